"""timm-mpc: MPC-friendly Vision Transformers for timm.

Importing the package registers the ``mpcvit_*`` models and the MPC-friendly attention and
activation layer names with timm.
"""
from .convert import SUPPORTED_ATTENTION, ConversionReport, convert_to_mpc
from .layers import (
    ATTN_KINDS, GELU_PATTERNS, SEARCH, HeadKinds, LinearizableMlp, MPCAttention, MPCEvaAttention,
    MPCWindowAttention, Quad2Attention, QuadGELU, ReLUSoftmaxAttention, ScalingAttention, SearchAttention,
    SoftmaxAttention, quad_gelu, register_timm_layers,
)
from .models import MPCViT, MPCViTBlock, PretrainedWeightsError, checkpoint_filter_fn
from .pattern import count_head_kinds, get_attn_pattern, get_gelu_pattern, set_attn_pattern
from .search import binarize_budget, binarize_gelu, binarize_mu, estimate_latency
from .training import RunConfig, TokenDistillationLoss, train_model
from .version import __version__

register_timm_layers()

__all__ = [
    '__version__', 'convert_to_mpc', 'ConversionReport', 'SUPPORTED_ATTENTION',
    'ATTN_KINDS', 'GELU_PATTERNS', 'SEARCH', 'HeadKinds', 'LinearizableMlp',
    'MPCAttention', 'SoftmaxAttention', 'ReLUSoftmaxAttention', 'ScalingAttention', 'Quad2Attention',
    'SearchAttention', 'MPCEvaAttention', 'MPCWindowAttention', 'QuadGELU', 'quad_gelu',
    'MPCViT', 'MPCViTBlock', 'PretrainedWeightsError', 'checkpoint_filter_fn',
    'count_head_kinds', 'get_attn_pattern', 'get_gelu_pattern', 'set_attn_pattern', 'register_timm_layers',
    'binarize_budget', 'binarize_gelu', 'binarize_mu', 'estimate_latency',
    'RunConfig', 'TokenDistillationLoss', 'train_model',
]
