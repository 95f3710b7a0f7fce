"""What a model will cost under MPC, for the search, training and evaluation: from the per-kind cost table where it
prices the model (ViT-shaped: one token sequence, blocks of one width with a plain MLP; :mod:`timm_mpc.cost`), else
from dry runs of the model itself (:mod:`timm_mpc.secure.crypten.dry_run`: any family the secure plan supports, CrypTen only).
"""
import copy
from typing import Any, Dict, Optional, Sequence

from torch import nn

from ..layers.linearizable_mlp import LinearizableMlp
from ..pattern import set_attn_pattern, set_gelu_pattern
from ..profile import NETWORKS
from ..reader import read_model
from ..secure.crypten.dry_run import dry_run
from ..secure.engines import get_engine
from ..secure.plan import build_plan, build_secure_plan
from ..secure.settings import SecureSettings
from . import cost_table_shape, head_costs, model_cost_table, model_latency

__all__ = ['priced_by_table', 'check_priceable', 'check_budgets', 'model_estimate', 'model_head_costs']


def priced_by_table(model: nn.Module) -> bool:
    """Whether the per-kind cost table prices ``model`` (else a dry run does)."""
    try:
        cost_table_shape(model)
    except ValueError:
        return False
    return True


def check_priceable(model: nn.Module, settings: SecureSettings, advice: str) -> None:
    """Refuse, before a run starts, a model neither the cost table nor a dry run can price: the engine has no dry
    run, or the secure plan cannot compute the model.

    Raises:
        ValueError: naming the model and ``advice`` (UnsupportedModelError names the module).
    """
    if priced_by_table(model):
        return
    if not get_engine(settings.engine).dry_run:
        raise ValueError(f'{type(model).__name__} is priced by a dry run, which the {get_engine(settings.engine).title} '
                         f'engine has not (the per-kind cost table prices ViT-shaped models only): {advice}')
    build_plan(_with_patterns(model, 'scaling', None))


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy to price: the plan's calibration runs on the CPU in eval mode; a training model may be elsewhere."""
    return copy.deepcopy(model).cpu().eval()


def _dry_estimate(model: nn.Module, settings: SecureSettings) -> Dict[str, Any]:
    """The dry-run estimate of ``model``, a :func:`_cpu_copy`."""
    dry = dry_run(build_secure_plan(model, settings), settings, 1)
    return dict(rounds=dry.rounds, bytes=dry.bytes, time_s=dry.compute_s,
                latency_s={name: dry.latency(net) for name, net in NETWORKS.items()}, priced_by='dry run')


def model_estimate(model: nn.Module, settings: SecureSettings) -> Dict[str, Any]:
    """One image's estimated secure cost of a fixed-pattern model: ``rounds``, ``bytes``, ``time_s``, ``latency_s``
    per network and ``priced_by`` (``'cost table'`` or ``'dry run'``)."""
    if priced_by_table(model):
        return dict(model_latency(model, model_cost_table(model, settings=settings)), priced_by='cost table')
    check_priceable(model, settings, 'estimate it with engine crypten')
    return _dry_estimate(_cpu_copy(model), settings)


def check_budgets(model: nn.Module, settings: SecureSettings, budgets_s: Sequence[float], network: str = 'lan') -> None:
    """Refuse, before a search starts, latency budgets below the least ``model`` can cost: every head Scaling and,
    with MPCViT+ MLPs, every GeLU token linear. (Binarizing checks each budget exactly; this catches the hopeless
    ones before the search epochs rather than after them.) Only for models the cost table prices: a dry run's
    seconds vary from run to run, so a dry-run-priced model's budgets are checked once, at binarization.

    Raises:
        ValueError: naming the budgets that are too low, the floor and the network.
    """
    if not budgets_s or not priced_by_table(model):
        return
    gelu = 'linear' if any(isinstance(m, LinearizableMlp) for _, m in read_model(model).mlps) else None
    floor = model_estimate(_with_patterns(model, 'scaling', gelu), settings)['latency_s'][network]
    low = [b for b in budgets_s if b < floor]
    if low:
        least = 'every head Scaling' + (' and every GeLU token linear' if gelu else '')
        raise ValueError(f'latency budgets {low} s ({network}) are below the least this model can cost: {floor:.3g} s '
                         f'estimated with {least} ({settings.engine} {settings.protocol} cost); accepted: budgets of '
                         f'at least {floor:.3g} s')


def _with_patterns(model: nn.Module, kind: str, gelu: Optional[str]) -> nn.Module:
    fixed = _cpu_copy(model)
    set_attn_pattern(fixed, [[kind] * m.num_heads for _, m in read_model(fixed).heads])
    if gelu is not None:
        set_gelu_pattern(fixed, gelu)
    return fixed


def model_head_costs(model: nn.Module, settings: SecureSettings, network: str = 'lan') -> Dict[str, Optional[float]]:
    """Seconds of estimated latency saved by one head going from ReLU-Softmax to Scaling (``head``) and by one token
    going from GeLU to linear (``token``, None without MPCViT+ MLPs), for the search's cost-weighted penalty: from the
    cost table, or from dry runs of the model with every head (and token) of one kind, averaged over them."""
    if priced_by_table(model):
        return head_costs(model_cost_table(model, settings=settings), network)
    check_priceable(model, settings, 'search it without --cost-weighted, or with --engine crypten')
    heads = sum(m.num_heads for _, m in read_model(model).heads)
    mlps = [m for _, m in read_model(model).mlps if isinstance(m, LinearizableMlp)]
    keep = 'gelu' if mlps else None

    def latency(kind: str, gelu: Optional[str]) -> float:
        return _dry_estimate(_with_patterns(model, kind, gelu), settings)['latency_s'][network]

    # differences of measured times: kept positive against timing noise (the rounds make them clearly so)
    head = max((latency('relu_softmax', keep) - latency('scaling', keep)) / heads, 1e-9)
    token = None
    if mlps:
        token = max((latency('scaling', 'gelu') - latency('scaling', 'linear')) / sum(m.num_tokens for m in mlps), 1e-9)
    return dict(head=head, token=token)
