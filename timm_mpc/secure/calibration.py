"""Plain-text calibration: the value ranges a secure inference will meet, before it runs.

Fixed-point shares wrap silently when a value outgrows the encoding, and CrypTen's Newton iterations
only converge on bounded inputs. One plain-text forward pass records, per layer, the LayerNorm
variances, the attention denominators, the GeLU inputs and the largest products. The ranges stay with
the owner: only the public scale and iteration count derived from each go into the plan
(:func:`timm_mpc.secure.plan.public_schedules`); values the encoding cannot hold are refused with
:class:`FixedPointRangeError`.
"""
from collections import defaultdict
from typing import Dict, List

import torch
from torch import nn

from ..layers.attn_kinds import SEARCH, get_attn_kind
from ..layers.head_kinds import HeadKinds
from ..reader import read_model
from ..utils import inference_pass
from .approximations import GELU_MAX_EXP_ITERATIONS, gelu_bound, gelu_exp_iterations
from .settings import SecureSettings

__all__ = ['calibrate', 'FixedPointRangeError', 'product_limit']


class FixedPointRangeError(ValueError):
    """A value of the model on the calibration images would overflow the fixed-point encoding."""


def product_limit(settings: SecureSettings) -> float:
    """Largest product magnitude a 64-bit ring holds with ``precision_bits`` fractional bits on each factor
    (one bit of headroom for the sign and one for the sum of shares)."""
    return 2.0 ** (62 - 2 * settings.precision_bits)


def calibrate(model: nn.Module, images: torch.Tensor, settings: SecureSettings) -> Dict[str, Dict[str, float]]:
    """Run ``model`` on ``images`` in plain text and return the ranges the secure plan needs: ``{'min', 'max'}``
    of each LayerNorm's variance and of each attention kind's denominator (``blocks.i.attn.<kind>``), the
    ``max`` of each exact GeLU's input magnitude, and of the logits' magnitude (``logits``).

    The modules are the ones :func:`timm_mpc.reader.read_model` finds, so calibration covers exactly what the
    plan computes; an exact GeLU is one entry of :data:`timm_mpc.layers.ACTIVATIONS` in either of its classes.

    Raises:
        FixedPointRangeError: a product would not fit the fixed-point encoding, or a GeLU input lies
            outside the range of the secure GeLU.
    """
    ranges: Dict[str, Dict[str, float]] = defaultdict(dict)
    largest: List[tuple] = []
    hooks = []

    def track(name: str, value: torch.Tensor) -> None:
        largest.append((float(value.detach().abs().max()), name))

    def record(name: str, value: torch.Tensor) -> None:
        r = ranges[name]
        r['min'] = min(r.get('min', float('inf')), float(value.min()))
        r['max'] = max(r.get('max', float('-inf')), float(value.max()))

    def layer_norm_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            centred = x - x.mean(-1, keepdim=True)
            record(name, centred.square().mean(-1) + module.eps)
            track(f'{name} (centred input)', centred)  # squared only after a public rescaling
        return hook

    def scores_hook(name: str):
        def hook(module: HeadKinds, args: tuple) -> None:
            scores = args[0].detach().float()
            keep = args[1] if len(args) > 1 else None  # windowed attention's shift mask
            track(f'{name} (attention scores)', scores)
            for kind, heads in module.groups:
                denominator = get_attn_kind(kind).denominator if kind != SEARCH else None
                if denominator is not None:
                    kept = None if keep is None else keep.expand_as(scores)[:, list(heads)]
                    denom = denominator(scores[:, list(heads)], keep=kept, **module.opts)
                    track(f'{name} ({kind} denominators)', denom)
                    record(f'{name}.{kind}', denom)
        return hook

    def act_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            record(name, x.abs())
            track(f'{name} (squared inputs)', x.square())
        return hook

    def output_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            track(f'{name} (output)', output)
        return hook

    parts = read_model(model)
    acts = parts.activation_names()
    hooks += [m.register_forward_pre_hook(layer_norm_hook(name)) for name, m in parts.norms]
    hooks += [m.register_forward_pre_hook(scores_hook(name.rsplit('.', 1)[0])) for name, m in parts.heads]
    hooks += [m.register_forward_pre_hook(act_hook(name)) for name, m in parts.activations  # they square their input
              if acts[name] in ('gelu', 'quad_gelu')]
    hooks += [m.register_forward_hook(output_hook(name)) for name, m in parts.linears]
    try:
        with inference_pass(model):
            record('logits', model(images).detach().float().abs())
    finally:
        for h in hooks:
            h.remove()

    limit = product_limit(settings)
    over = [(v, n) for v, n in largest if not v <= limit]  # in forward order: the first is the origin
    if over:
        value, name = over[0]
        raise FixedPointRangeError(
            f'{name} reaches {value:.3g}, beyond the {limit:.3g} that products hold with '
            f'{settings.precision_bits} fractional bits in a 64-bit ring ({len(over)} value(s) too large); '
            f'lower precision_bits or rescale the model')
    for name, _ in parts.activations:
        abs_max = ranges.get(name, {}).get('max')
        if (acts[name] == 'gelu' and abs_max is not None and settings.gelu in ('exp_fit', 'spline')
                and gelu_exp_iterations(abs_max, 0) is None):
            raise FixedPointRangeError(
                f'{name}: GeLU inputs reach {abs_max:.3g}, beyond the ±{gelu_bound(GELU_MAX_EXP_ITERATIONS):.3g} '
                f'that the secure GeLU covers with its most squarings ({GELU_MAX_EXP_ITERATIONS}); rescale the model')
    return dict(ranges)
