"""The services' control messages: a client asking the owner's service for a session (:mod:`.query`), the owner's
service asking the dealer's for one (:mod:`.owner`, :mod:`.dealer`), and their answers.

Each is one JSON object behind its length (4 bytes, big-endian; at most :data:`CONTROL_LIMIT`), over a TLS 1.3
connection opened as a party's link is (:func:`~.links.connect_to`, :func:`~.links.greet`: certificates on both sides,
the peer's identity pinned). JSON, never pickle: a peer is not trusted to run code. Every message must arrive whole
within its bound. Nothing of an image, a weight or a share ever passes here: a session's data moves over the session's
own links, between processes started for it.
"""
import json
import socket
import ssl
import struct
import time
from dataclasses import replace
from typing import Any, Dict, Tuple

from ..errors import PeerError
from ..links import LinkSecurity, greet
from ..protocol import decode_json
from ..settings import SecureSettings

__all__ = ['CONTROL_VERSION', 'CONTROL_LIMIT', 'send_message', 'recv_message', 'accept_control', 'refuse',
           'offered_field', 'offered_settings']

CONTROL_VERSION = 1
CONTROL_LIMIT = 1 << 16  # bytes of one message (a session's offer is about 1 kB)
_LENGTH = struct.Struct('>I')


def send_message(sock: socket.socket, message: Dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, size: int, peer: str, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)
            chunk = sock.recv(size - len(data))
        except socket.timeout:
            raise PeerError(f'the {peer} did not send a whole message in time (timed out)') from None
        except (OSError, ssl.SSLError) as e:
            raise PeerError(f'lost the {peer}: its connection failed ({e})') from None
        if not chunk:
            raise PeerError(f'lost the {peer}: it closed the connection')
        data += chunk
    return bytes(data)


def recv_message(sock: socket.socket, peer: str, timeout_s: float) -> Dict[str, Any]:
    """The next message from ``peer``, whole within ``timeout_s`` (a trickle is no way round it): a JSON object, or
    PeerError (closed, silent, too large, not JSON, not an object)."""
    deadline = time.monotonic() + timeout_s
    size, = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, peer, deadline))
    if size > CONTROL_LIMIT:
        raise PeerError(f'the {peer} announced a message of {size} bytes; a control message has at most '
                        f'{CONTROL_LIMIT}')
    message = decode_json(_recv_exactly(sock, size, peer, deadline), peer)
    if not isinstance(message, dict):
        raise PeerError(f'the {peer} sent {str(message)[:80]} where a message (a JSON object) belongs')
    return message


def refuse(sock: socket.socket, reason: str) -> None:
    """Tell the peer why it is refused, if it still listens."""
    try:
        send_message(sock, dict(status='refused', reason=reason))
    except (OSError, ssl.SSLError):
        pass


def accept_control(sock: socket.socket, context: ssl.SSLContext, rank: int, security: LinkSecurity, where: str,
                   timeout_s: float) -> Tuple[ssl.SSLSocket, str]:
    """A service's side of a new connection from rank ``rank`` (:func:`~.links.greet`), whole within ``timeout_s``."""
    sock, _, identity = greet(sock, context, [rank], security, where, time.monotonic() + timeout_s)
    return sock, identity


def offered_field(message: Dict[str, Any], name: str, kind: type, peer: str, required: bool = True) -> Any:
    """A field of ``peer``'s message, of ``kind`` (a bool is no number); None where it is not ``required`` and
    missing or null; else PeerError naming it."""
    value = message.get(name)
    if value is None:
        if required:
            raise PeerError(f'the {peer}\'s message has no {name!r}: {str(message)[:200]}')
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PeerError(f'the {peer}\'s {name!r} is not a {kind.__name__}: {str(value)[:80]}')
    return value


def offered_settings(values: Any, peer: str, timeout_s: float) -> SecureSettings:
    """The secure settings a session's ``peer`` offers, as this side runs them: private (CrypTen with a dealer and
    its offline phase), their timeout at most this side's ``timeout_s``; else PeerError naming why."""
    try:
        settings = SecureSettings.from_dict(values) if isinstance(values, dict) else None
    except (TypeError, ValueError) as e:
        raise PeerError(f'the {peer} offered settings that are not valid: {e}') from None
    if settings is None or not (settings.secure and settings.dealer):
        what = ('that are not an object' if settings is None else
                f'that are not private ({settings.describe_insecurity()})' if not settings.secure else
                f'of engine {settings.engine} {settings.protocol}, which has no dealer')
        raise PeerError(f'the {peer} offered settings {what}: a session runs CrypTen with a dealer outside both '
                        f'parties and its offline phase only')
    return replace(settings, timeout_s=min(settings.timeout_s, timeout_s))
