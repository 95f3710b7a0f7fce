"""Hugging Face Hub publishing: repository folders the timm way, model cards, and offline cache seeding."""
from .cache import seed_hub_cache
from .card import DATASET_CARDS, pattern_grid, render_card
from .model_config import check_rebuild, hub_model_args
from .publish import HUB_FILES, model_facts, publish, save_for_hub

__all__ = [
    'publish', 'save_for_hub', 'HUB_FILES', 'model_facts', 'render_card', 'pattern_grid', 'DATASET_CARDS',
    'hub_model_args', 'check_rebuild', 'seed_hub_cache',
]
