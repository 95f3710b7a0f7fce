"""MPC-aware architecture search: binarization of searched supernets by μ or by a secure-latency budget
(priced by :mod:`timm_mpc.cost`)."""
from .binarize import binarize_budget, binarize_gelu, binarize_mu, searched_alpha, searched_beta

__all__ = [
    'binarize_budget', 'binarize_gelu', 'binarize_mu', 'searched_alpha', 'searched_beta',
]
