"""One party of the two-party protocol: the model owner (rank 0), the client (rank 1), or the dealer.

The owner holds the weights and the plan, the client holds the images; they meet over
torch.distributed (gloo) at a rendezvous address. The owner sends the plan (public architecture) to
the client, both share their secrets, run the plan, and only the client learns the logits.
"""
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from .costs import CostMeter, CostProfile
from .crypten_compat import import_crypten, set_process_group_timeout
from .plan import PLAN_VERSION, check_images
from .secure_vit import CLIENT, OWNER, SecureViT
from .settings import SecureSettings

__all__ = ['PartyResult', 'run_owner', 'run_client', 'run_dealer', 'PeerError']

ROLES = {OWNER: 'owner', CLIENT: 'client'}


class PeerError(RuntimeError):
    """The other party could not be reached, stopped answering, or broke the protocol."""


@dataclass
class PartyResult:
    """What a party ends with: the client's logits (None for the owner) and the cost profile."""
    rank: int
    logits: Optional[torch.Tensor]
    profile: CostProfile
    plan: Dict[str, Any]


def _first_line(error: BaseException) -> str:
    """The message of a torch.distributed error without the C++ stack trace it carries."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(('frame #', 'Exception raised from'))]
    return lines[0] if lines else type(error).__name__


def _init(rank: int, rendezvous: str, settings: SecureSettings, world_size: int = 2) -> Any:
    os.environ.update(RENDEZVOUS=rendezvous, WORLD_SIZE=str(world_size), RANK=str(rank), DISTRIBUTED_BACKEND='gloo')
    set_process_group_timeout(settings.timeout_s)
    crypten = import_crypten()
    settings.apply(crypten)
    try:
        crypten.init()
    except Exception as e:
        raise PeerError(f'could not meet the other party at {rendezvous} within {settings.timeout_s:.0f} s '
                        f'({type(e).__name__}: {_first_line(e)})') from e
    return crypten


def _exchange_json(crypten: Any, obj: Optional[Any], src: int) -> Any:
    """Send a JSON value from ``src`` to the other party (JSON, never pickle: the peer is not trusted to run code)."""
    import torch.distributed as dist
    group = crypten.communicator.get().main_group
    if crypten.communicator.get().get_rank() == src:
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src, group=group)
    if crypten.communicator.get().get_rank() != src:
        data = torch.zeros(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
    return json.loads(bytes(data.tolist()).decode())


def _run(rank: int, rendezvous: str, settings: SecureSettings, plan: Optional[Dict[str, Any]],
         state_dict: Optional[Dict[str, torch.Tensor]], images: Optional[torch.Tensor],
         log: Optional[Callable[[str], None]] = None) -> PartyResult:
    crypten = _init(rank, rendezvous, settings)
    if log is not None:
        log(f'{ROLES[rank]}: connected to the other party; running the protocol')
    try:
        # settings must agree, or the parties would compute different things
        owner_settings = _exchange_json(crypten, settings.to_dict() if rank == OWNER else None, OWNER)
        own = settings.to_dict()
        differ = {k: (owner_settings[k], own[k]) for k in own if k != 'timeout_s' and owner_settings.get(k) != own[k]}
        if differ:
            raise PeerError(f'the parties use different secure settings (owner, client): {differ}')
        plan = _exchange_json(crypten, plan, OWNER)
        if plan.get('version') != PLAN_VERSION:
            raise PeerError(f'plan version {plan.get("version")} from the owner; this timm-mpc reads {PLAN_VERSION}')
        if rank == CLIENT:
            check_images(plan, images)
        batch = _exchange_json(crypten, images.shape[0] if rank == CLIENT else None, CLIENT)

        meter = CostMeter(crypten.communicator.get())
        program = SecureViT(plan, settings, meter, state_dict)
        patches = program.share_images(images, batch)
        with meter.inference():
            logits = program.forward(patches)
            with meter.section('head', 'reveal'):
                plain = logits.get_plain_text(dst=CLIENT)
        profile = meter.profile
        # each party counted only what it sent: add the other party's bytes
        mine = [[r.bytes for r in profile.rows], [r.bytes for r in profile.setup]]
        owner_bytes = _exchange_json(crypten, mine if rank == OWNER else None, OWNER)
        client_bytes = _exchange_json(crypten, mine if rank == CLIENT else None, CLIENT)
        other = client_bytes if rank == OWNER else owner_bytes
        profile = CostProfile.merge_parties(profile, other[0], other[1])
        return PartyResult(rank, plain if rank == CLIENT else None, profile, plan)
    except RuntimeError as e:
        if isinstance(e, PeerError):
            raise
        message = str(e)
        if any(s in message.lower() for s in ('connection', 'timed out', 'timeout', 'closed', 'reset by peer', 'broken pipe')):
            raise PeerError(f'lost the other party during the protocol ({type(e).__name__}: {_first_line(e)})') from e
        raise
    finally:
        try:
            crypten.uninit()
        except Exception:  # the peer may be gone already; nothing left to release
            pass


def run_owner(rendezvous: str, plan: Dict[str, Any], state_dict: Dict[str, torch.Tensor],
              settings: SecureSettings, log: Optional[Callable[[str], None]] = None) -> PartyResult:
    """Run party 0, the model owner: contributes the weights, learns nothing but the costs."""
    return _run(OWNER, rendezvous, settings, plan, state_dict, None, log)


def run_client(rendezvous: str, images: torch.Tensor, settings: SecureSettings,
               log: Optional[Callable[[str], None]] = None) -> PartyResult:
    """Run party 1, the client: contributes the images and alone receives the logits."""
    return _run(CLIENT, rendezvous, settings, None, None, images, log)


def run_dealer(rendezvous: str, settings: SecureSettings) -> None:
    """Run the trusted third party that deals multiplication triples (``provider='TTP'``), rank 2."""
    os.environ.update(RENDEZVOUS=rendezvous, WORLD_SIZE='2', RANK='2', DISTRIBUTED_BACKEND='gloo')
    set_process_group_timeout(settings.timeout_s)
    crypten = import_crypten()
    settings.apply(crypten)
    crypten.mpc.provider.TTPServer()
