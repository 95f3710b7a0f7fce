"""timm-mpc: MPC-friendly Vision Transformers for timm.

Importing the package registers the ``mpcvit_*`` models, the ``mpc_converted`` architecture (a converted model of
any supported family, as published) and the MPC-friendly attention and activation layer names with timm.
"""
from .convert import SUPPORTED_ATTENTION, ConversionReport, convert_to_mpc
from .converted import CONVERTED_ARCH
from .cost import estimate_latency
from .factory import create_mpc_model
from .layers import (
    ATTN_KINDS, GELU_PATTERNS, SEARCH, AttnKind, HeadKinds, KindContext, LinearizableMlp, MPCAttention,
    MPCEvaAttention, MPCWindowAttention, PatternError, Quad2Attention, QuadGELU, ReLUSoftmaxAttention,
    ScalingAttention, SearchAttention, SoftmaxAttention, get_attn_kind, quad_gelu, register_attn_kind,
    register_timm_layers,
)
from .models import MPCViT, MPCViTBlock, PretrainedWeightsError, checkpoint_filter_fn
from .pattern import count_head_kinds, get_attn_pattern, get_gelu_pattern, set_attn_pattern, set_gelu_pattern
from .reader import FAMILIES, read_model, support_table
from .search import binarize_budget, binarize_gelu, binarize_mu
from .secure.crypten_compat import install_import_hook
from .training import RunConfig, TokenDistillationLoss, train_model
from .version import __version__

register_timm_layers()
install_import_hook()  # a plain `import crypten` gets timm-mpc's CrypTen (see timm_mpc.secure.crypten_compat)

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
