"""Seed the Hugging Face cache from a repository folder, for machines without Hub access."""
import hashlib
import shutil
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import constants

__all__ = ['require_org_name', 'seed_hub_cache']


def require_org_name(repo_id: str) -> None:
    """Refuse a Hub repository id that is not ``ORG/NAME`` (timm's hf_hub_id must name its organisation)."""
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'repo_id must be ORG/NAME, got {repo_id!r}')


def seed_hub_cache(
        folder: Union[str, Path],
        repo_id: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Path:
    """Place a published repository folder in the Hub cache the way ``hf_hub_download`` leaves it
    (``models--ORG--NAME/refs/main`` and ``snapshots/<commit>/<file>``), so ``HF_HUB_OFFLINE=1`` loads find it.

    The commit name is a hash of the files' contents, so seeding the same folder twice is a no-op and a
    changed folder becomes a new snapshot that ``main`` points at.

    Args:
        folder: A folder written by :func:`timm_mpc.hub.save_for_hub` (or downloaded from the Hub).
        repo_id: ``ORG/NAME``; default the folder's parent and own names (``.../ORG/NAME``).
        cache_dir: The Hub cache; default huggingface_hub's (``HF_HUB_CACHE``).

    Returns:
        The snapshot folder.

    Raises:
        ValueError: the folder has no ``config.json`` or the repo id is not ``ORG/NAME``.
    """
    folder = Path(folder)
    if not (folder / 'config.json').is_file():
        raise ValueError(f'{folder} is not a published model folder (no config.json)')
    repo_id = repo_id or f'{folder.resolve().parent.name}/{folder.name}'
    require_org_name(repo_id)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode() + b'\0' + hashlib.sha256(path.read_bytes()).digest())
    commit = digest.hexdigest()
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo_dir / 'snapshots' / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, snapshot / path.name)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(commit)  # the Hub client reads it without a trailing newline
    return snapshot
