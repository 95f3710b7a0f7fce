"""Building a :class:`~.schema.SecurePlan` from a timm model (ViT, DeiT, EVA-02, Swin, converted or MPCViT) and
calibrating its public schedules from the owner's images: :func:`build_plan`, :func:`build_secure_plan`.

Everything the secure engines do not support is refused by :func:`build_plan`, naming the module, before any party
starts.
"""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GluMlp, LayerScale, Mlp, PatchEmbed, SwiGLU
from timm.models.eva import EvaBlock
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from ...data import calibration_examples
from ...layers.activations import ACTIVATIONS, activation_name
from ...layers.attention import MPCAttention
from ...layers.attn_kinds import SEARCH, get_attn_kind
from ...layers.eva_attention import MPCEvaAttention
from ...layers.linearizable_mlp import LinearizableMlp
from ...layers.swin_attention import MPCWindowAttention
from ...reader import FAMILIES, read_model
from ..approximations import (
    GELU_MAX_EXP_ITERATIONS, RECIPROCAL_DOMAIN, gelu_exp_iterations, inv_sqrt_domain, newton_schedule,
)
from ..calibration import calibrate
from ..settings import SecureSettings
from .schema import (
    AttentionSpec, BlockSpec, MergeSpec, MlpSpec, NormSpec, Schedule, SecurePlan, UnsupportedModelError, WindowSpec,
    check_images, swin_windows,
)

__all__ = ['build_plan', 'build_secure_plan', 'normalization', 'public_schedules', 'logit_bound']


def _fail(path: str, module: Any, accepted: str) -> None:
    raise UnsupportedModelError(
        f'secure inference does not support {path or "the model"} ({type(module).__name__}); accepted: {accepted}')


def _layer_norm(path: str, module: nn.Module, optional: bool = True) -> Optional[NormSpec]:
    if isinstance(module, nn.Identity) and optional:
        return None
    if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine or len(module.normalized_shape) != 1:
        _fail(path, module, 'nn.LayerNorm over the last dimension with affine weights, or nn.Identity')
    return NormSpec(eps=float(module.eps), bias=module.bias is not None)


def _attention(path: str, attn: nn.Module) -> AttentionSpec:
    if not isinstance(attn, (MPCAttention, MPCEvaAttention, MPCWindowAttention)):
        _fail(path, attn, 'timm_mpc MPCAttention, MPCEvaAttention or MPCWindowAttention (convert the model with '
                          'timm_mpc.convert_to_mpc first)')
    if any(kind == SEARCH for kind, _ in attn.heads.groups):
        raise UnsupportedModelError(
            f'{path} has heads in search mode (learnable alpha); binarize it to one kind per head before secure '
            f'inference')
    if getattr(attn, 'gate', None) is not None:
        _fail(path, attn, 'attention without an output gate')
    eva = isinstance(attn, MPCEvaAttention)
    fused = getattr(attn, 'qkv', None) is not None
    # separate projections: EVA's k_proj has no bias; the forward reads each bias from the shared weights
    qkv_bias = (attn.qkv if fused else attn.q_proj).bias is not None
    qv_bias = eva and fused and attn.q_bias is not None
    return AttentionSpec(
        num_heads=attn.num_heads, head_dim=getattr(attn, 'head_dim', None) or attn.proj.in_features // attn.num_heads,
        scale=float(attn.scale), kinds=attn.heads.pattern,
        qkv='fused' if fused else 'separate', qkv_bias=qkv_bias, qv_bias=qv_bias, proj_bias=attn.proj.bias is not None,
        # Swin's window attention has no q/k norms and no inner norm
        **{norm: _layer_norm(f'{path}.{norm}', getattr(attn, norm, nn.Identity()))
           for norm in ('q_norm', 'k_norm', 'norm')},
        rope_half=bool(getattr(attn, 'rotate_half', False)) if eva else None,
        opts={k: float(v) for k, v in attn.heads.opts.items()})


def _mlp(path: str, mlp: nn.Module) -> MlpSpec:
    kinds = {Mlp: 'mlp', LinearizableMlp: 'mlp', GluMlp: 'glu', SwiGLU: 'swiglu'}
    kind = kinds.get(type(mlp))
    if kind is None:
        _fail(path, mlp, 'timm Mlp, GluMlp or SwiGLU, or timm_mpc LinearizableMlp')
    if kind == 'glu' and mlp.chunk_dim != -1:
        _fail(path, mlp, 'a GluMlp that splits the last dimension')
    for fc in ('fc1', 'fc1_g', 'fc1_x', 'fc2'):
        if hasattr(mlp, fc) and not isinstance(getattr(mlp, fc), nn.Linear):
            _fail(f'{path}.{fc}', getattr(mlp, fc), 'nn.Linear')
    gelu_tokens = None
    if isinstance(mlp, LinearizableMlp) and mlp.mode != 'gelu':
        if mlp.searching:
            raise UnsupportedModelError(f'{path} is in search mode (learnable beta); fix its GeLU pattern first')
        if mlp.token_shape and len(mlp.token_shape) != 1:
            _fail(path, mlp, 'a per-token or per-layer GeLU pattern over a token sequence')
        gelu_tokens = mlp.gelu_tokens.flatten().int().tolist()
    act = activation_name(mlp.act)
    if act is None:
        _fail(f'{path}.act', mlp.act, f'one of {[name for name, _ in ACTIVATIONS]} (GeLU exact, not tanh)')
    first = mlp.fc1_g if kind == 'swiglu' else mlp.fc1
    return MlpSpec(kind=kind, hidden=mlp.fc2.in_features, act=act, gelu_tokens=gelu_tokens,
                   gate_last=bool(getattr(mlp, 'gate_last', False)), norm=_layer_norm(f'{path}.norm', mlp.norm),
                   fc1_bias=first.bias is not None, fc2_bias=mlp.fc2.bias is not None)


def _layer_scale(path: str, blk: nn.Module, module: str, parameter: str) -> Optional[str]:
    """The block's LayerScale parameter after a branch: a timm ``LayerScale`` module's gamma (ViT), or EVA's
    ``gamma_1``/``gamma_2``; None without one."""
    ls = getattr(blk, module, None)
    if ls is None:
        return parameter if getattr(blk, parameter, None) is not None else None
    if isinstance(ls, nn.Identity):
        return None
    if not isinstance(ls, LayerScale):
        _fail(f'{path}.{module}', ls, 'LayerScale or Identity')
    return f'{module}.gamma'


def _block(path: str, blk: nn.Module) -> BlockSpec:
    style = getattr(blk, 'norm_style', 'pre' if type(blk) in (Block, EvaBlock) else None)
    if style is None:
        _fail(path, blk, 'timm Block or EvaBlock (pre-norm), or timm_mpc MPCViTBlock (LayerNorm after the attention '
                         'residual)')
    return BlockSpec(
        path=path, style=style, norm1=_layer_norm(f'{path}.norm1', blk.norm1, optional=False),
        norm2=_layer_norm(f'{path}.norm2', blk.norm2, optional=False),
        attn=_attention(f'{path}.attn', blk.attn), mlp=_mlp(f'{path}.mlp', blk.mlp),
        ls1=_layer_scale(path, blk, 'ls1', 'gamma_1'), ls2=_layer_scale(path, blk, 'ls2', 'gamma_2'))


def _swin_blocks(model: SwinTransformer) -> List[BlockSpec]:
    """Every Swin block with its windows, and the patch merging before the first block of a stage."""
    blocks = []
    for s, stage in enumerate(model.layers):
        merge = None
        if not len(stage.blocks):
            _fail(f'layers.{s}', stage, 'stages with at least one block')
        if isinstance(stage.downsample, PatchMerging):
            path = f'layers.{s}.downsample'
            if not isinstance(stage.downsample.reduction, nn.Linear):
                _fail(f'{path}.reduction', stage.downsample.reduction, 'nn.Linear')
            if any(r % 2 for r in stage.input_resolution):
                _fail(path, stage.downsample, f'patch merging of an even token grid (timm pads the '
                                              f'{list(stage.input_resolution)} grid)')
            merge = MergeSpec(path=path, resolution=list(stage.input_resolution),
                              norm=_layer_norm(f'{path}.norm', stage.downsample.norm, optional=False),
                              reduction_bias=stage.downsample.reduction.bias is not None)
        elif not isinstance(stage.downsample, nn.Identity):
            _fail(f'layers.{s}.downsample', stage.downsample, 'timm PatchMerging or Identity')
        for j, blk in enumerate(stage.blocks):
            path = f'layers.{s}.blocks.{j}'
            if type(blk) is not SwinTransformerBlock or getattr(blk, 'dynamic_mask', False):
                _fail(path, blk, 'timm SwinTransformerBlock with a fixed input resolution')
            window = WindowSpec(resolution=list(blk.input_resolution), window_size=list(blk.window_size),
                                shift=list(blk.shift_size), rel_pos_bias=hasattr(blk.attn, 'relative_position_bias_table'))
            if any(r % w for r, w in zip(window.resolution, window.window_size)):
                _fail(path, blk, f'windows that tile the token grid (a {window.resolution} grid in windows of '
                                 f'{window.window_size} would be padded)')
            keep = swin_windows(window)[2]
            if (keep is None) != (blk.attn_mask is None) or (keep is not None and not torch.equal(keep, blk.attn_mask == 0)):
                _fail(f'{path}.attn_mask', blk, 'the shift mask timm derives from the window size and shift')
            spec = BlockSpec(path=path, style='pre', norm1=_layer_norm(f'{path}.norm1', blk.norm1, optional=False),
                             norm2=_layer_norm(f'{path}.norm2', blk.norm2, optional=False),
                             attn=_attention(f'{path}.attn', blk.attn), mlp=_mlp(f'{path}.mlp', blk.mlp),
                             ls1=None, ls2=None, window=window, merge=merge if j == 0 else None)
            blocks.append(spec)
    return blocks


def _rope_table(model: nn.Module) -> Optional[List[List[float]]]:
    """EVA's rotary embedding of the patch tokens (sin then cos per row), or None for a model without one."""
    rope = getattr(model, 'rope', None)
    if rope is None:
        return None
    if getattr(model, 'rope_mixed', False) or not hasattr(rope, 'feat_shape'):
        _fail('rope', rope, 'a rotary embedding with one fixed table for every block (RotaryEmbeddingCat)')
    return rope.get_embed().detach().float().tolist()


def build_plan(model: nn.Module) -> SecurePlan:
    """The public plan of ``model`` (a ViT-family timm model whose attention was made MPC-friendly), without
    schedules.

    Raises:
        UnsupportedModelError: naming the family that does not run securely yet, or the first module the
            secure engine cannot compute.
    """
    parts = read_model(model)
    if parts.unsupported:  # a family timm-mpc does not know: name its first attention module
        path, cls = parts.unsupported[0]
        raise UnsupportedModelError(
            f'secure inference does not support {path} ({cls}): timm-mpc does not know this family; accepted: '
            f'{", ".join(f.models for f in FAMILIES if f.secure)}')
    if not parts.runs_securely:
        secure = ', '.join(f'{f.models}' for f in FAMILIES if f.secure)
        family = f'the {parts.family.name} family ({parts.family.secure_note})' if parts.family else 'this model'
        _fail('', model, f'{secure}; {family} does not run securely yet'
              + ('' if parts.converts else '; convert it with timm_mpc.convert_to_mpc first'))
    if isinstance(model, SwinTransformer):
        return _swin_plan(model)
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or not pe.flatten \
            or pe.proj.kernel_size != pe.proj.stride or pe.proj.padding != (0, 0) or model.dynamic_img_size:
        _fail('patch_embed', pe, 'timm PatchEmbed with kernel = stride, no norm, fixed image size')
    if getattr(model, 'attn_pool', None) is not None or model.global_pool not in ('token', 'avg'):
        _fail('attn_pool', getattr(model, 'attn_pool', None) or model, "global_pool 'token' or 'avg'")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        _fail('head', model.head, 'nn.Linear or nn.Identity')
    dist_token = getattr(model, 'dist_token', None) is not None
    if dist_token:  # VisionTransformerDistilled's head reads tokens 0 and 1, with neither fc_norm nor register tokens
        if model.reg_token is not None or not isinstance(model.fc_norm, nn.Identity):
            _fail('dist_token', model, 'a distillation token without register tokens or fc_norm')
        if not isinstance(model.head_dist, type(model.head)):
            _fail('head_dist', model.head_dist, f'{type(model.head).__name__}, as head')
    return SecurePlan(
        **_input_fields(model),
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
        params=_params(model),
        dist_token=dist_token,
        rope=_rope_table(model),
    )


def _input_fields(model: nn.Module) -> Dict[str, Any]:
    pe = model.patch_embed
    return dict(input_size=[pe.proj.in_channels, *pe.img_size], patch_size=list(pe.patch_size),
                input_bounds=[[(0.0 - m) / s, (1.0 - m) / s] for m, s in zip(*normalization(model, pe.proj.in_channels))])


def _params(model: nn.Module) -> Dict[str, List[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _swin_plan(model: SwinTransformer) -> SecurePlan:
    """The plan of a Swin Transformer: windows, shifts and patch merging on a token grid with no prefix tokens."""
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or pe.flatten or pe.output_fmt.value != 'NHWC' or pe.proj.kernel_size != pe.proj.stride \
            or pe.proj.padding != (0, 0) or getattr(pe, 'dynamic_img_pad', False) or not pe.strict_img_size:
        _fail('patch_embed', pe, 'timm PatchEmbed with kernel = stride, NHWC output, fixed image size')
    if getattr(model, 'absolute_pos_embed', None) is not None:
        _fail('absolute_pos_embed', model, 'a Swin without an absolute position embedding')
    head = model.head
    if type(head).__name__ != 'ClassifierHead' or getattr(head.global_pool, 'pool_type', None) != 'avg' \
            or not isinstance(head.fc, (nn.Linear, nn.Identity)):
        _fail('head', head, "timm ClassifierHead with global_pool 'avg' and a linear fc")
    return SecurePlan(
        **_input_fields(model), embed_dim=pe.proj.out_channels,
        cls_token=False, reg_tokens=0, num_prefix_tokens=0, pos_embed=False, no_embed_class=False, norm_pre=None,
        blocks=_swin_blocks(model), norm=_layer_norm('norm', model.norm), fc_norm=None, global_pool='avg',
        num_classes=head.fc.out_features if isinstance(head.fc, nn.Linear) else 0, params=_params(model),
        patch_norm=_layer_norm('patch_embed.norm', pe.norm), head='head.fc')


def normalization(model: nn.Module, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The model's input mean and std, one per channel, from its ``pretrained_cfg`` (timm's ImageNet defaults
    where it has none). The plan's input bounds are pixels in [0, 1] normalized with them."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean, std = cfg.get('mean', IMAGENET_DEFAULT_MEAN), cfg.get('std', IMAGENET_DEFAULT_STD)
    if len(mean) != channels or len(std) != channels:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    return tuple(map(float, mean)), tuple(map(float, std))


def _schedule(low: Optional[float], high: Optional[float], domain: Dict[int, Tuple[float, float]],
              default_iters: int, settings: SecureSettings, margin: float) -> Schedule:
    """Public input scale and Newton iterations for values in ``[low, high]`` (with ``high`` widened by
    ``margin``: only values above the covered range make the iterations diverge; values below it come out
    too small, never unbounded). CrypTen's fixed choice when range scaling is off or nothing was measured."""
    if not settings.range_scaling or high is None:
        return Schedule(scale=1.0, iters=default_iters)
    scale, iters = newton_schedule(low, high * margin, domain, min(domain))
    return Schedule(scale=float(scale), iters=iters)  # a float as read back: the client's plan is the owner's, byte for byte


def public_schedules(plan: SecurePlan, ranges: Dict[str, Dict[str, float]],
                     settings: SecureSettings) -> Dict[str, Schedule]:
    """The plan's ``schedules`` from the owner's calibrated ``ranges`` (which stay with the owner)."""
    out = {}
    for name in plan.layer_norm_names():
        r = ranges.get(name, {})
        out[name] = _schedule(r.get('min'), r.get('max'), inv_sqrt_domain(settings.inv_sqrt), settings.sqrt_nr_iters,
                              settings, settings.range_margin)
    for name, kind, blk in plan.reciprocal_names():
        calibrated = ranges.get(name)
        spec = get_attn_kind(kind)
        if spec.denominator is not None and calibrated is None:  # nothing measured: CrypTen's fixed choice
            out[name] = _schedule(None, None, RECIPROCAL_DOMAIN, settings.reciprocal_nr_iters, settings, 1.0)
            continue
        low, high, widen = spec.reciprocal_range(calibrated or {}, plan.num_keys(blk))
        out[name] = _schedule(low, high, RECIPROCAL_DOMAIN, settings.reciprocal_nr_iters, settings,
                              settings.range_margin if widen else 1.0)
    for blk in plan.blocks:
        if blk.mlp.act == 'gelu' and settings.gelu in ('exp_fit', 'spline'):  # spline: its comparisons' width
            abs_max = ranges.get(f'{blk.path}.mlp.act', {}).get('max')
            iters = settings.gelu_exp_iterations
            if settings.range_scaling and abs_max is not None:
                iters = gelu_exp_iterations(abs_max * settings.range_margin, iters) or GELU_MAX_EXP_ITERATIONS
            out[f'{blk.path}.mlp.act'] = Schedule(scale=1.0, iters=iters)
    return out


def logit_bound(calibrated_max: float, settings: SecureSettings) -> float:
    """The plan's public bound on the logits: a power of 2 at least ``range_margin`` times the largest logit
    magnitude the owner calibrated (and at least 2^10), so it reveals only an order of magnitude."""
    return 2.0 ** max(10, math.ceil(math.log2(max(calibrated_max, 1e-12) * settings.range_margin)))


def build_secure_plan(model: nn.Module, settings: SecureSettings,
                      calibration_images: Optional[torch.Tensor] = None) -> SecurePlan:
    """The plan the owner sends: :func:`build_plan`, calibrated on the owner's images (default: the shipped
    Fashion-MNIST examples as the model's input), with only the public schedules kept.

    Raises:
        UnsupportedModelError: a module the secure engine cannot compute.
        InputRangeError: calibration images outside the model's input bounds.
        FixedPointRangeError: a value the fixed-point encoding cannot hold on the calibration images.
    """
    plan = build_plan(model)
    if calibration_images is None:
        calibration_images = calibration_examples(model)
    check_images(plan, calibration_images, what='calibration images')
    ranges = calibrate(model, calibration_images, settings)
    plan.schedules = public_schedules(plan, ranges, settings)
    plan.logit_bound = logit_bound(ranges['logits']['max'], settings)
    plan.check()
    return plan
