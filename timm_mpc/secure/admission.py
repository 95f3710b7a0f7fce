"""Who may join a run: listeners bound to the address they were given, joiners admitted by a per-run secret.

The owner's rendezvous store listens on the rendezvous address only (torch's own ``tcp://`` store listens on
every interface), and every party's engine links listen on the one interface that holds its address (the
rendezvous address for the owner, the address that reaches the owner for the others, loopback for a local run).

Each pair of parties then proves, both ways, that it holds the run's secret, before anything else passes between
them: a challenge-response over fresh nonces (HMAC-SHA256 keyed by the secret, bound to the two roles), so the
secret itself never crosses the link and a recorded answer is worth nothing in another run. A party that fails is
refused, and told so, before the plan, the settings or any share is sent. The secret is given to the owner, the
client and the dealer out of band (:func:`write_secret`, ``timm-mpc secret``), or made here for a local run.

This closes the door to strangers; it does not protect the links themselves: whoever can read or rewrite the
traffic between admitted parties can still read or corrupt the run (see docs/security.md).
"""
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Tuple, Union
from urllib.parse import parse_qs, urlparse

from .errors import PeerError

__all__ = ['SECRET_BYTES', 'admit', 'bind_rendezvous', 'check_secret', 'new_secret', 'parse_rendezvous', 'read_secret',
           'write_secret']

SECRET_BYTES = 32  # what new_secret makes
MIN_SECRET_BYTES = 16  # what read_secret accepts
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
BOUND_SCHEME = 'timm-mpc-tcp'  # torch's tcp:// rendezvous, its store listening on the address given only
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address
_ACCEPTED, _REFUSED = b'\x01', b'\x00'


def new_secret() -> bytes:
    """A fresh secret for one run (:data:`SECRET_BYTES` random bytes)."""
    return secrets.token_bytes(SECRET_BYTES)


def write_secret(path: Union[str, Path]) -> Path:
    """Write a new secret to ``path`` (hex, readable by its owner only) for the parties of a run; an existing file
    is never overwritten.

    Raises:
        FileExistsError: ``path`` exists.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f'{path} exists; a secret file is never overwritten: choose another path or remove it')
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    try:  # mkstemp's file is the user's alone (0600); the link makes it appear whole or not at all
        with os.fdopen(fd, 'w') as f:
            f.write(new_secret().hex() + '\n')
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path


def read_secret(path: Union[str, Path]) -> bytes:
    """The secret in ``path`` (hex, as :func:`write_secret` writes it).

    Raises:
        ValueError: the file is missing, unreadable, not hex, or shorter than :data:`MIN_SECRET_BYTES` bytes.
    """
    path = Path(path)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'cannot read the secret file {path} ({type(e).__name__}: {e}); make one with '
                         f'`timm-mpc secret FILE` and give the same file to the owner, the client and the dealer') from e
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f'the secret file {path} does not hold a hex string (as `timm-mpc secret FILE` writes); '
                         f'found {len(text)} characters') from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f'the secret in {path} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are accepted '
                         f'(`timm-mpc secret FILE` writes {SECRET_BYTES})')
    return secret


def check_secret(secret: object) -> bytes:
    """``secret`` if it is bytes of at least :data:`MIN_SECRET_BYTES`.

    Raises:
        ValueError: anything else (named, without its value).
    """
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        found = f'{len(secret)} bytes' if isinstance(secret, bytes) else type(secret).__name__
        raise ValueError(f'the run\'s secret must be bytes, at least {MIN_SECRET_BYTES} of them (new_secret() or '
                         f'read_secret(FILE)); got {found}')
    return secret


def _proof(secret: bytes, prover: str, verifier: str, nonces: bytes) -> bytes:
    message = b'timm-mpc admission v1\0' + prover.encode() + b'\0' + verifier.encode() + b'\0' + nonces
    return hmac.new(secret, message, hashlib.sha256).digest()


def admit(send: Callable[[bytes], None], recv: Callable[[int], bytes], secret: bytes, me: str, peer: str,
          first: bool) -> None:
    """Prove to ``peer`` that this party holds ``secret`` and check that ``peer`` does, over a link whose
    ``send(data)`` and ``recv(size)`` move bytes to and from it (``first``: the party that speaks first; the other
    calls this with ``first=False``). Three fixed-size messages: the first party's nonce; the other's nonce and
    proof; the first party's verdict and proof.

    Raises:
        PeerError: ``peer`` did not prove it holds the secret, or refused this party's proof.
    """
    def receive(size: int) -> bytes:
        data = recv(size)
        if len(data) != size:  # the SPU link moves whole messages of the sender's size
            raise PeerError(f'the {peer} sent {len(data)} bytes where the admission expects {size}: refused before '
                            f'anything was shared')
        return data

    refused = PeerError(f'the {peer} did not prove that it holds this run\'s secret: refused before anything was '
                        f'shared (a wrong or missing secret file, or a process that is not the {peer})')
    if first:
        mine = secrets.token_bytes(NONCE_BYTES)
        send(mine)
        answer = receive(NONCE_BYTES + MAC_BYTES)
        nonces = mine + answer[:NONCE_BYTES]
        if not hmac.compare_digest(answer[NONCE_BYTES:], _proof(secret, peer, me, nonces)):
            send(_REFUSED + bytes(MAC_BYTES))
            raise refused
        send(_ACCEPTED + _proof(secret, me, peer, nonces))
        return
    theirs = receive(NONCE_BYTES)
    nonces = theirs + secrets.token_bytes(NONCE_BYTES)
    send(nonces[NONCE_BYTES:] + _proof(secret, me, peer, nonces))
    verdict = receive(1 + MAC_BYTES)
    if verdict[:1] != _ACCEPTED:
        raise PeerError(f'the {peer} refused this party\'s proof of the run\'s secret before anything was shared: '
                        f'give every party the same secret file')
    if not hmac.compare_digest(verdict[1:], _proof(secret, peer, me, nonces)):
        raise refused


def _ipv4(host: str, what: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(f'{what}: cannot resolve {host!r} to an IPv4 address ({e})') from None


def _interface_of(address: str) -> str:
    """The name of this machine's network interface whose IPv4 address is ``address`` (loopback's for any 127.x)."""
    if ipaddress.ip_address(address).is_loopback:  # 127.0.1.1, a Debian host name's address, is loopback's too
        address = '127.0.0.1'
    if sys.platform.startswith('linux'):
        import fcntl
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack('256s', name.encode()[:15]))
                except OSError:  # no IPv4 address
                    continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    raise ValueError(f'no network interface of this machine has the address {address}: the parties listen on their '
                     f'own address only (set GLOO_SOCKET_IFNAME to choose the interface yourself)')


def parse_rendezvous(rendezvous: str) -> Tuple[str, int]:
    """The IPv4 address and port of a rendezvous ``tcp://HOST:PORT`` (the owner's listening address).

    Raises:
        ValueError: anything else, an unresolvable host, or 0.0.0.0 (every interface).
    """
    parsed = urlparse(rendezvous)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != 'tcp' or not parsed.hostname or not port:
        raise ValueError(f'the rendezvous must be tcp://HOST:PORT with a port from 1 to 65535, got {rendezvous!r}')
    host = _ipv4(parsed.hostname, f'the rendezvous {rendezvous}')
    if host == '0.0.0.0':
        raise ValueError(f'the rendezvous {rendezvous} names every interface; the owner listens on one address: '
                         f'give the one the other parties reach it at')
    return host, port


def _local_address(rendezvous: str, rank: int) -> Tuple[str, int, str]:
    """The rendezvous host's IPv4 address, its port, and the address this party listens on: the rendezvous address
    for the owner (rank 0), the one this machine reaches it from for the others."""
    host, port = parse_rendezvous(rendezvous)
    if rank == 0:
        return host, port, host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a route lookup: nothing is sent
        s.connect((host, port))
        return host, port, s.getsockname()[0]


def bind_rendezvous(rendezvous: str, rank: int) -> str:
    """Bind this process's engine links to its own address and return the rendezvous to initialize
    torch.distributed with (a ``tcp://`` one becomes one whose store listens on its address only; a ``file://`` one,
    for a run on this machine, stays and its links listen on loopback). An interface chosen with
    ``GLOO_SOCKET_IFNAME`` is kept.

    Raises:
        ValueError: the rendezvous is neither, or no interface of this machine holds the address to listen on.
    """
    if rendezvous.startswith('file://'):
        local, url = '127.0.0.1', rendezvous
    else:
        host, port, local = _local_address(rendezvous, rank)
        url = f'{BOUND_SCHEME}://{host}:{port}'
        _register_bound_store()
    os.environ.setdefault('GLOO_SOCKET_IFNAME', _interface_of(local))
    return url


def _bound_store(url: str, timeout: timedelta = timedelta(seconds=300), **kwargs) -> Iterator:
    """torch.distributed's rendezvous handler for :data:`BOUND_SCHEME`: its ``tcp://`` store, whose server (rank
    0) listens on the URL's address only."""
    from torch.distributed import TCPStore
    parsed = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    rank, world_size = int(query['rank']), int(query['world_size'])
    listener = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((parsed.hostname, parsed.port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
    store = TCPStore(parsed.hostname, parsed.port, world_size, rank == 0, timeout,
                     master_listen_fd=None if listener is None else listener.detach())
    yield store, rank, world_size
    raise RuntimeError(f'the {BOUND_SCHEME}:// rendezvous cannot be repeated')


def _register_bound_store() -> None:
    import torch.distributed as dist
    try:
        dist.register_rendezvous_handler(BOUND_SCHEME, _bound_store)
    except RuntimeError:  # registered already, by an earlier run in this process
        pass
