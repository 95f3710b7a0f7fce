"""Make the MPC-friendly layers known to timm by name.

timm has no plugin entry points, so this runs on ``import timm_mpc``. Afterwards
``timm.create_model('vit_tiny_patch16_224', attn_layer='relu_softmax', act_layer='quad_gelu')`` works.
"""
from typing import Dict, Type

from timm.models import vision_transformer
from torch import nn

from ..timm_adapter import activation_layers
from .activations import QuadGELU
from .attention import (
    MPCAttention, Quad2Attention, ReLUSoftmaxAttention, ScalingAttention, SearchAttention, SoftmaxAttention,
)
from .attn_kinds import SEARCH, list_attn_kinds

__all__ = ['ACT_LAYER_NAMES', 'attn_layer_names', 'register_timm_layers']

_NAMED_CLASSES = {cls.default_pattern: cls for cls in (
    SoftmaxAttention, ReLUSoftmaxAttention, ScalingAttention, Quad2Attention, SearchAttention)}

ACT_LAYER_NAMES: Dict[str, Type[nn.Module]] = {
    'quad_gelu': QuadGELU,
}
"""Names added to timm's activation lookup (``relu`` and ``gelu`` are timm's own)."""


def attn_layer_names() -> Dict[str, Type[MPCAttention]]:
    """Names for timm's ViT ``attn_layer``: ``'mpc'`` (kinds per head from the weights: how a converted ViT is
    published), ``'search'``, and one per registered attention kind (all its heads of that kind)."""
    names: Dict[str, Type[MPCAttention]] = {'mpc': MPCAttention}
    for name in [k.name for k in list_attn_kinds()] + [SEARCH]:
        if name not in _NAMED_CLASSES:  # a kind registered by a user: a class of its own, made once
            title = ''.join(part.title() for part in name.split('_'))
            cls = type(f'{title}Attention', (MPCAttention,), dict(
                default_pattern=name, __doc__=f'``{name}`` attention in every head.', __module__=__name__))
            globals()[cls.__name__] = _NAMED_CLASSES[name] = cls  # a module attribute, so it pickles
        names[name] = _NAMED_CLASSES[name]
    return names


def register_timm_layers() -> None:
    """Add :func:`attn_layer_names` and :data:`ACT_LAYER_NAMES` to timm's name tables. Idempotent; call it
    again after registering an attention kind to give the kind its timm name.

    Raises:
        RuntimeError: timm already maps one of the names to a different layer.
    """
    for table, names in ((vision_transformer.ATTN_LAYERS, attn_layer_names()),
                         (activation_layers(), ACT_LAYER_NAMES)):
        for name, layer in names.items():
            if table.get(name, layer) is not layer:
                raise RuntimeError(f'timm already defines layer name {name!r} as {table[name]}; not overriding it')
            table[name] = layer
