"""What secure inference costs: measured profiles (rounds, bytes, time per layer and operator), the per-kind
cost table measured once per shape, and estimates for whole models and networks priced from it."""
from ..profile import NETWORKS, CostMeter, CostProfile, CostRow, NetworkSetting
from .estimate import cost_table_shape, estimate_latency, head_costs, layer_cost, model_cost_table, model_latency
from .table import default_cache_dir, kind_cost_table

__all__ = [
    'NETWORKS', 'NetworkSetting', 'CostMeter', 'CostProfile', 'CostRow', 'kind_cost_table', 'default_cache_dir',
    'cost_table_shape', 'estimate_latency', 'head_costs', 'layer_cost', 'model_cost_table', 'model_latency',
]
