"""MPC-friendly activations."""
import torch
from torch import nn

__all__ = ['QuadGELU', 'quad_gelu']


def quad_gelu(x: torch.Tensor) -> torch.Tensor:
    """MPCFormer's quadratic GeLU approximation ``0.125x² + 0.5x + 0.25``: one secure multiply."""
    return 0.125 * x.square() + 0.5 * x + 0.25


class QuadGELU(nn.Module):
    """Module form of :func:`quad_gelu`; ``inplace`` is accepted for timm's layer factory and ignored."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quad_gelu(x)
