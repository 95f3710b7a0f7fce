"""timm-mpc: MPC-friendly Vision Transformers for timm.

Importing the package registers the ``mpcvit_*`` models, the ``mpc_converted`` architecture (a converted model of
any supported family, as published) and the MPC-friendly attention and activation layer names with timm, and
nothing else: secure inference (:mod:`timm_mpc.secure`, CrypTen), training (:mod:`timm_mpc.training`), the cost
model and the Hub tools load when they are first used (the names below from them too, on first access).
"""
import importlib
from typing import Any

from .convert import SUPPORTED_ATTENTION, ConversionReport, convert_to_mpc
from .converted import CONVERTED_ARCH
from .factory import create_mpc_model
from .layers import (
    ATTN_KINDS, GELU_PATTERNS, SEARCH, AttnKind, HeadKinds, KindContext, LinearizableMlp, MPCAttention, MPCEvaAttention, MPCWindowAttention, PatternError, Quad2Attention, QuadGELU, ReLUSoftmaxAttention, ScalingAttention, SearchAttention, SoftmaxAttention, get_attn_kind, quad_gelu, register_attn_kind, register_timm_layers,
)
from .models import MPCViT, MPCViTBlock, PretrainedWeightsError, checkpoint_filter_fn
from .pattern import count_head_kinds, get_attn_pattern, get_gelu_pattern, set_attn_pattern, set_gelu_pattern
from .reader import FAMILIES, read_model, support_table
from .search.binarize import binarize_budget, binarize_gelu, binarize_mu
from .version import __version__

register_timm_layers()

# public names of the heavier rooms, imported on first access (PEP 562): `import timm_mpc` stays light
_LAZY = {'estimate_latency': 'timm_mpc.cost', 'RunConfig': 'timm_mpc.training',
         'TokenDistillationLoss': 'timm_mpc.training', 'train_model': 'timm_mpc.training'}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

__all__ = [
    '__version__', 'convert_to_mpc', 'ConversionReport', 'SUPPORTED_ATTENTION', 'CONVERTED_ARCH', 'create_mpc_model',
    'FAMILIES', 'read_model', 'support_table',
    'ATTN_KINDS', 'GELU_PATTERNS', 'SEARCH', 'AttnKind', 'KindContext', 'PatternError', 'register_attn_kind',
    'get_attn_kind', 'HeadKinds', 'LinearizableMlp',
    'MPCAttention', 'SoftmaxAttention', 'ReLUSoftmaxAttention', 'ScalingAttention', 'Quad2Attention',
    'SearchAttention', 'MPCEvaAttention', 'MPCWindowAttention', 'QuadGELU', 'quad_gelu',
    'MPCViT', 'MPCViTBlock', 'PretrainedWeightsError', 'checkpoint_filter_fn',
    'count_head_kinds', 'get_attn_pattern', 'get_gelu_pattern', 'set_attn_pattern', 'set_gelu_pattern',
    'register_timm_layers',
    'binarize_budget', 'binarize_gelu', 'binarize_mu', 'estimate_latency',
    'RunConfig', 'TokenDistillationLoss', 'train_model',
]
