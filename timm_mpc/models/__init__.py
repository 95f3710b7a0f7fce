"""``mpcvit_*`` models, registered in timm on import."""
from .mpcvit import MPCViT, MPCViTBlock, PretrainedWeightsError, checkpoint_filter_fn

__all__ = ['MPCViT', 'MPCViTBlock', 'PretrainedWeightsError', 'checkpoint_filter_fn']
