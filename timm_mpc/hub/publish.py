"""Publish an MPC-friendly model the timm way: ``config.json``, ``model.safetensors``, ``results.json`` and a
model card, written to a folder and uploaded to the Hugging Face Hub with huggingface_hub."""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from huggingface_hub import HfApi, get_token
from timm.models import get_model_input_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..pattern import count_head_kinds, get_attn_pattern, get_gelu_pattern
from ..layers.pattern_state import checkpoint_state
from ..reader import num_weights
from ..timm_adapter import save_config_for_hf
from ..utils import inference_pass, save_weights
from .cache import require_org_name
from .card import render_card
from .model_config import check_rebuild, hub_model_args

__all__ = ['HUB_FILES', 'model_facts', 'save_for_hub', 'publish']

HUB_FILES = ('config.json', 'model.safetensors', 'results.json', 'README.md')
"""What a published repository holds: no pickled weights."""


def model_facts(model: nn.Module) -> Dict[str, Any]:
    """What a card says about the model itself: size, compute, input and head pattern, all measured."""
    cfg = model.pretrained_cfg
    size = tuple(get_model_input_config(model)['input_size'])
    device = next(model.parameters()).device
    with inference_pass(model), FlopCounterMode(display=False) as flops:
        model(torch.zeros(1, *size, device=device))
    facts: Dict[str, Any] = dict(
        architecture=cfg['architecture'], params=num_weights(model),
        gmacs=flops.get_total_flops() / 2e9, image_size=list(size[1:]), in_chans=size[0],
        num_classes=model.num_classes, license=cfg.get('license', 'apache-2.0'),
        head_kinds=count_head_kinds(model), attn_pattern=get_attn_pattern(model))
    gelu = get_gelu_pattern(model)
    if gelu:
        facts['gelu_pattern'] = gelu
    return facts


def _write_folder(
        model: nn.Module,
        directory: Path,
        repo_id: str,
        results: Optional[Dict[str, Any]],
        label_names: Optional[Sequence[str]],
) -> None:
    architecture, model_args = hub_model_args(model)
    check_rebuild(model, architecture, model_args)  # before anything is written
    results = dict(results or {}, model=model_facts(model))
    card = render_card(results, repo_id)
    # timm names Hub repos ARCHITECTURE.TAG; the source checkpoint's tag would be stale here
    name = repo_id.split('/')[-1]
    model_config: Dict[str, Any] = dict(pretrained_cfg=dict(tag=name.split('.', 1)[-1], architecture=architecture))
    labels = label_names or model.pretrained_cfg.get('label_names')
    if labels:
        if len(labels) != model.num_classes:
            raise ValueError(f'{len(labels)} label names for a model with {model.num_classes} classes')
        model_config['label_names'] = list(labels)
    save_config_for_hf(model, str(directory / 'config.json'), model_config=model_config, model_args=model_args)
    save_weights(checkpoint_state(model), directory / 'model.safetensors')
    (directory / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    (directory / 'README.md').write_text(card)


def save_for_hub(
        model: nn.Module,
        directory: Union[str, Path],
        repo_id: str,
        results: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
) -> Path:
    """Write the folder a Hub repository of ``model`` holds (:data:`HUB_FILES`).

    The model is rebuilt from the config first and must compute exactly what it computes, so what is
    written loads back (``local-dir:``, ``hf-hub:``) as the same model. Files are written to a temporary
    folder and moved into ``directory`` only when all of them are complete.

    Args:
        model: An ``mpcvit_*`` model, or a timm model after :func:`timm_mpc.convert_to_mpc`.
        directory: The folder to write (created; the four files are replaced if present).
        repo_id: ``ORG/NAME`` the folder is for (used by the card).
        results: Measured figures for the card (see :func:`timm_mpc.hub.render_card`).
        label_names: Class names, one per output; default the model's ``pretrained_cfg['label_names']``.

    Returns:
        The folder.

    Raises:
        ValueError: a model that cannot be rebuilt from a config, or labels that do not fit it.
    """
    directory = Path(directory)
    blocked = [str(p) for p in [directory] if p.exists() and not p.is_dir()]
    blocked += [str(directory / name) for name in HUB_FILES
                if (directory / name).exists() and not (directory / name).is_file() or (directory / name).is_symlink()]
    if blocked:  # checked first, so that a failed move cannot leave new files beside old ones
        raise ValueError(f'cannot write the repository folder {directory}: {", ".join(blocked)} '
                         f'{"is" if len(blocked) == 1 else "are"} in the way (accepted: an absent or regular file '
                         f'for each of {list(HUB_FILES)} in a folder)')
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.', dir=directory.parent))
    try:
        _write_folder(model, tmp, repo_id, results, label_names)
        directory.mkdir(exist_ok=True)
        for name in HUB_FILES:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def publish(
        model: nn.Module,
        repo_id: str,
        results: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        dry_run_dir: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
        endpoint: Optional[str] = None,
        private: bool = False,
        commit_message: str = 'Publish with timm-mpc',
) -> str:
    """Publish ``model`` to the Hugging Face Hub as ``repo_id``, or only write the folder (``dry_run_dir``).

    Args:
        model: An ``mpcvit_*`` model, or a timm model after :func:`timm_mpc.convert_to_mpc`.
        repo_id: ``ORG/NAME``; timm's convention is ``ORG/ARCHITECTURE.TAG``.
        results: Measured figures for the card.
        label_names: Class names, one per output.
        dry_run_dir: Write the repository folder here and upload nothing.
        token: Hub token; default huggingface_hub's (``HF_TOKEN`` or ``hf auth login``).
        endpoint: Hub URL; default huggingface_hub's (``HF_ENDPOINT``).
        private: Create the repository private.
        commit_message: The commit's message.

    Returns:
        The folder written (dry run) or the URL of the commit.

    Raises:
        ValueError: a bad ``repo_id`` or a model that cannot be published (see :func:`save_for_hub`).
        RuntimeError: no token to upload with.
    """
    require_org_name(repo_id)
    if dry_run_dir is not None:
        return str(save_for_hub(model, dry_run_dir, repo_id, results, label_names))
    token = token or get_token()
    if not token:
        raise RuntimeError('no Hugging Face token to upload with: set HF_TOKEN or run `hf auth login`, '
                           'or write the folder only with dry_run_dir (--dry-run DIR)')
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_for_hub(model, Path(tmp) / 'repo', repo_id, results, label_names)
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return commit.commit_url
