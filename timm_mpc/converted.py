"""``mpc_converted``: the timm architecture of a model :func:`~timm_mpc.convert_to_mpc` converted, for families whose
timm constructors cannot build MPC attention themselves (EVA-02, Swin: no ``attn_layer`` argument) and for MPCViT+
MLPs of a timm ViT (its ``mlp_layer`` is a class, not a name).

``timm.create_model('mpc_converted', base='eva02_tiny_patch14_224', attn_pattern=..., **base_kwargs)`` builds
``base`` with timm, then converts it: the structure comes from the arguments, the weights only fill it, as timm's
``build_model_with_cfg`` loads them. A published ``config.json`` names this architecture and those arguments, so
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` (or ``local-dir:``) loads such a model back the timm way.
"""
from functools import partial
from typing import Any, Optional

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from .convert import convert_to_mpc
from .factory import builds_mpc_attention

__all__ = ['CONVERTED_ARCH', 'mpc_converted']

CONVERTED_ARCH = 'mpc_converted'

default_cfgs = generate_default_cfgs({
    # a published repository's config.json gives the real one (input size, mean, std, classes); built directly,
    # the base's default
    CONVERTED_ARCH: dict(url='', num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation='bicubic',
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), license='apache-2.0'),
})


def _build(base: str, attn_pattern: Any, gelu_pattern: Any, act_layer: Optional[str], relu_eps: float, quad_c: float,
           **kwargs: Any) -> nn.Module:
    model = timm.create_model(base, **kwargs)
    convert_to_mpc(model, attn_pattern, act_layer=act_layer, gelu_pattern=gelu_pattern, relu_eps=relu_eps,
                   quad_c=quad_c)
    return model


@register_model
def mpc_converted(pretrained: bool = False, base: Optional[str] = None, attn_pattern: Any = 'softmax',
                  gelu_pattern: Any = None, act_layer: Optional[str] = None, relu_eps: float = 1e-5,
                  quad_c: float = 5.0, **kwargs: Any) -> nn.Module:
    """A timm model ``base`` converted with these ``convert_to_mpc`` arguments; ``kwargs`` go to ``base``.

    Raises:
        ValueError: no ``base``, ``base`` is not a timm model or an ``mpcvit_*`` one, or ``features_only``.
    """
    if not base or not isinstance(base, str) or not timm.is_model(base):
        raise ValueError(f'{CONVERTED_ARCH} needs base=<a registered timm architecture>, got {base!r}')
    if builds_mpc_attention(base):
        raise ValueError(f'{CONVERTED_ARCH}: base {base!r} builds MPC attention itself; create it directly')
    if kwargs.get('features_only'):
        raise ValueError(f'{CONVERTED_ARCH} does not build features_only models; use the model\'s '
                         f'forward_intermediates()')
    if not pretrained and kwargs.get('pretrained_cfg') is None:  # built directly: the base's input size, mean, std
        kwargs['pretrained_cfg'] = get_pretrained_cfg(base)
    build = partial(_build, base, attn_pattern, gelu_pattern, act_layer, relu_eps, quad_c)
    return build_model_with_cfg(build, CONVERTED_ARCH, pretrained=pretrained, **kwargs)
