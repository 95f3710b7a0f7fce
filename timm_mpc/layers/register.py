"""Make the MPC-friendly layers known to timm by name.

timm has no plugin entry points, so this runs on ``import timm_mpc``. Afterwards
``timm.create_model('vit_tiny_patch16_224', attn_layer='relu_softmax', act_layer='quad_gelu')`` works.
"""
from typing import Dict, Type

from timm.layers import create_act
from timm.models import vision_transformer
from torch import nn

from .activations import QuadGELU
from .attention import (
    MPCAttention, Quad2Attention, ReLUSoftmaxAttention, ScalingAttention, SearchAttention, SoftmaxAttention,
)

__all__ = ['ATTN_LAYER_NAMES', 'ACT_LAYER_NAMES', 'register_timm_layers']

ATTN_LAYER_NAMES: Dict[str, Type[MPCAttention]] = {
    'mpc': MPCAttention,  # kinds per head from the weights: how a converted ViT is published
    'softmax': SoftmaxAttention,
    'relu_softmax': ReLUSoftmaxAttention,
    'scaling': ScalingAttention,
    '2quad': Quad2Attention,
    'search': SearchAttention,
}
"""Names added to timm's ViT ``attn_layer`` table."""

ACT_LAYER_NAMES: Dict[str, Type[nn.Module]] = {
    'quad_gelu': QuadGELU,
}
"""Names added to timm's activation lookup (``relu`` and ``gelu`` are timm's own)."""


def register_timm_layers() -> None:
    """Add :data:`ATTN_LAYER_NAMES` and :data:`ACT_LAYER_NAMES` to timm's name tables. Idempotent.

    Raises:
        RuntimeError: timm already maps one of the names to a different layer.
    """
    for table, names in ((vision_transformer.ATTN_LAYERS, ATTN_LAYER_NAMES),
                         (create_act._ACT_LAYER_DEFAULT, ACT_LAYER_NAMES)):
        for name, layer in names.items():
            if table.get(name, layer) is not layer:
                raise RuntimeError(f'timm already defines layer name {name!r} as {table[name]}; not overriding it')
            table[name] = layer
