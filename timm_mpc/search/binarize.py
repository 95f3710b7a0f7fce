"""Turn a searched supernet's α (per head) and β (per token) into fixed patterns: by a fraction μ of
ReLU-Softmax heads (global top-k, as in the paper), or by a secure-latency budget."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..layers.attn_kinds import SEARCH_KINDS
from ..layers.linearizable_mlp import LinearizableMlp
from ..reader import read_model
from ..cost import NETWORKS, estimate_latency

__all__ = ['searches_gelu', 'searched_alpha', 'searched_beta', 'binarize_mu', 'binarize_budget', 'binarize_budget_checked',
           'binarize_gelu']

RS, SA = SEARCH_KINDS  # what α = 1 and α = 0 stand for


def searched_alpha(model: nn.Module) -> List[List[float]]:
    """α of every search-mode attention layer, one list of per-head values per layer."""
    layers = [m for _, m in read_model(model).heads]
    if not layers or not all(m.searching for m in layers):
        raise ValueError('the model is not a searched supernet: every attention layer must be in search mode (α)')
    return [m.alpha.detach().flatten().tolist() for m in layers]


def searches_gelu(model: nn.Module) -> bool:
    """True if any MLP of the model is searching its GeLU linearization (MPCViT+ β)."""
    return any(isinstance(m, LinearizableMlp) and m.searching for _, m in read_model(model).mlps)


def searched_beta(model: nn.Module) -> List[List[float]]:
    """β of every search-mode MLP (MPCViT+), one flat list of per-token values per layer."""
    layers = [m for _, m in read_model(model).mlps if isinstance(m, LinearizableMlp)]
    if not layers or not all(m.searching for m in layers):
        raise ValueError("the model has no GeLU search: create it with gelu_pattern='search' (MPCViT+)")
    return [m.beta.detach().flatten().tolist() for m in layers]


def _ranked(values: Sequence[Sequence[float]]) -> List[Tuple[int, int]]:
    """(layer, index) pairs from the largest value down; ties go to the earlier layer and index."""
    flat = [(-v, layer, i) for layer, row in enumerate(values) for i, v in enumerate(row)]
    return [(layer, i) for _, layer, i in sorted(flat)]


def binarize_mu(alpha: Sequence[Sequence[float]], mu: float) -> List[List[str]]:
    """Keep ReLU-Softmax in the ``round(μ·L·H)`` heads with the largest α over all layers; the rest Scaling."""
    if not 0 <= mu <= 1:
        raise ValueError(f'mu is the fraction of ReLU-Softmax heads and must lie in [0, 1]; got {mu}')
    total = sum(len(row) for row in alpha)
    keep = set(_ranked(alpha)[:round(mu * total)])
    return [[RS if (layer, h) in keep else SA for h in range(len(row))] for layer, row in enumerate(alpha)]


def binarize_budget(
        alpha: Sequence[Sequence[float]],
        table: Dict[str, Any],
        budget_s: float,
        network: str = 'lan',
        gelu_pattern: Optional[Sequence[Any]] = None,
) -> List[List[str]]:
    """Keep ReLU-Softmax in the heads with the largest α for as long as the estimated latency stays within
    ``budget_s`` seconds on ``network``: heads are taken greedily in α order, skipping any that would
    exceed the budget (a layer's first ReLU-Softmax head also pays that kind's rounds).

    Raises:
        ValueError: the budget is below the all-Scaling model's latency (the least the model can cost).
    """
    if network not in NETWORKS:
        raise ValueError(f'unknown network {network!r}; accepted: {list(NETWORKS)}')
    pattern = [[SA] * len(row) for row in alpha]

    def latency(p: List[List[str]]) -> float:
        return estimate_latency(table, p, gelu_pattern)['latency_s'][network]

    floor = latency(pattern)
    if floor > budget_s:
        raise ValueError(f'a budget of {budget_s:.3g} s ({network}) is below the all-Scaling model\'s '
                         f'estimated {floor:.3g} s; the budget must be at least that')
    for layer, h in _ranked(alpha):
        pattern[layer][h] = RS
        if latency(pattern) > budget_s:
            pattern[layer][h] = SA
    return pattern


def binarize_budget_checked(
        alpha: Sequence[Sequence[float]],
        latency: Callable[[List[List[str]]], float],
        budget_s: float,
        network: str = 'lan',
) -> List[List[str]]:
    """:func:`binarize_budget` for a model the per-kind table does not price, with ``latency(pattern)`` an exact but
    costly estimate (a dry run of the model with that pattern): ReLU-Softmax in the ``k`` heads with the largest α,
    ``k`` first from the average saving of one head (the all-Scaling and all-ReLU-Softmax estimates), then one fewer
    for as long as the pattern's own estimate exceeds ``budget_s``. Within the budget, though the average may spend
    it on heads that save less than others would.

    Raises:
        ValueError: the budget is below the all-Scaling model's latency (the least the model can cost).
    """
    def pattern(k: int) -> List[List[str]]:
        out = [[SA] * len(row) for row in alpha]
        for layer, h in ranked[:k]:
            out[layer][h] = RS
        return out

    ranked = _ranked(alpha)
    floor = latency(pattern(0))
    if floor > budget_s:
        raise ValueError(f'a budget of {budget_s:.3g} s ({network}) is below the all-Scaling model\'s '
                         f'estimated {floor:.3g} s; the budget must be at least that')
    saving = (latency(pattern(len(ranked))) - floor) / max(len(ranked), 1)
    k = len(ranked) if saving <= 0 else min(len(ranked), int((budget_s - floor) // saving))
    while k > 0 and latency(pattern(k)) > budget_s:
        k -= 1
    return pattern(k)


def binarize_gelu(beta: Sequence[Sequence[float]], keep: float) -> List[List[int]]:
    """Keep GeLU (1) on the ``round(keep·total)`` token positions with the largest β over all layers; the
    others are linearized (0). One 0/1 list per layer, shaped like β."""
    if not 0 <= keep <= 1:
        raise ValueError(f'the GeLU keep fraction must lie in [0, 1]; got {keep}')
    total = sum(len(row) for row in beta)
    kept = set(_ranked(beta)[:round(keep * total)])
    return [[int((layer, t) in kept) for t in range(len(row))] for layer, row in enumerate(beta)]
