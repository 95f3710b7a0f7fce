"""Teacher training, MPC-aware search and distilled retraining on timm's training machinery."""
from .config import RunConfig
from .data import (
    DATASETS, DatasetMissingError, FashionMNISTImages, TinyImageNet, build_dataset, build_loader, model_data_config,
)
from .engine import TokensAndLogits, create_run_model, evaluate, load_weights, model_summary, train_model
from .losses import ArchitecturePenalty, TokenDistillationLoss
from .pareto import load_runs, pareto_table, plot_pareto

__all__ = [
    'RunConfig', 'DATASETS', 'DatasetMissingError', 'FashionMNISTImages', 'TinyImageNet', 'build_dataset',
    'model_data_config',
    'build_loader', 'TokensAndLogits', 'create_run_model', 'evaluate', 'load_weights', 'model_summary',
    'train_model', 'ArchitecturePenalty', 'TokenDistillationLoss', 'load_runs', 'pareto_table',
    'plot_pareto',
]
