"""The client of an owner's service (``timm-mpc serve``): :func:`connect` asks it for a session and runs the
client's side (``timm-mpc query`` does the same from the command line).

The client pins the owner's and the dealer's certificate identities (``security.expect``); the service tells it where
the session's owner and dealer listen, the session's secret and the settings, and the client refuses settings that are
not private. The images never pass the control connection: they are checked, then shared over the session's own
links, exactly as by :func:`~.own_process.run_client`.
"""
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..admission import check_secret
from ..errors import PeerError
from ..launch import SecureInferenceError
from ..links import LinkSecurity, connect_to, parse_address, parse_rendezvous
from ..own_process import run_client
from ..protocol import PartyResult, client_inputs
from ..secure_vit import CLIENT, OWNER
from ..settings import SecureSettings
from .control import CONTROL_VERSION, offered_field, offered_settings, recv_message, send_message

__all__ = ['SessionOffer', 'request_session', 'connect']


@dataclass(frozen=True)
class SessionOffer:
    """Where a session granted by an owner's service meets (the owner's ``rendezvous``, the ``dealer``'s address),
    its ``secret`` and ``settings`` (private, with the client's own timeout at most)."""
    number: int
    rendezvous: str
    dealer: str
    secret: bytes
    settings: SecureSettings


def request_session(server: str, security: LinkSecurity, images: int, batch_size: Optional[int] = None,
                    timeout_s: float = 120.0, queue_timeout_s: float = 600.0,
                    log: Optional[Callable[[str], None]] = None) -> SessionOffer:
    """Ask the owner's service at ``server`` (``HOST:PORT``) for a session of ``images`` images (``batch_size`` at a
    time), waiting in turn at most ``queue_timeout_s``; every message within ``timeout_s``.

    Raises:
        ValueError: ``server`` is not an address, or ``security`` pins no owner or no dealer.
        PeerError: the service refused (its reason), was not reached, or sent anything but the protocol.
    """
    security.require(['owner', 'dealer'])
    address = parse_address(server, 'the server')
    sock, _ = connect_to(CLIENT, OWNER, address, security, time.monotonic() + timeout_s)
    deadline, place = time.monotonic() + queue_timeout_s, None
    try:
        send_message(sock, dict(kind='query', version=CONTROL_VERSION, images=images, batch_size=batch_size))
        while True:
            message = recv_message(sock, 'owner\'s service', timeout_s)
            status = message.get('status')
            if status == 'refused':
                raise PeerError(f'the owner\'s service refused: {str(message.get("reason"))[:500]}')
            if status == 'start':
                return _offer(message, timeout_s)
            if status == 'preparing':
                if log is not None and place != 0:
                    log('client: the owner prepares the session (a dry run of this batch size, once)')
                place = 0
            elif status == 'queued':
                if log is not None and message.get('position') != place:  # repeated while the client waits
                    place = message.get('position')
                    log(f'client: waiting for a session: place {place} in the queue')
            else:
                raise PeerError(f'the owner\'s service sent {str(message)[:200]} where a session belongs')
            if time.monotonic() > deadline:
                raise PeerError(f'waited {queue_timeout_s:.0f} s for a session (queue_timeout_s)')
    finally:
        sock.close()


def _offer(message: dict, timeout_s: float) -> SessionOffer:
    peer = 'owner\'s service'
    try:
        rendezvous = offered_field(message, 'rendezvous', str, peer)
        dealer = offered_field(message, 'dealer', str, peer)
        parse_rendezvous(rendezvous)
        parse_address(dealer, 'the session\'s dealer')
        secret = check_secret(bytes.fromhex(offered_field(message, 'secret', str, peer)))
    except ValueError as e:
        raise PeerError(f'the {peer} offered a session that is not valid: {e}') from None
    settings = offered_settings(message.get('settings'), peer, timeout_s)
    return SessionOffer(offered_field(message, 'session', int, peer), rendezvous, dealer, secret, settings)


def connect(server: str, images: torch.Tensor, security: LinkSecurity, batch_size: Optional[int] = None,
            clamp: bool = False, timeout_s: float = 120.0, queue_timeout_s: float = 600.0,
            log: Optional[Callable[[str], None]] = None) -> PartyResult:
    """Predict ``images`` with the owner's service at ``server`` (``HOST:PORT``): a session of their own, the client's
    side in a child process. ``security``: the client's certificate and the owner's and dealer's identities it
    accepts. Returns the client's :class:`~.protocol.PartyResult` (``logits``, ``profile``).

    The images are checked before anything is sent (a finite float ``(B, C, H, W)`` tensor), against the owner's plan
    in the session before anything is shared (outside its input bounds: refused, or clamped with ``clamp``).

    Raises:
        SecureInferenceError: the service refused or was not reached, or the session failed (its reason).
    """
    images = client_inputs(images, SecureSettings(timeout_s=timeout_s), batch_size)
    try:
        offer = request_session(server, security, int(images.shape[0]), batch_size, timeout_s, queue_timeout_s, log)
    except PeerError as e:
        raise SecureInferenceError(str(e)) from None
    if log is not None:
        log(f'client: session {offer.number}: meeting the owner at {offer.rendezvous} and the dealer at {offer.dealer}')
    return run_client(offer.rendezvous, images, offer.settings, offer.secret, clamp=clamp, batch_size=batch_size,
                      dealer=offer.dealer, security=security)
