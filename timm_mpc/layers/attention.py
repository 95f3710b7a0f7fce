"""MPC-friendly drop-ins for timm's ``Attention`` (``vit_*``, ``deit_*`` and their kin)."""
from typing import Optional

import torch
from timm.layers import Attention

from .head_kinds import HeadPattern
from .mpc_attention import MPCAttentionMixin

__all__ = [
    'MPCAttention', 'SoftmaxAttention', 'ReLUSoftmaxAttention', 'ScalingAttention', 'Quad2Attention',
    'SearchAttention',
]


class MPCAttention(MPCAttentionMixin, Attention):
    """timm ``Attention`` with a choice of attention kind per head.

    Same constructor arguments and parameter names as ``timm.layers.Attention``, plus the head
    pattern, so a timm state dict loads strictly. Never uses fused SDPA: the weights are computed
    explicitly, as an MPC engine must.
    """
    default_pattern: HeadPattern = 'softmax'

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *args,
            attn_pattern: Optional[HeadPattern] = None,
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
            **kwargs,
    ) -> None:
        """
        Args:
            dim: Input dimension of the token embeddings.
            num_heads: Number of attention heads.
            *args: Further positional arguments of ``timm.layers.Attention``.
            attn_pattern: A kind for all heads, ``'search'``, or one kind per head; defaults to
                the class's ``default_pattern``.
            relu_eps: Added to the ReLU-Softmax denominator.
            quad_c: The shift ``c`` of 2Quad attention.
            **kwargs: Further keyword arguments of ``timm.layers.Attention``.
        """
        super().__init__(dim, num_heads, *args, **kwargs)
        self.fused_attn = False
        self.init_heads(num_heads, attn_pattern or self.default_pattern, relu_eps, quad_c)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.project_out(x, gate)


class SoftmaxAttention(MPCAttention):
    """Softmax in every head, computed explicitly: the baseline and the distillation teacher."""
    default_pattern = 'softmax'


class ReLUSoftmaxAttention(MPCAttention):
    """ReLU-Softmax, ``relu(s) / (Σ relu(s) + eps)``, in every head."""
    default_pattern = 'relu_softmax'


class ScalingAttention(MPCAttention):
    """Scaling attention, ``s / N``, in every head: no non-linear step at all."""
    default_pattern = 'scaling'


class Quad2Attention(MPCAttention):
    """MPCFormer's 2Quad, ``(s + c)² / Σ (s + c)²``, in every head."""
    default_pattern = '2quad'


class SearchAttention(MPCAttention):
    """MPCViT search form: every head mixes ReLU-Softmax and Scaling with a learnable α."""
    default_pattern = 'search'
