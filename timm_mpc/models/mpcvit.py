"""MPCViT: the ViT-Lite models of "MPCViT: Searching for Accurate and Efficient MPC-Friendly Vision
Transformer with Heterogeneous Attention" (Zeng et al., ICCV 2023, https://arxiv.org/abs/2211.13955).

Built on timm's ``VisionTransformer`` with the paper's block: the LayerNorm sits after the attention
residual and there is none in front of the MLP. Each head runs Softmax, ReLU-Softmax, Scaling or
2Quad attention, or in search mode a learnable mix of ReLU-Softmax and Scaling. MPCViT+ linearizes
the GeLU of chosen token positions.
"""
import logging
import os
import re
import socket
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, Union
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.layers import Attention, DropPath, LayerScale, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..data import FASHION_MNIST_CLASSES, FASHION_MNIST_DATA_CONFIG
from ..layers.attention import MPCAttention
from ..layers.attn_kinds import BASELINE_KIND, SEARCH_KINDS, PatternError, kind_code
from ..layers.linearizable_mlp import GeluPattern, LinearizableMlp
from ..layers.pattern_state import is_pattern_key
from ..pattern import ModelPattern, expand_attn_pattern, expand_gelu_pattern, set_attn_pattern, set_gelu_pattern
from ..reader import Family, register_family

__all__ = ['MPCViT', 'MPCViTBlock', 'checkpoint_filter_fn', 'PretrainedWeightsError']

HUB_ORG = 'timm-mpc'
"""The Hugging Face Hub organisation that holds the published ``mpcvit_*`` checkpoints."""

SHIPPED_CHECKPOINTS = Path(__file__).resolve().parents[2] / 'checkpoints'
"""A checkout's copy of the published repositories (``checkpoints/ORG/NAME``), read where the Hub cannot be."""

_logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights for an ``mpcvit_*`` model could not be found or loaded."""


class MPCViTBlock(nn.Module):
    """ViT-Lite block of MPCViT: ``x = norm2(x + attn(norm1(x))); x = x + mlp(x)``.

    Takes the same arguments as timm's ``Block``, so it serves as ``VisionTransformer``'s ``block_fn``.
    """
    norm_style = 'post'  # the secure plan reads this: the norm after the attention residual is on the stream

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
    """timm ``VisionTransformer`` with :class:`MPCViTBlock` blocks, a head pattern and MPCViT+ MLPs.

    Every MLP is a :class:`~timm_mpc.layers.LinearizableMlp` and every attention layer has its
    :class:`~timm_mpc.layers.HeadKinds`, whatever the patterns: a pattern is values in those modules' state,
    so setting or loading one never changes the model's structure. Without weights the model starts where the
    MPCViT search starts: every head in search mode with α = 1, every token with its GeLU. The distillation
    teacher is the same model with ``attn_pattern='softmax'``.
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
                ``'search'``, or a list with one kind per head. Kinds: see :data:`timm_mpc.layers.ATTN_KINDS`.
            gelu_pattern: MPCViT+ linearization: ``'gelu'`` (None, the default: every token keeps its GeLU),
                ``'linear'``, ``'search'``, or one entry per layer (those names or a 0/1 value per token).
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
        token_shape = (self.num_tokens,) if gelu_per_token else ()
        for blk in self.blocks:
            blk.mlp = LinearizableMlp.from_module(blk.mlp, token_shape, 'gelu')
        set_attn_pattern(self, attn_pattern)
        if gelu_pattern is not None:
            set_gelu_pattern(self, gelu_pattern)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: patches plus class/register tokens."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def set_gelu_pattern(self, gelu_pattern: Union[GeluPattern, Sequence[GeluPattern]]) -> None:
        """Set every MLP's GeLU pattern in place (see :func:`timm_mpc.pattern.set_gelu_pattern`)."""
        set_gelu_pattern(self, gelu_pattern)


register_family(Family('MPCViT', 'mpcvit_*', MPCViT, Attention, MPCAttention, True))

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
_BINARY_KINDS = {1.0: kind_code(SEARCH_KINDS[0]), 0.0: kind_code(SEARCH_KINDS[1])}  # the authors' binarized α


def _convert_authors_checkpoint(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the original MPCViT repository's layout onto ``MPCViT`` names.

    Binary α (1 = ReLU-Softmax, 0 = Scaling) is a fixed head pattern and binary β a fixed GeLU pattern, so they
    become ``kinds`` codes and ``gelu_tokens``; fractional values are a search checkpoint and stay α and β, where
    they mean the mix the search trained (the authors' evaluation code would leave such heads unnormalised).
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
        binary = bool(((value == 0) | (value == 1)).all())
        if new_key.endswith('.heads.alpha') and binary:
            out[new_key.replace('.alpha', '.kinds')] = torch.tensor([_BINARY_KINDS[float(v)] for v in value.flatten()])
        elif new_key.endswith('.mlp.beta') and binary:
            out[new_key.replace('.beta', '.gelu_tokens')] = value.float()
        else:
            out[new_key] = value
    if unknown:
        raise ValueError(
            f'checkpoint in the MPCViT repository layout has keys this converter does not know: {unknown[:6]}'
            f'{" ..." if len(unknown) > 6 else ""}; known prefixes are tokenizer.conv_layers.0.0, classifier.*')
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MPCViT) -> Dict[str, torch.Tensor]:
    """Remap a checkpoint's keys for ``model``: ours, a timm ViT-Lite one, or the MPCViT authors' layout.

    The model is not touched: keys are renamed (the authors' α/β encoding included), and where a checkpoint
    holds neither tensor of a layer's pattern (a timm ViT-Lite checkpoint, or one written before patterns were
    always saved) the filter adds what that absence means, Softmax heads and GeLU on every token. The patterns
    are values in the weights, so loading sets them. Shapes are checked first, so a checkpoint of
    another architecture is refused with a clear message before anything is loaded.

    Raises:
        ValueError: a checkpoint that does not fit the model.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    if any(k.startswith(('tokenizer.', 'classifier.')) for k in state_dict):
        state_dict = _convert_authors_checkpoint(state_dict)
    state_dict = dict(state_dict)
    for i, blk in enumerate(model.blocks):  # neither tensor of a pattern: a plain ViT-Lite layer
        heads, mlp = f'blocks.{i}.attn.heads.', f'blocks.{i}.mlp.'
        if heads + 'kinds' not in state_dict and heads + 'alpha' not in state_dict:
            state_dict[heads + 'kinds'] = torch.full((blk.attn.heads.num_heads,), kind_code(BASELINE_KIND))
        if mlp + 'gelu_tokens' not in state_dict and mlp + 'beta' not in state_dict:
            state_dict[mlp + 'gelu_tokens'] = torch.ones_like(blk.mlp.gelu_tokens)
    expected = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    adaptable = tuple(p for p in (cfg.get('classifier'), cfg.get('first_conv')) if p)  # timm adapts these
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and not is_pattern_key(k) and not k.startswith(adaptable) and v.shape != expected[k].shape]
    # a checkpoint may hold either tensor of a pattern (older ones hold one); the layers fill in the other. The
    # classifier of another class count (or none: num_classes=0) is timm's to drop after this filter
    missing = [k for k in expected if k not in state_dict and not is_pattern_key(k) and not k.startswith(adaptable)]
    unexpected = [k for k in state_dict if k not in expected and not k.startswith(adaptable)]
    if mismatched or missing or unexpected:
        arch = (f'depth {len(model.blocks)}, dim {model.embed_dim}, '
                f'{model.blocks[0].attn.num_heads} heads, {model.num_tokens} tokens')
        problems = [('shape mismatches', mismatched), ('missing keys', missing), ('unexpected keys', unexpected)]
        detail = '; '.join(f'{name}: {items[:4]}{" ..." if len(items) > 4 else ""}' for name, items in problems if items)
        raise ValueError(f'checkpoint does not fit this model ({arch}): {detail}')
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
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2211.13955',
        'paper_name': 'MPCViT: Searching for Accurate and Efficient MPC-Friendly Vision Transformer '
                      'with Heterogeneous Attention',
        **kwargs,
    }


def _fmnist_cfg(tag: str, **kwargs: Any) -> Dict[str, Any]:
    return _cfg(hf_hub_id=f'{HUB_ORG}/mpcvit_tiny.{tag}', label_names=FASHION_MNIST_CLASSES,
                **FASHION_MNIST_DATA_CONFIG, **kwargs)


default_cfgs = generate_default_cfgs({
    # Fashion-MNIST (grey 28x28 repeated to 3 channels and padded to 32x32 by timm's eval transform), searched
    # and distilled.
    # The first tag is the default: μ = 0.5 with distillation, the paper's main setting and the longest retrained
    'mpcvit_tiny.fmnist_mu50_kd': _fmnist_cfg('fmnist_mu50_kd'),
    'mpcvit_tiny.fmnist_mu70_kd': _fmnist_cfg('fmnist_mu70_kd'),
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


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub's host answers (one TCP connection, bounded): huggingface_hub retries an unreachable host for
    about a minute before it falls back to its cache."""
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def _local_copy(repo: str) -> Optional[Path]:
    """A published repository's weights without the Hub: the Hub cache's copy, else a checkout's shipped copy."""
    cached = try_to_load_from_cache(repo, 'model.safetensors')
    if isinstance(cached, str):
        return Path(cached)
    shipped = SHIPPED_CHECKPOINTS / repo / 'model.safetensors'
    return shipped if shipped.is_file() else None


def _from_local_copy(kwargs: Dict[str, Any], repo: str, why: str) -> Optional[Dict[str, Any]]:
    """``kwargs`` that load ``repo``'s local copy instead of asking the Hub (and a one-line notice), or None."""
    local = _local_copy(repo)
    if local is None:
        return None
    _logger.warning(f'timm-mpc: the Hugging Face Hub cannot give {repo} ({why}); loading it from {local}')
    return dict(kwargs, pretrained_cfg_overlay=dict(kwargs.get('pretrained_cfg_overlay') or {}, file=str(local)))


def _check_weights_pattern(model: MPCViT, requested: Dict[str, Any]) -> None:
    """The patterns a caller asked for (``model_args``) must be the ones the loaded weights hold."""
    if 'attn_pattern' in requested:
        heads = [blk.attn.heads for blk in model.blocks]
        asked = [h.codes_of(layer) for h, layer in zip(heads, expand_attn_pattern(
            requested['attn_pattern'], [h.num_heads for h in heads]))]
        if asked != [h.kinds.tolist() for h in heads]:
            raise PatternError(f'the weights hold head pattern {[h.pattern for h in heads]}, but attn_pattern='
                               f'{requested["attn_pattern"]!r} was asked for; leave attn_pattern out to take the '
                               f'weights\' pattern, or load weights of that pattern')
    if requested.get('gelu_pattern') is not None:
        mlps = [blk.mlp for blk in model.blocks]
        layers = expand_gelu_pattern(requested['gelu_pattern'], len(mlps))
        if not all(torch.equal(m.values_of(layer), m.gelu_tokens.cpu()) for m, layer in zip(mlps, layers)):
            raise PatternError(f'the weights hold GeLU pattern {[m.pattern for m in mlps]}, but gelu_pattern='
                               f'{requested["gelu_pattern"]!r} was asked for; leave gelu_pattern out to take the '
                               f'weights\' pattern')


def _create_mpcvit(variant: str, pretrained: bool = False, **kwargs: Any) -> MPCViT:
    build = dict(pretrained_filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'))
    if not pretrained:
        return build_model_with_cfg(MPCViT, variant, pretrained=False, **build, **kwargs)
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
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
    # published weights without the Hub (offline, or its host does not answer): the cache's or the checkout's copy;
    # with an offline cache timm reads it itself. huggingface_hub alone retries a silent host for about a minute
    repo = None if cfg.get('file') or cfg.get('state_dict') else cfg.get('hf_hub_id')
    if repo and not (constants.HF_HUB_OFFLINE and isinstance(try_to_load_from_cache(repo, 'model.safetensors'), str)):
        why = ('HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else
               None if _hub_reachable() else f'{urlparse(constants.ENDPOINT).hostname} does not answer')
        local = _from_local_copy(kwargs, repo, why) if why else None
        if local is not None:
            kwargs, repo = local, None
    try:
        try:
            model = build_model_with_cfg(MPCViT, variant, pretrained=True, **build, **kwargs)
        except (TypeError, PatternError):
            raise
        except Exception as e:  # the Hub answered without the weights (not published there yet): a local copy
            local = _from_local_copy(kwargs, repo, f'{type(e).__name__}') if repo else None
            if local is None:
                raise
            model = build_model_with_cfg(MPCViT, variant, pretrained=True, **build, **local)
    except (TypeError, PatternError):  # arguments the model does not take: not a weights problem
        raise
    except Exception as e:  # any other failure is a failure to get the weights: say which and from where
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
    if not kwargs.get('features_only'):
        _check_weights_pattern(model, kwargs)
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
