"""Small helpers shared across the package."""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ['inference_pass']


@contextmanager
def inference_pass(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with autograd off for the block; its training mode is restored afterwards,
    so a probe forward pass (token counting, FLOPs, a rebuild check) leaves a model in training as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
