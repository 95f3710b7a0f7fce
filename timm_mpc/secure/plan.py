"""The public side of a secure model: its architecture as plain data (a *plan*).

Both parties must run the same computation. The model owner builds the plan from a timm model and
sends it to the client as JSON; the client never sees a weight or a calibration statistic, only what
both must agree on. The fields, all public:

- ``version``: :data:`PLAN_VERSION`; another version, or a field not listed here, is refused.
- ``input_size`` ``[C, H, W]``, ``input_bounds`` (per channel ``[low, high]``: pixels in [0, 1] normalized
  with the model's mean and std), ``patch_size``, ``embed_dim``, ``cls_token``, ``reg_tokens``,
  ``num_prefix_tokens``, ``pos_embed``, ``no_embed_class``, ``global_pool``, ``num_classes``.
- ``norm_pre``, ``norm``, ``fc_norm``: LayerNorm ``eps`` and whether it has a bias, or None.
- ``blocks``: per block its style (pre- or post-norm), norms, LayerScale flags, attention (heads, head
  size, score scale, one kind per head, biases, q/k norms, ReLU-Softmax eps, 2Quad constant) and MLP (hidden
  size, activation, MPCViT+ GeLU tokens, biases).
- ``params``: the name and shape of every weight the owner will share (values stay the owner's).
- ``schedules``: per LayerNorm and per attention kind that divides, a public input scale (a power of 4)
  and a Newton iteration count; per exact GeLU, the squarings of its exp. They are derived from ranges the
  owner calibrated on its own images, widened by ``range_margin``, and reveal the order of magnitude of
  those ranges (a power of 4, an iteration count), never the ranges themselves.

Everything the secure engine does not support is refused here, naming the module, before any party starts.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GELU, LayerScale, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..layers.activations import QuadGELU
from ..layers.attention import MPCAttention
from ..layers.linearizable_mlp import LinearizableMlp
from ..models.mpcvit import MPCViT, MPCViTBlock
from . import ops
from .settings import SecureSettings

__all__ = ['UnsupportedModelError', 'InputRangeError', 'build_plan', 'build_secure_plan', 'plan_tokens',
           'check_image_tensor', 'check_images', 'validate_plan', 'normalization', 'PLAN_VERSION']

PLAN_VERSION = 2

# every attention kind that divides by a data-dependent denominator has a calibrated reciprocal schedule
_DIVIDING_KINDS = ('relu_softmax', '2quad')
_BOUND_TOLERANCE = 1e-3  # float round-off of a normalization, in normalized units


class InputRangeError(ValueError):
    """Images outside the plan's public input bounds: secure inference would not be accurate on them."""


class UnsupportedModelError(ValueError):
    """The model has a part the secure engine cannot compute."""


def _fail(path: str, module: Any, accepted: str) -> None:
    raise UnsupportedModelError(
        f'secure inference does not support {path or "the model"} ({type(module).__name__}); accepted: {accepted}')


def _layer_norm(path: str, module: nn.Module, optional: bool = True) -> Optional[Dict[str, Any]]:
    if isinstance(module, nn.Identity) and optional:
        return None
    if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine or len(module.normalized_shape) != 1:
        _fail(path, module, 'nn.LayerNorm over the last dimension with affine weights, or nn.Identity')
    return dict(eps=float(module.eps), bias=module.bias is not None)


def _activation(path: str, act: nn.Module) -> str:
    if isinstance(act, QuadGELU):
        return 'quad_gelu'
    if isinstance(act, (nn.GELU, GELU)) and getattr(act, 'approximate', 'none') == 'none':
        return 'gelu'
    if isinstance(act, nn.ReLU):
        return 'relu'
    if isinstance(act, nn.Identity):
        return 'identity'
    _fail(path, act, 'exact GELU, QuadGELU, ReLU or Identity')


def _attention(path: str, attn: nn.Module) -> Dict[str, Any]:
    if not isinstance(attn, MPCAttention):
        _fail(path, attn, 'timm_mpc MPCAttention (convert the model with timm_mpc.convert_to_mpc first)')
    if attn.heads.searching:
        raise UnsupportedModelError(
            f'{path} is in search mode (learnable alpha); binarize it to one kind per head before secure inference')
    if attn.gate is not None or not isinstance(attn.norm, nn.Identity):
        _fail(path, attn, 'attention without output gate or scale norm')
    return dict(
        num_heads=attn.num_heads, head_dim=attn.head_dim, scale=float(attn.scale), kinds=attn.heads.pattern,
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
        q_norm=_layer_norm(f'{path}.q_norm', attn.q_norm), k_norm=_layer_norm(f'{path}.k_norm', attn.k_norm),
        relu_eps=float(attn.heads.relu_eps), quad_c=float(attn.heads.quad_c))


def _mlp(path: str, mlp: nn.Module) -> Dict[str, Any]:
    if type(mlp) not in (Mlp, LinearizableMlp) or not isinstance(mlp.norm, nn.Identity):
        _fail(path, mlp, 'timm Mlp (fc1, act, fc2) or timm_mpc LinearizableMlp, without hidden norm')
    if not isinstance(mlp.fc1, nn.Linear):
        _fail(f'{path}.fc1', mlp.fc1, 'nn.Linear')
    gelu_tokens = None
    if isinstance(mlp, LinearizableMlp):
        if mlp.searching:
            raise UnsupportedModelError(f'{path} is in search mode (learnable beta); fix its GeLU pattern first')
        if mlp.token_shape and len(mlp.token_shape) != 1:
            _fail(path, mlp, 'a per-token or per-layer GeLU pattern over a token sequence')
        gelu_tokens = mlp.gelu_tokens.flatten().int().tolist()
    return dict(hidden=mlp.fc1.out_features, act=_activation(f'{path}.act', mlp.act), gelu_tokens=gelu_tokens,
                fc1_bias=mlp.fc1.bias is not None, fc2_bias=mlp.fc2.bias is not None)


def _block(path: str, blk: nn.Module) -> Dict[str, Any]:
    if type(blk) not in (Block, MPCViTBlock):
        _fail(path, blk, 'timm Block (pre-norm) or timm_mpc MPCViTBlock (LayerNorm after the attention residual)')
    for name in ('ls1', 'ls2'):
        ls = getattr(blk, name)
        if not isinstance(ls, (nn.Identity, LayerScale)):
            _fail(f'{path}.{name}', ls, 'LayerScale or Identity')
    return dict(
        style='post' if isinstance(blk, MPCViTBlock) else 'pre',
        norm1=_layer_norm(f'{path}.norm1', blk.norm1, optional=False),
        norm2=_layer_norm(f'{path}.norm2', blk.norm2, optional=False),
        attn=_attention(f'{path}.attn', blk.attn), mlp=_mlp(f'{path}.mlp', blk.mlp),
        ls1=isinstance(blk.ls1, LayerScale), ls2=isinstance(blk.ls2, LayerScale))


def build_plan(model: nn.Module) -> Dict[str, Any]:
    """The public plan of ``model`` (a ViT-family timm model whose attention was made MPC-friendly).

    Raises:
        UnsupportedModelError: naming the first module the secure engine cannot compute.
    """
    if not isinstance(model, VisionTransformer):
        _fail('', model, 'timm VisionTransformer models: mpcvit_*, or vit_* / deit_* after convert_to_mpc')
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or not pe.flatten \
            or pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0) or model.dynamic_img_size:
        _fail('patch_embed', pe, 'timm PatchEmbed with kernel = stride, no norm, fixed image size')
    if model.attn_pool is not None or model.global_pool not in ('token', 'avg'):
        _fail('attn_pool', model.attn_pool or model, "global_pool 'token' or 'avg'")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        _fail('head', model.head, 'nn.Linear or nn.Identity')
    if type(model) not in (VisionTransformer, MPCViT):
        _fail('', model, 'VisionTransformer or MPCViT (distilled and other subclasses have their own forward)')
    params = {name: list(p.shape) for name, p in model.named_parameters()}
    return dict(
        version=PLAN_VERSION,
        input_size=[pe.proj.in_channels, *pe.img_size],
        input_bounds=[[(0.0 - m) / s, (1.0 - m) / s] for m, s in zip(*normalization(model, pe.proj.in_channels))],
        patch_size=list(pe.patch_size),
        embed_dim=model.embed_dim,
        cls_token=model.cls_token is not None,
        reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        num_prefix_tokens=model.num_prefix_tokens,
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        norm_pre=_layer_norm('norm_pre', model.norm_pre),
        blocks=[_block(f'blocks.{i}', blk) for i, blk in enumerate(model.blocks)],
        norm=_layer_norm('norm', model.norm),
        fc_norm=_layer_norm('fc_norm', model.fc_norm),
        global_pool=model.global_pool,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        params=params,
        schedules={},
    )


def normalization(model: nn.Module, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The model's input mean and std, one per channel, from its ``pretrained_cfg`` (timm's ImageNet defaults
    where it has none). The plan's input bounds are pixels in [0, 1] normalized with them."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = cfg.get('mean', IMAGENET_DEFAULT_MEAN), cfg.get('std', IMAGENET_DEFAULT_STD)
    if len(mean) != channels or len(std) != channels:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    return tuple(map(float, mean)), tuple(map(float, std))


def _schedule(low: Optional[float], high: Optional[float], domain: Dict[int, Tuple[float, float]],
              default_iters: int, settings: SecureSettings, margin: float) -> Dict[str, Any]:
    """Public input scale and Newton iterations for values in ``[low, high]`` (with ``high`` widened by
    ``margin``: only values above the covered range make the iterations diverge; values below it come out
    too small, never unbounded). CrypTen's fixed choice when range scaling is off or nothing was measured."""
    if not settings.range_scaling or high is None:
        return dict(scale=1.0, iters=default_iters)
    scale, iters = ops.newton_schedule(low, high * margin, domain, min(domain))
    return dict(scale=scale, iters=iters)


def _layer_norm_names(plan: Dict[str, Any]) -> List[str]:
    names = [name for name in ('norm_pre', 'norm', 'fc_norm') if plan[name] is not None]
    for i, blk in enumerate(plan['blocks']):
        names += [f'blocks.{i}.norm1', f'blocks.{i}.norm2']
        if blk['attn']['q_norm'] is not None:
            names += [f'blocks.{i}.attn.q_norm', f'blocks.{i}.attn.k_norm']
    return names


def public_schedules(plan: Dict[str, Any], ranges: Dict[str, Dict[str, float]],
                     settings: SecureSettings) -> Dict[str, Dict[str, Any]]:
    """The plan's ``schedules`` from the owner's calibrated ``ranges`` (which stay with the owner)."""
    out = {}
    for name in _layer_norm_names(plan):
        r = ranges.get(name, {})
        out[name] = _schedule(r.get('var_min'), r.get('var_max'), ops.INV_SQRT_DOMAIN, settings.sqrt_nr_iters,
                              settings, settings.range_margin)
    tokens = plan_tokens(plan)
    for i, blk in enumerate(plan['blocks']):
        if blk['mlp']['act'] == 'gelu' and settings.gelu == 'exp_fit':
            abs_max = ranges.get(f'blocks.{i}.mlp.act', {}).get('abs_max')
            iters = settings.gelu_exp_iterations
            if settings.range_scaling and abs_max is not None:
                iters = ops.gelu_exp_iterations(abs_max * settings.range_margin, iters) or ops.GELU_MAX_EXP_ITERATIONS
            out[f'blocks.{i}.mlp.act'] = dict(scale=1.0, iters=iters)
        for kind in sorted(set(blk['attn']['kinds'])):
            name = f'blocks.{i}.attn.{kind}'
            if kind == 'softmax':  # the sum of exp(s - max) lies in [1, N] whatever the data
                out[name] = _schedule(1.0, float(tokens), ops.RECIPROCAL_DOMAIN, settings.reciprocal_nr_iters,
                                      settings, 1.0)
            elif kind in _DIVIDING_KINDS:
                r = ranges.get(name, {})
                out[name] = _schedule(r.get('denom_min'), r.get('denom_max'), ops.RECIPROCAL_DOMAIN,
                                      settings.reciprocal_nr_iters, settings, settings.range_margin)
    return out


def build_secure_plan(model: nn.Module, settings: SecureSettings,
                      calibration_images: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The plan the owner sends: :func:`build_plan`, calibrated on the owner's images (default: the shipped
    Fashion-MNIST examples at the model's input size), with only the public schedules kept.

    Raises:
        UnsupportedModelError: a module the secure engine cannot compute.
        InputRangeError: calibration images outside the model's input bounds.
        FixedPointRangeError: a value the fixed-point encoding cannot hold on the calibration images.
    """
    from ..data import calibration_examples
    from .calibration import calibrate
    plan = build_plan(model)
    if calibration_images is None:
        calibration_images = calibration_examples(plan['input_size'], *normalization(model, plan['input_size'][0]))
    check_images(plan, calibration_images, what='calibration images')
    plan['schedules'] = public_schedules(plan, calibrate(model, calibration_images, settings), settings)
    return plan


def plan_tokens(plan: Dict[str, Any]) -> int:
    """Tokens per image: patches plus prefix tokens."""
    _, h, w = plan['input_size']
    return (h // plan['patch_size'][0]) * (w // plan['patch_size'][1]) + plan['num_prefix_tokens']


def check_image_tensor(images: Any, what: str = 'images') -> None:
    """What can be checked of images without the plan: a finite, floating-point ``(B, C, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'{what} must be a torch.Tensor, got {type(images).__name__}')
    if not images.is_floating_point():
        raise ValueError(f'{what} must be a floating-point tensor (normalized pixels), got dtype {images.dtype}')
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f'{what} must have shape (batch, channels, height, width) with batch >= 1; '
                         f'got {tuple(images.shape)}')
    if not torch.isfinite(images).all():
        raise ValueError(f'{what} contain NaN or infinite values')


def check_images(plan: Dict[str, Any], images: torch.Tensor, clamp: bool = False,
                 what: str = 'images') -> torch.Tensor:
    """Refuse images the plan cannot take, before anything is shared; return the images to share.

    Values must lie within the plan's public ``input_bounds`` (with a tolerance of 1e-3 for the round-off of
    a normalization): secure inference is calibrated, and its fixed-point encoding sized, for those. With
    ``clamp``, values outside are clamped to the bounds instead (the result is then that of the clamped images).

    Raises:
        InputRangeError: values outside the bounds, without ``clamp``.
    """
    check_image_tensor(images, what)
    expected = tuple(plan['input_size'])
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f'{what} must have shape (batch, {", ".join(map(str, expected))}); got {tuple(images.shape)}')
    low = torch.tensor([b[0] for b in plan['input_bounds']]).view(1, -1, 1, 1)
    high = torch.tensor([b[1] for b in plan['input_bounds']]).view(1, -1, 1, 1)
    if clamp:
        return torch.maximum(torch.minimum(images, high), low)
    found = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    bad = [c for c in range(expected[0]) if found[0][c] < low.flatten()[c] - _BOUND_TOLERANCE
           or found[1][c] > high.flatten()[c] + _BOUND_TOLERANCE]
    if bad:
        c = bad[0]
        raise InputRangeError(
            f'{what} leave the model\'s input range: channel {c} has values in [{found[0][c]:.4g}, {found[1][c]:.4g}], '
            f'accepted [{low.flatten()[c]:.4g}, {high.flatten()[c]:.4g}] (pixels in [0, 1] normalized with the '
            f'model\'s mean and std); normalize them that way, or clamp them (clamp_images=True, --clamp-images)')
    return images


_PLAN_FIELDS = {
    'version', 'input_size', 'input_bounds', 'patch_size', 'embed_dim', 'cls_token', 'reg_tokens',
    'num_prefix_tokens', 'pos_embed', 'no_embed_class', 'norm_pre', 'blocks', 'norm', 'fc_norm', 'global_pool',
    'num_classes', 'params', 'schedules'}


def validate_plan(plan: Any) -> Dict[str, Any]:
    """Refuse a plan of another version, or with fields missing or unknown (the client runs only what it knows)."""
    if not isinstance(plan, dict):
        raise ValueError(f'a plan is a JSON object, got {type(plan).__name__}')
    if plan.get('version') != PLAN_VERSION:
        raise ValueError(f'plan version {plan.get("version")!r}; this timm-mpc reads version {PLAN_VERSION}')
    missing, unknown = _PLAN_FIELDS - set(plan), set(plan) - _PLAN_FIELDS
    if missing or unknown:
        raise ValueError(f'plan fields: missing {sorted(missing)}, unknown {sorted(unknown)}; '
                         f'version {PLAN_VERSION} has {sorted(_PLAN_FIELDS)}')
    c = plan['input_size'][0]
    if len(plan['input_bounds']) != c or any(len(b) != 2 or not b[0] < b[1] for b in plan['input_bounds']):
        raise ValueError(f'plan input_bounds must be one [low, high] pair per channel ({c}), got {plan["input_bounds"]}')
    return plan
