"""One party of the two-party protocol: the model owner (rank 0), the client (rank 1), or the dealer (rank 2).

The owner holds the weights and the plan, the client holds the images, and the dealer (CrypTen's trusted
third party, ``provider='TTP'``) deals the multiplication triples. They meet over timm-mpc's links (:mod:`..links`):
the owner listens at the rendezvous address, the dealer at its own; over TLS with every peer's certificate identity
pinned (``security``), or in plaintext on loopback only. Each pair then proves it holds the run's secret
(:mod:`.admission`). The owner sends the public plan to the client, the client checks its images
against it before sharing anything, both share their secrets and run the plan, and the owner sends its
share of the logits to the client alone, which adds the two shares. Every wait is bounded by the
settings' timeout.
"""
import json
import math
import sys
import threading
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...profile import CostMeter, CostProfile
from ..admission import admit, check_secret
from ..errors import DealerError, PeerError
from ..links import FRAME_LIMIT, LinkSecurity, connect_links, parse_address, parse_rendezvous
from ..plan import SecurePlan, check_images
from ..protocol import (
    DEALER, ROLES, OwnerLimits, PartyResult, SessionLink, agree, batch_sizes, bound_batches, checked_batches,
    client_inputs, decode_json, lost_peer, watchdog,
)
from ..secure_vit import CLIENT, OWNER, SecureViT
from ..settings import SecureSettings
from .backend import CryptenBackend
from .compat import apply_settings, import_crypten, start_crypten
from .dealer import DealerLink, serve_dealer, verify_dealer
from .dry_run import dry_run
from .offline import mask_requests, prefetch, prefetch_keys
from .ops import reveal_to

__all__ = ['run_owner', 'run_client', 'run_dealer']


def _first_line(error: BaseException) -> str:
    """An error's message without a C++ stack trace it may carry."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(('frame #', 'Exception raised from'))]
    return lines[0] if lines else type(error).__name__


def dealer_address(rendezvous: str, dealer: Optional[str]) -> Tuple[str, int]:
    """Where the dealer listens: ``dealer`` (``HOST:PORT``), by default the rendezvous host at the next port."""
    if dealer is not None:
        return parse_address(dealer, 'the dealer\'s address')
    host, port = parse_rendezvous(rendezvous)
    return host, port + 1


def _init(rank: int, rendezvous: str, settings: SecureSettings, secret: bytes,
          on_timeout: Optional[Callable[[str], None]] = None, dealer: Optional[str] = None,
          security: Optional[LinkSecurity] = None) -> Any:
    """Meet the other party (and the dealer) within ``settings.timeout_s`` over links of this party's own
    (:func:`~timm_mpc.secure.links.connect_links`: TLS with ``security``, else plaintext on loopback), and admit each
    of them by the run's ``secret`` (:mod:`.admission`); return the initialized ``crypten``."""
    check_secret(secret)
    owner = parse_rendezvous(rendezvous)
    world = 3 if settings.dealer else 2
    dealer_at = dealer_address(rendezvous, dealer) if world == 3 else None
    crypten = import_crypten()
    apply_settings(settings, crypten)
    others = 'the two parties' if rank == DEALER else 'the other party' + (' and the dealer' if settings.dealer else '')
    message = f'could not meet {others} at {rendezvous} within {settings.timeout_s:.0f} s'
    with watchdog(settings.timeout_s + 5, f'{message} (no answer)', on_timeout):
        try:
            links = connect_links(rank, world, owner, dealer_at, security, settings.timeout_s, admission=True)
        except ValueError:
            raise
        except (PeerError, OSError) as e:
            raise PeerError(f'{message} ({e})') from e
        try:
            start_crypten(crypten, links, 2, partial(_admit_peers, crypten, rank, secret, settings))
        except BaseException:  # a peer refused at admission: this party's links close with the error
            _release(crypten, failed=True, seconds=settings.timeout_s)
            raise
    return crypten


def _admit_peers(crypten: Any, rank: int, secret: bytes, settings: SecureSettings) -> None:
    """Each pair of this run's processes proves, both ways, that it holds ``secret``, before anything else passes."""
    comm = crypten.communicator.get()
    world = 3 if settings.dealer else 2
    for first, second in ((OWNER, CLIENT), (OWNER, DEALER), (CLIENT, DEALER)):
        if rank not in (first, second) or second >= world:
            continue
        peer = second if rank == first else first
        admit(lambda data, peer=peer: comm.send_tensor(peer, torch.frombuffer(bytearray(data), dtype=torch.uint8)),
              lambda size, peer=peer: comm.recv_tensor(peer, torch.empty(size, dtype=torch.uint8)).numpy().tobytes(),
              secret, ROLES[rank], ROLES[peer], first=rank == first)
        comm.links.admitted(peer)


def _exchange_json(crypten: Any, obj: Optional[Any], src: int) -> Any:
    """Send a JSON value from ``src`` to the other party (JSON, never pickle: the peer is not trusted to run code)."""
    comm = crypten.communicator.get()
    if comm.get_rank() == src:
        data = json.dumps(obj).encode()
        comm.send_frame(1 - src, data)
    else:
        data = comm.recv_frame(src, FRAME_LIMIT)  # a deviating peer's size: refused before any allocation
    return decode_json(data, ROLES[src])


def _next_batches(crypten: Any, rank: int, plan: SecurePlan, settings: SecureSettings,
                  request: Optional[Dict[str, Any]], clamp: bool,
                  limits: Optional[OwnerLimits]) -> Tuple[Optional[torch.Tensor], Optional[List[int]]]:
    """A session's next request: the client's checked images and its batch sizes, which it tells the owner, who
    checks them against its limits (None, None: the session ends)."""
    images, sent = None, None
    if rank == CLIENT and request is not None:
        images = check_images(plan, request['images'], clamp=clamp)
        sent = batch_sizes(int(images.shape[0]), request.get('batch_size'))
    batches = _exchange_json(crypten, sent, CLIENT)
    if batches is None:
        return None, None
    batches = checked_batches(batches, 'request')
    bound_batches(partial(_exchange_json, crypten), rank, batches, plan, settings, limits)
    return images, batches


def _run(rank: int, rendezvous: str, settings: SecureSettings, secret: bytes, plan: Optional[SecurePlan],
         state_dict: Optional[Dict[str, torch.Tensor]], images: Optional[torch.Tensor], clamp: bool = False,
         log: Optional[Callable[[str], None]] = None, on_timeout: Optional[Callable[[str], None]] = None,
         requests: Optional[Dict[int, List[Any]]] = None, batch_size: Optional[int] = None,
         on_batch: Optional[Callable[[int], None]] = None,
         on_layer: Optional[Callable[[], None]] = None, session: Optional[SessionLink] = None,
         limits: Optional[OwnerLimits] = None, dealer: Optional[str] = None,
         security: Optional[LinkSecurity] = None) -> PartyResult:
    crypten = _init(rank, rendezvous, settings, secret, on_timeout, dealer, security)
    comm = crypten.communicator.get()
    if log is not None:
        log(f'{ROLES[rank]}: connected to the other party; running the protocol')
    link = DealerLink(comm) if settings.dealer and rank == OWNER else None
    try:
        dealer = None if link is None else link.tally
        plan, images, batches = agree(partial(_exchange_json, crypten), rank, settings, plan, images, clamp, batch_size,
                                      limits)
        checked = settings.dealer and settings.offline_phase  # the dealer serves what the client approved
        requests = {**(requests or {})}
        from crypten.mpc.provider.ttp_provider import TTPClient
        if link is not None:
            ttp = TTPClient.get()
            ttp.ttp_request = link.live  # offline_phase=False (insecure): one request at a time, during the inference
        # the weights are shared once; then the batches run one after another in this session
        program = SecureViT(plan, settings, CostMeter(comm, dealer), state_dict, CryptenBackend())
        program.on_layer = on_layer
        first = True
        while True:
            setup = mask_requests(plan, settings) if first else []  # the session's weight masks, on its first call
            if checked:  # before any image: the owner's dry runs (cached), the dealer's digest checked by the client
                _approve_dealer(crypten, rank, plan, settings, batches, requests, link, log, setup)
            if setup:
                if checked and link is not None:
                    prefetch(ttp, link, setup)
                program.mask_weights()
            logits, profile, start = [], None, 0
            for index, size in enumerate(batches):
                if checked and link is not None:  # this batch's triples, fetched before its images are shared
                    prefetch(ttp, link, requests[size])
                elif checked and settings.fss_comparisons:  # the client's comparison keys, as the dealer serves them
                    prefetch_keys(TTPClient.get(), comm, requests[size])
                if index or not first:  # the profile is the first batch's; the dealer's tally the session's first
                    program.meter = CostMeter(comm)
                meter = program.meter
                patches = program.share_images(None if images is None else images[start:start + size], size)
                # the online phase starts when both parties are ready: the client does not time the owner's offline phase
                _exchange_json(crypten, 'online', OWNER)
                with meter.inference():
                    shared = program.forward(patches)
                    with meter.section('head', 'reveal'):
                        logits.append(reveal_to(shared, CLIENT, comm))
                start += size
                if index == 0:
                    profile = _merged_profile(crypten, rank, meter.profile, dealer if first else None)
                if on_batch is not None:
                    on_batch(size)
            plain = None if rank == OWNER else torch.cat(logits)
            result = PartyResult(rank, plain, profile, plan, [] if plain is None else plan.implausible(plain))
            if session is None:
                return result
            session.deliver(result)
            request = session.next_request(None if link is None else link.keepalive, settings.timeout_s / 4)
            if request is not None:
                requests.update(request.get('requests') or {})
            images, batches = _next_batches(crypten, rank, plan, settings, request, clamp, limits)
            if batches is None:
                return result
            first = False
    except BaseException as e:
        if link is not None:  # the dealer ends with an error too, not as after a finished protocol
            link.abort(f'{type(e).__name__}: {_first_line(e)}')
        if not isinstance(e, RuntimeError) or isinstance(e, PeerError):
            raise
        if lost_peer(str(e)):
            raise PeerError(f'lost the other party (the {ROLES[1 - rank]}) during the protocol '
                            f'({type(e).__name__}: {_first_line(e)})') from e
        raise
    finally:
        _release(crypten, failed=sys.exc_info()[0] is not None, seconds=settings.timeout_s)


def _release(crypten: Any, failed: bool, seconds: float) -> None:
    """CrypTen's teardown (the links' closing). After a failure it is bounded (``seconds`` at most, 5 s at most): the
    error must reach the caller first; a teardown still running then is left to the process's end."""
    def uninit() -> None:
        try:
            crypten.uninit()
        except Exception:  # the peer may be gone already; nothing left to release
            pass
    if not failed:
        uninit()
        return
    worker = threading.Thread(target=uninit, daemon=True)
    worker.start()
    worker.join(min(seconds, 5.0))


def _approve_dealer(crypten: Any, rank: int, plan: SecurePlan, settings: SecureSettings, batches: List[int],
                    requests: Dict[int, List[Any]], link: Optional[DealerLink], log: Optional[Callable[[str], None]],
                    setup: List[Any]) -> None:
    """The dealer requests of this call, agreed before the client shares an image: the owner records them (dry runs,
    cached) and commits them to the dealer, after the session's ``setup`` requests on its first call (the weights'
    masks, from the plan); the client derives them from its own copy of the plan and checks the dealer's digest of
    the committed ones; both learn the client's verdict. Raises on a refusal or a difference."""
    t0 = time.perf_counter()
    for size in sorted(set(batches) - set(requests)):
        requests[size] = dry_run(plan, settings, size).requests
    call = list(setup) + [request for size in batches for request in requests[size]]
    verdict: Optional[str] = None
    if rank == OWNER:
        link.tally['record_s'] = time.perf_counter() - t0
        if log is not None:  # what the client's batches will cost, before any image is shared
            log(f'owner: {dry_run(plan, settings, batches[0]).summary()} (dry run)')
        link.commit(call)
    # the owner says it committed: a client whose owner is gone learns it here, not from the dealer's wait on the owner
    _exchange_json(crypten, 'committed' if rank == OWNER else None, OWNER)
    if rank == CLIENT:
        try:
            verify_dealer(crypten.communicator.get(), call)
            verdict = 'approved'
            if log is not None:
                log(f'client: the dealer serves the {len(call)} requests of the plan, nothing else; sharing the images')
        except DealerError as e:
            verdict, refusal = str(e), e
    verdict = _exchange_json(crypten, verdict, CLIENT)
    if verdict != 'approved':
        if rank == CLIENT:
            raise refusal
        raise DealerError(f'the client stopped before sharing its images: {str(verdict)[:300]}')


def _merged_profile(crypten: Any, rank: int, profile: CostProfile, dealer: Optional[Dict[str, float]]) -> CostProfile:
    """Each party counted only what it sent: add the other party's bytes; the owner tells the dealer's cost."""
    mine = dict(rows=[r.bytes for r in profile.rows], setup=[r.bytes for r in profile.setup], dealer=dealer,
                dealer_s=[r.dealer_s for r in profile.rows] if dealer else None)
    owner_part = _exchange_json(crypten, mine if rank == OWNER else None, OWNER)
    client_part = _exchange_json(crypten, mine if rank == CLIENT else None, CLIENT)
    other = client_part if rank == OWNER else owner_part
    _check_counters(other, ROLES[1 - rank], len(profile.rows), len(profile.setup))
    return CostProfile.merge_parties(profile, other['rows'], other['setup'], owner_part['dealer'],
                                     owner_part['dealer_s'])


def _check_counters(part: Any, peer: str, rows: int, setup: int) -> None:
    """The other party's cost counters as the protocol sends them: non-negative finite numbers, one per row (and
    the dealer's tally, from the owner), or PeerError."""
    def numbers(values: Any, count: Optional[int]) -> bool:
        return isinstance(values, list) and (count is None or len(values) == count) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values)
    dealer = part.get('dealer') if isinstance(part, dict) else None
    if not (isinstance(part, dict) and numbers(part.get('rows'), rows) and numbers(part.get('setup'), setup)
            and (dealer is None or isinstance(dealer, dict) and numbers(list(dealer.values()), None))
            and (part.get('dealer_s') is None or numbers(part.get('dealer_s'), rows))):
        raise PeerError(f'the {peer} sent cost counters that are not {rows} and {setup} non-negative numbers '
                        f'(and the dealer\'s tally): {str(part)[:120]}')


def run_owner(rendezvous: str, plan: SecurePlan, state_dict: Dict[str, torch.Tensor],
              settings: SecureSettings, secret: bytes, log: Optional[Callable[[str], None]] = None,
              on_timeout: Optional[Callable[[str], None]] = None,
              requests: Optional[Dict[int, List[Any]]] = None, session: Optional[SessionLink] = None,
              limits: Optional[OwnerLimits] = None, dealer: Optional[str] = None,
              security: Optional[LinkSecurity] = None) -> PartyResult:
    """Run party 0, the model owner: contributes the weights and the plan, learns nothing but the costs (and the
    sizes of the client's batches).

    It listens at ``rendezvous`` (``tcp://HOST:PORT``) for the client and reaches the dealer at ``dealer``
    (``HOST:PORT``; default: the rendezvous host, the next port). ``security``: TLS for every link, with the identities
    this party accepts of the client and the dealer (:class:`~timm_mpc.secure.links.LinkSecurity`); None: plaintext,
    on loopback only.

    ``secret``: the run's secret, which every party proves it holds before anything is shared (:mod:`.admission`).
    ``on_timeout`` reports why the process ends when the rendezvous does not complete in time (default: a
    line on stderr); the process then exits with code 2. ``requests``: batch size -> the dealer requests of one
    inference at that size (:func:`timm_mpc.secure.crypten.dry_run.dry_run`); sizes the client asks for that are
    missing are recorded here once they are known. ``session``: serve a session's further requests (see
    :class:`SessionLink`); the result returned is its last. ``limits``: what the owner accepts of the client's
    batches (:class:`OwnerLimits`), refused before any dry run.
    """
    plan.check()
    settings.warn_if_insecure()
    return _run(OWNER, rendezvous, settings, secret, plan, state_dict, None, log=log, on_timeout=on_timeout,
                requests=requests, session=session, limits=limits, dealer=dealer, security=security)


def run_client(rendezvous: str, images: torch.Tensor, settings: SecureSettings, secret: bytes,
               log: Optional[Callable[[str], None]] = None, clamp: bool = False,
               on_timeout: Optional[Callable[[str], None]] = None, batch_size: Optional[int] = None,
               on_batch: Optional[Callable[[int], None]] = None,
               on_layer: Optional[Callable[[], None]] = None, session: Optional[SessionLink] = None,
               requests: Optional[Dict[int, List[Any]]] = None, dealer: Optional[str] = None,
               security: Optional[LinkSecurity] = None) -> PartyResult:
    """Run party 1, the client: contributes the images and alone receives the logits. ``secret``, ``dealer`` and
    ``security``: as for :func:`run_owner` (the client reaches the owner at ``rendezvous`` and the dealer at
    ``dealer``; it listens nowhere).

    The images are checked before connecting (a finite float tensor of four dimensions) and against the
    owner's plan (shape, public input bounds) before anything is shared; with ``clamp`` values outside the
    bounds are clamped to them instead of refused. With ``batch_size`` they run that many at a time, one batch
    after another in the same session (the weights are shared once); ``on_batch(n)`` is called after each, and
    ``on_layer()`` after each block and the head of each batch (:meth:`SecureViT.layer_steps` per batch).
    The cost profile is the first batch's. ``session``: serve a session's further requests (:class:`SessionLink`).
    Before sharing the images the client checks that the dealer serves exactly the requests its own copy of the
    plan makes: ``requests`` (batch size -> those of one inference, as :func:`~.dry_run.dry_run` records them) for
    the sizes it has, a dry run here for the others.
    """
    images = client_inputs(images, settings, batch_size)
    return _run(CLIENT, rendezvous, settings, secret, None, None, images, clamp=clamp, log=log, on_timeout=on_timeout,
                requests=requests, batch_size=batch_size, on_batch=on_batch, on_layer=on_layer, session=session,
                dealer=dealer, security=security)


def run_dealer(rendezvous: str, settings: SecureSettings, secret: bytes,
               on_timeout: Optional[Callable[[str], None]] = None, dealer: Optional[str] = None,
               security: Optional[LinkSecurity] = None) -> None:
    """Run the dealer of multiplication triples (``provider='TTP'``), rank 2, until the owner is done. It listens at
    ``dealer`` (``HOST:PORT``; default: the rendezvous host, the next port) for both parties; ``security`` as for
    :func:`run_owner`.

    The dealer must be neither party: it knows every triple, so together with either party it would open
    the other party's inputs. It sees only the sizes of the triples it is asked for, and serves only the requests
    the client approved (:mod:`.dealer`), after both proved they hold the run's ``secret``.

    Raises:
        DealerError: the owner asked for anything else, the client refused the owner's requests, or a party was lost
            before the protocol ended.
    """
    if not settings.dealer:
        raise ValueError(f'the dealer (rank 2) serves CrypTen with provider TTP; these settings use '
                         f'{settings.engine} with provider {settings.provider}')
    crypten = _init(DEALER, rendezvous, settings, secret, on_timeout, dealer, security)
    from crypten.mpc.provider.ttp_provider import TTPServer
    comm = crypten.communicator.get()
    # CrypTen's dealer functions and its seeding of the parties' generators, without its loop (which runs any name)
    server = TTPServer.__new__(TTPServer)
    server.ttp_group, server.comm_group, server.device = comm.ttp_group, comm.ttp_comm_group, 'cpu'
    server._setup_generators()
    serve_dealer(server, settings, comm)
