"""MPCViT+ MLP: per-token choice between GeLU and a linear path with a ReLU after the second layer."""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import Mlp

from .attn_kinds import PatternError
from .pattern_state import PatternState, check_unit_interval
from .rebase import rebase_module

__all__ = ['LinearizableMlp', 'GeluPattern', 'GELU_PATTERNS']

GeluPattern = Union[str, Sequence[Any], torch.Tensor]
"""``'gelu'``, ``'linear'``, ``'search'``, or one 0/1 value per token (1 = keep GeLU)."""

GELU_PATTERNS = ('gelu', 'linear', 'search')
_SEARCH_VALUE = -1.0  # a gelu_tokens value: the token's β is searched


class LinearizableMlp(PatternState, Mlp):
    """timm ``Mlp`` where each token position either keeps the activation or is linearized.

    With ``β`` per token position (shape ``(1, *token_shape, 1)``)::

        h   = β · act(fc1 x) + (1 − β) · fc1 x
        out = (1 − β) · ReLU(fc2 h) + β · fc2 h

    A token with β = 1 is the plain MLP; with β = 0 it skips the activation and gets a ReLU after
    the second linear layer (MPCViT+). The ``gelu_tokens`` buffer holds the fixed 0/1 values, or -1 where β
    is searched as the ``beta`` buffer; both always exist (see :class:`PatternState`). Parameter names
    are ``Mlp``'s.
    """
    pattern_keys, attribute_name, search_value = ('gelu_tokens', 'beta'), 'mlp', _SEARCH_VALUE

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            *args,
            token_shape: Sequence[int] = (),
            gelu_pattern: GeluPattern = 'gelu',
            **kwargs,
    ) -> None:
        """
        Args:
            in_features: Input channels.
            hidden_features: Hidden channels.
            out_features: Output channels.
            *args: Further positional arguments of ``timm.layers.Mlp``.
            token_shape: Token dimensions between batch and channels, e.g. ``(65,)``; ``()`` gives one
                β for the whole layer.
            gelu_pattern: ``'gelu'`` (β = 1), ``'linear'`` (β = 0), ``'search'`` (learnable β = 1),
                or a 0/1 value per token.
            **kwargs: Further keyword arguments of ``timm.layers.Mlp``.
        """
        super().__init__(in_features, hidden_features, out_features, *args, **kwargs)
        self.init_linearization(token_shape, gelu_pattern)

    def init_linearization(self, token_shape: Sequence[int], gelu_pattern: GeluPattern) -> None:
        self.token_shape: Tuple[int, ...] = tuple(int(t) for t in token_shape)
        device = self.fc1.weight.device
        self.register_buffer('beta', torch.ones(self.beta_shape, device=device))
        self.register_buffer('gelu_tokens', torch.ones(self.beta_shape, device=device))
        self.mode = 'gelu'
        self.set_pattern(gelu_pattern)

    @classmethod
    def from_module(cls, module: Mlp, token_shape: Sequence[int], gelu_pattern: GeluPattern) -> 'LinearizableMlp':
        """A ``LinearizableMlp`` sharing every weight of a timm ``Mlp``."""
        new = rebase_module(module, cls)
        new.init_linearization(token_shape, gelu_pattern)
        return new

    @property
    def searching(self) -> bool:
        """True in search mode (learnable β)."""
        return self.mode == 'search'

    @property
    def num_tokens(self) -> int:
        """Number of β values: the product of ``token_shape`` (1 for a per-layer β)."""
        return math.prod(self.token_shape)

    @property
    def beta_shape(self) -> Tuple[int, ...]:
        return (1, *self.token_shape, 1)

    @property
    def pattern(self) -> Union[str, List[Any]]:
        """``'search'``, or the 0/1 value per token as nested lists."""
        if self.searching:
            return 'search'
        return self.gelu_tokens.reshape(self.token_shape).int().tolist()

    def values_of(self, gelu_pattern: GeluPattern) -> torch.Tensor:
        """The ``gelu_tokens`` values of a pattern (-1 for search).

        Raises:
            PatternError: an unknown name, a pattern of the wrong shape, or values other than 0 and 1.
        """
        if isinstance(gelu_pattern, str):
            if gelu_pattern not in GELU_PATTERNS:
                raise PatternError(
                    f'unknown GeLU pattern {gelu_pattern!r}; accepted: {list(GELU_PATTERNS)} or one 0/1 '
                    f'value per token (shape {self.token_shape})')
            value = {'gelu': 1.0, 'linear': 0.0, 'search': _SEARCH_VALUE}[gelu_pattern]
            return torch.full(self.beta_shape, value, device='cpu')
        values = torch.as_tensor(gelu_pattern, dtype=torch.float32, device='cpu').detach()
        if values.numel() != self.num_tokens:
            raise PatternError(
                f'a GeLU pattern needs one value per token, shape {self.token_shape}; got shape {tuple(values.shape)}')
        if not ((values == 0) | (values == 1)).all():
            raise PatternError(
                'a fixed GeLU pattern holds 0 (linearized token) or 1 (GeLU token); got values '
                f'{sorted(set(values.flatten().tolist()))[:8]}; use set_beta for fractional search values')
        return values.reshape(self.beta_shape)

    def set_pattern(self, gelu_pattern: GeluPattern) -> None:
        """Set the pattern in place (see the constructor); ``'search'`` restarts β from 1.

        Raises:
            PatternError: an unknown name, a pattern of the wrong shape, or values other than 0 and 1.
        """
        values = self.values_of(gelu_pattern)
        with torch.no_grad():
            self.gelu_tokens.copy_(values)
            if isinstance(gelu_pattern, str) and gelu_pattern == 'search':
                self.beta.fill_(1.0)
        self.refresh(values)

    def set_beta(self, beta: torch.Tensor) -> None:
        """Enter search mode with the given β (one value per token, in [0, 1]), in place."""
        self.enter_search(beta, 'token')

    def refresh(self, codes: Optional[torch.Tensor] = None) -> None:
        """The forward path from the ``gelu_tokens`` buffer (after it was set or loaded)."""
        tokens = self.gelu_tokens if codes is None else codes
        self.mode = 'search' if bool((tokens == _SEARCH_VALUE).all()) else 'gelu' if bool((tokens == 1).all()) \
            else 'mixed'
        self.train_searched(self.mode == 'search')

    def unused_state(self) -> Tuple[str, ...]:
        return () if self.searching else ('beta',)

    def check_state(self, state: Dict[str, torch.Tensor]) -> None:
        tokens, beta = state['gelu_tokens'], state['beta']
        for name, value in state.items():
            if value.numel() != self.num_tokens:
                raise PatternError(f'{name} needs one value per token, shape {self.token_shape}; '
                                   f'got shape {tuple(value.shape)}')
        searched = tokens == _SEARCH_VALUE
        if not (searched.all() or ((tokens == 0) | (tokens == 1)).all()):
            raise PatternError(f'gelu_tokens holds 0 or 1 per token, or -1 everywhere (search); got values '
                               f'{sorted(set(tokens.flatten().tolist()))[:8]}')
        check_unit_interval('beta', beta)

    def legacy_state(self, present: str, value: torch.Tensor) -> torch.Tensor:
        # checkpoints written before both tensors always existed hold one: gelu_tokens (fixed) or beta (search)
        if present == 'gelu_tokens':
            return torch.ones(self.beta_shape)
        return torch.full(self.beta_shape, _SEARCH_VALUE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.mode == 'gelu':
            x = self.fc2(self.norm(self.drop1(self.act(x))))
        else:
            beta = (self.beta if self.mode == 'search' else self.gelu_tokens).to(x.dtype)
            x = beta * self.act(x) + (1 - beta) * x
            x = self.norm(self.drop1(x))
            x = self.fc2(x)
            x = (1 - beta) * x.relu() + beta * x
        return self.drop2(x)

    def extra_repr(self) -> str:
        if self.searching:
            return f'token_shape={self.token_shape}, pattern=search'
        kept = int(self.gelu_tokens.sum().item())
        return f'token_shape={self.token_shape}, gelu_tokens={kept}/{self.gelu_tokens.numel()}'
