"""`HeadKinds`: one attention kind per head, or a learnable ReLU-Softmax/Scaling mix per head."""
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .attn_kinds import ATTN_KINDS, KIND_WEIGHTS, SEARCH, kind_code, kind_name, relu_softmax_weights, scaling_weights
from .state_mode import StateModeMixin

__all__ = ['HeadKinds', 'HeadPattern', 'check_unit_interval']

HeadPattern = Union[str, Sequence[str]]
"""A layer's heads: one kind for all heads, ``'search'``, or a list with one kind per head."""


def check_unit_interval(name: str, value: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` unless every element of ``value`` lies in [0, 1]."""
    value = value.detach()
    if not torch.isfinite(value).all() or value.min() < 0 or value.max() > 1:
        raise ValueError(
            f'{name} must lie in [0, 1] (1 = keep the non-linear form, 0 = the linear form); '
            f'got values from {value.min().item():.4g} to {value.max().item():.4g}')


class HeadKinds(StateModeMixin, nn.Module):
    """Turns attention scores into attention weights, with its own rule for each head.

    Two modes, told apart by the module's state so that the mode travels with a checkpoint:

    * fixed: the ``kinds`` buffer holds one kind code per head (see :data:`ATTN_KINDS`).
      All heads of one kind are computed together; the loop runs over kinds, never heads.
    * search (MPCViT): the ``alpha`` parameter, shape ``(1, H, 1, 1)``, initialised to 1, mixes
      ``alpha · ReLUSoftmax(s) + (1 − alpha) · Scaling(s)`` for every head.

    Loading a state dict switches the mode to the one the state dict holds; a plain timm state
    dict, which holds neither key, leaves the module as it is.
    """
    fixed_key, search_key, state_name = 'kinds', 'alpha', 'head pattern'

    def __init__(
            self,
            num_heads: int,
            pattern: HeadPattern = 'softmax',
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
    ) -> None:
        """
        Args:
            num_heads: Number of attention heads.
            pattern: A kind for all heads, ``'search'``, or a list of ``num_heads`` kinds.
            relu_eps: Added to the ReLU-Softmax denominator.
            quad_c: The shift ``c`` of 2Quad attention.
        """
        super().__init__()
        self.num_heads = num_heads
        self.relu_eps = relu_eps
        self.quad_c = quad_c
        self.alpha: Optional[nn.Parameter] = None
        self.kinds: Optional[torch.Tensor] = None
        self.set_pattern(pattern)

    @property
    def searching(self) -> bool:
        """True in search mode (learnable α per head)."""
        return self.alpha is not None

    @property
    def pattern(self) -> Union[str, List[str]]:
        """``'search'`` in search mode, otherwise the list of per-head kind names."""
        if self.searching:
            return SEARCH
        return [kind_name(c) for c in self.kinds.tolist()]

    def set_pattern(self, pattern: HeadPattern) -> None:
        """Switch to ``pattern``: a kind for all heads, ``'search'`` (α = 1), or one kind per head.

        Raises:
            ValueError: an unknown kind, or a list whose length is not the number of heads.
        """
        device = self._device()
        if isinstance(pattern, str) and pattern == SEARCH:
            self._set_search(torch.ones(1, self.num_heads, 1, 1, device=device))
            return
        if isinstance(pattern, str):
            codes = [kind_code(pattern)] * self.num_heads
        elif isinstance(pattern, Sequence) and len(pattern) == self.num_heads:
            codes = [kind_code(k) for k in pattern]
        else:
            raise ValueError(
                f'a head pattern must be one of {list(ATTN_KINDS) + [SEARCH]} or a list of '
                f'{self.num_heads} kinds (one per head); got {pattern!r}')
        self._set_kinds(torch.tensor(codes, dtype=torch.long, device=device))

    def set_alpha(self, alpha: torch.Tensor) -> None:
        """Enter search mode with the given α (any shape with ``num_heads`` elements, values in [0, 1])."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        if alpha.numel() != self.num_heads:
            raise ValueError(f'alpha must have {self.num_heads} values (one per head); got shape {tuple(alpha.shape)}')
        check_unit_interval('alpha', alpha)
        self._set_search(alpha.reshape(1, self.num_heads, 1, 1).to(self._device()))

    def _device(self) -> torch.device:
        state = self.alpha if self.alpha is not None else self.kinds
        return state.device if state is not None else torch.device('cpu')

    def _set_search(self, alpha: torch.Tensor) -> None:
        # exactly one of the two is registered state; the other is a plain None attribute
        self._buffers.pop('kinds', None)
        self.__dict__['kinds'] = None
        self.__dict__.pop('alpha', None)
        self.alpha = nn.Parameter(alpha.float())

    def _set_kinds(self, codes: torch.Tensor) -> None:
        self._parameters.pop('alpha', None)
        self.__dict__['alpha'] = None
        self.__dict__.pop('kinds', None)
        self.register_buffer('kinds', codes)

    def forward(self, scores: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention weights for ``scores`` of shape ``(B, H, Nq, Nk)``.

        Args:
            scores: Scaled dot products, any additive bias (relative position) already added.
            keep: Optional boolean mask broadcastable to ``scores``: False marks keys a query must not see.
        """
        opts = dict(eps=self.relu_eps, quad_c=self.quad_c)
        if self.searching:
            alpha = self.alpha.to(scores.dtype)
            return alpha * relu_softmax_weights(scores, keep, **opts) + (1 - alpha) * scaling_weights(scores, keep)
        codes = self.kinds.unique().tolist()
        if len(codes) == 1:
            return KIND_WEIGHTS[kind_name(codes[0])](scores, keep, **opts)
        weights = torch.empty_like(scores)
        if keep is not None:
            keep = keep.expand_as(scores)
        for code in codes:
            heads = self.kinds == code
            weights[:, heads] = KIND_WEIGHTS[kind_name(code)](
                scores[:, heads], None if keep is None else keep[:, heads], **opts)
        return weights

    def _load_fixed(self, kinds: torch.Tensor) -> None:
        if kinds.shape != (self.num_heads,) or kinds.is_floating_point():
            raise ValueError(f'expected an integer tensor of shape ({self.num_heads},), got '
                             f'{kinds.dtype} of shape {tuple(kinds.shape)}')
        for code in kinds.tolist():
            kind_name(code)
        self._set_kinds(kinds.to(self._device(), torch.long).clone())

    def _load_search(self, alpha: torch.Tensor) -> None:
        self.set_alpha(alpha)

    def extra_repr(self) -> str:
        if self.searching:
            return f'num_heads={self.num_heads}, pattern=search'
        return f'num_heads={self.num_heads}, pattern={self.pattern}'
