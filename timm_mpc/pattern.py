"""Head patterns of whole models: expand, read, set and count them."""
from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple, Union

from torch import nn

from .layers.attn_kinds import ATTN_KINDS, SEARCH, kind_code
from .layers.head_kinds import HeadKinds, HeadPattern
from .layers.linearizable_mlp import GELU_PATTERNS, GeluPattern, LinearizableMlp

__all__ = [
    'ModelPattern', 'expand_attn_pattern', 'get_attn_pattern', 'set_attn_pattern',
    'count_head_kinds', 'expand_gelu_pattern', 'get_gelu_pattern',
]

ModelPattern = Union[str, Sequence[HeadPattern]]
"""A model's heads: one kind (or ``'search'``) for every head, or one layer pattern per attention layer.

A layer pattern is a kind for all its heads, ``'search'``, or a list with one kind per head. All of it
is plain strings and lists, so it fits in a Hub ``config.json``.
"""


def expand_attn_pattern(pattern: ModelPattern, heads_per_layer: Sequence[int]) -> List[HeadPattern]:
    """Check ``pattern`` against the layers' head counts and give one layer pattern per layer.

    Raises:
        ValueError: an unknown kind, or a pattern whose shape does not match the layers and heads.
    """
    accepted = f'accepted kinds: {list(ATTN_KINDS)} or {SEARCH!r}'
    if isinstance(pattern, str):
        if pattern != SEARCH:
            kind_code(pattern)
        return [pattern] * len(heads_per_layer)
    if not isinstance(pattern, Sequence) or len(pattern) != len(heads_per_layer):
        got = f'{len(pattern)} entries' if isinstance(pattern, Sequence) else repr(pattern)
        raise ValueError(
            f'attn_pattern must be one kind for all heads or a list of {len(heads_per_layer)} layer patterns '
            f'(one per attention layer, with {list(heads_per_layer)} heads); got {got}. {accepted}')
    layers: List[HeadPattern] = []
    for i, (layer, num_heads) in enumerate(zip(pattern, heads_per_layer)):
        if isinstance(layer, str):
            if layer != SEARCH:
                kind_code(layer)
        elif isinstance(layer, Sequence) and len(layer) == num_heads:
            for kind in layer:
                kind_code(kind)
            layer = list(layer)
        else:
            raise ValueError(
                f'attn_pattern layer {i} must be a kind or a list of {num_heads} kinds (one per head); '
                f'got {layer!r}. {accepted}')
        layers.append(layer)
    return layers


def _head_kinds(model: nn.Module) -> List[Tuple[str, HeadKinds]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, HeadKinds)]
    if not found:
        raise ValueError(
            f'{type(model).__name__} has no MPC attention layers; create an mpcvit_* model or '
            f'convert a timm model with timm_mpc.convert_to_mpc first')
    return found


def get_attn_pattern(model: nn.Module) -> List[HeadPattern]:
    """The model's head pattern, one entry per attention layer (``'search'`` or per-head kinds)."""
    return [heads.pattern for _, heads in _head_kinds(model)]


def set_attn_pattern(model: nn.Module, pattern: ModelPattern) -> None:
    """Set every attention layer's heads; the whole pattern is checked before any layer changes."""
    found = _head_kinds(model)
    layers = expand_attn_pattern(pattern, [heads.num_heads for _, heads in found])
    for (_, heads), layer in zip(found, layers):
        heads.set_pattern(layer)


def count_head_kinds(model: nn.Module) -> Dict[str, int]:
    """Number of heads of each kind (and ``'search'`` heads) over the whole model."""
    counts: Counter = Counter()
    for _, heads in _head_kinds(model):
        if heads.searching:
            counts[SEARCH] += heads.num_heads
        else:
            counts.update(heads.pattern)
    return dict(counts)


def expand_gelu_pattern(pattern: Union[GeluPattern, Sequence[GeluPattern]], num_layers: int) -> List[GeluPattern]:
    """One GeLU pattern per MLP layer from a model-level one.

    ``pattern`` is ``'gelu'``, ``'linear'`` or ``'search'`` for every layer, or a list with one entry
    per layer, each one of those names or a 0/1 value per token.

    Raises:
        ValueError: an unknown name or a list whose length is not the number of layers.
    """
    accepted = f'accepted: {list(GELU_PATTERNS)}, or a list of {num_layers} such entries or per-token 0/1 lists'
    if isinstance(pattern, str):
        if pattern not in GELU_PATTERNS:
            raise ValueError(f'unknown gelu_pattern {pattern!r}; {accepted}')
        return [pattern] * num_layers
    if not isinstance(pattern, Sequence) or len(pattern) != num_layers:
        got = f'{len(pattern)} entries' if isinstance(pattern, Sequence) else repr(pattern)
        raise ValueError(f'gelu_pattern must have one entry per MLP layer ({num_layers}); got {got}; {accepted}')
    for i, layer in enumerate(pattern):
        if isinstance(layer, str) and layer not in GELU_PATTERNS:
            raise ValueError(f'gelu_pattern layer {i}: unknown name {layer!r}; {accepted}')
    return list(pattern)


def get_gelu_pattern(model: nn.Module) -> List[Union[str, List[Any]]]:
    """The GeLU pattern of every :class:`LinearizableMlp` in the model, in model order."""
    return [m.pattern for m in model.modules() if isinstance(m, LinearizableMlp)]
