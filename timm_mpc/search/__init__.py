"""MPC-aware architecture search: secure-latency cost model and binarization of searched supernets."""
from .binarize import binarize_budget, binarize_gelu, binarize_mu, searched_alpha, searched_beta
from .cost_model import estimate_latency, head_costs, layer_cost, model_cost_table, model_latency

__all__ = [
    'binarize_budget', 'binarize_gelu', 'binarize_mu', 'searched_alpha', 'searched_beta',
    'estimate_latency', 'head_costs', 'layer_cost', 'model_cost_table', 'model_latency',
]
