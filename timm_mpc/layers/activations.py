"""MPC-friendly activations, and the one table that names every MLP activation timm-mpc knows."""
from typing import Optional, Tuple, Type

import torch
from timm.layers import GELU
from torch import nn

__all__ = ['QuadGELU', 'quad_gelu', 'ACTIVATIONS', 'activation_name']


def quad_gelu(x: torch.Tensor) -> torch.Tensor:
    """MPCFormer's quadratic GeLU approximation ``0.125x² + 0.5x + 0.25``: one secure multiply."""
    return 0.125 * x.square() + 0.5 * x + 0.25


class QuadGELU(nn.Module):
    """Module form of :func:`quad_gelu`; ``inplace`` is accepted for timm's layer factory and ignored."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quad_gelu(x)


ACTIVATIONS: Tuple[Tuple[str, Tuple[Type[nn.Module], ...]], ...] = (
    ('gelu', (nn.GELU, GELU)),  # torch's and timm's exact GeLU (approximate='none')
    ('quad_gelu', (QuadGELU,)),
    ('relu', (nn.ReLU,)),
    ('silu', (nn.SiLU,)),  # EVA-02's SwiGLU gate
    ('identity', (nn.Identity,)),
)
"""Every MLP activation that calibration, the secure plan and the cost table know, by name. An exact GeLU
in either of its classes is one entry, so every reader of a model treats them alike."""


def activation_name(module: nn.Module) -> Optional[str]:
    """The :data:`ACTIVATIONS` name of an activation module, or None for one timm-mpc does not know (including
    GeLU's tanh approximation)."""
    for name, classes in ACTIVATIONS:
        if isinstance(module, classes):
            if name == 'gelu' and getattr(module, 'approximate', 'none') != 'none':
                return None
            return name
    return None
