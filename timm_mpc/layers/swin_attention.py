"""MPC-friendly drop-in for timm's Swin ``WindowAttention`` (relative position bias, shift mask)."""
from typing import Optional

import torch
from timm.models.swin_transformer import WindowAttention

from .mpc_attention import MPCAttentionMixin

__all__ = ['MPCWindowAttention']


class MPCWindowAttention(MPCAttentionMixin, WindowAttention):
    """Swin ``WindowAttention`` with a choice of attention kind per head.

    The relative position bias is added to the scores for every kind. The shifted-window mask
    (0 where two tokens share a region, -100 elsewhere) becomes a keep-mask, so masked keys get
    weight exactly 0 whatever the kind. Made from an existing module with :meth:`from_module`.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # the relative position bias as an additive mask; the shift mask (0 or -100) as keys to keep
        attn_mask = self._get_rel_pos_bias().expand(B_, -1, -1, -1)
        if mask is not None:
            num_win = mask.shape[0]
            # windows are laid out batch-major: (B, num_win) flattened, as in timm
            keep = (mask == 0).unsqueeze(1).unsqueeze(0).expand(B_ // num_win, -1, self.num_heads, -1, -1)
            attn_mask = attn_mask.masked_fill(~keep.reshape(B_, self.num_heads, N, N), float('-inf'))
        x = self.attend(q, k, v, attn_mask)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
