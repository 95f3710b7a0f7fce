"""Head and GeLU patterns of whole models: parse, expand, read, set and count them.

A pattern has one form in memory and on disk: plain strings and lists (JSON), one entry per layer. The
command line's text (a kind, ``muNN`` or a JSON list) is parsed here, once, by :func:`parse_attn_pattern` and
:func:`parse_gelu_pattern`; the weights hold the same pattern as codes (see :class:`timm_mpc.layers.HeadKinds`).
"""
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn

from .layers.attn_kinds import SEARCH, SEARCH_KINDS, PatternError, kind_code, list_attn_kinds
from .layers.head_kinds import HeadKinds, HeadPattern
from .layers.linearizable_mlp import GELU_PATTERNS, GeluPattern, LinearizableMlp
from .reader import read_model
from .utils import parse_json

__all__ = [
    'ModelPattern', 'expand_attn_pattern', 'get_attn_pattern', 'set_attn_pattern', 'count_head_kinds',
    'expand_gelu_pattern', 'get_gelu_pattern', 'set_gelu_pattern', 'mu_pattern', 'parse_attn_pattern',
    'parse_gelu_pattern',
]

ModelPattern = Union[str, Sequence[HeadPattern]]
"""A model's heads: one kind (or ``'search'``) for every head, or one layer pattern per attention layer.

A layer pattern is a kind for all its heads, ``'search'``, or a list with one kind per head. All of it
is plain strings and lists, so it fits in a Hub ``config.json``.
"""


def _check_kind(kind: Any) -> None:
    if kind != SEARCH:
        kind_code(kind)


def expand_attn_pattern(pattern: ModelPattern, heads_per_layer: Sequence[int]) -> List[HeadPattern]:
    """Check ``pattern`` against the layers' head counts and give one layer pattern per layer.

    Raises:
        PatternError: an unknown kind, or a pattern whose shape does not match the layers and heads.
    """
    accepted = f'accepted kinds: {[k.name for k in list_attn_kinds()]} or {SEARCH!r}'
    if isinstance(pattern, str):
        _check_kind(pattern)
        return [pattern] * len(heads_per_layer)
    if not isinstance(pattern, Sequence) or len(pattern) != len(heads_per_layer):
        got = f'{len(pattern)} entries' if isinstance(pattern, Sequence) else repr(pattern)
        raise PatternError(
            f'attn_pattern must be one kind for all heads or a list of {len(heads_per_layer)} layer patterns '
            f'(one per attention layer, with {list(heads_per_layer)} heads); got {got}. {accepted}')
    layers: List[HeadPattern] = []
    for i, (layer, num_heads) in enumerate(zip(pattern, heads_per_layer)):
        if isinstance(layer, str):
            _check_kind(layer)
        elif isinstance(layer, Sequence) and len(layer) == num_heads:
            for kind in layer:
                _check_kind(kind)
            layer = list(layer)
        else:
            raise PatternError(
                f'attn_pattern layer {i} must be a kind or a list of {num_heads} kinds (one per head); '
                f'got {layer!r}. {accepted}')
        layers.append(layer)
    return layers


def _heads(model: nn.Module) -> List[HeadKinds]:
    found = [heads for _, heads in read_model(model).heads]
    if not found:
        raise PatternError(
            f'{type(model).__name__} has no MPC attention layers; create an mpcvit_* model or '
            f'convert a timm model with timm_mpc.convert_to_mpc first')
    return found


def get_attn_pattern(model: nn.Module) -> List[HeadPattern]:
    """The model's head pattern, one entry per attention layer (``'search'`` or per-head kinds)."""
    return [heads.pattern for heads in _heads(model)]


def set_attn_pattern(model: nn.Module, pattern: ModelPattern) -> None:
    """Set every attention layer's heads in place; the whole pattern is checked before any layer changes."""
    found = _heads(model)
    layers = expand_attn_pattern(pattern, [heads.num_heads for heads in found])
    for heads, layer in zip(found, layers):
        heads.set_pattern(layer)


def count_head_kinds(model: nn.Module) -> Dict[str, int]:
    """Number of heads of each kind (and ``'search'`` heads) over the whole model."""
    counts: Counter = Counter()
    for heads in _heads(model):
        for kind, members in heads.groups:
            counts[kind] += len(members)
    return dict(counts)


def mu_pattern(heads_per_layer: Sequence[int], mu: float) -> List[List[str]]:
    """A fixed pattern with ``round(mu · heads)`` ReLU-Softmax heads spread over the layers, the rest Scaling.

    It stands in for a searched pattern of the same μ when none is at hand (same count, not the same choice).
    """
    total = sum(heads_per_layer)
    order = sorted(((h, layer) for layer, n in enumerate(heads_per_layer) for h in range(n)))[:round(mu * total)]
    chosen = {(layer, h) for h, layer in order}
    return [[SEARCH_KINDS[0] if (layer, h) in chosen else SEARCH_KINDS[1] for h in range(n)]
            for layer, n in enumerate(heads_per_layer)]


def parse_attn_pattern(text: str, model: Optional[nn.Module] = None, what: str = '--pattern') -> Any:
    """A head pattern given as text: a kind, ``search``, ``muNN`` (NN% ReLU-Softmax heads, the rest Scaling;
    needs the ``model`` for its head counts) or a JSON list."""
    text = text.strip()
    if text.startswith('['):
        return parse_json(text, what)
    if text.startswith('mu') and text[2:].isdigit():
        if model is None:
            raise PatternError(f'{what} {text}: a muNN pattern needs the model\'s head counts; give a kind or a list')
        return mu_pattern([m.num_heads for _, m in read_model(model).attention], int(text[2:]) / 100)
    return text


def parse_gelu_pattern(text: Optional[str], what: str = '--gelu-pattern') -> Any:
    """A GeLU pattern given as text: ``gelu``, ``linear``, ``search`` or a JSON list (None stays None)."""
    if text is None:
        return None
    text = text.strip()
    return parse_json(text, what) if text.startswith('[') else text


def expand_gelu_pattern(pattern: Union[GeluPattern, Sequence[GeluPattern]], num_layers: int) -> List[GeluPattern]:
    """One GeLU pattern per MLP layer from a model-level one.

    ``pattern`` is ``'gelu'``, ``'linear'`` or ``'search'`` for every layer, or a list with one entry
    per layer, each one of those names or a 0/1 value per token.

    Raises:
        PatternError: an unknown name or a list whose length is not the number of layers.
    """
    accepted = f'accepted: {list(GELU_PATTERNS)}, or a list of {num_layers} such entries or per-token 0/1 lists'
    if isinstance(pattern, str):
        if pattern not in GELU_PATTERNS:
            raise PatternError(f'unknown gelu_pattern {pattern!r}; {accepted}')
        return [pattern] * num_layers
    if not isinstance(pattern, Sequence) or len(pattern) != num_layers:
        got = f'{len(pattern)} entries' if isinstance(pattern, Sequence) else repr(pattern)
        raise PatternError(f'gelu_pattern must have one entry per MLP layer ({num_layers}); got {got}; {accepted}')
    for i, layer in enumerate(pattern):
        if isinstance(layer, str) and layer not in GELU_PATTERNS:
            raise PatternError(f'gelu_pattern layer {i}: unknown name {layer!r}; {accepted}')
    return list(pattern)


def _linearizable(model: nn.Module) -> List[LinearizableMlp]:
    return [m for _, m in read_model(model).mlps if isinstance(m, LinearizableMlp)]


def get_gelu_pattern(model: nn.Module) -> List[Union[str, List[Any]]]:
    """The GeLU pattern of every MPCViT+ MLP, in model order; empty when every token of every MLP keeps its
    GeLU (a plain model)."""
    mlps = _linearizable(model)
    if all(m.mode == 'gelu' for m in mlps):
        return []
    return [m.pattern for m in mlps]


def set_gelu_pattern(model: nn.Module, pattern: Union[GeluPattern, Sequence[GeluPattern]]) -> None:
    """Set every MPCViT+ MLP's GeLU pattern in place; the whole pattern is checked before any layer changes.

    Raises:
        PatternError: the model has no MPCViT+ MLPs, or a pattern that does not fit them.
    """
    mlps = _linearizable(model)
    if not mlps:
        raise PatternError(f'{type(model).__name__} has no MPCViT+ MLPs (LinearizableMlp); create an mpcvit_* model or '
                           f'convert with convert_to_mpc(..., gelu_pattern=...)')
    layers = expand_gelu_pattern(pattern, len(mlps))
    for mlp, layer in zip(mlps, layers):
        mlp.values_of(layer)  # raises before any layer changes
    for mlp, layer in zip(mlps, layers):
        mlp.set_pattern(layer)
