"""CrypTen as a :class:`~timm_mpc.secure.secure_vit.Backend`: its secret tensors and timm-mpc's operators on them."""
from typing import Any, Sequence

import torch

from ..secure_vit import Backend
from . import ops
from .compat import import_crypten, mask_weights

__all__ = ['CryptenBackend']


class CryptenBackend(Backend):
    """CrypTen's secret tensors and timm-mpc's operators on them (:mod:`.ops`)."""
    ops = ops

    def __init__(self) -> None:
        self.crypten = import_crypten()

    def share(self, value: torch.Tensor, src: int) -> Any:
        return self.crypten.cryptensor(value, src=src)

    def cat(self, tensors: Sequence[Any], dim: int) -> Any:
        return self.crypten.cat(list(tensors), dim=dim)

    def mask_weights(self, weights: Sequence[Any]) -> None:
        mask_weights(weights)
