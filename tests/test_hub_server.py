"""The loopback Hub works with huggingface_hub's real client: upload, LFS, download, caching, errors."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError)
from safetensors.torch import save_file

from hub_server import LoopbackHub

REPO = "timm-mpc/mpcvit_tiny.fmnist_mu50_kd"  # the dot in the name is deliberate
TOKEN = "hf_test"


@pytest.fixture
def hub():
    with LoopbackHub(token=TOKEN) as server:
        yield server


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder like the one the publisher uploads: small text files and ~2 MB of safetensors."""
    out = tmp_path / "upload"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architecture": "mpcvit_tiny", "num_classes": 10}))
    (out / "results.json").write_text(json.dumps({"top1": 91.5}))
    (out / "README.md").write_text("---\nlibrary_name: timm\nlicense: apache-2.0\n---\n# mpcvit_tiny\n")
    save_file({"weight": torch.randn(512, 1024)}, str(out / "model.safetensors"))
    return out


def _local(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _run(script: str, **env: str) -> str:
    """Run ``script`` in a fresh interpreter, so huggingface_hub reads HF_* variables at import time."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_upload_folder_then_download_roundtrip(hub: LoopbackHub, folder: Path, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    url = api.create_repo(REPO, exist_ok=True)
    assert url.repo_id == REPO
    api.create_repo(REPO, exist_ok=True)  # second call gets the Hub's 409, which exist_ok swallows
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add weights")

    head = hub.repos[REPO][-1]
    assert info.oid == head.sha and len(head.sha) == 40 and head.message == "add weights"
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == _local(folder)

    cache = tmp_path / "cache"
    for name, data in _local(folder).items():
        assert Path(hf_hub_download(REPO, name, endpoint=hub.endpoint, cache_dir=cache)).read_bytes() == data
    repo_dir = cache / "models--timm-mpc--mpcvit_tiny.fmnist_mu50_kd"
    assert (repo_dir / "refs" / "main").read_text() == head.sha
    assert sorted(p.name for p in (repo_dir / "snapshots" / head.sha).iterdir()) == sorted(_local(folder))
    assert ("HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests


def test_lfs_upload_uses_basic_transfer(folder: Path, tmp_path: Path) -> None:
    # With hf_xet installed the client uploads "lfs" files through Xet only; HF_HUB_DISABLE_XET=1 in a fresh
    # interpreter is what routes them through the LFS batch API and a plain HTTP PUT.
    with LoopbackHub(token=TOKEN, lfs=True) as hub:
        _run(f"""
            from huggingface_hub import HfApi
            api = HfApi(endpoint={hub.endpoint!r}, token={TOKEN!r})
            api.create_repo({REPO!r}, exist_ok=True)
            api.upload_folder(repo_id={REPO!r}, folder_path={str(folder)!r}, commit_message="lfs")
            """, HF_HUB_DISABLE_XET="1")
        paths = [p for _, p in hub.requests]
        assert f"/{REPO}.git/info/lfs/objects/batch" in paths and f"/{REPO}.git/info/lfs/objects/verify" in paths
        assert any(p.startswith("/lfs-upload/") for p in paths)
        assert hub.repos[REPO][-1].lfs == {"model.safetensors"}

        cache = tmp_path / "cache"
        data = (folder / "model.safetensors").read_bytes()
        path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.endpoint, cache_dir=cache)
        assert Path(path).read_bytes() == data
        blob = cache / "models--timm-mpc--mpcvit_tiny.fmnist_mu50_kd" / "blobs" / hashlib.sha256(data).hexdigest()
        assert blob.is_file()  # X-Linked-Etag made the client name the blob by its sha256, as for Hub LFS files


def test_lfs_upload_checks_oid_and_size(hub: LoopbackHub) -> None:
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO)
    data = b"weights"
    oid = hashlib.sha256(data).hexdigest()
    batch = urllib.request.Request(
        f"{hub.endpoint}/{REPO}.git/info/lfs/objects/batch", method="POST",
        data=json.dumps({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 7}]}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.git-lfs+json"})
    with urllib.request.urlopen(batch) as resp:
        answer = json.load(resp)
    assert answer["transfer"] == "basic"
    href = answer["objects"][0]["actions"]["upload"]["href"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(href, data=b"weightz", method="PUT"))
    assert err.value.code == 400
    with urllib.request.urlopen(urllib.request.Request(href, data=data, method="PUT")) as resp:
        assert resp.status == 200


def test_wrong_token_is_rejected(hub: LoopbackHub, folder: Path) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo(REPO)
    assert err.value.response.status_code == 401
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO)
    before = list(hub.repos[REPO])
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").upload_folder(repo_id=REPO, folder_path=folder)
    assert err.value.response.status_code == 401
    assert hub.repos[REPO] == before


def test_missing_file_and_repo_raise_hub_errors(hub: LoopbackHub, tmp_path: Path) -> None:
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download(REPO, "nope.bin", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert isinstance(err.value, EntryNotFoundError)  # what timm catches when probing for weights
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("timm-mpc/absent", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path)


def test_second_commit_moves_main(hub: LoopbackHub, folder: Path, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    (folder / "results.json").write_text(json.dumps({"top1": 92.0}))
    second = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="new results").oid

    assert first != second and [c.sha for c in hub.repos[REPO][-2:]] == [first, second]
    cache = tmp_path / "cache"
    latest = hf_hub_download(REPO, "results.json", endpoint=hub.endpoint, cache_dir=cache)
    assert json.loads(Path(latest).read_text()) == {"top1": 92.0}
    old = hf_hub_download(REPO, "results.json", revision=first, endpoint=hub.endpoint, cache_dir=cache)
    assert json.loads(Path(old).read_text()) == {"top1": 91.5}
    assert (cache / "models--timm-mpc--mpcvit_tiny.fmnist_mu50_kd" / "refs" / "main").read_text() == second


def test_hf_endpoint_env_in_subprocess(hub: LoopbackHub, folder: Path, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    out = _run(f"""
        import huggingface_hub
        print(huggingface_hub.hf_hub_download({REPO!r}, "model.safetensors"))
        """, HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "cache"))
    path = Path(out.strip().splitlines()[-1])
    assert path.is_relative_to(tmp_path / "cache")
    assert path.read_bytes() == (folder / "model.safetensors").read_bytes()
