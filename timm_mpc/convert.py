"""``convert_to_mpc``: make any supported timm model MPC-friendly in place, keeping its weights."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from timm.layers import Mlp, get_act_layer
from timm.models import get_model_input_config
from torch import nn

from .layers.linearizable_mlp import GeluPattern, LinearizableMlp
from .layers.mpc_attention import MPCAttentionMixin
from .pattern import ModelPattern, count_head_kinds, expand_attn_pattern, expand_gelu_pattern
from .reader import FAMILIES, MLP_TYPES, SUPPORTED_ATTENTION, ModelParts, read_model
from .utils import inference_pass

__all__ = ['convert_to_mpc', 'ConversionReport', 'SUPPORTED_ATTENTION']



@dataclass
class ConversionReport:
    """What :func:`convert_to_mpc` changed: ``(module name, old class, new class)`` per module, and whether the
    converted model runs securely."""
    attention: List[Tuple[str, str, str]] = field(default_factory=list)
    activations: List[Tuple[str, str, str]] = field(default_factory=list)
    mlps: List[Tuple[str, str, str]] = field(default_factory=list)
    head_counts: Dict[str, int] = field(default_factory=dict)
    family: str = ''
    runs_securely: bool = False
    secure_note: str = ''

    def __str__(self) -> str:
        secure = 'yes' if self.runs_securely else f'not yet ({self.secure_note})'
        lines = [f'family {self.family}: converts yes, runs securely {secure}',
                 f'attention modules converted: {len(self.attention)}; heads by kind: {self.head_counts}']
        for title, rows in (('attention', self.attention), ('activation', self.activations), ('mlp', self.mlps)):
            lines += [f'  {title:10s} {name}: {old} -> {new}' for name, old, new in rows]
        return '\n'.join(lines)


def _supported_families() -> str:
    return '; '.join(f'{f.models} ({f.attention.__name__})' for f in FAMILIES)


def _check_converts(parts: ModelParts, model: nn.Module) -> None:
    """Raise naming what was found unless every attention module of the model converts."""
    if not parts.converts:
        what = (f'attention modules of unsupported types {sorted({t for _, t in parts.unsupported})}'
                if parts.unsupported else f'no attention modules (top-level type {type(model).__name__})')
        raise ValueError(
            f'convert_to_mpc cannot convert this model: it has {what}. Supported families: '
            f'{_supported_families()}. Nothing was changed.')


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
        model: A timm model of a supported family (see :data:`timm_mpc.reader.FAMILIES`), or one converted before.
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
    parts = read_model(model)
    _check_converts(parts, model)
    attention = parts.attention
    layers = expand_attn_pattern(attn_pattern, [m.num_heads for _, m in attention])

    new_act = None
    if act_layer is not None:
        try:
            new_act = get_act_layer(act_layer)
        except KeyError:
            raise ValueError(
                f'unknown act_layer {act_layer!r}; use a timm activation name (e.g. quad_gelu, relu, gelu) '
                f'or an nn.Module class') from None
    mlps = parts.mlps
    if (new_act is not None or gelu_pattern is not None) and not mlps:
        raise ValueError(f'act_layer/gelu_pattern given, but the model has no timm MLP ({[t.__name__ for t in MLP_TYPES]})')

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
                mlp.values_of(layer)  # set in place below; checked now
                new_mlps.append((name, mlp, layer))
            else:
                new_mlps.append((name, mlp, LinearizableMlp.from_module(mlp, shape, layer)))

    # a module converted before keeps its tensors and gets the new pattern in place
    new_attention = [
        (name, module, layer if isinstance(module, MPCAttentionMixin)
         else SUPPORTED_ATTENTION[type(module)].from_module(module, layer, relu_eps, quad_c))
        for (name, module), layer in zip(attention, layers)]

    # all checks passed: apply
    report = ConversionReport()
    for name, old, new in new_attention:
        if isinstance(new, nn.Module):
            _replace(model, name, new)
        else:
            old.heads.set_pattern(new)
            new = old
        report.attention.append((name, type(old).__name__, type(new).__name__))
    for name, old, new in new_mlps:
        if isinstance(new, nn.Module):
            _replace(model, name, new)
        else:
            old.set_pattern(new)
            new = old
        report.mlps.append((name, type(old).__name__, type(new).__name__))
    if new_act is not None:
        for name, mlp in read_model(model).mlps:
            old_act = type(mlp.act).__name__
            mlp.act = new_act()
            report.activations.append((f'{name}.act', old_act, type(mlp.act).__name__))
    report.head_counts = count_head_kinds(model)
    if parts.family is not None:
        report.family, report.secure_note = parts.family.name, parts.family.secure_note
    report.runs_securely = parts.runs_securely
    return (model, report) if return_report else model
