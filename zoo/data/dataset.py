"""``load_data``: any data a user passes (a registered dataset's name, an ImageFolder
directory, a CSV, Hugging Face data, tensors or a torch Dataset) as an :class:`ImageData`.

Every form becomes the same ImageData of ``(image, label)`` pairs (``zoo.data.imagedata``),
split by ``zoo.data.splits`` and decoded by ``zoo.data.sources``; the model's input
transform is ``zoo.data.transforms``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.core.errors import PluginError, UnknownNameError, ZooError
from zoo.core.spec import DatasetSpec, resolve_callable
from zoo.data import hf as hf_data
from zoo.data.imagedata import ImageData, fits_in_memory
from zoo.data.sources import (
    _as_chw,
    _as_size,
    _check_unit_range,
    _common_format,
    _DatasetSource,
    _FileSource,
    _shown,
    _try_decode,
)
from zoo.data.splits import _check_labels, _class_name, _select, _split_files, _SplitFiles
from zoo.data.transforms import Geometry, resize_crop
from zoo.plugins.registry import find_dataset, list_datasets

__all__ = ["list_datasets", "load_data"]

_SPLITS = ("train", "val", "test")


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
    columns = (image_column, label_column)
    if hf_data.is_hf_object(data) or isinstance(data, hf_data.DataSource) or (
            isinstance(data, str) and data.startswith("hf:")):
        return _finish(hf_data.load_hf(data, split, *columns), classes, limit_per_class, seed,
                       size)
    if isinstance(data, str | os.PathLike):
        return _load_named(os.fspath(data), split, columns, classes=classes,
                           limit=limit_per_class, strict=strict, seed=seed, size=size,
                           in_memory=in_memory)
    raise ZooError(f"cannot load data from a {type(data).__name__}; pass a built-in name, an "
                   "ImageFolder directory, an (x, y) pair of tensors or a torch Dataset")


def _load_named(text: str, split: str, columns: tuple[str | None, str | None], *,
                classes: Sequence[int | str] | None, limit: int | None, strict: bool,
                seed: int, size: tuple[int, int] | None, in_memory: bool | None) -> ImageData:
    """Data named by a string: a registered dataset, a saved Hugging Face dataset or parquet
    file, a CSV of ``path,label`` rows or an ImageFolder directory (see ``load_data``)."""
    spec = find_dataset(text)
    if spec is not None:
        return _finish(_load_registered(spec, split), classes, limit, seed, size)
    path = Path(text).expanduser()
    if hf_data.is_hf_path(path):
        return _finish(hf_data.load_hf(text, split, *columns), classes, limit, seed, size)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _load_files(path.parent, hf_data.load_csv(path, split), classes=classes,
                           limit=limit, strict=strict, seed=seed, size=size,
                           in_memory=in_memory)
    if path.is_dir():
        return _load_folder(path, split, classes=classes, limit=limit, strict=strict,
                            seed=seed, size=size, in_memory=in_memory)
    if path.exists():
        raise ZooError(f"{text} is a file; pass an ImageFolder directory "
                       "(DIR/<class>/*.jpg), a .csv of path,label rows, a .parquet file "
                       "or a built-in dataset name")
    if os.sep in text or "/" in text or text.startswith((".", "~")):
        raise ZooError(f"dataset directory {text} does not exist")
    raise UnknownNameError.for_name(
        "dataset", text, [d.name for d in list_datasets()],
        context="; use a built-in name (zoo datasets) or an ImageFolder directory")


def _finish(data: ImageData, classes: Sequence[int | str] | None, limit: int | None, seed: int,
            size: tuple[int, int] | None) -> ImageData:
    """Apply the class selection and per-class limit, then fit the images to ``size``."""
    if classes is not None or limit is not None:
        index, targets, names = _select(data.targets, data.classes, classes, limit, seed)
        data = data._relabelled(index, targets, names)
    if size is not None and (data.image_shape[1:] != size or data.geometry is not None):
        data = data.at(Geometry(size))
    return data


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


# --------------------------------------------------------------------------- registered datasets


def _load_registered(spec: DatasetSpec, split: str) -> ImageData:
    """The ``split`` of a dataset a plugin registered, named after it: its loader's
    ``(images, labels)`` pair, or whatever else it returned loaded as ``load_data`` would."""
    split = spec.split_for(split)
    try:
        found = resolve_callable(spec.loader)(split)
    except ZooError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {spec.plugin!r} failed to load dataset {spec.name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if isinstance(found, tuple | list) and len(found) == 2:
        images, labels = _check_tensor_pair(*found)
        classes = list(spec.classes or (
            str(c) for c in range(spec.num_classes or int(labels.max()) + 1)))
        _check_labels(labels, len(classes), f"dataset {spec.name!r}'s labels")
        return ImageData(images, labels, classes, name=spec.name, split=split)
    if isinstance(found, str) and find_dataset(found) is not None:
        raise PluginError(f"plugin {spec.plugin!r}: the loader of dataset {spec.name!r} "
                          f"returned the dataset name {found!r}; return data or a path")
    data = copy.copy(load_data(found, split))
    data.name = spec.name
    return data


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
        in_memory = fits_in_memory(len(paths) * channels * max(mean_area, shape[1] * shape[2]))
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


