"""After a search: binarize the supernet for each requested μ and latency budget, and save every result as
a pattern (JSON) and as a checkpoint whose state holds the fixed pattern."""
import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from ..cost import estimate_latency, model_cost_table
from ..layers.pattern_state import checkpoint_state
from ..pattern import count_head_kinds, set_attn_pattern, set_gelu_pattern
from ..utils import save_weights
from .binarize import (
    binarize_budget, binarize_budget_checked, binarize_gelu, binarize_mu, searched_alpha, searched_beta, searches_gelu,
)

__all__ = ['binarized_model', 'export_patterns']


def binarized_model(supernet: nn.Module, attn_pattern: List[List[str]], gelu_pattern: Optional[List[Any]] = None) -> nn.Module:
    """A copy of the searched supernet with fixed head (and GeLU) patterns and the same weights."""
    model = copy.deepcopy(supernet)
    set_attn_pattern(model, attn_pattern)
    if gelu_pattern is not None:
        set_gelu_pattern(model, gelu_pattern)
    elif searches_gelu(model):
        raise ValueError('the supernet searched GeLU linearization (β); give a GeLU keep fraction to binarize it')
    return model


def export_patterns(
        supernet: nn.Module,
        out_dir: Path,
        mus: Sequence[float] = (0.5,),
        budgets_s: Sequence[float] = (),
        network: str = 'lan',
        gelu_keep: Optional[float] = None,
        table: Optional[Dict[str, Any]] = None,
        estimate: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Binarize ``supernet`` for every μ and budget; write ``<name>.safetensors`` and ``patterns.json``.

    Names are ``mu50`` for μ = 0.5 and ``budget_lan_9.5s`` for a 9.5 s LAN budget. Each binarized model's secure cost
    is ``estimate(model)`` (e.g. :func:`timm_mpc.cost.pricing.model_estimate`, which prices any family), or, when
    None, the per-kind cost ``table``'s (measured for the supernet's shapes when None). Budgets binarize with the
    table where one is given (:func:`binarize_budget`), else with ``estimate`` (:func:`binarize_budget_checked`).

    Returns:
        ``alpha``, ``beta`` (None without a GeLU search) and ``patterns``: per name the head and GeLU
        patterns, the number of ReLU-Softmax heads, the estimated secure cost and the checkpoint file.
    """
    alpha = searched_alpha(supernet)
    beta = searched_beta(supernet) if searches_gelu(supernet) else None
    gelu = binarize_gelu(beta, gelu_keep) if beta is not None and gelu_keep is not None else None
    if table is None and estimate is None:
        table = model_cost_table(supernet)
    chosen = {f'mu{round(mu * 100):02d}': binarize_mu(alpha, mu) for mu in mus}
    for budget in budgets_s:
        if table is not None:
            chosen[f'budget_{network}_{budget:g}s'] = binarize_budget(alpha, table, budget, network, gelu)
        else:  # each candidate pattern priced by ``estimate`` itself
            chosen[f'budget_{network}_{budget:g}s'] = binarize_budget_checked(
                alpha, lambda attn: estimate(binarized_model(supernet, attn, gelu))['latency_s'][network], budget,
                network)
    patterns: Dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, attn in chosen.items():
        model = binarized_model(supernet, attn, gelu)
        save_weights(checkpoint_state(model), out_dir / f'{name}.safetensors')
        patterns[name] = dict(attn_pattern=attn, gelu_pattern=gelu, head_kinds=count_head_kinds(model),
                              secure_estimate=estimate(model) if estimate else estimate_latency(table, attn, gelu),
                              file=f'{name}.safetensors')
    result = dict(alpha=alpha, beta=beta, gelu_keep=gelu_keep, network=network, patterns=patterns)
    (out_dir / 'patterns.json').write_text(json.dumps(result, indent=1))
    return result
