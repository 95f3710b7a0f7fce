"""What the long-running services (:mod:`.owner`, :mod:`.dealer`) share: a listener, one thread per connection up to
:data:`MAX_CONNECTIONS` (a slow or hostile peer holds only its own, for :data:`HANDSHAKE_S` at most before it is
admitted), the TLS handshake with the peer's identity pinned, the sessions' threads, and a graceful stop (SIGTERM or
SIGINT: no new connection is taken, the sessions running finish, then the service ends; a second signal ends it at
once)."""
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Callable, List, Optional, Set

from .control import accept_control
from ..errors import PeerError
from ..links import LinkSecurity, listener_at, parse_address
from ..processes import free_port

__all__ = ['Service', 'HANDSHAKE_S', 'MAX_CONNECTIONS', 'log_line']

HANDSHAKE_S = 10.0  # a new connection's TLS handshake and hello, and each control message, at most
MAX_CONNECTIONS = 256  # connections answered at once (waiting clients included); more are closed at once
_POLL_S = 0.5  # how often the listener looks for a stop
_ACCEPT_RETRY_S = 1.0  # after the system refused an accept (out of descriptors): the service goes on


def log_line(message: str) -> None:
    print(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}', file=sys.stderr, flush=True)


class Service:
    """A TLS service at ``listen`` (``HOST:PORT``) for peers of rank :attr:`peer_rank`, pinned by ``security``:
    subclasses answer each admitted connection in :meth:`handle` (its own thread) and run sessions with
    :meth:`run_session`."""

    name = 'service'
    peer_rank = 1

    def __init__(self, listen: str, security: LinkSecurity, log: Callable[[str], None] = log_line,
                 session_ports: Optional[range] = None) -> None:
        self.address = parse_address(listen, '--listen')
        if session_ports is not None and not (isinstance(session_ports, range) and session_ports.step == 1 and
                                              1024 <= session_ports.start < session_ports.stop <= 65536):
            raise ValueError(f'session_ports must be a range of ports from 1024 to 65535, got {session_ports!r}')
        self.session_ports = session_ports
        self._ports: Set[int] = set()  # handed to sessions still running (each binds its own a moment later)
        self.security, self.log = security, log
        self.context = security.context(server=True)
        self.stopping = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self._sessions: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def start(self) -> 'Service':
        """Listen (an address that cannot be bound raises here, before anything else) and take connections."""
        self._listener = listener_at(self.address)
        self._listener.settimeout(_POLL_S)
        self._spawn(self._accept_loop, self._threads)
        return self

    @property
    def where(self) -> str:
        return f'{self.address[0]}:{self.address[1]}'

    def _spawn(self, target: Callable[..., None], into: List[threading.Thread], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            into[:] = [t for t in into if t.is_alive()]
            into.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if self.stopping.is_set():  # the listener closed
                    return
                self.log(f'{self.name}: could not accept a connection ({e}); going on')
                time.sleep(_ACCEPT_RETRY_S)
                continue
            if not self._connections.acquire(blocking=False):
                self.log(f'{self.name}: refused a connection: {peer[0]}:{peer[1]}: {MAX_CONNECTIONS} connections '
                         f'are answered already')
                sock.close()
                continue
            try:
                self._spawn(self._answer, self._threads, sock, f'{peer[0]}:{peer[1]}')
            except RuntimeError as e:  # no thread to be had
                self._connections.release()
                sock.close()
                self.log(f'{self.name}: refused a connection: {peer[0]}:{peer[1]}: {e}')

    def _answer(self, sock: socket.socket, where: str) -> None:
        try:
            try:
                tls, identity = accept_control(sock, self.context, self.peer_rank, self.security, where, HANDSHAKE_S)
            except (OSError, ssl.SSLError, RuntimeError) as e:
                self.log(f'{self.name}: refused a connection: {where}: {type(e).__name__}: {e}')
                sock.close()
                return
            with tls:
                try:
                    self.handle(tls, identity, where)
                except (OSError, ssl.SSLError, RuntimeError, ValueError) as e:  # its end; the service goes on
                    self.log(f'{self.name}: ended a connection: {where} ({identity}): {type(e).__name__}: {e}')
        finally:
            self._connections.release()

    def handle(self, sock: ssl.SSLSocket, identity: str, where: str) -> None:
        raise NotImplementedError

    def session_port(self) -> int:
        """A port of this service's host for a session's process to listen on: free now, in ``session_ports``
        (default: below the system's range for outgoing connections), and not handed to a session still running.
        PeerError when there is none."""
        with self._lock:
            for _ in range(64):
                try:
                    port = free_port(self.address[0], self.session_ports)
                except OSError:
                    break
                if port not in self._ports:
                    self._ports.add(port)
                    return port
        where = 'its --session-ports' if self.session_ports is not None else 'the ports it chooses from'
        raise PeerError(f'the {self.name}\'s service has no free port for a session in {where} now; try again')

    def release_port(self, port: int) -> None:
        with self._lock:
            self._ports.discard(port)

    def run_session(self, target: Callable[..., None], *args: object) -> None:
        """Run a session's ``target`` in a thread the graceful stop waits for."""
        self._spawn(target, self._sessions, *args)

    def running_sessions(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._sessions)

    def stop(self) -> None:
        """Take no new connection; the sessions running go on (:meth:`wait`)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self._listener is not None:
            self._listener.close()
        self.log(f'{self.name}: stopping: no new sessions; waiting for the {self.running_sessions()} running')

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        """Wait for the connections and sessions running to end (a connection may still start one); whether they
        all did within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                alive = [t for t in self._threads + self._sessions if t.is_alive()]
            if not alive:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            alive[0].join(_POLL_S)

    def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; a second signal ends the process at once."""
        def on_signal(*_: object) -> None:
            if self.stopping.is_set():
                self.log(f'{self.name}: a second signal: ending now, the sessions running with it')
                os._exit(1)
            self.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.start()
        self.log(f'{self.name}: listening at {self.where}')
        while not self.stopping.wait(_POLL_S):
            pass
        self.wait()
        self.log(f'{self.name}: stopped')
