"""MPC-friendly layers: the registry of attention kinds, heads with a kind each, activations and the MPCViT+ MLP."""
from .activations import ACTIVATIONS, QuadGELU, activation_name, quad_gelu
from .attention import (
    MPCAttention, Quad2Attention, ReLUSoftmaxAttention, ScalingAttention, SearchAttention, SoftmaxAttention,
)
from .attn_kinds import (
    ATTN_KINDS, BASELINE_KIND, SEARCH, SEARCH_CODE, SEARCH_KINDS, AttnKind, KindContext, PatternError, get_attn_kind, kind_code, kind_modules, kind_name, list_attn_kinds, quad2_weights, register_attn_kind, relu_softmax_weights, scaling_weights, softmax_weights,
)
from .eva_attention import MPCEvaAttention
from .head_kinds import HeadKinds, HeadPattern
from .linearizable_mlp import GELU_PATTERNS, GeluPattern, LinearizableMlp
from .mpc_attention import MPCAttentionMixin, split_attn_mask
from .pattern_state import PatternState, is_pattern_key, searched_tensors
from .register import ACT_LAYER_NAMES, attn_layer_names, register_timm_layers
from .swin_attention import MPCWindowAttention

__all__ = [
    'ATTN_KINDS', 'BASELINE_KIND', 'SEARCH', 'SEARCH_CODE', 'SEARCH_KINDS', 'GELU_PATTERNS', 'ACT_LAYER_NAMES', 'ACTIVATIONS',
    'AttnKind', 'KindContext', 'PatternError', 'register_attn_kind', 'get_attn_kind', 'list_attn_kinds', 'kind_modules',
    'HeadKinds', 'HeadPattern', 'GeluPattern', 'LinearizableMlp', 'PatternState', 'is_pattern_key', 'searched_tensors',
    'MPCAttentionMixin', 'MPCAttention', 'SoftmaxAttention', 'ReLUSoftmaxAttention', 'ScalingAttention',
    'Quad2Attention', 'SearchAttention', 'MPCEvaAttention', 'MPCWindowAttention',
    'QuadGELU', 'quad_gelu', 'activation_name', 'kind_code', 'kind_name', 'split_attn_mask',
    'attn_layer_names', 'register_timm_layers',
    'softmax_weights', 'relu_softmax_weights', 'scaling_weights', 'quad2_weights',
]
