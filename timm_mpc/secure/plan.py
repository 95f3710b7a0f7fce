"""The public side of a secure model: its architecture as plain data (a *plan*).

Both parties must run the same computation. The model owner builds the plan from a timm model and
sends it to the client; the client never sees a weight, only the plan (shapes, head kinds,
activation kinds, LayerNorm eps and the fixed-point ranges chosen for the approximations).
Everything the secure engine does not support is refused here, naming the module, before any party starts.
"""
from typing import Any, Dict, Optional

import torch
from timm.layers import GELU, LayerScale, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..layers.activations import QuadGELU
from ..layers.attention import MPCAttention
from ..layers.linearizable_mlp import LinearizableMlp
from ..models.mpcvit import MPCViT, MPCViTBlock

__all__ = ['UnsupportedModelError', 'build_plan', 'plan_tokens', 'check_images', 'PLAN_VERSION']

PLAN_VERSION = 1


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
        ranges={},
    )


def plan_tokens(plan: Dict[str, Any]) -> int:
    """Tokens per image: patches plus prefix tokens."""
    _, h, w = plan['input_size']
    return (h // plan['patch_size'][0]) * (w // plan['patch_size'][1]) + plan['num_prefix_tokens']


def check_images(plan: Dict[str, Any], images: torch.Tensor) -> None:
    """Refuse images the plan cannot take, before any protocol starts."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'images must be a torch.Tensor, got {type(images).__name__}')
    if not images.is_floating_point():
        raise ValueError(f'images must be a floating-point tensor (normalized pixels), got dtype {images.dtype}')
    expected = tuple(plan['input_size'])
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise ValueError(f'images must have shape (batch, {", ".join(map(str, expected))}); got {tuple(images.shape)}')
    if not torch.isfinite(images).all():
        raise ValueError('images contain NaN or infinite values')
