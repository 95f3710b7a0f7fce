"""Example data shipped with the package: eight Fashion-MNIST test images (MIT licence, Zalando Research)."""
from pathlib import Path
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['FASHION_MNIST_CLASSES', 'fashion_mnist_to_model_input', 'example_images', 'calibration_examples']

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
_MEAN, _STD = 0.2860, 0.3530
_EXAMPLES = Path(__file__).with_name('fashion_mnist_test8.pt')


def fashion_mnist_to_model_input(images: torch.Tensor, size: int = 32, channels: int = 3) -> torch.Tensor:
    """Grey 28×28 uint8 images ``(B, 28, 28)`` to normalized ``(B, channels, size, size)`` model input.

    The image is zero-padded to ``size`` (28 → 32 adds two black pixels a side, which is the background
    colour), scaled to [0, 1], repeated over ``channels`` and normalized with Fashion-MNIST's mean and std.
    """
    x = images.float().div(255).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad < 0:
        raise ValueError(f'size must be at least {x.shape[-1]}, got {size}')
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return ((x - _MEAN) / _STD).expand(-1, channels, -1, -1).contiguous()


def example_images() -> Tuple[torch.Tensor, torch.Tensor]:
    """The first eight Fashion-MNIST test images as ``mpcvit_tiny`` input ``(8, 3, 32, 32)``, and their labels."""
    data = torch.load(_EXAMPLES, weights_only=True)
    return fashion_mnist_to_model_input(data['images']), data['labels']


def calibration_examples(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The eight shipped images as input of any model: ``(8, C, H, W)``, pixels in [0, 1] normalized with
    ``mean`` and ``std`` (the model's, one per channel), zero-padded to ``H × W`` from 28 × 28 where they fit, resized
    (bilinear) where they do not. The owner's default calibration images for secure inference."""
    c, h, w = input_size
    x = torch.load(_EXAMPLES, weights_only=True)['images'].float().div(255).unsqueeze(1)
    if h >= x.shape[-2] and w >= x.shape[-1]:
        dh, dw = h - x.shape[-2], w - x.shape[-1]
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    else:
        x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False).clamp(0, 1)
    x = x.expand(-1, c, -1, -1)
    return ((x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)).contiguous()
