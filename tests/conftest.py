"""Shared fixtures: a small Fashion-MNIST in the Debian package's layout."""
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the authors' reference model lives beside the tests

from timm_mpc.training import data as data_mod  # noqa: E402


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x801 if array.ndim == 1 else 0x803  # IDX: unsigned bytes, 1 or 3 dimensions
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


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
