"""MPCViT+ MLP: per-token choice between GeLU and a linear path with a ReLU after the second layer."""
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import Mlp
from torch import nn

from .head_kinds import check_unit_interval
from .rebase import rebase_module
from .state_mode import StateModeMixin

__all__ = ['LinearizableMlp', 'GeluPattern', 'GELU_PATTERNS']

GeluPattern = Union[str, Sequence[Any], torch.Tensor]
"""``'gelu'``, ``'linear'``, ``'search'``, or one 0/1 value per token (1 = keep GeLU)."""

GELU_PATTERNS = ('gelu', 'linear', 'search')


class LinearizableMlp(StateModeMixin, Mlp):
    """timm ``Mlp`` where each token position either keeps the activation or is linearized.

    With ``β`` per token position (shape ``(1, *token_shape, 1)``)::

        h   = β · act(fc1 x) + (1 − β) · fc1 x
        out = (1 − β) · ReLU(fc2 h) + β · fc2 h

    A token with β = 1 is the plain MLP; with β = 0 it skips the activation and gets a ReLU after
    the second linear layer (MPCViT+). Fixed mode keeps 0/1 values in the ``gelu_tokens``
    buffer; search mode learns them as the ``beta`` parameter. Parameter names are ``Mlp``'s.
    """
    fixed_key, search_key, state_name = 'gelu_tokens', 'beta', 'GeLU pattern'

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
        self.beta: Optional[nn.Parameter] = None
        self.gelu_tokens: Optional[torch.Tensor] = None
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
        return self.beta is not None

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

    def set_pattern(self, gelu_pattern: GeluPattern) -> None:
        """Switch to ``gelu_pattern`` (see the constructor).

        Raises:
            ValueError: an unknown name, a pattern of the wrong shape, or values other than 0 and 1.
        """
        device = self.fc1.weight.device
        if isinstance(gelu_pattern, str):
            if gelu_pattern not in GELU_PATTERNS:
                raise ValueError(
                    f'unknown GeLU pattern {gelu_pattern!r}; accepted: {list(GELU_PATTERNS)} or one 0/1 '
                    f'value per token (shape {self.token_shape})')
            if gelu_pattern == 'search':
                self._set_search(torch.ones(self.beta_shape, device=device))
                return
            values = torch.full(self.beta_shape, 1. if gelu_pattern == 'gelu' else 0., device=device)
        else:
            values = torch.as_tensor(gelu_pattern, dtype=torch.float32, device=device)
            if values.numel() != self.num_tokens:
                raise ValueError(
                    f'a GeLU pattern needs one value per token, shape {self.token_shape}; '
                    f'got shape {tuple(values.shape)}')
            if not ((values == 0) | (values == 1)).all():
                raise ValueError(
                    'a fixed GeLU pattern holds 0 (linearized token) or 1 (GeLU token); got values '
                    f'{sorted(set(values.flatten().tolist()))[:8]}; use set_beta for fractional search values')
        self._set_fixed(values.reshape(self.beta_shape))

    def set_beta(self, beta: torch.Tensor) -> None:
        """Enter search mode with the given β (one value per token, in [0, 1])."""
        beta = torch.as_tensor(beta, dtype=torch.float32)
        if beta.numel() != self.num_tokens:
            raise ValueError(f'beta needs one value per token, shape {self.token_shape}; got shape {tuple(beta.shape)}')
        check_unit_interval('beta', beta)
        self._set_search(beta.reshape(self.beta_shape).to(self.fc1.weight.device))

    def _set_search(self, beta: torch.Tensor) -> None:
        # exactly one of the two is registered state; the other is a plain None attribute
        self._buffers.pop('gelu_tokens', None)
        self.__dict__['gelu_tokens'] = None
        self.__dict__.pop('beta', None)
        self.beta = nn.Parameter(beta)

    def _set_fixed(self, values: torch.Tensor) -> None:
        self._parameters.pop('beta', None)
        self.__dict__['beta'] = None
        self.__dict__.pop('gelu_tokens', None)
        self.register_buffer('gelu_tokens', values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta if self.searching else self.gelu_tokens
        x = self.fc1(x)
        if self.searching or not bool(beta.all()):
            beta = beta.to(x.dtype)
            x = beta * self.act(x) + (1 - beta) * x
            x = self.norm(self.drop1(x))
            x = self.fc2(x)
            x = (1 - beta) * x.relu() + beta * x
        else:
            x = self.fc2(self.norm(self.drop1(self.act(x))))
        return self.drop2(x)

    def _load_fixed(self, gelu_tokens: torch.Tensor) -> None:
        self.set_pattern(gelu_tokens)

    def _load_search(self, beta: torch.Tensor) -> None:
        self.set_beta(beta)

    def extra_repr(self) -> str:
        if self.searching:
            return f'token_shape={self.token_shape}, pattern=search'
        kept = int(self.gelu_tokens.sum().item())
        return f'token_shape={self.token_shape}, gelu_tokens={kept}/{self.gelu_tokens.numel()}'
