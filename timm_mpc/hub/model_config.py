"""What a published checkpoint's ``config.json`` says about its model, and the check that it rebuilds it.

timm's ``hf-hub:`` and ``local-dir:`` loaders call ``timm.create_model(architecture, **model_args)`` and
then load the weights strictly, so the architecture must be registered and ``model_args`` must rebuild
the same modules. The head pattern also travels in the weights (the ``heads.kinds`` buffers), so a
plain ``timm.create_model("mpcvit_tiny", pretrained=True)`` through a default config gets it too; where
``model_args`` name a pattern, loading checks that the weights hold the same one.
"""
from itertools import zip_longest
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from timm.models import get_model_input_config
from torch import nn

from ..converted import CONVERTED_ARCH
from ..layers.attention import MPCAttention
from ..layers.linearizable_mlp import LinearizableMlp
from ..layers.mpc_attention import MPCAttentionMixin
from ..layers.register import attn_layer_names
from ..models.mpcvit import MPCViT
from ..pattern import get_attn_pattern, get_gelu_pattern
from ..reader import read_model
from ..timm_adapter import activation_layers
from ..utils import inference_pass

__all__ = ['hub_model_args', 'check_rebuild']

_HEAD_DEFAULTS = dict(relu_eps=1e-5, quad_c=5.0)  # what timm's ViT builds MPC attention with


def _head_constants(model: nn.Module) -> Dict[str, float]:
    """The ReLU-Softmax epsilon and 2Quad shift, which must be the same in every head to be an argument."""
    values = {(h.relu_eps, h.quad_c) for _, h in read_model(model).heads}
    if len(values) != 1:
        raise ValueError(f'heads use different relu_eps/quad_c {sorted(values)}; a config can hold one of each')
    relu_eps, quad_c = values.pop()
    return dict(relu_eps=relu_eps, quad_c=quad_c)


def hub_model_args(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """The registered architecture and the JSON-serialisable ``model_args`` that rebuild ``model``.

    An ``mpcvit_*`` model records its head pattern, GeLU pattern and head constants. A timm ViT
    converted by :func:`timm_mpc.convert_to_mpc` is published as its own architecture with
    ``attn_layer='mpc'`` (the per-head kinds come with the weights) and, if its activation was
    replaced, the new ``act_layer`` name. Any other converted model (EVA-02, Swin, DeiT with MPCViT+ MLPs, other
    head constants) is published as :data:`~timm_mpc.converted.CONVERTED_ARCH` with its timm architecture as
    ``base`` and the conversion's arguments.

    Args:
        model: A model made by ``timm.create_model`` (so its architecture is known).

    Returns:
        ``(architecture, model_args)``; timm adds ``num_classes``, ``img_size`` and the like on export.

    Raises:
        ValueError: the model has no timm architecture, or a change a config cannot express.
    """
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not arch or not timm.is_model(arch):
        raise ValueError('the model has no registered timm architecture in its pretrained_cfg; '
                         'create it with timm.create_model(...) before publishing')
    args = dict(getattr(model, '_model_args', {}))
    parts = read_model(model)
    heads = [m for _, m in parts.attention if isinstance(m, MPCAttentionMixin)]
    if not heads:
        raise ValueError(f'{arch} has no MPC attention; convert it with timm_mpc.convert_to_mpc first')
    constants = _head_constants(model)
    if isinstance(model, MPCViT):
        args['attn_pattern'] = get_attn_pattern(model)
        gelu = get_gelu_pattern(model)
        if gelu:
            args.update(gelu_pattern=gelu, gelu_per_token=model.gelu_per_token)
        else:
            args.pop('gelu_pattern', None)
        args.update({k: v for k, v in constants.items() if v != _HEAD_DEFAULTS[k]})
        return arch, args

    act = _replaced_activation(parts)
    if (arch == CONVERTED_ARCH or 'base' in args or constants != _HEAD_DEFAULTS or any(type(m) is not MPCAttention for m in heads)
            or any(isinstance(m, LinearizableMlp) for _, m in parts.mlps)):
        # timm cannot build these MPC modules from its own arguments: the architecture converts at build time
        base = args.pop('base', arch)
        for key in ('attn_pattern', 'gelu_pattern', 'act_layer', 'relu_eps', 'quad_c'):
            args.pop(key, None)
        args.update(base=base, attn_pattern=get_attn_pattern(model), **constants)
        linearizable = [m for _, m in parts.mlps if isinstance(m, LinearizableMlp)]
        if linearizable:  # all-GeLU ones too: they are LinearizableMlp modules, with their buffers
            args['gelu_pattern'] = [m.pattern for m in linearizable]
        if act is not None:
            args['act_layer'] = act
        return CONVERTED_ARCH, args
    args['attn_layer'] = next(name for name, cls in attn_layer_names().items() if cls is MPCAttention)
    if act is not None:
        args['act_layer'] = act
    return arch, args


def _replaced_activation(parts: Any) -> Optional[str]:
    """The timm name of the one MLP activation class, where it has one: timm's ViT builds nn.GELU by default,
    which has none; an activation ``convert_to_mpc`` put in its place has."""
    acts = {type(act) for _, act in parts.activations}
    if len(acts) != 1:
        return None
    act = acts.pop()
    return next((n for n, cls in activation_layers().items() if cls is act), None)


def check_rebuild(model: nn.Module, architecture: str, model_args: Dict[str, Any]) -> None:
    """Rebuild the model from ``architecture`` and ``model_args``, load its weights strictly, and check
    that the modules and the outputs on a fixed random batch are the same.

    Raises:
        ValueError: the rebuilt model differs; the message names the first difference.
    """
    rebuilt = timm.create_model(architecture, **model_args)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ours = [(n, type(m).__name__) for n, m in model.named_modules()]
    theirs = [(n, type(m).__name__) for n, m in rebuilt.named_modules()]
    if ours != theirs:
        first = next((a, b) for a, b in zip_longest(ours, theirs) if a != b)
        raise ValueError(f'{architecture} rebuilt from its config differs from the model: {first[0]} vs {first[1]}')
    device = next(model.parameters()).device
    size = get_model_input_config(model)['input_size']  # the model's current size, not its source checkpoint's
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(device)
    with inference_pass(model), inference_pass(rebuilt.to(device)):
        same = torch.equal(model(images), rebuilt(images))
    if not same:
        raise ValueError(f'{architecture} rebuilt from its config computes different outputs from the model')
