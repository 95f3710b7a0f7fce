"""Every use of timm's private API in timm-mpc, in one file: a timm release that moves one of these breaks this
module and nothing else. Each has no public equivalent in timm 1.0.31 (the lowest release ``pyproject.toml``
accepts); everything else timm-mpc uses from timm is public."""
from typing import Any, Dict

from timm.layers import create_act

__all__ = ['activation_layers', 'save_config_for_hf']


def activation_layers() -> Dict[str, type]:
    """timm's table of activation layer names, which ``timm.layers.get_act_layer`` reads: timm has no public way
    to add a name to it (the point of the plugin's ``quad_gelu``), nor to ask for a class's name."""
    return create_act._ACT_LAYER_DEFAULT


def save_config_for_hf(model: Any, config_path: str, **kwargs: Any) -> None:
    """Write the Hub ``config.json`` of ``model`` as ``timm.models.push_to_hf_hub`` does, without uploading it
    (timm's own helper for that step is private)."""
    from timm.models._hub import save_config_for_hf as save
    save(model, config_path, **kwargs)
