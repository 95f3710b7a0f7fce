"""Small helpers shared across the package."""
import importlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Union

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

__all__ = ['inference_pass', 'parse_json', 'read_json', 'save_weights', 'cache_root', 'progress', 'end_process',
           'import_extra']

# the extra of pyproject.toml that installs each optional dependency
EXTRAS = {'crypten': 'secure', 'spu': 'spu', 'jax': 'spu', 'matplotlib': 'train', 'jinja2': 'hub'}


def import_extra(module: str, what: str) -> Any:
    """Import ``module``, an optional dependency, or raise an ImportError that names the ``pip install`` of the extra
    that brings it (``what`` needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        root = module.split('.')[0]
        if e.name is None or e.name.split('.')[0] != root:  # something it imports is broken: not a missing extra
            raise
        extra = EXTRAS[root]
        raise ImportError(f'{what} needs {root}, which is not installed: pip install "timm-mpc[{extra}]" (in a '
                          f'checkout: pip install -e ".[{extra}]"; see the README\'s install notes)') from e


@contextmanager
def inference_pass(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with autograd off for the block; its training mode is restored afterwards,
    so a probe forward pass (token counting, FLOPs, a rebuild check) leaves a model in training as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def parse_json(text: str, what: str) -> Any:
    """``text`` parsed as JSON, or a ValueError that names ``what`` (an option, a file) and shows the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        shown = text if len(text) <= 80 else text[:77] + '...'
        raise ValueError(f'{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {shown!r}') from None


def read_json(path: Union[str, Path], what: str) -> Any:
    """The JSON content of the file ``path``, or a ValueError that names ``what`` and why it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'cannot read {what} {path}: {getattr(e, "strerror", None) or e}') from None
    return parse_json(text, f'{what} {path}')


def save_weights(state: Dict[str, torch.Tensor], path: Union[str, Path]) -> None:
    """A state dict as safetensors, written whole or not at all."""
    path = Path(path)
    tmp = path.with_suffix('.part')
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def cache_root() -> Path:
    """Where timm-mpc caches what it measured or recorded: ``$TIMM_MPC_CACHE`` or ``~/.cache/timm_mpc``."""
    return Path(os.environ.get('TIMM_MPC_CACHE') or Path.home() / '.cache' / 'timm_mpc')


def progress(iterable: Any = None, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable``, hidden where ``show`` is False. ``disable`` is passed only to hide it: an explicit
    argument would override tqdm's ``TQDM_*`` environment defaults (``TQDM_DISABLE=1`` hides every bar)."""
    return tqdm(iterable, **kwargs) if show else tqdm(iterable, disable=True, **kwargs)


def end_process(code: int) -> None:
    """Exit with ``code`` at once, output flushed, without teardown: for a process whose other threads are blocked in
    C++ calls (a link to a lost peer) that cannot be interrupted, and whose teardown may crash."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
