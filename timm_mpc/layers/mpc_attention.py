"""The part every MPC-friendly attention module shares: per-head weights and in-place conversion."""
from typing import Optional, Tuple, Type, TypeVar

import torch
from torch import nn

from .head_kinds import HeadKinds, HeadPattern
from .rebase import rebase_module

__all__ = ['MPCAttentionMixin', 'split_attn_mask', 'attention_scores']

_M = TypeVar('_M', bound=nn.Module)


def split_attn_mask(
        attn_mask: Optional[torch.Tensor],
        num_queries: int,
        num_keys: int,
        is_causal: bool = False,
        device: Optional[torch.device] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Split an SDPA-style mask into an additive bias and a boolean keep-mask.

    Softmax treats ``-inf`` in an additive mask as "never attend"; the other kinds have no
    exponential to do that, so masked keys are passed as a boolean ``keep`` mask instead.

    Returns:
        ``(bias, keep)``: the finite part of a float mask (or None) and the keys to keep (or None).
    """
    if is_causal:
        keep = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril()
        return None, keep
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return None, attn_mask
    keep = torch.isfinite(attn_mask)
    if bool(keep.all()):
        return attn_mask, None
    return attn_mask.masked_fill(~keep, 0.), keep


def attention_scores(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scores ``q·kᵀ·scale`` plus the finite part of ``attn_mask``, and the keys each query may see (or None).

    One function for fx tracing (wrapped, not traced into): whether a mask was given is decided when the model
    runs, not baked into the graph.
    """
    bias, keep = split_attn_mask(attn_mask, q.shape[-2], k.shape[-2], is_causal, device=q.device)
    scores = (q * scale) @ k.transpose(-2, -1)
    return (scores if bias is None else scores + bias), keep


torch.fx.wrap('attention_scores')  # fx records the call; it runs when the traced model runs


class MPCAttentionMixin:
    """Adds a :class:`HeadKinds` module named ``heads`` to an attention module.

    A subclass of a timm attention class inherits this mixin and rewrites ``forward`` so that
    the softmax of the original becomes ``self.heads``; every parameter name stays the same.
    """
    heads: HeadKinds
    scale: float
    attn_drop: nn.Module
    norm: nn.Module
    proj: nn.Module
    proj_drop: nn.Module

    def init_heads(self, num_heads: int, attn_pattern: HeadPattern, relu_eps: float, quad_c: float) -> None:
        device = next(self.parameters()).device  # where timm's device factory argument put the weights
        self.heads = HeadKinds(num_heads, attn_pattern, relu_eps=relu_eps, quad_c=quad_c, device=device)

    def attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """``weights(q·kᵀ·scale + mask) @ v`` for ``q, k, v`` of shape ``(B, H, N, head_dim)`` and an SDPA-style
        ``attn_mask`` (additive, or boolean keep) or ``is_causal``."""
        scores, keep = attention_scores(q, k, self.scale, attn_mask, is_causal)
        return self.attn_drop(self.heads(scores, keep)) @ v

    def project_out(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Output norm, optional gate, projection and dropout, as timm's attention modules end."""
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def from_module(
            cls: Type[_M],
            module: nn.Module,
            attn_pattern: HeadPattern = 'softmax',
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
    ) -> _M:
        """A new module of this class that shares every parameter and buffer of ``module``.

        Nothing is copied, so the converted module keeps the original weights exactly.
        """
        new = rebase_module(module, cls)
        new.init_heads(module.num_heads, attn_pattern, relu_eps, quad_c)
        return new
