"""Secure latency of a whole model priced from a per-kind cost table, without running the protocol."""
from typing import Any, Dict, List, Optional, Sequence, Union

from timm.layers import Mlp
from torch import nn

from ..layers.activations import activation_name
from ..layers.attn_kinds import SEARCH_KINDS
from ..layers.linearizable_mlp import LinearizableMlp
from ..pattern import get_attn_pattern, get_gelu_pattern
from ..profile import NETWORKS, NetworkSetting
from ..reader import read_model
from .table import kind_cost_table

MLP_TYPES_PRICED = (Mlp, LinearizableMlp)  # fc1, activation, fc2: what the probe model measures

__all__ = ['estimate_latency', 'model_latency', 'model_cost_table', 'cost_table_shape', 'head_costs', 'layer_cost']

Cost = Dict[str, float]


def _zero() -> Cost:
    return dict(rounds=0.0, bytes=0.0, time_s=0.0)


def _add(total: Cost, part: Dict[str, float], scale: float = 1.0) -> None:
    # rounds do not scale: operations of one kind in one layer run together
    total['rounds'] += part['rounds']
    total['bytes'] += part['bytes'] * scale
    total['time_s'] += part['time_s'] * scale


def layer_cost(table: Dict[str, Any], heads: Sequence[str], gelu: Union[str, Sequence[Any], None] = None,
               act: str = 'gelu') -> Cost:
    """Rounds, bytes and seconds of one block with the given per-head kinds and GeLU pattern.

    Heads of one kind run together, so a kind's rounds count once per layer. A GeLU pattern keeps the
    activation's bytes and time on its GeLU tokens and gives the linearized tokens a ReLU on the
    (narrower) output of the second linear layer, as the secure model computes it.
    """
    cost = _zero()
    _add(cost, table['per_layer_rest'])
    for kind in sorted(set(heads)):
        if kind not in table['per_head']:
            raise ValueError(f'the cost table has no measured cost for attention kind {kind!r} (it measured '
                             f'{sorted(table["per_head"])}); measure a new table with the kind registered')
        _add(cost, table['per_head'][kind], sum(1 for h in heads if h == kind))
    tokens = [1] if gelu is None or gelu == 'gelu' else [0] if gelu == 'linear' else [int(t) for t in _flat(gelu)]
    kept = sum(tokens) / len(tokens)
    if kept > 0:
        _add(cost, table['per_layer_activation'][act], kept)
    if kept < 1:
        narrow = table['shape']['embed_dim'] / table['hidden_features']
        _add(cost, table['per_layer_activation']['relu'], (1 - kept) * narrow)
    return cost


def _flat(values: Any) -> List[Any]:
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def estimate_latency(
        table: Dict[str, Any],
        attn_pattern: Sequence[Sequence[str]],
        gelu_pattern: Optional[Sequence[Any]] = None,
        networks: Optional[Dict[str, NetworkSetting]] = None,
        act: str = 'gelu',
) -> Dict[str, Any]:
    """Estimated secure cost of a model whose blocks all have the table's shape.

    Args:
        table: A :func:`timm_mpc.cost.kind_cost_table` for the model's shapes.
        attn_pattern: One list of per-head kinds per block.
        gelu_pattern: None (plain MLPs) or one GeLU pattern per block (``'gelu'``, ``'linear'``, 0/1 per token).
        networks: Settings to estimate latency for (default LAN and WAN).
        act: The MLP activation of GeLU tokens (``gelu``, ``quad_gelu`` or ``relu``).

    Returns:
        ``rounds``, ``bytes``, ``time_s`` and ``latency_s`` (one per network).
    """
    networks = networks or NETWORKS
    total = _zero()
    _add(total, table['outside'])
    gelu_pattern = gelu_pattern or [None] * len(attn_pattern)
    if len(gelu_pattern) != len(attn_pattern):
        raise ValueError(f'one GeLU pattern per block is needed: {len(attn_pattern)} blocks, '
                         f'{len(gelu_pattern)} GeLU patterns')
    for heads, gelu in zip(attn_pattern, gelu_pattern):
        _add(total, layer_cost(table, heads, gelu, act))
    latency = {name: n.latency(total['time_s'], total['rounds'], total['bytes']) for name, n in networks.items()}
    return dict(total, latency_s=latency)


def cost_table_shape(model: nn.Module,
                     advice: str = 'price it by dry runs (timm_mpc.cost.pricing)') -> Dict[str, Any]:
    """The shapes :func:`kind_cost_table` measures for ``model``: a ViT's (one token sequence, blocks of one width
    with a plain MLP), as ``mpcvit_*``, a converted ViT or DeiT have.

    Raises:
        ValueError: a model the table does not price (Swin's stages, EVA's gated MLPs), naming it.
    """
    parts = read_model(model)
    blocks = getattr(model, 'blocks', None)
    mlps = [m for _, m in parts.mlps]
    if not blocks or not parts.heads or not mlps or not all(type(m) in MLP_TYPES_PRICED for m in mlps) \
            or len({m.fc1.out_features for m in mlps}) != 1:
        raise ValueError(f'the secure cost model prices ViT-shaped models (one token sequence, blocks of one width '
                         f'with a plain MLP); {type(model).__name__} is not priced by the table: {advice}')
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                embed_dim=model.embed_dim, num_heads=parts.heads[0][1].num_heads,
                mlp_ratio=mlps[0].fc1.out_features / model.embed_dim)


def model_cost_table(model: nn.Module, **kwargs: Any) -> Dict[str, Any]:
    """The cached per-kind cost table for a ViT-shaped model's shapes (measured on first use; see
    :func:`cost_table_shape`)."""
    return kind_cost_table(**cost_table_shape(model), **kwargs)


def model_latency(model: nn.Module, table: Dict[str, Any], networks: Optional[Dict[str, NetworkSetting]] = None) -> Dict[str, Any]:
    """:func:`estimate_latency` for a fixed-pattern model, reading its head and GeLU patterns."""
    act_kind = activation_name(model.blocks[0].mlp.act) or 'gelu'
    return estimate_latency(table, get_attn_pattern(model), get_gelu_pattern(model) or None, networks, act_kind)


def head_costs(table: Dict[str, Any], network: Union[str, NetworkSetting] = 'lan') -> Dict[str, float]:
    """Seconds of estimated latency saved by one head going from ReLU-Softmax to Scaling (``head``) and by
    one token position going from GeLU to linear (``token``), for the search's cost-weighted penalty.

    A layer's rounds are shared by its heads (or tokens), so they are spread evenly over them.
    """
    net = NETWORKS[network] if isinstance(network, str) else network
    h = table['shape']['num_heads']
    rs, sa = (table['per_head'][kind] for kind in SEARCH_KINDS)
    head = net.latency(rs['time_s'] - sa['time_s'], (rs['rounds'] - sa['rounds']) / h, rs['bytes'] - sa['bytes'])
    one_gelu = layer_cost(table, [], 'gelu')
    one_linear = layer_cost(table, [], 'linear')
    t = table['num_tokens']
    token = (net.latency(one_gelu['time_s'], one_gelu['rounds'], one_gelu['bytes'])
             - net.latency(one_linear['time_s'], one_linear['rounds'], one_linear['bytes'])) / t
    return dict(head=head, token=token)
