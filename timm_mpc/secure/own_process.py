"""One party of a run across hosts, for a launcher of your own: :func:`run_owner`, :func:`run_client`,
:func:`run_dealer`.

Each runs its party in a child process and waits for it: a party that cannot meet or lost its peer can only be stopped
by ending its process (a blocked handshake, SPU's link), and that must not be the caller's. The caller gets the
party's result or a :class:`~.launch.SecureInferenceError` naming why it failed.
"""
from typing import Any, Dict, List, Optional

import torch

from ..layers.attn_kinds import kind_modules
from .launch import LocalParties, party_process
from .links import LinkSecurity
from .plan import SecurePlan
from .processes import process_context, start_processes
from .protocol import OwnerLimits, PartyResult, client_inputs
from .settings import SecureSettings

__all__ = ['run_owner', 'run_client', 'run_dealer']


def _engine_options(settings: SecureSettings, client_address: Optional[str], dealer: Optional[str] = None,
                    security: Optional[LinkSecurity] = None) -> Dict[str, Any]:
    if settings.engine == 'spu':
        if dealer is not None:
            raise ValueError('dealer is for CrypTen\'s links; SPU has no dealer')
        return dict(security=security, **({} if client_address is None else dict(client_address=client_address)))
    if client_address is not None:
        raise ValueError(f'client_address is for the SPU engine (CrypTen parties meet at the rendezvous only); '
                         f'these settings use {settings.engine}')
    return dict(dealer=dealer, security=security)


def _run_party(role: str, rendezvous: str, settings: SecureSettings, payload: Dict[str, Any]) -> Any:
    """Run ``role`` in a child process until it reports; its result (None for the dealer), or a
    SecureInferenceError."""
    ctx = process_context()
    modules = kind_modules()
    reader, sender = ctx.Pipe()
    # not a daemon: an owner asked for a batch size it has no dry run of starts the dry run's processes itself
    proc = ctx.Process(target=party_process, args=(role, rendezvous, settings.to_dict(), payload, sender, modules))
    start_processes([proc], modules)
    sender.close()
    parties = LocalParties({role: proc}, {role: reader}, {}, settings)
    try:
        result = parties.collect([role])[role]
    finally:
        parties.stop()
    if result is not None and result.logits is not None:
        result.logits = torch.from_numpy(result.logits)
    return result


def run_owner(rendezvous: str, plan: SecurePlan, state_dict: Dict[str, torch.Tensor], settings: SecureSettings,
              secret: bytes, requests: Optional[Dict[int, List[Any]]] = None, limits: Optional[OwnerLimits] = None,
              client_address: Optional[str] = None, dealer: Optional[str] = None,
              security: Optional[LinkSecurity] = None) -> PartyResult:
    """Run party 0, the model owner, in a child process (see the engine's ``run_owner``, e.g.
    :func:`timm_mpc.secure.crypten.party.run_owner`): it contributes the weights and the plan and learns nothing but the
    costs and the sizes of the client's batches.

    Args:
        rendezvous: ``tcp://HOST:PORT`` where the owner listens for the client (and the dealer).
        plan: The owner's plan (:func:`~.plan.build_secure_plan`); ``state_dict``: :meth:`SecurePlan.owner_weights`.
        settings: The run's settings; the engine they name runs the party.
        secret: The run's secret, which every party proves it holds before anything is shared.
        requests: Batch size -> the dealer requests of one inference (:func:`~.dry_run.dry_run`); others are made.
        limits: What the owner accepts of the client's batches (:class:`~.party.OwnerLimits`).
        client_address: SPU only: where the client listens (default: the rendezvous port + 1).
        dealer: CrypTen: ``HOST:PORT`` where the dealer listens (default: the rendezvous host, the next port).
        security: CrypTen: TLS for every link and the peers' identities this party accepts
            (:class:`~timm_mpc.secure.links.LinkSecurity`); None: plaintext, on loopback only.

    Raises:
        SecureInferenceError: the party failed (its error), was not met or lost its peer within the timeout.
    """
    plan.check()
    options = dict(limits=limits, **_engine_options(settings, client_address, dealer, security))
    payload = dict(plan=plan, state_dict=state_dict, requests=requests, secret=secret, options=options)
    return _run_party('owner', rendezvous, settings, payload)


def run_client(rendezvous: str, images: torch.Tensor, settings: SecureSettings, secret: bytes, clamp: bool = False,
               batch_size: Optional[int] = None, requests: Optional[Dict[int, List[Any]]] = None,
               client_address: Optional[str] = None, dealer: Optional[str] = None,
               security: Optional[LinkSecurity] = None) -> PartyResult:
    """Run party 1, the client, in a child process (see the engine's ``run_client``, e.g.
    :func:`timm_mpc.secure.crypten.party.run_client`): it contributes the images and alone receives the logits.

    The images are checked here first (a finite float tensor of four dimensions), against the owner's plan in the
    party before anything is shared (outside its input bounds: refused, or clamped with ``clamp``). ``batch_size``:
    that many images at a time in one session; ``requests``, ``client_address``, ``dealer``, ``security``: as for
    :func:`run_owner`.

    Raises:
        SecureInferenceError: the party failed (its error), was not met or lost its peer within the timeout.
    """
    images = client_inputs(images, settings, batch_size)
    payload = dict(images=images, batch_size=batch_size, requests=requests, secret=secret,
                   options=dict(clamp=clamp, **_engine_options(settings, client_address, dealer, security)))
    return _run_party('client', rendezvous, settings, payload)


def run_dealer(rendezvous: str, settings: SecureSettings, secret: bytes, dealer: Optional[str] = None,
               security: Optional[LinkSecurity] = None) -> None:
    """Run the dealer of a CrypTen run (``provider='TTP'``, rank 2) in a child process until the owner is done (see
    :func:`timm_mpc.secure.crypten.party.run_dealer`). It must be neither party. It listens at ``dealer``; ``security``
    as for :func:`run_owner`.

    Raises:
        ValueError: the settings have no dealer.
        SecureInferenceError: the dealer refused a request, or was not met or lost a party within the timeout.
    """
    if not settings.dealer:
        raise ValueError(f'the dealer (rank 2) serves CrypTen with provider TTP; these settings use '
                         f'{settings.engine} with provider {settings.provider}')
    _run_party('dealer', rendezvous, settings,
               dict(secret=secret, options=_engine_options(settings, None, dealer, security)))

