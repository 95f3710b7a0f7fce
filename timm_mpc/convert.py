"""``convert_to_mpc``: make any supported timm model MPC-friendly in place, keeping its weights."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from timm.layers import GluMlp, Mlp, SwiGLU, get_act_layer
from timm.layers import Attention
from timm.models._input import get_model_input_config
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from .layers.attention import MPCAttention
from .layers.eva_attention import MPCEvaAttention
from .layers.linearizable_mlp import GeluPattern, LinearizableMlp
from .layers.mpc_attention import MPCAttentionMixin
from .layers.swin_attention import MPCWindowAttention
from .pattern import ModelPattern, count_head_kinds, expand_attn_pattern, expand_gelu_pattern
from .utils import inference_pass

__all__ = ['convert_to_mpc', 'ConversionReport', 'SUPPORTED_ATTENTION']

SUPPORTED_ATTENTION: Dict[Type[nn.Module], Type[MPCAttentionMixin]] = {
    Attention: MPCAttention,
    EvaAttention: MPCEvaAttention,
    WindowAttention: MPCWindowAttention,
}
"""timm attention classes that convert, and what they become."""

SUPPORTED_FAMILIES = ('vit_* and deit_* (timm.layers.Attention)', 'eva02_* and eva_* (EvaAttention, rope)',
                      'swin_* (WindowAttention, relative position bias and shifted windows)')
_MLP_TYPES = (Mlp, GluMlp, SwiGLU)


@dataclass
class ConversionReport:
    """What :func:`convert_to_mpc` changed: ``(module name, old class, new class)`` per module."""
    attention: List[Tuple[str, str, str]] = field(default_factory=list)
    activations: List[Tuple[str, str, str]] = field(default_factory=list)
    mlps: List[Tuple[str, str, str]] = field(default_factory=list)
    head_counts: Dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f'attention modules converted: {len(self.attention)}; heads by kind: {self.head_counts}']
        for title, rows in (('attention', self.attention), ('activation', self.activations), ('mlp', self.mlps)):
            lines += [f'  {title:10s} {name}: {old} -> {new}' for name, old, new in rows]
        return '\n'.join(lines)


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return 'attention' in name or 'attn' in name


def _find_attention(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Supported attention modules; raises naming what it found if anything else looks like attention."""
    found, unsupported = [], set()
    for name, module in model.named_modules():
        if isinstance(module, MPCAttentionMixin) or type(module) in SUPPORTED_ATTENTION:
            found.append((name, module))
        elif _looks_like_attention(module) and not any(name.startswith(f'{n}.') for n, _ in found):
            unsupported.add(f'{type(module).__module__}.{type(module).__name__}')
    if unsupported or not found:
        what = (f'attention modules of unsupported types {sorted(unsupported)}' if unsupported
                else f'no attention modules (top-level type {type(model).__name__})')
        raise ValueError(
            f'convert_to_mpc cannot convert this model: it has {what}. Supported families: '
            f'{"; ".join(SUPPORTED_FAMILIES)}. Nothing was changed.')
    return found


def _mlp_token_shapes(model: nn.Module, mlps: Sequence[nn.Module], input_size: Sequence[int]) -> List[Tuple[int, ...]]:
    """Token dimensions seen by each MLP, from one forward pass on a blank image."""
    shapes: Dict[int, Tuple[int, ...]] = {}

    def record(module: nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shapes.setdefault(id(module), tuple(args[0].shape[1:-1]))

    hooks = [m.register_forward_hook(record) for m in mlps]
    try:
        param = next(model.parameters())
        with inference_pass(model):
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    return [shapes[id(m)] for m in mlps]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_to_mpc(
        model: nn.Module,
        attn_pattern: ModelPattern = 'softmax',
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        gelu_pattern: Optional[Union[GeluPattern, Sequence[GeluPattern]]] = None,
        relu_eps: float = 1e-5,
        quad_c: float = 5.0,
        input_size: Optional[Sequence[int]] = None,
        return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Swap a timm model's attention (and optionally activation) modules for MPC-friendly ones, in place.

    Every parameter and buffer stays the same tensor, so the weights are kept exactly; with
    ``attn_pattern='softmax'`` the model computes what it computed before (with unfused attention).
    Everything is checked before the first module changes: on error the model is untouched.

    Args:
        model: A timm model of a supported family (see ``SUPPORTED_ATTENTION``), or one converted before.
        attn_pattern: One kind (``softmax``, ``relu_softmax``, ``scaling``, ``2quad``) or ``'search'``
            for every head, or one entry per attention module: a kind, ``'search'``, or a list of kinds,
            one per head.
        act_layer: New activation for every MLP (a name such as ``'quad_gelu'`` or ``'relu'``, or a
            class); None keeps the activations.
        gelu_pattern: MPCViT+ linearization of ``Mlp`` layers: ``'gelu'``, ``'linear'``, ``'search'``
            (learnable β per token), or one entry per MLP. None leaves the MLPs as they are.
        relu_eps: ReLU-Softmax denominator epsilon.
        quad_c: 2Quad shift.
        input_size: ``(C, H, W)`` for the blank forward pass that measures token counts for
            ``gelu_pattern``; defaults to the model's current input size.
        return_report: Also return a :class:`ConversionReport`.

    Returns:
        The model, or ``(model, report)`` when ``return_report`` is True.

    Raises:
        ValueError: an unsupported model, an unknown kind or activation, or a pattern of the wrong shape.
    """
    attention = _find_attention(model)
    layers = expand_attn_pattern(attn_pattern, [m.num_heads for _, m in attention])

    new_act = None
    if act_layer is not None:
        try:
            new_act = get_act_layer(act_layer)
        except KeyError:
            raise ValueError(
                f'unknown act_layer {act_layer!r}; use a timm activation name (e.g. quad_gelu, relu, gelu) '
                f'or an nn.Module class') from None
    mlps = [(n, m) for n, m in model.named_modules() if isinstance(m, _MLP_TYPES)]
    if (new_act is not None or gelu_pattern is not None) and not mlps:
        raise ValueError(f'act_layer/gelu_pattern given, but the model has no timm MLP ({[t.__name__ for t in _MLP_TYPES]})')

    new_mlps: List[Tuple[str, nn.Module, LinearizableMlp]] = []
    if gelu_pattern is not None:
        plain = [(n, m) for n, m in mlps if not isinstance(m, Mlp)]
        if plain:
            raise ValueError(
                f'gelu_pattern needs fc1 -> act -> fc2 MLPs (timm Mlp); {plain[0][0]} is {type(plain[0][1]).__name__}')
        gelu_layers = expand_gelu_pattern(gelu_pattern, len(mlps))
        # the model's current size (a ViT made with img_size=32 keeps its source cfg's 224)
        size = input_size or (get_model_input_config(model)['input_size'] if hasattr(model, 'pretrained_cfg') else None)
        if size is None:
            raise ValueError('gelu_pattern needs input_size=(C, H, W) to count tokens; the model has no pretrained_cfg')
        shapes = _mlp_token_shapes(model, [m for _, m in mlps], size)
        for (name, mlp), shape, layer in zip(mlps, shapes, gelu_layers):
            if isinstance(mlp, LinearizableMlp):
                new = LinearizableMlp.from_module(mlp, mlp.token_shape, layer)
            else:
                new = LinearizableMlp.from_module(mlp, shape, layer)
            new_mlps.append((name, mlp, new))

    new_attention = [
        (name, module, SUPPORTED_ATTENTION.get(type(module), type(module)).from_module(module, layer, relu_eps, quad_c))
        for (name, module), layer in zip(attention, layers)]

    # all checks passed: apply
    report = ConversionReport()
    for name, old, new in new_attention:
        _replace(model, name, new)
        report.attention.append((name, type(old).__name__, type(new).__name__))
    for name, old, new in new_mlps:
        _replace(model, name, new)
        report.mlps.append((name, type(old).__name__, type(new).__name__))
    if new_act is not None:
        for name, mlp in model.named_modules():
            if isinstance(mlp, _MLP_TYPES):
                old_act = type(mlp.act).__name__
                mlp.act = new_act()
                report.activations.append((f'{name}.act', old_act, type(mlp.act).__name__))
    report.head_counts = count_head_kinds(model)
    return (model, report) if return_report else model
