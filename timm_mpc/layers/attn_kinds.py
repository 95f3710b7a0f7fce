"""Attention kinds: the per-head rules that turn attention scores into attention weights.

Each kind maps scores ``s = q·kᵀ·scale`` of shape ``(B, H, N, N)`` to weights of the same shape,
one row per query. Only ``softmax`` is the ViT baseline; the others avoid the exponential, the max
and (for ``scaling``) every non-linear step, which is what makes them cheap under MPC.

| kind           | weights                          | source        |
|----------------|----------------------------------|---------------|
| softmax        | exp(s) / Σ exp(s)                | ViT           |
| relu_softmax   | relu(s) / (Σ relu(s) + eps)      | MPCViT        |
| scaling        | s / N                            | MPCViT        |
| 2quad          | (s + c)² / Σ (s + c)²            | MPCFormer     |
"""
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = [
    'ATTN_KINDS', 'SEARCH', 'kind_code', 'kind_name',
    'softmax_weights', 'relu_softmax_weights', 'scaling_weights', 'quad2_weights',
]

SEARCH = 'search'
"""Pattern value for a layer whose heads each mix ReLU-Softmax and Scaling with a learnable α."""

ATTN_KINDS: Tuple[str, ...] = ('softmax', 'relu_softmax', 'scaling', '2quad')
"""Every fixed attention kind, in the order of their integer codes in checkpoints."""


def kind_code(kind: str) -> int:
    """Integer code of an attention kind, as stored in a checkpoint's ``head_kinds`` buffer.

    Raises:
        ValueError: ``kind`` is not one of :data:`ATTN_KINDS`.
    """
    if not isinstance(kind, str) or kind not in ATTN_KINDS:
        raise ValueError(f'unknown attention kind {kind!r}; accepted kinds are {list(ATTN_KINDS)}')
    return ATTN_KINDS.index(kind)


def kind_name(code: int) -> str:
    """Name of the attention kind with integer code ``code``.

    Raises:
        ValueError: ``code`` is not a valid kind code.
    """
    if not 0 <= int(code) < len(ATTN_KINDS):
        raise ValueError(
            f'unknown attention kind code {int(code)}; codes run from 0 to {len(ATTN_KINDS) - 1} '
            f'({", ".join(f"{i}={k}" for i, k in enumerate(ATTN_KINDS))})')
    return ATTN_KINDS[int(code)]


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


KIND_WEIGHTS: Dict[str, Callable[..., torch.Tensor]] = {
    'softmax': softmax_weights,
    'relu_softmax': relu_softmax_weights,
    'scaling': scaling_weights,
    '2quad': quad2_weights,
}
