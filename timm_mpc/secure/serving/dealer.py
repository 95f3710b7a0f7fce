"""The dealer as a long-running service (``timm-mpc dealer``): it serves the sessions of the owners it accepts, each
in a dealer process of its own (:func:`~.own_process.run_dealer`) at a port of its own.

An owner's service asks for a session over a control connection (:mod:`.control`): the session's secret, the
certificate identity of its client, where the owner listens and the settings. The dealer refuses a client it does
not accept itself (``expect['client']``), settings that are not private, and more than ``max_sessions`` at once; it
then starts the session's dealer, which pins this owner and that client on its links, and answers with the
session's address. The dealer learns what a dealer of one run learns (the sizes of what it deals), and which client
each session is for.
"""
import threading
from dataclasses import replace
from typing import Any, Callable, Dict, Optional

from ..admission import check_secret
from ..errors import PeerError
from ..links import LinkSecurity, parse_rendezvous
from ..own_process import run_dealer
from ..secure_vit import OWNER
from .control import CONTROL_VERSION, offered_field, offered_settings, recv_message, refuse, send_message
from .service import HANDSHAKE_S, Service, log_line

__all__ = ['DealerService']


class DealerService(Service):
    """The dealer's service at ``listen`` (``HOST:PORT``). ``security``: its certificate, and the identities it
    accepts of owners (``expect['owner']``) and of their clients (``expect['client']``). At most ``max_sessions``
    at once; each session's waits are bounded by the owner's timeout, at most ``timeout_s``."""

    name = 'dealer'
    peer_rank = OWNER

    def __init__(self, listen: str, security: LinkSecurity, max_sessions: int = 8, timeout_s: float = 120.0,
                 log: Callable[[str], None] = log_line, session_ports: Optional[range] = None) -> None:
        security.require(['owner', 'client'])
        if not (isinstance(max_sessions, int) and max_sessions >= 1):
            raise ValueError(f'max_sessions must be a whole number of at least 1, got {max_sessions!r}')
        super().__init__(listen, security, log, session_ports)
        self.max_sessions, self.timeout_s = max_sessions, timeout_s
        self.sessions = 0  # started so far
        self._admitting = threading.Lock()

    def handle(self, sock: Any, owner: str, where: str) -> None:
        message = recv_message(sock, 'owner', HANDSHAKE_S)
        try:
            with self._admitting:  # the count of sessions checked and the new one started at once
                session = self._session(message, owner)
                port = self.session_port()
                self.sessions += 1
                address = f'{self.address[0]}:{port}'
                security = replace(self.security, expect=dict(owner=(owner,), client=(session['client'],)))
                self.run_session(self._run, self.sessions, session, address, security, owner, port)
        except PeerError as e:
            self.log(f'dealer: refused a session of owner {owner} ({where}): {e}')
            refuse(sock, str(e))
            return
        send_message(sock, dict(status='ready', dealer=address))

    def _session(self, message: Dict[str, Any], owner: str) -> Dict[str, Any]:
        """The session an owner asks for, checked; PeerError naming what is refused."""
        if message.get('kind') != 'session' or message.get('version') != CONTROL_VERSION:
            raise PeerError(f'not a request for a session of version {CONTROL_VERSION}: {str(message)[:200]}')
        if self.stopping.is_set():
            raise PeerError('the dealer is stopping')
        if self.running_sessions() >= self.max_sessions:
            raise PeerError(f'the dealer runs {self.max_sessions} sessions already (its --max-sessions); try again')
        client = offered_field(message, 'client', str, 'owner')
        if client not in self.security.expect['client']:
            raise PeerError(f'client {client!r} is not among the clients this dealer serves (its --expect-client)')
        try:
            secret = check_secret(bytes.fromhex(offered_field(message, 'secret', str, 'owner')))
            rendezvous = offered_field(message, 'rendezvous', str, 'owner')
            parse_rendezvous(rendezvous)
        except ValueError as e:
            raise PeerError(f'the owner\'s session: {e}') from None
        settings = offered_settings(message.get('settings'), 'owner', self.timeout_s)
        return dict(client=client, secret=secret, rendezvous=rendezvous, settings=settings)

    def _run(self, number: int, session: Dict[str, Any], address: str, security: LinkSecurity, owner: str,
             port: int) -> None:
        what = f'dealer: session {number} (owner {owner}, client {session["client"]}) at {address}'
        self.log(f'{what}: started')
        try:
            run_dealer(session['rendezvous'], session['settings'], session['secret'], dealer=address, security=security)
        except Exception as e:  # the session's end; the service goes on
            self.log(f'{what}: failed: {type(e).__name__}: {e}')
            return
        finally:
            self.release_port(port)
        self.log(f'{what}: done')
