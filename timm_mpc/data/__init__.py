"""Example data shipped with the package (eight Fashion-MNIST test images; MIT licence, Zalando Research) and the
one way images become model input: timm's eval transform for the model's data config."""
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_model_input_config
from torch import nn

__all__ = ['FASHION_MNIST_CLASSES', 'FASHION_MNIST_DATA_CONFIG', 'model_data_config', 'to_model_input',
           'example_images', 'calibration_examples']

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')

FASHION_MNIST_DATA_CONFIG: Dict[str, Any] = dict(
    input_size=(3, 32, 32), interpolation='bilinear', mean=(0.2860,) * 3, std=(0.3530,) * 3,
    # timm's 'border' crop scales the longest edge to input / crop_pct = 28 (a no-op on a 28x28 image) and pads it
    # to 32 with the mean, which normalizes to zero: a grey 28x28 image in the middle of a blank border
    crop_mode='border', crop_pct=32 / 28)
"""The data config of the Fashion-MNIST checkpoints: what their ``pretrained_cfg`` says and what they were trained on."""

_EXAMPLES = Path(__file__).with_name('fashion_mnist_test8.pt')


def model_data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config for ``model`` at the input size it has now: ``resolve_data_config`` alone reads the size of
    the source checkpoint's ``pretrained_cfg`` (224 for ``vit_tiny_patch16_224`` built with ``img_size=32``)."""
    return resolve_data_config(dict(input_size=get_model_input_config(model)['input_size']), model=model)


def to_model_input(images: torch.Tensor, data_config: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Grey uint8 images ``(B, H, W)`` (Fashion-MNIST's 28x28) to model input ``(B, C, H', W')``, each through timm's
    eval transform for ``data_config`` (default: the Fashion-MNIST checkpoints'), as a PIL image given the model's
    channels: exactly what ``timm.data.create_transform(**resolve_data_config(model=model))`` makes of it."""
    cfg = dict(data_config or FASHION_MNIST_DATA_CONFIG)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f'images must be grey uint8 (B, H, W); got {images.dtype} {tuple(images.shape)}')
    mode = {1: 'L', 3: 'RGB'}.get(cfg['input_size'][0])
    if mode is None:
        raise ValueError(f'grey images can be given 1 or 3 channels; the data config has input_size {cfg["input_size"]}')
    channels = cfg['input_size'][0]
    for key in ('mean', 'std'):  # one value per channel (a grey model may carry an RGB checkpoint's three)
        if len(cfg[key]) != channels:
            cfg[key] = (cfg[key][0],) * channels
    transform = create_transform(**{k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct',
                                                        'crop_mode') if k in cfg})
    return torch.stack([transform(Image.fromarray(img.numpy(), mode='L').convert(mode)) for img in images])


def example_images(data_config: Optional[Mapping[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first eight Fashion-MNIST test images as model input (default: ``mpcvit_tiny``'s, ``(8, 3, 32, 32)``) and
    their labels."""
    data = torch.load(_EXAMPLES, weights_only=True)
    return to_model_input(data['images'], data_config), data['labels']


def calibration_examples(model: nn.Module) -> torch.Tensor:
    """The eight shipped images as ``model``'s input, through timm's eval transform for its data config at the input
    size it has now. The owner's default calibration images for secure inference."""
    return example_images(model_data_config(model))[0]
