"""Datasets for training and evaluation: Fashion-MNIST, CIFAR-10/100, Tiny-ImageNet and any ImageFolder,
by the names timm and torchvision use, with timm's loaders and transforms."""
import gzip
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform
from torchvision.transforms import Compose
from torch.utils.data import Dataset, Subset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.folder import default_loader

from ..data import model_data_config
from ..utils import cache_root

__all__ = ['DATASETS', 'DatasetMissingError', 'FashionMNISTImages', 'TinyImageNet', 'build_dataset', 'build_loader',
           'model_data_config']

DEBIAN_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
"""Where the Debian package ``dataset-fashion-mnist`` puts the gzipped IDX files."""

DATASETS: Dict[str, Dict[str, Any]] = {
    'fashion_mnist': dict(num_classes=10, how='apt install dataset-fashion-mnist (Debian/Ubuntu), or pass '
                          '--download to fetch it with torchvision'),
    'cifar10': dict(num_classes=10, how='pass --download to fetch it with torchvision'),
    'cifar100': dict(num_classes=100, how='pass --download to fetch it with torchvision'),
    'tiny_imagenet': dict(num_classes=200, how='download http://cs231n.stanford.edu/tiny-imagenet-200.zip and '
                          'unzip it; --data-dir is the tiny-imagenet-200 folder'),
}


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


class FashionMNISTImages(FashionMNIST):
    """torchvision's Fashion-MNIST as 28x28 PIL images with ``channels`` (grey repeated), so that timm's transforms
    make of them what they make of any user's image."""

    def __init__(self, root: str, train: bool = True, channels: int = 3, **kwargs: Any) -> None:
        if channels not in (1, 3):
            raise ValueError(f'Fashion-MNIST can be given 1 or 3 channels, got {channels}')
        super().__init__(root, train=train, **kwargs)
        self.mode = {1: 'L', 3: 'RGB'}[channels]

    @property
    def raw_folder(self) -> str:
        # torchvision names the folder after the class; keep the standard FashionMNIST location
        return os.path.join(self.root, 'FashionMNIST', 'raw')

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.data[index].numpy(), mode='L').convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class TinyImageNet(Dataset):
    """Tiny-ImageNet-200 in its distributed layout: ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (the test split has no labels)."""

    def __init__(self, root: str, split: str = 'train', transform: Optional[Any] = None) -> None:
        root_path = Path(root)
        wnids_file = root_path / 'wnids.txt'
        if not wnids_file.is_file():
            raise DatasetMissingError(f'Tiny-ImageNet not found in {root} (no wnids.txt); '
                                      f'{DATASETS["tiny_imagenet"]["how"]}')
        self.classes = wnids_file.read_text().split()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if split == 'train':
            self.samples = [(str(p), self.class_to_idx[wnid]) for wnid in self.classes
                            for p in sorted((root_path / 'train' / wnid / 'images').glob('*.JPEG'))]
        elif split in ('val', 'validation'):
            rows = (line.split('\t') for line in (root_path / 'val' / 'val_annotations.txt').read_text().splitlines())
            self.samples = [(str(root_path / 'val' / 'images' / r[0]), self.class_to_idx[r[1]]) for r in rows if r[0]]
        else:
            raise ValueError(f'Tiny-ImageNet splits with labels are train and val; got {split!r}')
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        img = default_loader(path)
        return (self.transform(img) if self.transform is not None else img), target


def _fashion_mnist_root(data_dir: Optional[str], download: bool) -> str:
    """A torchvision Fashion-MNIST root, filled from the Debian package's files when they are present."""
    root = Path(data_dir or cache_root() / 'datasets')
    raw = root / 'FashionMNIST' / 'raw'
    names = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
    if not all((raw / n).is_file() for n in names):
        if all((DEBIAN_FASHION_MNIST / f'{n}.gz').is_file() for n in names):
            raw.mkdir(parents=True, exist_ok=True)
            for n in names:
                tmp = raw / f'{n}.{os.getpid()}.part'  # processes of a distributed run may race here
                with gzip.open(DEBIAN_FASHION_MNIST / f'{n}.gz', 'rb') as src, open(tmp, 'wb') as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(raw / n)  # never leave a half-written file under the final name
        elif not download:
            raise DatasetMissingError(f'Fashion-MNIST not found in {raw} or {DEBIAN_FASHION_MNIST}; '
                                      f'{DATASETS["fashion_mnist"]["how"]}')
    return str(root)


def build_dataset(
        name: str,
        split: str,
        data_dir: Optional[str] = None,
        download: bool = False,
        in_chans: int = 3,
        subset: Optional[int] = None,
) -> Dataset:
    """The ``split`` (``'train'`` or ``'test'``/``'val'``) of a dataset by name.

    Args:
        name: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``tiny_imagenet``, or ``folder`` (an ImageFolder
            with ``train``/``val`` sub-folders under ``data_dir``, read by timm).
        split: ``train`` or ``test`` (``val`` is accepted as a synonym).
        data_dir: Root folder; Fashion-MNIST defaults to a cache filled from the Debian package.
        download: Let torchvision download a missing dataset.
        in_chans: Model input channels (Fashion-MNIST's grey is repeated to them).
        subset: Keep only the first ``subset`` images (quick runs and tests).

    Raises:
        DatasetMissingError: the files are missing; the message says how to get them.
        ValueError: an unknown dataset name or split.
    """
    train = split == 'train'
    if split not in ('train', 'test', 'val', 'validation'):
        raise ValueError(f'split must be train or test (val), got {split!r}')
    if name == 'fashion_mnist':
        ds: Dataset = FashionMNISTImages(_fashion_mnist_root(data_dir, download), train=train, channels=in_chans,
                                         download=download)
    elif name in ('cifar10', 'cifar100'):
        try:
            ds = create_dataset(f'torch/{name}', root=data_dir or '.', split='train' if train else 'validation',
                                download=download)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            raise DatasetMissingError(f'{name} not found in {data_dir}: {e}; {DATASETS[name]["how"]}') from e
    elif name == 'tiny_imagenet':
        ds = TinyImageNet(data_dir or '.', 'train' if train else 'val')
    elif name == 'folder':
        folder = Path(data_dir or '.') / ('train' if train else 'val')
        if not folder.is_dir():
            raise DatasetMissingError(f'ImageFolder split not found: {folder} (expected {data_dir}/train and '
                                      f'{data_dir}/val with one sub-folder per class)')
        ds = create_dataset('', root=str(folder))
    else:
        raise ValueError(f'unknown dataset {name!r}; accepted: {list(DATASETS) + ["folder"]}')
    if subset is not None:
        ds = _SubsetWithTransform(ds, range(min(subset, len(ds))))
    return ds


class _SubsetWithTransform(Subset):
    """A ``Subset`` whose ``transform`` is its dataset's, so timm's ``create_loader`` can set it."""

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value


def build_loader(
        dataset: Dataset,
        data_config: Dict[str, Any],
        batch_size: int,
        is_training: bool,
        num_workers: int = 2,
        distributed: bool = False,
        device: torch.device = torch.device('cpu'),
        **aug: Any,
) -> torch.utils.data.DataLoader:
    """timm's ``create_loader`` with the model's data config (input size, mean, std, crop) and, for
    training, the augmentation options in ``aug`` (``scale``, ``hflip``, ``auto_augment``, ``re_prob``...).

    With ``crop_mode='border'`` (the Fashion-MNIST checkpoints') timm's eval transform pads each image to the input
    size with the mean; training images get that same border before timm's augmentation, so that training sees
    what evaluation sees."""
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=is_training,
        mean=data_config['mean'], std=data_config['std'], interpolation=data_config['interpolation'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=num_workers,
        distributed=distributed, use_prefetcher=False, device=device, persistent_workers=False,
        **(aug if is_training else {}))
    if is_training and data_config.get('crop_mode') == 'border':
        eval_geometry = create_transform(**{k: data_config[k] for k in _GEOMETRY if k in data_config})
        border = Compose(eval_geometry.transforms[:2])  # ResizeKeepRatio, CenterCropOrPad (then ToTensor, Normalize)
        loader.dataset.transform = Compose([border, loader.dataset.transform])  # workers start at the first batch
    return loader


_GEOMETRY = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
