"""What the long-running services (:mod:`.owner`, :mod:`.dealer`) share: a listener, one thread per
connection (a slow or hostile peer holds only its own), the sessions' threads, and a graceful stop (SIGTERM or
SIGINT: no new connection is taken, the sessions running finish, then the service ends)."""
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Callable, List, Optional

from ..links import LinkSecurity, listener_at, parse_address

__all__ = ['Service', 'HANDSHAKE_S', 'log_line']

HANDSHAKE_S = 10.0  # a new connection's TLS handshake and first message, at most
_POLL_S = 0.5  # how often the listener looks for a stop


def log_line(message: str) -> None:
    print(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}', file=sys.stderr, flush=True)


class Service:
    """A TLS service at ``listen`` (``HOST:PORT``): subclasses answer each connection in :meth:`handle` (its own
    thread) and run sessions with :meth:`run_session`."""

    name = 'service'

    def __init__(self, listen: str, security: LinkSecurity, log: Callable[[str], None] = log_line) -> None:
        self.address = parse_address(listen, '--listen')
        self.security, self.log = security, log
        self.context = security.context(server=True)
        self.stopping = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self._sessions: List[threading.Thread] = []
        self._lock = threading.Lock()

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
            except OSError:  # the listener closed: stopping
                return
            self._spawn(self._answer, self._threads, sock, f'{peer[0]}:{peer[1]}')

    def _answer(self, sock: socket.socket, where: str) -> None:
        try:
            self.handle(sock, where)
        except (OSError, ssl.SSLError, RuntimeError, ValueError) as e:  # that connection's end; the service goes on
            self.log(f'{self.name}: refused a connection: {where}: {type(e).__name__}: {e}')
        finally:
            sock.close()

    def handle(self, sock: socket.socket, where: str) -> None:
        raise NotImplementedError

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
        """Wait for the sessions (and connections) running to end; whether they all did within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in list(self._sessions) + list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._sessions)

    def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        self.start()
        self.log(f'{self.name}: listening at {self.where}')
        while not self.stopping.wait(_POLL_S):
            pass
        self.wait()
        self.log(f'{self.name}: stopped')
