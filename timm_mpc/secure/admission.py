"""Who may join a run: joiners admitted by a per-run secret (the links themselves listen on the address they were
given only: :mod:`.links`).

Each pair of parties proves, both ways, that it holds the run's secret, before anything else passes between
them: a challenge-response over fresh nonces (HMAC-SHA256 keyed by the secret, bound to the two roles), so the
secret itself never crosses the link and a recorded answer is worth nothing in another run. A party that fails is
refused, and told so, before the plan, the settings or any share is sent. The secret is given to the owner, the
client and the dealer out of band (:func:`write_secret`, ``timm-mpc secret``), or made here for a local run.

With TLS (:class:`~.links.LinkSecurity`) the certificates already pin every peer; the secret stays beside them as a
second, independent key to the run (a certificate that leaks does not let its holder into a run it was not given
the secret of). Without TLS (loopback only) it closes the door to other local users.
"""
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import PeerError

__all__ = ['SECRET_BYTES', 'admit', 'check_secret', 'new_secret', 'read_secret', 'write_secret']

SECRET_BYTES = 32  # what new_secret makes
MIN_SECRET_BYTES = 16  # what read_secret accepts
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
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
