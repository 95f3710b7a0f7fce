"""The registry of attention kinds: the per-head rules that turn attention scores into attention weights.

Each kind maps scores ``s = q·kᵀ·scale`` of shape ``(B, H, N, N)`` to weights of the same shape, one row per
query. Everything timm-mpc knows about a kind is in its :class:`AttnKind` record: its checkpoint code, its
plain-text weights, its secure computation, what calibration records for it, the range its secure reciprocal
must cover, and how a card names it. Plain text, calibration, secure inference, the cost table, the search
and the cards all dispatch through :func:`get_attn_kind`; adding a kind is one :func:`register_attn_kind` call.

| kind           | weights                          | source        |
|----------------|----------------------------------|---------------|
| softmax        | exp(s) / Σ exp(s)                | ViT           |
| relu_softmax   | relu(s) / (Σ relu(s) + eps)      | MPCViT        |
| scaling        | s / N                            | MPCViT        |
| 2quad          | (s + c)² / Σ (s + c)²            | MPCFormer     |
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

__all__ = [
    'AttnKind', 'KindContext', 'PatternError', 'register_attn_kind', 'get_attn_kind', 'list_attn_kinds', 'kind_modules',
    'import_kind_modules',
    'ATTN_KINDS', 'BASELINE_KIND', 'SEARCH', 'SEARCH_CODE', 'SEARCH_KINDS', 'kind_code', 'kind_name',
    'softmax_weights', 'relu_softmax_weights', 'scaling_weights', 'quad2_weights',
]

SEARCH = 'search'
"""Pattern value for heads that mix ReLU-Softmax and Scaling with a learnable α (the MPCViT search)."""

SEARCH_CODE = -1
"""The code of a search head in a ``kinds`` buffer."""

BASELINE_KIND = 'softmax'
"""The ViT's own kind: what a converted model starts with, and the baseline every saving is measured against."""

SEARCH_KINDS = ('relu_softmax', 'scaling')
"""The two kinds a search head mixes, ``α · first + (1 − α) · second``, and binarizes to (α = 1: the first)."""


class PatternError(ValueError):
    """A head or GeLU pattern that names an unknown kind or does not fit the model's layers."""


@dataclass(frozen=True)
class KindContext:
    """What a kind's secure computation may use besides its shares.

    ``reciprocal`` and ``softmax`` are the engine's approximations with the public schedule the plan holds
    for this kind in this layer (``softmax`` already leaves out the keys ``keep`` masks); ``opts`` are the
    layer's constants (``eps``, ``quad_c``). Windowed attention (Swin) adds ``bias``, a secret added to the scores
    (the relative position bias of the kind's heads), and ``keep``, the public 0/1 mask of the keys each query
    may see (the shift mask, broadcast over heads).
    """
    num_keys: int
    opts: Dict[str, float]
    reciprocal: Callable[[Any], Any]
    softmax: Callable[[Any], Any]
    bias: Any = None
    keep: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class AttnKind:
    """One attention kind.

    Attributes:
        name: The pattern value (``'relu_softmax'``).
        code: Its integer in a checkpoint's ``kinds`` buffer; never reused once published.
        title: Its name on a card (``'ReLU-Softmax'``).
        label: Its two-letter cell in a card's pattern grid (``'RS'``).
        paper: Where it comes from.
        weights: Plain text: ``weights(scores, keep=None, **opts)`` with ``keep`` a boolean mask of the keys
            a query may see.
        secure: ``secure(q, k, v, scale, ctx)``: the heads' output ``weights(q·kᵀ·scale + ctx.bias) @ v`` written with
            tensor methods an MPC tensor has (``matmul``, ``mul``, ``relu``, ``square``, ``sum``) and the
            :class:`KindContext`; it runs unchanged on plain tensors.
        denominator: ``denominator(scores, keep=None, **opts)``: the values the kind divides by, which calibration
            records (None for a kind that does not divide by data).
        reciprocal_range: ``reciprocal_range(calibrated, num_keys)``: ``(low, high, widen)`` that the secure
            reciprocal must cover, from the calibrated ``{'min', 'max'}`` of the denominator (``widen``: add
            the settings' range margin), or None for a kind without a reciprocal.
    """
    name: str
    code: int
    title: str
    label: str
    paper: str
    weights: Callable[..., torch.Tensor]
    secure: Callable[..., Any]
    denominator: Optional[Callable[..., torch.Tensor]] = None
    reciprocal_range: Optional[Callable[[Dict[str, float], int], Optional[Tuple[float, float, bool]]]] = None


_REGISTRY: Dict[str, AttnKind] = {}


def register_attn_kind(kind: AttnKind) -> AttnKind:
    """Add ``kind`` to the registry (idempotent for the same record).

    A kind used in secure inference must be registered in every party's process: put the call in a module
    that the parties import (``secure_predict`` imports the module that defined the kind in its processes).

    Raises:
        ValueError: the name or code is taken by another kind, or the name is not a plain identifier.
    """
    if not kind.name.replace('_', '').isalnum() or kind.name == SEARCH or kind.code < 0:
        raise ValueError(f'an attention kind needs an identifier name other than {SEARCH!r} and a code >= 0; '
                         f'got {kind.name!r} with code {kind.code}')
    for other in _REGISTRY.values():
        if other == kind:
            return kind
        if other.name == kind.name or other.code == kind.code:
            raise ValueError(f'attention kind {kind.name!r} (code {kind.code}) clashes with the registered '
                             f'{other.name!r} (code {other.code})')
    _REGISTRY[kind.name] = kind
    return kind


def get_attn_kind(name: str) -> AttnKind:
    """The registered kind called ``name``.

    Raises:
        PatternError: no such kind.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise PatternError(f'unknown attention kind {name!r}; accepted kinds are {list(_REGISTRY)}')
    return _REGISTRY[name]


def kind_modules() -> Tuple[str, ...]:
    """The modules that registered kinds beyond the built-in ones: a new process imports them to know those kinds."""
    return tuple(sorted({k.secure.__module__ for k in _REGISTRY.values() if k.secure.__module__ != __name__}))


def import_kind_modules(modules: Sequence[str]) -> None:
    """Import :func:`kind_modules` of another process, so that this one knows the same kinds."""
    for module in modules:
        importlib.import_module(module)


def list_attn_kinds() -> Tuple[AttnKind, ...]:
    """Every registered kind, in the order of their codes."""
    return tuple(sorted(_REGISTRY.values(), key=lambda k: k.code))


class _KindNames(Sequence):
    """The names of the registered kinds in code order, read from the registry each time."""

    def __getitem__(self, index: Any) -> Any:
        return tuple(k.name for k in list_attn_kinds())[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(k.name for k in list_attn_kinds()))

    def __repr__(self) -> str:
        return repr(tuple(self))


ATTN_KINDS: Sequence[str] = _KindNames()
"""The names of every registered attention kind, in code order (a live view of the registry)."""


def kind_code(kind: str) -> int:
    """Integer code of an attention kind, as stored in a checkpoint's ``kinds`` buffer.

    Raises:
        PatternError: ``kind`` is not a registered kind.
    """
    return get_attn_kind(kind).code


def kind_name(code: int) -> str:
    """Name of the attention kind with integer code ``code`` (``'search'`` for :data:`SEARCH_CODE`).

    Raises:
        PatternError: ``code`` is not a registered code.
    """
    code = int(code)
    if code == SEARCH_CODE:
        return SEARCH
    for kind in _REGISTRY.values():
        if kind.code == code:
            return kind.name
    raise PatternError(f'unknown attention kind code {code}; registered codes: '
                       f'{", ".join(f"{k.code}={k.name}" for k in list_attn_kinds())}, {SEARCH_CODE}={SEARCH}')


def softmax_weights(scores: torch.Tensor, keep: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """Softmax over keys; keys where ``keep`` is False get weight 0."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float('-inf'))
    return scores.softmax(dim=-1)


def relu_softmax_weights(
        scores: torch.Tensor,
        keep: Optional[torch.Tensor] = None,
        eps: float = 1e-5,
        **_,
) -> torch.Tensor:
    """ReLU-Softmax: ``relu(s) / (Σ relu(s) + eps)``; eps keeps an all-negative row finite."""
    weights = scores.relu()
    if keep is not None:
        weights = weights * keep
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def scaling_weights(scores: torch.Tensor, keep: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """Scaling attention: ``s / N`` with N the number of attended keys. Linear in the scores."""
    if keep is None:
        return scores / scores.shape[-1]
    num_keys = keep.sum(dim=-1, keepdim=True).clamp_min(1)
    return scores * keep / num_keys


def quad2_weights(
        scores: torch.Tensor,
        keep: Optional[torch.Tensor] = None,
        quad_c: float = 5.0,
        **_,
) -> torch.Tensor:
    """MPCFormer's 2Quad: ``(s + c)² / Σ (s + c)²``."""
    weights = (scores + quad_c).square()
    if keep is not None:
        weights = weights * keep
    return weights / weights.sum(dim=-1, keepdim=True)


def _masked(values: Any, keep: Optional[torch.Tensor]) -> Any:
    """``values`` with the keys ``keep`` masks (0) set to 0."""
    return values if keep is None else values * keep


def _scores(q: Any, k: Any, scale: float, ctx: KindContext) -> Any:
    scores = q.mul(scale).matmul(k.transpose(-2, -1))
    return scores if ctx.bias is None else scores + ctx.bias


def _secure_softmax(q: Any, k: Any, v: Any, scale: float, ctx: KindContext) -> Any:
    return ctx.softmax(_scores(q, k, scale, ctx)).matmul(v)


def _secure_relu_softmax(q: Any, k: Any, v: Any, scale: float, ctx: KindContext) -> Any:
    numer = _masked(_scores(q, k, scale, ctx).relu(), ctx.keep)
    return (numer * ctx.reciprocal(numer.sum(-1, keepdim=True) + ctx.opts['eps'])).matmul(v)


def _secure_scaling(q: Any, k: Any, v: Any, scale: float, ctx: KindContext) -> Any:
    if ctx.bias is not None or ctx.keep is not None:  # per-window scores: (QKᵀ + bias) · keep / (keys kept)
        factor = 1 / ctx.num_keys if ctx.keep is None else ctx.keep / ctx.keep.sum(-1, keepdim=True).clamp_min(1)
        return (_scores(q, k, scale, ctx) * factor).matmul(v)
    n = ctx.num_keys
    # the public factors go in first, so no product grows with the sequence: a truncation fails with a
    # probability that grows with the magnitude of what it truncates
    if n > q.size(-1):  # Q(KᵀV) moves less data than (QKᵀ)V once the sequence is longer than a head
        return q.mul(scale).matmul(k.mul(1 / n).transpose(-2, -1).matmul(v))
    return q.mul(scale / n).matmul(k.transpose(-2, -1)).matmul(v)


def _secure_quad2(q: Any, k: Any, v: Any, scale: float, ctx: KindContext) -> Any:
    numer = _masked((_scores(q, k, scale, ctx) + ctx.opts['quad_c']).square(), ctx.keep)
    return (numer * ctx.reciprocal(numer.sum(-1, keepdim=True))).matmul(v)




def _calibrated(calibrated: Dict[str, float], num_keys: int) -> Tuple[float, float, bool]:
    return calibrated['min'], calibrated['max'], True


for _kind in (
        AttnKind('softmax', 0, 'Softmax', 'SM', 'ViT (Dosovitskiy et al., 2021)', softmax_weights, _secure_softmax,
                 # the sum of exp(s - max) lies in [1, N] whatever the data: nothing to calibrate or widen
                 reciprocal_range=lambda calibrated, num_keys: (1.0, float(num_keys), False)),
        AttnKind('relu_softmax', 1, 'ReLU-Softmax', 'RS', 'MPCViT (Zeng et al., ICCV 2023)', relu_softmax_weights,
                 _secure_relu_softmax, denominator=lambda s, keep=None, eps=1e-5, **_: _masked(s.relu(), keep).sum(-1) + eps,
                 reciprocal_range=_calibrated),
        AttnKind('scaling', 2, 'Scaling', 'SC', 'MPCViT (Zeng et al., ICCV 2023)', scaling_weights, _secure_scaling),
        AttnKind('2quad', 3, '2Quad', '2Q', 'MPCFormer (Li et al., ICLR 2023)', quad2_weights, _secure_quad2,
                 denominator=lambda s, keep=None, quad_c=5.0, **_: _masked((s + quad_c).square(), keep).sum(-1),
                 reciprocal_range=_calibrated),
):
    register_attn_kind(_kind)
