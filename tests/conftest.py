"""Shared fixtures: a small Fashion-MNIST in the Debian package's layout; the ``spu`` marker's skip."""
import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the authors' reference model lives beside the tests

from timm_mpc.training import data as data_mod  # noqa: E402


def pytest_configure(config):
    """Each xdist worker computes on its share of the cores, it and the processes it starts: two workers of two
    OpenMP threads each on two cores spin against each other (a 0.2 s forward and backward took 6 s)."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        import torch
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ['OMP_NUM_THREADS'] = str(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``spu`` skip, saying why, where SPU is not installed; an SPU that is installed but fails to
    import still fails them (CI checks ``import spu`` before the suite, so there they always run)."""
    if importlib.util.find_spec('spu') is not None:
        return
    skip = pytest.mark.skip(reason="SPU is not installed (pip install 'timm-mpc[spu]'): the SPU engine's tests need it")
    for item in items:
        if item.get_closest_marker('spu') is not None:
            item.add_marker(skip)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x801 if array.ndim == 1 else 0x803  # IDX: unsigned bytes, 1 or 3 dimensions
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope='session', autouse=True)
def timm_mpc_cache(tmp_path_factory):
    """One cache for the run (dry runs, cost tables, datasets), shared by its tests and their processes and new
    for every run: nothing a previous run or the user's ~/.cache left decides a result, and what one test
    measures once the others find."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent  # the run's folder, which its workers share: one cache for the run
    root = root / 'timm_mpc_cache'
    root.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TIMM_MPC_CACHE', str(root))
        patch.setenv('TORCHINDUCTOR_CACHE_DIR', str(root / 'inductor'))  # compiled as on a new machine
        yield root


@pytest.fixture(scope='module')
def fmnist(tmp_path_factory):
    """A small Fashion-MNIST in the Debian package's layout: 10 easy classes (a bright square whose
    position is the label) so that a few steps of training learn something."""
    root = tmp_path_factory.mktemp('debian_fmnist')
    rng = np.random.default_rng(0)
    for split, n in (('train', 320), ('t10k', 80)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 5)
            images[i, 4 + r * 12:12 + r * 12, 2 + c * 5:6 + c * 5] = 250
        _write_idx(root / f'{split}-images-idx3-ubyte.gz', images)
        _write_idx(root / f'{split}-labels-idx1-ubyte.gz', labels)
    return root


@pytest.fixture
def debian_fmnist(fmnist, tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, 'DEBIAN_FASHION_MNIST', fmnist)
    monkeypatch.setenv('TIMM_MPC_CACHE', str(tmp_path / 'cache'))
    return fmnist
