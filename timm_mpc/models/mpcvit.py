"""MPCViT: the ViT-Lite models of "MPCViT: Searching for Accurate and Efficient MPC-Friendly Vision
Transformer with Heterogeneous Attention" (Zeng et al., ICCV 2023, https://arxiv.org/abs/2211.13955).

Built on timm's ``VisionTransformer`` with the paper's block: the LayerNorm sits after the attention
residual and there is none in front of the MLP. Each head runs Softmax, ReLU-Softmax, Scaling or
2Quad attention, or in search mode a learnable mix of ReLU-Softmax and Scaling. MPCViT+ linearizes
the GeLU of chosen token positions.
"""
import os
import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Set, Type, Union

import torch
from timm.layers import DropPath, LayerScale, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..layers.attention import MPCAttention
from ..layers.linearizable_mlp import GeluPattern, LinearizableMlp
from ..pattern import ModelPattern, expand_gelu_pattern, set_attn_pattern

__all__ = ['MPCViT', 'MPCViTBlock', 'checkpoint_filter_fn', 'PretrainedWeightsError']

HUB_ORG = 'timm-mpc'
"""The Hugging Face Hub organisation that holds the published ``mpcvit_*`` checkpoints."""

FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                        'Ankle boot')
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights for an ``mpcvit_*`` model could not be found or loaded."""


class MPCViTBlock(nn.Module):
    """ViT-Lite block of MPCViT: ``x = norm2(x + attn(norm1(x))); x = x + mlp(x)``.

    Takes the same arguments as timm's ``Block``, so it serves as ``VisionTransformer``'s ``block_fn``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 2.,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            attn_layer: Type[nn.Module] = MPCAttention,
            depth: int = 0,
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            dim: Embedding dimension.
            num_heads: Number of attention heads.
            mlp_ratio: MLP hidden dimension over ``dim``.
            qkv_bias: Bias in the qkv projection (none in the paper).
            qk_norm: Normalize queries and keys.
            scale_attn_norm: Normalize the attention output before its projection.
            scale_mlp_norm: Normalize the MLP hidden activations.
            proj_bias: Bias in the output projections.
            proj_drop: Dropout after projections.
            attn_drop: Dropout on attention weights.
            init_values: LayerScale initial value; None disables LayerScale.
            drop_path: Stochastic depth rate.
            act_layer: MLP activation.
            norm_layer: Normalization layer.
            mlp_layer: MLP layer.
            attn_layer: Attention layer; an MPC attention class.
            depth: Index of the block.
            relu_eps: ReLU-Softmax denominator epsilon.
            quad_c: 2Quad shift.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
            proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
            relu_eps=relu_eps, quad_c=quad_c, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.norm2(x)
        x = x + self.drop_path2(self.ls2(self.mlp(x)))
        return x


class MPCViT(VisionTransformer):
    """timm ``VisionTransformer`` with :class:`MPCViTBlock` blocks and a head pattern.

    Without weights the model starts where the MPCViT search starts: every head in search mode
    with α = 1. The distillation teacher is the same model with ``attn_pattern='softmax'``.
    """

    def __init__(
            self,
            attn_pattern: ModelPattern = 'search',
            gelu_pattern: Optional[Union[GeluPattern, Sequence[GeluPattern]]] = None,
            gelu_per_token: bool = True,
            relu_eps: float = 1e-5,
            quad_c: float = 5.0,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            attn_pattern: One kind (or ``'search'``, the default) for all heads, or one entry per layer: a kind,
                ``'search'``, or a list with one kind per head. Kinds: ``softmax``, ``relu_softmax``,
                ``scaling``, ``2quad``.
            gelu_pattern: None for plain GeLU MLPs; else MPCViT+ linearization: ``'gelu'``, ``'linear'``,
                ``'search'``, or one entry per layer (those names or a 0/1 value per token).
            gelu_per_token: One β per token position (the paper); False gives one β per layer.
            relu_eps: ReLU-Softmax denominator epsilon.
            quad_c: 2Quad shift.
            **kwargs: ``VisionTransformer`` arguments.
        """
        kwargs.setdefault('norm_layer', partial(nn.LayerNorm, eps=1e-5))
        kwargs.setdefault('block_fn', partial(MPCViTBlock, relu_eps=relu_eps, quad_c=quad_c))
        kwargs.setdefault('attn_layer', MPCAttention)
        super().__init__(**kwargs)
        self.gelu_per_token = gelu_per_token
        set_attn_pattern(self, attn_pattern)
        if gelu_pattern is not None:
            self.set_gelu_pattern(gelu_pattern)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: patches plus class/register tokens."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def set_gelu_pattern(self, gelu_pattern: Union[GeluPattern, Sequence[GeluPattern]]) -> None:
        """Turn the MLPs into :class:`LinearizableMlp` (if not already) with the given pattern.

        The pattern is checked for every layer before any layer changes.
        """
        layers = expand_gelu_pattern(gelu_pattern, len(self.blocks))
        token_shape = (self.num_tokens,) if self.gelu_per_token else ()
        mlps = [blk.mlp if isinstance(blk.mlp, LinearizableMlp) else LinearizableMlp.from_module(blk.mlp, token_shape, 'gelu')
                for blk in self.blocks]
        for mlp, layer in zip(mlps, layers):
            mlp.set_pattern(layer)  # raises before anything is attached if a layer's pattern is bad
        for blk, mlp in zip(self.blocks, mlps):
            blk.mlp = mlp

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # the architecture parameters α and β are searched, not regularised by weight decay
        names = set(super().no_weight_decay())
        names.update(n for n, _ in self.named_parameters() if n.endswith('.alpha') or n.endswith('.beta'))
        return names


_AUTHORS_KEYS = [
    (r'^tokenizer\.conv_layers\.0\.0\.', 'patch_embed.proj.'),
    (r'^classifier\.class_emb$', 'cls_token'),
    (r'^classifier\.positional_emb$', 'pos_embed'),
    (r'^classifier\.blocks\.(\d+)\.pre_norm\.', r'blocks.\1.norm1.'),
    (r'^classifier\.blocks\.(\d+)\.self_attn\.(qkv|proj)\.', r'blocks.\1.attn.\2.'),
    (r'^classifier\.blocks\.(\d+)\.self_attn\.alpha$', r'blocks.\1.attn.heads.alpha'),
    (r'^classifier\.blocks\.(\d+)\.linear1\.', r'blocks.\1.mlp.fc1.'),
    (r'^classifier\.blocks\.(\d+)\.norm1\.', r'blocks.\1.norm2.'),
    (r'^classifier\.blocks\.(\d+)\.linear2\.', r'blocks.\1.mlp.fc2.'),
    (r'^classifier\.blocks\.(\d+)\.beta$', r'blocks.\1.mlp.beta'),
    (r'^classifier\.norm\.', 'norm.'),
    (r'^classifier\.fc\.', 'head.'),
]
# keys whose presence or absence sets a layer's mode rather than a weight
_MODE_KEY = re.compile(r'\.(heads\.(alpha|kinds)|mlp\.(beta|gelu_tokens))$')


def _convert_authors_checkpoint(state_dict: Dict[str, torch.Tensor], model: MPCViT) -> Dict[str, torch.Tensor]:
    """Map the original MPCViT repository's layout onto ``MPCViT`` names.

    Binary α (1 = ReLU-Softmax, 0 = Scaling) becomes a fixed head pattern and binary β a fixed GeLU
    pattern; fractional values are a search checkpoint and load in search mode, where they mean the
    mix the search trained (the authors' evaluation code would leave such heads unnormalised).
    """
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, repl in _AUTHORS_KEYS:
            new_key, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            unknown.append(key)
            continue
        if new_key.endswith('.heads.alpha') and ((value == 0) | (value == 1)).all():
            codes = torch.where(value.flatten() == 1, 1, 2)  # relu_softmax : scaling
            out[new_key.replace('.alpha', '.kinds')] = codes.long()
        elif new_key.endswith('.mlp.beta') and ((value == 0) | (value == 1)).all():
            out[new_key.replace('.beta', '.gelu_tokens')] = value.float()
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(
            f'checkpoint in the MPCViT repository layout has keys this converter does not know: {unknown[:6]}'
            f'{" ..." if len(unknown) > 6 else ""}; known prefixes are tokenizer.conv_layers.0.0, classifier.*')
    # blocks without α are the authors' Softmax baseline
    for i, blk in enumerate(model.blocks):
        if f'blocks.{i}.attn.qkv.weight' in out and not any(f'blocks.{i}.attn.heads.{k}' in out for k in ('kinds', 'alpha')):
            out[f'blocks.{i}.attn.heads.kinds'] = torch.zeros(blk.attn.num_heads, dtype=torch.long)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MPCViT) -> Dict[str, torch.Tensor]:
    """Prepare a checkpoint for ``model``: ours, a timm ViT-Lite one, or the MPCViT authors' layout.

    The checkpoint's head pattern and GeLU pattern travel with it: the model is switched to them
    (MPCViT+ MLPs are created where the checkpoint has β). Shapes are checked first, so a
    mismatched checkpoint is refused with a clear message before anything is changed.

    Raises:
        ValueError: a checkpoint that does not fit the model.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    if any(k.startswith(('tokenizer.', 'classifier.')) for k in state_dict):
        state_dict = _convert_authors_checkpoint(state_dict, model)

    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    adaptable = tuple(p for p in (cfg.get('classifier'), cfg.get('first_conv')) if p)  # timm adapts these
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and not _MODE_KEY.search(k) and not k.startswith(adaptable) and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state_dict and not _MODE_KEY.search(k)]
    unexpected = [k for k in state_dict if k not in expected and not _MODE_KEY.search(k)]
    if mismatched or missing or unexpected:
        arch = (f'depth {len(model.blocks)}, dim {model.embed_dim}, '
                f'{model.blocks[0].attn.num_heads} heads, {model.num_tokens} tokens')
        problems = [('shape mismatches', mismatched), ('missing keys', missing), ('unexpected keys', unexpected)]
        detail = '; '.join(f'{name}: {items[:4]}{" ..." if len(items) > 4 else ""}' for name, items in problems if items)
        raise ValueError(f'checkpoint does not fit this model ({arch}): {detail}')

    for i, blk in enumerate(model.blocks):
        has_beta = any(f'blocks.{i}.mlp.{k}' in state_dict for k in ('beta', 'gelu_tokens'))
        if has_beta and not isinstance(blk.mlp, LinearizableMlp):
            beta = state_dict.get(f'blocks.{i}.mlp.beta', state_dict.get(f'blocks.{i}.mlp.gelu_tokens'))
            token_shape = (model.num_tokens,) if beta.numel() > 1 else ()
            blk.mlp = LinearizableMlp.from_module(blk.mlp, token_shape, 'gelu')
    return state_dict


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'fixed_input_size': True,
        'mean': FASHION_MNIST_MEAN,
        'std': FASHION_MNIST_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2211.13955',
        'paper_name': 'MPCViT: Searching for Accurate and Efficient MPC-Friendly Vision Transformer '
                      'with Heterogeneous Attention',
        **kwargs,
    }


def _fmnist_cfg(tag: str, **kwargs: Any) -> Dict[str, Any]:
    return _cfg(hf_hub_id=f'{HUB_ORG}/mpcvit_tiny.{tag}', label_names=FASHION_MNIST_LABELS, **kwargs)


default_cfgs = generate_default_cfgs({
    # Fashion-MNIST (grey 28x28 padded to 32x32 and repeated to 3 channels), searched and distilled.
    # The first tag is the default, the best trade-off: μ = 0.3/0.5/0.7 save about the same secure LAN
    # latency against all-Softmax (about 1.7x, measured on their cards) and μ = 0.7 keeps the most accuracy
    'mpcvit_tiny.fmnist_mu70_kd': _fmnist_cfg('fmnist_mu70_kd'),
    'mpcvit_tiny.fmnist_mu50_kd': _fmnist_cfg('fmnist_mu50_kd'),
    'mpcvit_tiny.fmnist_mu30_kd': _fmnist_cfg('fmnist_mu30_kd'),
    'mpcvit_tiny.fmnist_plus_mu50_kd': _fmnist_cfg('fmnist_plus_mu50_kd'),
    'mpcvit_tiny.fmnist_softmax': _fmnist_cfg('fmnist_softmax'),
    # the paper's CIFAR-10 layout; weights come from a local file (pretrained_cfg_overlay=dict(file=...))
    'mpcvit_tiny.cifar10': _cfg(mean=CIFAR10_MEAN, std=CIFAR10_STD),
    # the paper's Tiny-ImageNet layout; weights come from a local file
    'mpcvit_small.tinyimagenet': _cfg(num_classes=200, input_size=(3, 64, 64), mean=(0.4802, 0.4481, 0.3975),
                                      std=(0.2770, 0.2691, 0.2821)),
})


def _weight_source(cfg: Dict[str, Any]) -> Optional[str]:
    for key in ('state_dict', 'file', 'hf_hub_id', 'url'):
        if cfg.get(key):
            return f'{key}={cfg[key] if key != "state_dict" else "<in memory>"}'
    return None


def _create_mpcvit(variant: str, pretrained: bool = False, **kwargs: Any) -> MPCViT:
    model = build_model_with_cfg(MPCViT, variant, pretrained=False, **kwargs)
    if not pretrained:
        return model
    cfg = model.pretrained_cfg
    name = f'{variant}.{cfg["tag"]}' if cfg.get('tag') and not cfg.get('file') else variant
    source = _weight_source(cfg)
    if source is None:
        raise PretrainedWeightsError(
            f'{name} has no published weights. Load a local checkpoint with '
            f'timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) '
            f'(ours, or an original MPCViT .pth.tar); published tags: '
            f'{[f"{variant}.{tag}" for tag, c in default_cfgs[variant].cfgs.items() if c.hf_hub_id]}')
    if cfg.get('file') and not os.path.exists(cfg['file']):
        raise PretrainedWeightsError(f'checkpoint file for {name} not found: {cfg["file"]}')
    try:
        load_pretrained(
            model,
            num_classes=kwargs.get('num_classes', cfg.get('num_classes', 10)),
            in_chans=kwargs.get('in_chans', 3),
            filter_fn=checkpoint_filter_fn,
        )
    except Exception as e:  # any failure here is a failure to get the weights: say which and from where
        if cfg.get('file'):
            hint = (' The file may be corrupt or truncated, or not a checkpoint of this model '
                    '(accepted: safetensors or torch.save state dicts in timm-mpc or MPCViT layout).')
        else:
            repo = cfg.get('hf_hub_id') or cfg.get('url')
            hint = (' The Hub repository may be unreachable, unpublished, or missing from the local cache '
                    '(HF_HUB_OFFLINE=1 reads only the cache): '
                    f'pre-download it with `hf download {repo}` on a machine with access, or seed the cache from '
                    f'a copy of the folder with `timm-mpc seed-cache DIR` (a timm-mpc checkout ships them in '
                    f'checkpoints/{repo}), or pass pretrained_cfg_overlay=dict(file=PATH) to load a local file.')
        raise PretrainedWeightsError(f'could not load pretrained weights for {name} from {source}: '
                                     f'{type(e).__name__}: {str(e).rstrip(".")}.{hint}') from e
    return model


@register_model
def mpcvit_tiny(pretrained: bool = False, **kwargs: Any) -> MPCViT:
    """MPCViT tiny: the paper's vit_7_4_32 (7 layers, 4 heads, dim 256, patch 4, 32x32 images)."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2, qkv_bias=False)
    return _create_mpcvit('mpcvit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mpcvit_small(pretrained: bool = False, **kwargs: Any) -> MPCViT:
    """MPCViT small: the paper's vit_9_12_64 (9 layers, 12 heads, dim 192, patch 4, 64x64 images)."""
    model_args = dict(img_size=64, patch_size=4, embed_dim=192, depth=9, num_heads=12, mlp_ratio=2, qkv_bias=False)
    return _create_mpcvit('mpcvit_small', pretrained=pretrained, **dict(model_args, **kwargs))
