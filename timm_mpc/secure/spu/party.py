"""One party of the two-party protocol on SPU (the paper's engine): the model owner (rank 0) or the client (rank 1).

The same roles as with CrypTen (:mod:`..crypten.party`): the owner secret-shares the weights and sends the public plan, the
client checks its images against the plan before sharing them, both run the plan's forward on SPU, and the owner
sends its share of the logits to the client alone. There is no dealer: with CHEETAH (the default) the parties make
their correlations between themselves with oblivious transfer and homomorphic encryption; with SEMI2K, SPU 0.9.5
makes the owner deal them (its trusted first party), which lets the owner open the client's data, so SEMI2K runs
measure cost only and warn. The parties talk over SPU's link (brpc): each listens on an address of its own, the
owner on the rendezvous ``tcp://HOST:PORT``, the client on ``client_address`` (default: the same host, the next
port), over TLS (``security``: SPU's link checks a peer's certificate against a CA only, so each party's CA is the
one that signed the other party's certificate alone) or in plaintext on loopback only, and they admit each other by
the run's secret (:mod:`.admission`) before anything else. Every wait is bounded by the settings' timeout (meeting
the other party included).
"""
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ...profile import CostMeter, CostRow
from ..admission import admit, check_secret
from ..errors import PeerError
from ..links import LinkSecurity, is_loopback, parse_address
from ..plan import SecurePlan
from ..protocol import (
    ROLES, OwnerLimits, PartyResult, agree, client_inputs, decode_json, lost_peer, report_on_stderr, watchdog,
)
from ..secure_vit import CLIENT, OWNER, Backend, SecureViT
from ..settings import SecureSettings
from . import ops as spu_ops
from .runtime import SpuSession, exit_if_links_abandoned

# exit_if_links_abandoned: the hook engines.exit_after_failure calls after a failure
__all__ = ['run_owner', 'run_client', 'spu_addresses', 'SpuBackend', 'exit_if_links_abandoned']


class SpuBackend(Backend):
    """SPU's secret tensors (:class:`~timm_mpc.secure.spu.runtime.SpuTensor`) and :mod:`.ops`."""
    ops = spu_ops

    def __init__(self, session: SpuSession) -> None:
        self.session = session

    def share(self, value: torch.Tensor, src: int) -> Any:
        return self.session.share(value.numpy() if self.session.rank == src else None, value.shape, src)

    def cat(self, tensors: Any, dim: int) -> Any:
        jnp = self.session.jnp
        return self.session.run(('cat', dim, len(tensors)), lambda *xs: jnp.concatenate(xs, axis=dim), tensors)[0]


def spu_addresses(rendezvous: str, client_address: Optional[str] = None) -> List[str]:
    """``[owner, client]`` listening addresses from the rendezvous ``tcp://HOST:PORT`` (the owner's) and the client's
    ``HOST:PORT`` (default: the owner's host, the next port)."""
    if not rendezvous.startswith('tcp://') or ':' not in rendezvous[6:]:
        raise ValueError(f'the SPU engine needs a rendezvous tcp://HOST:PORT (where the owner listens), got {rendezvous!r}')
    host, port = rendezvous[6:].rsplit(':', 1)
    if not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f'the rendezvous port must be a number from 1 to 65534, got {port!r}')
    client = client_address or f'{host}:{int(port) + 1}'
    if ':' not in client or not client.rsplit(':', 1)[1].isdigit():
        raise ValueError(f'the client address must be HOST:PORT, got {client!r}')
    return [f'{host}:{port}', client]


def _message(e: BaseException) -> str:
    """The line of an SPU (yacl) error that says what went wrong, without its stack trace."""
    lines = [line.strip() for line in str(e).splitlines()
             if line.strip() and not line.lstrip().startswith(('#', 'what:', 'Stacktrace', 'stacktrace'))]
    return lines[0] if lines else type(e).__name__


def _exchange(session: SpuSession, obj: Any, src: int) -> Any:
    """Send a JSON value from ``src`` to the other party (JSON, never pickle)."""
    if session.rank == src:
        session.send(json.dumps(obj).encode())
        return obj
    return decode_json(session.recv(), ROLES[src])


def _admit(rank: int, secret: bytes, session: SpuSession) -> None:
    """The other party proves it holds the run's secret, and this one too, before SPU's runtime starts."""
    admit(session.send, lambda size: session.recv(), secret, ROLES[rank], ROLES[1 - rank], first=rank == OWNER)


def _compile(program: SecureViT, session: SpuSession, size: int) -> float:
    """Compile every SPU program of a batch of ``size`` images in a pass of the forward without traffic (and without
    cost rows or progress); return the seconds it took."""
    meter, program.meter = program.meter, CostMeter(session)
    on_layer, program.on_layer = program.on_layer, None
    t0 = time.perf_counter()
    try:
        with session.compile_only():
            program.forward(program.share_images(None, size))
    finally:
        program.meter, program.on_layer = meter, on_layer
    return time.perf_counter() - t0


def _run(rank: int, rendezvous: str, settings: SecureSettings, secret: bytes, plan: Optional[SecurePlan],
         state_dict: Optional[dict], images: Optional[torch.Tensor], clamp: bool = False,
         log: Optional[Callable[[str], None]] = None, batch_size: Optional[int] = None,
         on_batch: Optional[Callable[[int], None]] = None,
         on_layer: Optional[Callable[[], None]] = None, client_address: Optional[str] = None,
         on_timeout: Optional[Callable[[str], None]] = None, limits: Optional[OwnerLimits] = None,
         security: Optional[LinkSecurity] = None) -> PartyResult:
    check_secret(secret)
    addresses = spu_addresses(rendezvous, client_address)
    if security is None:
        remote = [a for a in addresses if not is_loopback(parse_address(a, 'an SPU party\'s address')[0])]
        if remote:
            raise ValueError(f'plaintext links are for loopback only; {remote[0]} is not: give TLS certificates '
                             f'(--tls-cert, --tls-key, --tls-ca)')
    elif security.expect:
        raise ValueError('SPU\'s link checks a peer\'s certificate against the CA only, not its identity: leave expect '
                         '(--expect-*) out and give as the CA the one that signed the other party\'s certificate alone')
    log_dir = tempfile.mkdtemp(prefix='timm-mpc-spu-')
    session = None
    try:
        message = f'could not meet the other party at {addresses[1 - rank]} within {settings.timeout_s:.0f} s'
        # brpc's connection retries have no overall bound of their own: the watchdog gives them one
        with watchdog(settings.timeout_s + 1, f'{message} (no answer)', on_timeout):
            try:
                session = SpuSession(rank, addresses, settings.protocol, settings.timeout_s, log_dir,
                                     on_timeout or report_on_stderr, partial(_admit, rank, secret), security)
            except PeerError:
                raise
            except RuntimeError as e:
                raise PeerError(f'{message} ({_message(e)})') from e
        if log is not None:
            log(f'{"owner" if rank == OWNER else "client"}: connected to the other party over SPU ({settings.protocol})')
        exchange = partial(_exchange, session)
        plan, images, batches = agree(exchange, rank, settings, plan, images, clamp, batch_size, limits)
        program = SecureViT(plan, settings, CostMeter(session), state_dict, SpuBackend(session))
        program.on_layer = on_layer
        logits, profile, start, compiled = [], None, 0, set()
        for index, size in enumerate(batches):
            if index:  # the cost profile is the first batch's
                program.meter = CostMeter(session)
            meter = program.meter
            if size not in compiled:  # SPU's programs for this batch size, compiled before the batch is timed
                meter.profile.setup.append(CostRow('program', 'compile', 0, 0.0, _compile(program, session, size)))
                compiled.add(size)
                if log is not None:
                    log(f'compiled {session.compiled} SPU programs')
            patches = program.share_images(None if images is None else images[start:start + size], size)
            exchange('online', OWNER)
            with meter.inference():
                shared = program.forward(patches)
                with meter.section('head', 'reveal'):
                    logits.append(session.reveal_to(shared, CLIENT))
            start += size
            if index == 0:
                profile = meter.profile  # SPU logs both directions' bytes: nothing to merge
            if on_batch is not None:
                on_batch(size)
        plain = None if rank == OWNER else torch.from_numpy(np.concatenate(logits)).float()
        return PartyResult(rank, plain, profile, plan, [] if plain is None else plan.implausible(plain))
    except RuntimeError as e:
        if isinstance(e, PeerError):
            raise
        message = _message(e)
        if lost_peer(message):
            raise PeerError(f'lost the other party (the {ROLES[1 - rank]}) during the protocol ({message})') from e
        raise RuntimeError(f'SPU failed: {message}') from e
    finally:
        if session is not None:
            session.close(peer_alive=sys.exc_info()[0] is None)
        shutil.rmtree(log_dir, ignore_errors=True)


def run_owner(rendezvous: str, plan: SecurePlan, state_dict: dict, settings: SecureSettings, secret: bytes,
              log: Optional[Callable[[str], None]] = None, on_timeout: Optional[Callable[[str], None]] = None,
              client_address: Optional[str] = None, limits: Optional[OwnerLimits] = None,
              security: Optional[LinkSecurity] = None, **_: Any) -> PartyResult:
    """Run party 0, the model owner, on SPU: contributes the weights and the plan, learns nothing but the costs (and
    the sizes of the client's batches). ``on_timeout`` reports why the process ends when the other party is not met
    in time (default: a line on stderr); the process then exits with code 2. ``secret``: the run's, which each party
    proves it holds before anything is shared (:mod:`.admission`). ``security``: TLS on SPU's link, its CA the one
    that signed the client's certificate alone (:class:`~timm_mpc.secure.links.LinkSecurity` without ``expect``);
    None: plaintext, on loopback only."""
    plan.check()
    settings.warn_if_insecure()
    return _run(OWNER, rendezvous, settings, secret, plan, state_dict, None, log=log, client_address=client_address,
                on_timeout=on_timeout, limits=limits, security=security)


def run_client(rendezvous: str, images: torch.Tensor, settings: SecureSettings, secret: bytes,
               log: Optional[Callable[[str], None]] = None, clamp: bool = False,
               on_timeout: Optional[Callable[[str], None]] = None, batch_size: Optional[int] = None,
               on_batch: Optional[Callable[[int], None]] = None,
               on_layer: Optional[Callable[[], None]] = None, client_address: Optional[str] = None,
               security: Optional[LinkSecurity] = None) -> PartyResult:
    """Run party 1, the client, on SPU: contributes the images and alone receives the logits (as
    :func:`timm_mpc.secure.crypten.party.run_client`). ``security``: as for :func:`run_owner`, its CA the one that
    signed the owner's certificate alone."""
    images = client_inputs(images, settings, batch_size)
    return _run(CLIENT, rendezvous, settings, secret, None, None, images, clamp=clamp, log=log, batch_size=batch_size,
                on_batch=on_batch, on_layer=on_layer, client_address=client_address, on_timeout=on_timeout,
                security=security)
