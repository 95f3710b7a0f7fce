"""`HeadKinds`: one attention kind per head, or a learnable ReLU-Softmax/Scaling mix per head."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import register_notrace_module
from torch import nn

from .attn_kinds import (
    SEARCH, SEARCH_CODE, SEARCH_KINDS, PatternError, get_attn_kind, kind_code, kind_name, list_attn_kinds,
)
from .pattern_state import PatternState, check_unit_interval

__all__ = ['HeadKinds', 'HeadPattern']

HeadPattern = Union[str, Sequence[str]]
"""A layer's heads: one kind for all heads, ``'search'``, or a list with one kind (or ``'search'``) per head."""


@register_notrace_module  # timm's fx tracing records the call; whether a mask is given is known when it runs
class HeadKinds(PatternState, nn.Module):
    """Turns attention scores into attention weights, with its own rule for each head.

    Its state is two tensors that always exist, so that optimizers, EMA copies, DDP and checkpoints keep
    valid references whatever the pattern:

    * ``kinds`` (buffer, one integer per head): the kind's code (see :func:`timm_mpc.layers.get_attn_kind`),
      or :data:`SEARCH_CODE` for a head in search mode;
    * ``alpha`` (buffer, shape ``(1, H, 1, 1)``, trained by the search): in search mode (MPCViT) the head computes
      ``alpha · ReLUSoftmax(s) + (1 − alpha) · Scaling(s)`` (:data:`SEARCH_KINDS`); a fixed head ignores it.

    The heads of one kind are grouped when the pattern is set (or loaded), so the forward pass has no
    data-dependent control flow: ``torch.compile`` and ``torch.fx`` see one graph.
    """
    pattern_keys, attribute_name, search_value = ('kinds', 'alpha'), 'heads', SEARCH_CODE

    def __init__(
            self,
            num_heads: int,
            pattern: HeadPattern = 'softmax',
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
            device: Optional[torch.device] = None,
    ) -> None:
        """
        Args:
            num_heads: Number of attention heads.
            pattern: A kind for all heads, ``'search'``, or a list of ``num_heads`` kinds.
            relu_eps: Added to the ReLU-Softmax denominator.
            quad_c: The shift ``c`` of 2Quad attention.
            device: Where ``alpha`` and ``kinds`` live (timm's ``device`` factory argument; meta too).
        """
        super().__init__()
        self.num_heads = num_heads
        self.relu_eps = relu_eps
        self.quad_c = quad_c
        self.register_buffer('alpha', torch.ones(1, num_heads, 1, 1, device=device))
        self.register_buffer('kinds', torch.zeros(num_heads, dtype=torch.long, device=device))
        self.groups: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
        self.set_pattern(pattern)

    @property
    def searching(self) -> bool:
        """True when every head is in search mode (learnable α)."""
        return all(kind == SEARCH for kind, _ in self.groups)

    @property
    def pattern(self) -> Union[str, List[str]]:
        """``'search'`` when every head searches, otherwise the list of per-head kind names."""
        if self.searching:
            return SEARCH
        return [kind_name(c) for c in self.kinds.tolist()]

    @property
    def opts(self) -> Dict[str, float]:
        """The constants every kind's weights take: ``eps`` (ReLU-Softmax) and ``quad_c`` (2Quad)."""
        return dict(eps=self.relu_eps, quad_c=self.quad_c)

    def codes_of(self, pattern: HeadPattern) -> List[int]:
        """The ``kinds`` codes of a layer pattern.

        Raises:
            PatternError: an unknown kind, or a list whose length is not the number of heads.
        """
        if isinstance(pattern, str):
            return [SEARCH_CODE if pattern == SEARCH else kind_code(pattern)] * self.num_heads
        if isinstance(pattern, Sequence) and len(pattern) == self.num_heads:
            return [SEARCH_CODE if k == SEARCH else kind_code(k) for k in pattern]
        raise PatternError(
            f'a head pattern must be one of {[k.name for k in list_attn_kinds()] + [SEARCH]} or a list of '
            f'{self.num_heads} kinds (one per head); got {pattern!r}')

    def set_pattern(self, pattern: HeadPattern) -> None:
        """Set every head's kind in place; ``'search'`` heads restart from α = 1.

        Raises:
            PatternError: an unknown kind, or a list whose length is not the number of heads.
        """
        codes = torch.tensor(self.codes_of(pattern), dtype=torch.long, device='cpu')  # read back at once: never on meta
        with torch.no_grad():
            self.kinds.copy_(codes)
            self.alpha.masked_fill_(codes.to(self.alpha.device).view(1, -1, 1, 1) == SEARCH_CODE, 1.0)
        self.refresh(codes)

    def set_alpha(self, alpha: torch.Tensor) -> None:
        """Put every head in search mode with the given α (``num_heads`` values in [0, 1]), in place."""
        self.enter_search(alpha, 'head')

    def refresh(self, codes: Optional[torch.Tensor] = None) -> None:
        """Group the heads by kind from the ``kinds`` buffer (after it was set or loaded)."""
        codes = (self.kinds if codes is None else codes).tolist()
        self.groups = tuple((kind_name(code), tuple(h for h, c in enumerate(codes) if c == code))
                            for code in sorted(set(codes)))
        self.train_searched(any(kind == SEARCH for kind, _ in self.groups))

    def unused_state(self) -> Tuple[str, ...]:
        return () if any(kind == SEARCH for kind, _ in self.groups) else ('alpha',)

    def check_state(self, state: Dict[str, torch.Tensor]) -> None:
        kinds = state['kinds']
        if kinds.shape != (self.num_heads,) or kinds.is_floating_point():
            raise PatternError(f'kinds must be an integer tensor of shape ({self.num_heads},), got '
                               f'{kinds.dtype} of shape {tuple(kinds.shape)}')
        for code in kinds.tolist():
            kind_name(code)
        check_unit_interval('alpha', state['alpha'])

    def legacy_state(self, present: str, value: torch.Tensor) -> torch.Tensor:
        # checkpoints written before both tensors always existed hold one: kinds (fixed) or alpha (search)
        if present == 'kinds':
            return torch.ones_like(self.alpha)
        return torch.full_like(self.kinds, SEARCH_CODE)

    def forward(self, scores: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention weights for ``scores`` of shape ``(B, H, Nq, Nk)``.

        Args:
            scores: Scaled dot products, any additive bias (relative position) already added.
            keep: Optional boolean mask broadcastable to ``scores``: False marks keys a query must not see.
        """
        if len(self.groups) == 1:
            return self._weights(self.groups[0][0], scores, keep, self.alpha)
        if keep is not None:
            keep = keep.expand_as(scores)
        parts, order = [], []
        for kind, heads in self.groups:  # constant per pattern: one graph for torch.compile and torch.fx
            index = list(heads)
            parts.append(self._weights(kind, scores[:, index], None if keep is None else keep[:, index],
                                       self.alpha[:, index]))
            order.extend(heads)
        return torch.cat(parts, dim=1)[:, sorted(range(len(order)), key=order.__getitem__)]

    def _weights(self, kind: str, scores: torch.Tensor, keep: Optional[torch.Tensor],
                 alpha: torch.Tensor) -> torch.Tensor:
        opts = self.opts
        if kind == SEARCH:
            alpha = alpha.to(scores.dtype)
            first, second = (get_attn_kind(k).weights for k in SEARCH_KINDS)
            return alpha * first(scores, keep, **opts) + (1 - alpha) * second(scores, keep, **opts)
        return get_attn_kind(kind).weights(scores, keep, **opts)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, pattern={self.pattern}'
