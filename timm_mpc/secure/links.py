"""The links between the processes of a CrypTen run: one TCP connection per pair of processes, over TLS 1.3 with a
certificate required on both sides and each peer's identity pinned (:class:`LinkSecurity`), or in plaintext on
loopback only (a run on one machine).

Who listens where: the owner (rank 0) at the rendezvous address, for the client; the dealer (rank 2) at its own
address, for both parties. The client only connects out; the owner connects to the dealer. Each listener binds the
one address it was given. A connection that fails the TLS handshake (no certificate, one the CA did not sign, an
expired one, plaintext) or presents an identity the listener does not accept for the role it claims is refused with
a log line, and the listener goes on waiting for the right peer until the timeout; a connecting party refuses a
listener whose identity is not the one it expects of that role. Nothing of the protocol moves before both sides of
every link are accepted, and until a peer is admitted by the run's secret (:mod:`.admission`) this process keeps at
most :data:`UNADMITTED_BYTES` of what it sends unasked.

After the meeting every link is non-blocking and one thread moves all of them: whenever a process waits (to send or
to receive), it also reads whatever any peer sent into that peer's inbox, so two processes sending large messages
to each other at once, or a dealer sending to both parties in turn, never wait on each other. Every wait is bounded:
a peer that moves no byte for ``timeout_s`` seconds, or whose message takes longer than ``timeout_s`` plus its size at
:data:`MIN_RATE`, is an error naming it.
"""
import ipaddress
import os
import select
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import PeerError

__all__ = ['LinkSecurity', 'Links', 'connect_links', 'connect_to', 'greet', 'listener_at', 'parse_address',
           'parse_rendezvous', 'is_loopback', 'certificate_identities', 'FRAME_LIMIT']

ROLES = ('owner', 'client', 'dealer')  # by rank
FRAME_LIMIT = 64 * 2 ** 20  # bytes of one framed message (a call of mpcvit_tiny commits about 100 kB)
LINK_VERSION = 1
_HELLO = b'TMPC'
_ACCEPTED = b'\x01'
_CHUNK = 1 << 20  # bytes moved per system call at most
_RETRY_S = 0.1  # between attempts to reach a listener that is not up yet
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
UNADMITTED_BYTES = 1 << 16  # what a peer not yet admitted may send ahead (the admission's messages are 32-65 bytes)
MIN_RATE = 1 << 16  # bytes per second: the slowest a message may move (a trickling peer ends the wait)
_HANGUP = select.POLLIN | select.POLLHUP | select.POLLERR


def parse_address(address: str, what: str) -> Tuple[str, int]:
    """``HOST:PORT`` (an IPv4 address or a name) as ``(IPv4 address, port)``.

    Raises:
        ValueError: naming ``what``, for anything else or a name that does not resolve.
    """
    host, _, port = str(address).rpartition(':')
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'{what} must be HOST:PORT with a port from 1 to 65535, got {address!r}')
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        raise ValueError(f'{what}: cannot resolve {host!r} to an IPv4 address') from None
    if resolved == '0.0.0.0':
        raise ValueError(f'{what} {address} names every interface; give the one address the peers reach')
    return resolved, int(port)


def parse_rendezvous(rendezvous: str) -> Tuple[str, int]:
    """The IPv4 address and port of a rendezvous ``tcp://HOST:PORT`` (the owner's listening address).

    Raises:
        ValueError: anything else, an unresolvable host, or 0.0.0.0 (every interface).
    """
    scheme, _, address = str(rendezvous).partition('://')
    host, _, port = address.rpartition(':')
    if scheme != 'tcp' or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'the rendezvous must be tcp://HOST:PORT with a port from 1 to 65535, got {rendezvous!r}')
    return parse_address(address, 'the rendezvous')


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def certificate_identities(certificate: Mapping) -> Tuple[str, ...]:
    """The identities a peer's certificate (as ``SSLSocket.getpeercert()`` gives it) names: its subject's common names
    and its DNS subject alternative names."""
    names = [value for rdn in certificate.get('subject', ()) for key, value in rdn if key == 'commonName']
    names += [value for kind, value in certificate.get('subjectAltName', ()) if kind == 'DNS']
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class LinkSecurity:
    """TLS for one party's links: its certificate and key (PEM files), the certificate authority whose signature it
    requires of every peer (PEM), and the identities it accepts of each peer role (``expect``: ``'owner'``,
    ``'client'``, ``'dealer'`` -> names, each a certificate's common name or DNS alternative name). A party must
    name an identity for every peer it meets: the client pins the owner and the dealer, the owner the dealer and the
    clients it accepts, the dealer both parties."""
    cert: str
    key: str
    ca: str
    expect: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ('cert', 'key', 'ca'):
            path = getattr(self, name)
            if not (isinstance(path, (str, os.PathLike)) and os.path.isfile(path)):
                raise ValueError(f'the TLS {name} must be a readable PEM file; {path!r} is not a file')
        expect = {}
        for role, names in dict(self.expect).items():
            names = (names,) if isinstance(names, str) else tuple(names)
            if role not in ROLES or not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f'expect maps a peer role ({", ".join(ROLES)}) to the identities accepted of it; got '
                                 f'{role!r}: {names!r}')
            expect[role] = names
        object.__setattr__(self, 'expect', expect)
        self.context(server=True)  # the files load, or a clear error now, before anything starts

    def require(self, roles: Iterable[str]) -> None:
        """Raise ValueError unless an identity is named for each of ``roles``."""
        missing = [role for role in roles if role not in self.expect]
        if missing:
            raise ValueError(f'name the certificate identity this party accepts of the {" and the ".join(missing)} '
                             f'(expect={{role: names}}, --expect-{missing[0]} NAME): every peer is pinned')

    def context(self, server: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # the peers are pinned by identity (below), not by the address reached
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f'the TLS certificate {self.cert} and key {self.key} do not load as a PEM pair: {e}') from None
        try:
            context.load_verify_locations(self.ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f'the TLS CA {self.ca} does not load as PEM certificates: {e}') from None
        return context

    def check(self, sock: ssl.SSLSocket, role: str) -> str:
        """The peer's identity if this party accepts it as ``role``; else PeerError naming what it presented."""
        names = certificate_identities(sock.getpeercert() or {})
        accepted = [n for n in names if n in self.expect.get(role, ())]
        if not accepted:
            raise PeerError(f'a peer presented a certificate for {list(names)} as the {role}; accepted as the {role}: '
                            f'{list(self.expect.get(role, ()))}')
        return accepted[0]


def _log_refusal(message: str) -> None:
    print(f'timm-mpc: refused a connection: {message}', file=sys.stderr, flush=True)


class Links:
    """This process's open links, by peer rank: bytes out (:meth:`send`) and in (:meth:`recv_into`), each wait also
    reading whatever any peer sent (module docstring), every wait bounded by ``timeout_s`` without progress."""

    def __init__(self, rank: int, socks: Dict[int, socket.socket], timeout_s: float,
                 identities: Optional[Dict[int, str]] = None, admission: bool = False) -> None:
        self.rank, self.socks, self.timeout_s = rank, socks, timeout_s
        self.identities = identities or {}  # peer rank -> its certificate identity (TLS)
        self.unadmitted = set(socks) if admission else set()  # peers whose unasked bytes are bounded
        self.inbox = {peer: bytearray() for peer in socks}
        self.failure: Dict[int, PeerError] = {}  # peers whose link ended (closed, reset) with what we had read
        self._scratch = bytearray(_CHUNK)
        for sock in socks.values():
            sock.setblocking(False)

    def _role(self, peer: int) -> str:
        if {self.rank, peer} == {0, 1}:
            return f'other party (the {ROLES[peer]})'
        return ROLES[peer] if peer < len(ROLES) else f'rank {peer}'

    def _drain(self, peer: int) -> None:
        """Read everything ``peer`` sent that is ready into its inbox; a link that ended is remembered, not raised:
        what came before is still read."""
        while peer not in self.failure:
            n = self._read(peer, self._scratch)
            if not n:
                return
            self.inbox[peer] += memoryview(self._scratch)[:n]
            if peer in self.unadmitted and len(self.inbox[peer]) > UNADMITTED_BYTES:
                self.failure[peer] = PeerError(f'the {self._role(peer)} sent more than {UNADMITTED_BYTES} bytes before '
                                               f'it was admitted: refused')
                self.inbox[peer] = bytearray()
                return

    def _read(self, peer: int, buffer: object) -> Optional[int]:
        """Bytes read from ``peer`` into ``buffer``: None if none are ready, 0 once its link ended (remembered in
        :attr:`failure`)."""
        try:
            n = self.socks[peer].recv_into(buffer, len(buffer))
        except _WOULD_BLOCK:
            return None
        except (OSError, ssl.SSLError) as e:
            self.failure[peer] = PeerError(f'lost the {self._role(peer)}: its link failed ({e})')
            return 0
        if n == 0:
            self.failure[peer] = PeerError(f'lost the {self._role(peer)}: it closed the link')
        return n

    def admitted(self, peer: int) -> None:
        """``peer`` proved it holds the run's secret: what it sends ahead is no longer bounded here."""
        self.unadmitted.discard(peer)

    def _wait(self, reading: Optional[int] = None, writing: Optional[int] = None, deadline: float = 0.0,
              limit: float = 0.0, size: int = 0) -> None:
        """Wait until ``reading`` has bytes or ``writing`` can take some, draining every other peer meanwhile; a
        PeerError once ``deadline`` (no progress) or ``limit`` (the whole message of ``size`` bytes) passes."""
        while True:
            for peer, sock in self.socks.items():  # TLS may hold decrypted bytes that poll cannot see
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    if peer == reading:
                        return
                    self._drain(peer)
            if (reading is not None and reading in self.failure) or (writing is not None and writing in self.failure):
                return
            now = time.monotonic()
            peer = reading if reading is not None else writing
            if now >= limit:
                raise PeerError(f'the {self._role(peer)} moved a message of {size} bytes slower than '
                                f'{MIN_RATE // 1024} kB/s (timed out)')
            if now >= deadline:
                raise PeerError(f'the {self._role(peer)} moved no byte for {self.timeout_s:.0f} s (timed out)')
            poller, peers = select.poll(), {}  # poll: no limit on descriptor numbers, unlike select
            for other, sock in self.socks.items():
                if other not in self.failure:
                    poller.register(sock, _HANGUP | (select.POLLOUT if other == writing else 0))
                    peers[sock.fileno()] = other
            ready = False
            for fd, event in poller.poll(1000 * min(1.0, min(deadline, limit) - now)):
                other = peers[fd]
                if other == writing and event & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    ready = True
                if event & _HANGUP:
                    if other == reading:
                        ready = True
                    else:
                        self._drain(other)
            if ready:
                return

    def _limit(self, size: int) -> float:
        return time.monotonic() + self.timeout_s + size / MIN_RATE

    def send(self, peer: int, data: object) -> None:
        """Send ``data`` (any bytes-like object) to ``peer`` in full."""
        view = memoryview(data).cast('B')
        sock, sent = self.socks[peer], 0
        deadline, limit = time.monotonic() + self.timeout_s, self._limit(len(view))
        while sent < len(view):
            if peer in self.failure:
                raise self.failure[peer]
            try:
                n = sock.send(view[sent:sent + _CHUNK])
            except _WOULD_BLOCK:
                self._wait(writing=peer, deadline=deadline, limit=limit, size=len(view))
                continue
            except (OSError, ssl.SSLError) as e:
                raise PeerError(f'lost the {self._role(peer)}: sending to it failed ({e})') from None
            sent += n
            deadline = time.monotonic() + self.timeout_s

    def recv_into(self, peer: int, buffer: object) -> None:
        """Fill ``buffer`` (a writable bytes-like object) with the next bytes from ``peer``."""
        view = memoryview(buffer).cast('B')
        inbox, got = self.inbox[peer], 0
        deadline, limit = time.monotonic() + self.timeout_s, self._limit(len(view))
        while got < len(view):
            if inbox:
                count = min(len(inbox), len(view) - got)
                view[got:got + count] = inbox[:count]
                del inbox[:count]
                got += count
                continue
            if peer in self.failure:
                raise self.failure[peer]
            n = self._read(peer, view[got:])  # straight into the buffer: large messages are not copied twice
            if n is None:
                self._wait(reading=peer, deadline=deadline, limit=limit, size=len(view))
                continue
            if n:  # 0: the link ended, raised above
                got += n
                deadline = time.monotonic() + self.timeout_s

    def recv(self, peer: int, size: int) -> bytes:
        data = bytearray(size)
        self.recv_into(peer, data)
        return bytes(data)

    def close(self, linger_s: float = 2.0) -> None:
        """End every link: this side's data is sent and the peer's end read (up to ``linger_s``), so that closing
        never resets a connection whose last bytes the peer has not read yet."""
        deadline = time.monotonic() + linger_s
        for sock in self.socks.values():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        open_ = dict(self.socks)
        while open_ and time.monotonic() < deadline:
            poller = select.poll()
            for sock in open_.values():
                poller.register(sock, _HANGUP)
            ready = {fd for fd, _ in poller.poll(1000 * max(0.0, deadline - time.monotonic()))}
            if not ready:
                break
            for peer in [p for p, s in open_.items() if s.fileno() in ready]:
                try:
                    if not open_[peer].recv(_CHUNK):
                        del open_[peer]
                except _WOULD_BLOCK:
                    pass
                except (OSError, ssl.SSLError):
                    del open_[peer]
        for sock in self.socks.values():
            sock.close()
        self.socks = {}


def listener_at(address: Tuple[str, int]) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(16)
    except OSError as e:
        listener.close()
        raise OSError(f'cannot listen on {address[0]}:{address[1]}: {e.strerror or e}') from None
    return listener


def _remaining(deadline: float) -> float:
    return max(0.01, deadline - time.monotonic())


def connect_to(rank: int, peer: int, address: Tuple[str, int], security: Optional[LinkSecurity],
               deadline: float) -> Tuple[socket.socket, Optional[str]]:
    """Reach ``peer``'s listener (retrying until it is up), check its identity, say who this is and wait for the
    listener's acceptance."""
    role, where = ROLES[peer], f'{address[0]}:{address[1]}'
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(_remaining(deadline))
        try:
            sock.connect(address)
            break
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout, OSError) as e:
            sock.close()
            if time.monotonic() + _RETRY_S >= deadline:
                raise PeerError(f'could not reach the {role} at {where} ({type(e).__name__}: {e}) '
                                f'before the timeout') from None
            time.sleep(_RETRY_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    identity = None
    try:
        if security is not None:
            sock = security.context(server=False).wrap_socket(sock, server_side=False)
            identity = security.check(sock, role)
        sock.sendall(_HELLO + bytes([LINK_VERSION, rank]))
        answer = sock.recv(1)
    except PeerError:
        sock.close()
        raise
    except socket.timeout:
        sock.close()
        raise PeerError(f'the {role} at {where} accepted the connection and did not answer before the timeout '
                        f'(a suspended process or another program on that port)') from None
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise PeerError(f'the {role} at {where} refused this party or failed the TLS handshake '
                        f'({type(e).__name__}: {e}): a certificate it does not accept, another run, or plaintext '
                        f'against TLS') from None
    if answer != _ACCEPTED:
        sock.close()
        raise PeerError(f'the {role} at {where} refused this party (its certificate identity or its role)')
    return sock, identity


def greet(sock: socket.socket, context: Optional[ssl.SSLContext], expected: Iterable[int],
          security: Optional[LinkSecurity], where: str, deadline: float) -> Tuple[socket.socket, int, Optional[str]]:
    """A listener's side of a new connection, by ``deadline`` (time.monotonic) each step: the TLS handshake with
    ``context``, the peer's hello claiming one of the ``expected`` ranks, its identity checked for that role; then
    the acceptance. Returns the (TLS) socket, the rank and the identity; raises PeerError, OSError or SSLError (the
    caller closes ``sock`` and logs why)."""
    sock.settimeout(_remaining(deadline))
    if context is not None:
        sock = context.wrap_socket(sock, server_side=True)
    hello = b''
    while len(hello) < len(_HELLO) + 2:
        if time.monotonic() >= deadline:
            raise PeerError(f'{where} did not say hello in time')
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(len(_HELLO) + 2 - len(hello))
        if not chunk:
            break
        hello += chunk
    if len(hello) != len(_HELLO) + 2 or not hello.startswith(_HELLO) or hello[4] != LINK_VERSION:
        raise PeerError(f'{where} did not open a timm-mpc link (version {LINK_VERSION})')
    rank, expected = hello[5], list(expected)
    if rank not in expected:
        raise PeerError(f'{where} claims rank {rank}; this party waits for {[ROLES[r] for r in expected]}')
    identity = None if security is None else security.check(sock, ROLES[rank])
    sock.sendall(_ACCEPTED)
    return sock, rank, identity


def _accept(listener: socket.socket, expected: List[int], security: Optional[LinkSecurity], deadline: float,
            log: Callable[[str], None]) -> Tuple[Dict[int, socket.socket], Dict[int, str]]:
    """Accept one connection from each of the ``expected`` ranks; refuse (with a log line) any other, and go on
    waiting until the deadline."""
    socks: Dict[int, socket.socket] = {}
    identities: Dict[int, str] = {}
    context = None if security is None else security.context(server=True)
    while len(socks) < len(expected):
        listener.settimeout(_remaining(deadline))
        try:
            sock, peer_address = listener.accept()
        except socket.timeout:
            missing = ' and the '.join(ROLES[r] for r in expected if r not in socks)
            raise PeerError(f'the {missing} did not connect before the timeout') from None
        where = f'{peer_address[0]}:{peer_address[1]}'
        try:
            sock, rank, identity = greet(sock, context, [r for r in expected if r not in socks], security, where,
                                         min(deadline, time.monotonic() + 30.0))
        except (PeerError, OSError, ssl.SSLError) as e:
            log(f'{where}: {type(e).__name__}: {e}')
            sock.close()
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks[rank] = sock
        if identity is not None:
            identities[rank] = identity
    return socks, identities


def connect_links(rank: int, world: int, owner: Tuple[str, int], dealer: Optional[Tuple[str, int]],
                  security: Optional[LinkSecurity], timeout_s: float,
                  log: Callable[[str], None] = _log_refusal, admission: bool = False) -> Links:
    """Meet the other processes of a run of ``world`` processes (2: owner and client; 3: and the dealer) as rank
    ``rank``, within ``timeout_s``: the owner listens at ``owner``, the dealer at ``dealer``. With ``admission``, what
    each peer sends unasked is bounded until :meth:`Links.admitted`.

    Raises:
        ValueError: plaintext (``security`` None) with an address that is not loopback, or no identity named for a
            peer this party meets.
        PeerError: a peer not met in time, or one refused by this party's pins.
    """
    peers = [r for r in range(world) if r != rank]
    addresses = [owner] + ([dealer] if world > 2 else [])
    if world > 2 and dealer is None:
        raise ValueError('a run with a dealer needs the dealer\'s address')
    if security is None:
        remote = [f'{h}:{p}' for h, p in addresses if not is_loopback(h)]
        if remote:
            raise ValueError(f'plaintext links are for loopback only; {", ".join(remote)} is not: give TLS '
                             f'certificates (--tls-cert, --tls-key, --tls-ca)')
    else:
        security.require(ROLES[r] for r in peers)
    deadline = time.monotonic() + timeout_s
    accepting = {0: [1] if world > 1 else [], 1: [], 2: [0, 1]}[rank]  # the client only connects out
    listener = listener_at(owner if rank == 0 else dealer) if accepting else None
    socks: Dict[int, socket.socket] = {}
    identities: Dict[int, str] = {}
    try:
        for peer in peers:
            if peer in accepting:
                continue
            address = owner if peer == 0 else dealer
            socks[peer], identity = connect_to(rank, peer, address, security, deadline)
            if identity is not None:
                identities[peer] = identity
        if listener is not None:
            accepted, names = _accept(listener, accepting, security, deadline, log)
            socks.update(accepted)
            identities.update(names)
    except BaseException:
        for sock in socks.values():
            sock.close()
        raise
    finally:
        if listener is not None:
            listener.close()
    return Links(rank, socks, timeout_s, identities, admission)
