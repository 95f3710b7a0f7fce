"""The one way a command gets its model: :func:`create_mpc_model`."""
from typing import Any, Dict, Optional

import timm
from timm.models import get_pretrained_cfg, load_state_dict, model_entrypoint
from torch import nn

from .convert import convert_to_mpc
from .layers.attn_kinds import BASELINE_KIND
from .layers.linearizable_mlp import LinearizableMlp
from .pattern import get_attn_pattern, parse_attn_pattern, parse_gelu_pattern, set_attn_pattern, set_gelu_pattern
from .reader import read_model

__all__ = ['create_mpc_model', 'builds_mpc_attention']


def builds_mpc_attention(name: str) -> bool:
    """True where timm builds the architecture with MPC heads itself (timm-mpc's own ``mpcvit_*``, a published
    ``hf-hub:`` or ``local-dir:`` repository), so that its checkpoints load the timm way."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return True
    arch = name.split('.')[0]
    return timm.is_model(arch) and model_entrypoint(arch).__module__.startswith('timm_mpc.')


def _num_classes(name: str, state: Dict[str, Any]) -> Optional[int]:
    """The classes of the classifier in a state dict of ``name``'s architecture (None: no classifier weight found
    under the name timm's ``pretrained_cfg`` gives it)."""
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, 'classifier', None) or 'head'
    weight = state.get(f'{classifier[0] if isinstance(classifier, (tuple, list)) else classifier}.weight')
    return int(weight.shape[0]) if weight is not None else None


def create_mpc_model(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        attn_pattern: Any = None,
        gelu_pattern: Any = None,
        act_layer: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """An MPC-friendly model by name, the way every ``timm-mpc`` command builds one.

    Args:
        name: ``mpcvit_*`` (optionally ``.TAG``), ``hf-hub:ORG/NAME``, ``local-dir:PATH``, or any timm model of
            a family ``convert_to_mpc`` supports (converted, keeping its weights).
        pretrained: The published weights, loaded the timm way, with the pattern they hold.
        checkpoint: A weights file of ``name``'s architecture (ours, timm's, or the MPCViT authors'), with the
            pattern it holds; for a converted timm model, the weights of the converted model.
        attn_pattern: Set this head pattern (a kind, ``search``, ``muNN``, JSON text or a list) after loading.
        gelu_pattern: Set this MPCViT+ GeLU pattern (``gelu``, ``linear``, ``search``, JSON text or a list).
        act_layer: Replace every MLP activation (e.g. ``quad_gelu``).
        **kwargs: ``timm.create_model`` arguments.

    Raises:
        ValueError: an unsupported model, a bad pattern, or a checkpoint that does not fit.
    """
    gelu_pattern = parse_gelu_pattern(gelu_pattern) if isinstance(gelu_pattern, str) else gelu_pattern
    if checkpoint and not builds_mpc_attention(name):
        # the converted model's weights: convert first (MLPs too, where they were), then load strictly
        state = load_state_dict(checkpoint, weights_only=True)
        classes = _num_classes(name, state)
        if 'num_classes' not in kwargs and classes is not None:  # the weights' head, not the source's 1,000 classes
            kwargs['num_classes'] = classes
        model = timm.create_model(name, **kwargs)
        convert_to_mpc(model, BASELINE_KIND, act_layer=act_layer, gelu_pattern=gelu_pattern)  # the structure
        act_layer = None
        model.load_state_dict(state, strict=True)
    elif checkpoint:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint), **kwargs)
    else:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not read_model(model).heads:
        convert_to_mpc(model, BASELINE_KIND)  # a plain timm model: the same computation, with MPC heads
    if attn_pattern is not None:
        set_attn_pattern(model, parse_attn_pattern(attn_pattern, model) if isinstance(attn_pattern, str)
                         else attn_pattern)
    if gelu_pattern is not None:
        if any(isinstance(m, LinearizableMlp) for _, m in read_model(model).mlps):
            set_gelu_pattern(model, gelu_pattern)
        else:
            convert_to_mpc(model, get_attn_pattern(model), gelu_pattern=gelu_pattern)
    if act_layer is not None:
        convert_to_mpc(model, get_attn_pattern(model), act_layer=act_layer)
    return model
