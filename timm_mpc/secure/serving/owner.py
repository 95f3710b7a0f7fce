"""The model owner as a long-running service (``timm-mpc serve``): the plan built and calibrated once, one secure
session per client, each in an owner process of its own (:func:`~.own_process.run_owner`), so that CrypTen's global
state and a crash stay inside it.

A client asks over a control connection (:mod:`.control`, :mod:`.query`) for a session of so many images. The
service refuses what its limits do not allow (:class:`ServiceLimits`: images per session and per batch, images per
client identity over the service's life, against model extraction), queues the rest behind the sessions running (at
most ``max_sessions``, and within ``max_memory`` for the service and its sessions together, each session reserving the
predicted memory of its batch's dry run), and tells a waiting client its place while it waits. A session's turn: the
dealer's service starts the session's dealer (:mod:`.dealer`), the service starts the session's owner
process, which pins this client and that dealer on its links, and tells the client where to meet them with the
session's secret. A client that dies, stalls or breaks the protocol ends its own session only: its owner process
ends within the settings' timeout, and the service goes on.
"""
import os
import threading
from multiprocessing import forkserver
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..admission import new_secret
from ..crypten.dry_run import dry_run
from ..errors import PeerError
from ..launch import dealer_requests
from ..links import LinkSecurity, connect_to, parse_address
from ..memory import format_bytes, line_peak, tree_rss
from ..own_process import run_owner
from ..plan import SecurePlan
from ..processes import process_context
from ..protocol import DEALER, OwnerLimits
from ..secure_vit import CLIENT, OWNER
from ..settings import SecureSettings
from .control import CONTROL_VERSION, offered_field, recv_message, refuse, send_message
from .service import HANDSHAKE_S, Service, log_line

__all__ = ['OwnerService', 'ServiceLimits', 'SessionRecord']

KEEPALIVE_S = 5.0  # a waiting client hears its place at least this often


@dataclass(frozen=True)
class ServiceLimits:
    """What the owner's service allows. ``max_sessions``: sessions at once (the rest wait in turn);
    ``max_memory``: bytes for the service and its sessions together (None: no bound); ``max_images_per_client``: images
    a client identity may have predicted over the service's life (None: no bound); ``max_images`` and
    ``max_batch_size``: of one session; ``queue_timeout_s``: the longest a client waits for its turn;
    ``max_waiting``: clients waiting at once (more are refused)."""
    max_sessions: int = 2
    max_memory: Optional[int] = None
    max_images_per_client: Optional[int] = None
    max_images: int = 1024
    max_batch_size: int = 32
    queue_timeout_s: float = 600.0
    max_waiting: int = 64

    def __post_init__(self) -> None:
        for name in ('max_sessions', 'max_images', 'max_batch_size', 'max_waiting', 'max_memory',
                     'max_images_per_client'):
            value = getattr(self, name)
            if value is None and name in ('max_memory', 'max_images_per_client'):
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f'{name} must be a whole number of at least 1, got {value!r}')
        if not self.queue_timeout_s > 0:
            raise ValueError(f'queue_timeout_s must be a positive number of seconds, got {self.queue_timeout_s!r}')


@dataclass
class SessionRecord:
    """One session as the service saw it: its client's identity, its images, how long it waited for its turn and
    ran, and how it ended (``error`` None: the client got its logits)."""
    number: int
    client: str
    images: int
    waited_s: float
    run_s: float
    error: Optional[str]


@dataclass(eq=False)
class _Ticket:
    client: str
    images: int
    batch_size: Optional[int]
    largest: int  # its largest batch
    reserve: int
    arrived: float


class OwnerService(Service):
    """The owner's service at ``listen`` (``HOST:PORT``) for ``plan`` and its weights (``state_dict``:
    :meth:`SecurePlan.owner_weights`), with private CrypTen ``settings``; the dealer's service at ``dealer``
    (``HOST:PORT``). ``security``: the owner's certificate, the identities of the clients it serves
    (``expect['client']``) and of the dealer (``expect['dealer']``)."""

    name = 'owner'
    peer_rank = CLIENT

    def __init__(self, plan: SecurePlan, state_dict: Dict[str, torch.Tensor], settings: SecureSettings, listen: str,
                 dealer: str, security: LinkSecurity, limits: ServiceLimits = ServiceLimits(),
                 log: Callable[[str], None] = log_line, session_ports: Optional[range] = None) -> None:
        plan.check()
        if not (settings.secure and settings.dealer):
            raise ValueError('the owner\'s service runs private CrypTen sessions only: provider TTP (a dealer outside '
                             'both parties) with its offline phase')
        security.require(['client', 'dealer'])
        super().__init__(listen, security, log, session_ports)
        self.plan, self.state_dict, self.settings, self.limits = plan, state_dict, settings, limits
        self.dealer = parse_address(dealer, '--dealer')
        self.records: List[SessionRecord] = []
        self.base_memory = 0
        self._line: Dict[int, int] = {}  # images -> predicted peak of the dry run (1 and 2)
        self._turns = threading.Condition()
        self._waiting: List[_Ticket] = []
        self._reserved: Dict[int, int] = {}  # running session -> its memory reserve
        self._used: Dict[str, int] = {}  # client identity -> images granted
        self._started = 0

    def _dry_peak(self, batch: int) -> int:
        """Both processes of the dry run of ``batch`` images at their peak (predicted on the line through one and two
        images, read once at :meth:`start`): what a session reserves. Its owner process alone needs less."""
        return line_peak(self._line.__getitem__, batch)

    def start(self) -> 'OwnerService':
        """Make the dry runs of one and two images (cached), measure the service's own memory (with the server its
        sessions' processes fork from), then listen."""
        # the line a request's reserve is read from, ready before any client waits on it (not re-read per request)
        self._line = {n: sum(dry_run(self.plan, self.settings, n).peak_rss) for n in (1, 2)}
        one = self._dry_peak(1)
        process_context()
        forkserver.ensure_running()  # the sessions' processes fork from it: part of the service's memory from now
        self.base_memory = tree_rss(os.getpid())
        bound = self.limits.max_memory
        if bound is not None and self.base_memory + one > bound:
            raise ValueError(f'the service needs {format_bytes(self.base_memory)} and one session of one image about '
                             f'{format_bytes(one)}: more than max_memory {format_bytes(bound)}')
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        with self._turns:
            self._turns.notify_all()  # the waiting clients are told and leave

    def handle(self, sock: Any, client: str, where: str) -> None:
        peer = f'client {client}'
        message = recv_message(sock, peer, HANDSHAKE_S)
        try:
            ticket = self._ticket(message, client)
        except PeerError as e:
            self.log(f'owner: refused {peer} ({where}): {e}')
            refuse(sock, str(e))
            return
        number, handed = None, False
        try:
            number = self._wait_turn(sock, ticket)
            offer = self._start(number, ticket, self._prepare(sock, ticket))
            handed = True  # the session's thread holds the slot now, and frees it
            send_message(sock, offer)
        except PeerError as e:
            self.log(f'owner: {peer} ({where}) got no session: {e}')
            refuse(sock, str(e))
        except OSError as e:
            if not handed:
                raise
            self.log(f'owner: {peer} ({where}) left before its offer ({e}); its session ends within the timeout')
        finally:
            if not handed:
                self._end(number, ticket, ran=False)

    def _ticket(self, message: Dict[str, Any], client: str) -> _Ticket:
        """The client's request checked against the limits, its images granted to its identity; PeerError naming
        what is refused."""
        if message.get('kind') != 'query' or message.get('version') != CONTROL_VERSION:
            raise PeerError(f'not a request for a session of version {CONTROL_VERSION}: {str(message)[:200]}')
        images = offered_field(message, 'images', int, 'client')
        batch_size = offered_field(message, 'batch_size', int, 'client', required=False)
        if images < 1 or batch_size is not None and batch_size < 1:
            raise PeerError(f'a session of {images} images in batches of {batch_size or "all"}: both must be at '
                            f'least 1')
        if images > self.limits.max_images:
            raise PeerError(f'{images} images; the service accepts at most {self.limits.max_images} per session')
        largest = min(batch_size or images, images)
        if largest > self.limits.max_batch_size:
            raise PeerError(f'a batch of {largest} images; the service accepts at most {self.limits.max_batch_size} '
                            f'per batch (ask for a smaller batch size)')
        reserve = self._dry_peak(largest)
        bound = self.limits.max_memory
        if bound is not None and self.base_memory + reserve > bound:
            raise PeerError(f'a batch of {largest} images needs about {format_bytes(reserve)}; the service\'s memory '
                            f'bound of {format_bytes(bound)} leaves {format_bytes(bound - self.base_memory)} to a '
                            f'session: ask for smaller batches')
        with self._turns:
            if self.stopping.is_set():
                raise PeerError('the service is stopping')
            used, most = self._used.get(client, 0), self.limits.max_images_per_client
            if most is not None and used + images > most:
                raise PeerError(f'client {client} was granted {used} of its {most} images already; {images} more '
                                f'exceed them')
            if len(self._waiting) >= self.limits.max_waiting:
                raise PeerError(f'{len(self._waiting)} clients wait already, the most the service queues; try again '
                                f'later')
            self._used[client] = used + images
            ticket = _Ticket(client, images, batch_size, largest, reserve, time.monotonic())
            self._waiting.append(ticket)
        return ticket

    def _fits(self, ticket: _Ticket) -> bool:
        if len(self._reserved) >= self.limits.max_sessions:
            return False
        bound = self.limits.max_memory
        return bound is None or self.base_memory + sum(self._reserved.values()) + ticket.reserve <= bound

    def _wait_turn(self, sock: Any, ticket: _Ticket) -> int:
        """Wait in turn (first come, first served) until the session fits; tell the client its place meanwhile.
        Returns the session's number; PeerError if the service stops, the wait passes its bound or the client
        leaves."""
        told = None
        while True:
            with self._turns:
                if self.stopping.is_set():
                    raise PeerError('the service is stopping')
                if self._waiting[0] is ticket and self._fits(ticket):
                    self._waiting.pop(0)
                    self._started += 1
                    self._reserved[self._started] = ticket.reserve
                    self._turns.notify_all()
                    return self._started
                waited = time.monotonic() - ticket.arrived
                if waited > self.limits.queue_timeout_s:
                    raise PeerError(f'waited {waited:.0f} s for a session, the service\'s bound')
                place = self._waiting.index(ticket) + 1
                if told is not None and told[0] == place and time.monotonic() - told[1] < KEEPALIVE_S:
                    self._turns.wait(KEEPALIVE_S)
                    continue
            try:
                send_message(sock, dict(status='queued', position=place))
            except OSError as e:
                raise PeerError(f'the client left while it waited ({e})') from None
            told = (place, time.monotonic())

    def _prepare(self, sock: Any, ticket: _Ticket) -> Optional[Dict[int, List[Any]]]:
        """The dealer requests of the session's batch sizes (dry runs, cached), made before the session's owner
        listens; the client hears that the owner prepares meanwhile. PeerError if the client leaves."""
        outcome: Dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome['requests'] = dealer_requests(self.plan, self.settings, ticket.images, ticket.batch_size)
            except Exception as e:  # reported to the client below
                outcome['error'] = e
            finally:
                done.set()
        threading.Thread(target=work, daemon=True).start()
        left = None
        while not done.wait(KEEPALIVE_S):
            if left is None:
                try:
                    send_message(sock, dict(status='preparing'))
                except OSError as e:
                    left = e  # the slot stays held until the dry run ends: its processes are in the reserve
        if left is not None:
            raise PeerError(f'the client left while the owner prepared its session ({left})')
        if 'error' in outcome:
            raise PeerError(f'the owner could not prepare the session: {outcome["error"]}')
        return outcome['requests']

    def _start(self, number: int, ticket: _Ticket, requests: Optional[Dict[int, List[Any]]]) -> Dict[str, Any]:
        """The session's dealer (asked of the dealer's service) and owner process; the offer the client gets. Once
        this returns, the session's thread holds the slot."""
        secret = new_secret()
        port = self.session_port()
        try:
            rendezvous = f'tcp://{self.address[0]}:{port}'
            dealer, identity = self._dealer_session(ticket.client, secret, rendezvous)
            security = replace(self.security, expect=dict(client=(ticket.client,), dealer=(identity,)))
            self.run_session(self._run, number, ticket, rendezvous, secret, dealer, security, requests, port)
        except BaseException:
            self.release_port(port)
            raise
        return dict(status='start', session=number, rendezvous=rendezvous, dealer=dealer, secret=secret.hex(),
                    settings=self.settings.to_dict())

    def _dealer_session(self, client: str, secret: bytes, rendezvous: str) -> Tuple[str, str]:
        """Ask the dealer's service for a session; the address of the session's dealer and the dealer's identity,
        or PeerError."""
        where = f'{self.dealer[0]}:{self.dealer[1]}'
        try:
            sock, identity = connect_to(OWNER, DEALER, self.dealer, self.security, time.monotonic() + HANDSHAKE_S)
            with sock:
                send_message(sock, dict(kind='session', version=CONTROL_VERSION, secret=secret.hex(), client=client,
                                        rendezvous=rendezvous, settings=self.settings.to_dict()))
                answer = recv_message(sock, 'dealer', HANDSHAKE_S)
            if answer.get('status') != 'ready':
                raise PeerError(f'it refused: {str(answer.get("reason", answer))[:300]}')
            address = offered_field(answer, 'dealer', str, 'dealer')
            parse_address(address, 'the dealer\'s session address')
        except (PeerError, OSError, ValueError) as e:
            raise PeerError(f'the dealer\'s service at {where} gave no session: {e}') from None
        return address, identity

    def _run(self, number: int, ticket: _Ticket, rendezvous: str, secret: bytes, dealer: str,
             security: LinkSecurity, requests: Optional[Dict[int, List[Any]]], port: int) -> None:
        what = f'owner: session {number} (client {ticket.client}, {ticket.images} images)'
        started, error = time.monotonic(), None
        self.log(f'{what}: started after {started - ticket.arrived:.1f} s in turn; owner at '
                 f'{rendezvous[len("tcp://"):]}, dealer at {dealer}')
        try:
            result = run_owner(rendezvous, self.plan, self.state_dict, self.settings, secret, requests=requests,
                               limits=OwnerLimits(ticket.largest, ticket.images), dealer=dealer,
                               security=security)
            self.log(f'{what}: done in {time.monotonic() - started:.1f} s; {result.profile.rounds} rounds, '
                     f'{result.profile.bytes / 1e6:.1f} MB per batch')
        except Exception as e:  # the session's end; the service goes on
            error = f'{type(e).__name__}: {e}'
            self.log(f'{what}: failed after {time.monotonic() - started:.1f} s: {error[:500]}')
        finally:
            self.release_port(port)
            self.records.append(SessionRecord(number, ticket.client, ticket.images, started - ticket.arrived,
                                              time.monotonic() - started, error))
            self._end(number, ticket, ran=True)

    def _end(self, number: Optional[int], ticket: _Ticket, ran: bool) -> None:
        """The session's slot is free; a session that never ran gives its images back to its client (one that ran
        keeps them counted, finished or not)."""
        with self._turns:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            if number is not None:
                self._reserved.pop(number, None)
            if not ran:
                self._used[ticket.client] -= ticket.images
            self._turns.notify_all()
