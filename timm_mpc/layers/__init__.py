"""MPC-friendly layers: attention kinds per head, activations and the MPCViT+ MLP."""
from .activations import QuadGELU, quad_gelu
from .attention import (
    MPCAttention, Quad2Attention, ReLUSoftmaxAttention, ScalingAttention, SearchAttention, SoftmaxAttention,
)
from .attn_kinds import (
    ATTN_KINDS, SEARCH, kind_code, kind_name, quad2_weights, relu_softmax_weights, scaling_weights, softmax_weights,
)
from .eva_attention import MPCEvaAttention
from .head_kinds import HeadKinds, HeadPattern
from .linearizable_mlp import GELU_PATTERNS, GeluPattern, LinearizableMlp
from .mpc_attention import MPCAttentionMixin, split_attn_mask
from .register import ACT_LAYER_NAMES, ATTN_LAYER_NAMES, register_timm_layers
from .swin_attention import MPCWindowAttention

__all__ = [
    'ATTN_KINDS', 'SEARCH', 'GELU_PATTERNS', 'ACT_LAYER_NAMES', 'ATTN_LAYER_NAMES',
    'HeadKinds', 'HeadPattern', 'GeluPattern', 'LinearizableMlp',
    'MPCAttentionMixin', 'MPCAttention', 'SoftmaxAttention', 'ReLUSoftmaxAttention', 'ScalingAttention',
    'Quad2Attention', 'SearchAttention', 'MPCEvaAttention', 'MPCWindowAttention',
    'QuadGELU', 'quad_gelu', 'kind_code', 'kind_name', 'split_attn_mask', 'register_timm_layers',
    'softmax_weights', 'relu_softmax_weights', 'scaling_weights', 'quad2_weights',
]
