"""The one kind of data zoo trains on: :class:`ImageData`, labelled images of one fixed size.

Images are uint8 (or float32 in [0, 1]) CHW tensors, so batches collate; they are held in
memory when they fit ``MEMORY_BUDGET`` and otherwise read from their source as needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.core.errors import ZooError
from zoo.data.sources import _check_unit_range, _Source
from zoo.data.transforms import Geometry, _match_channels, _to_float, resize_crop

__all__ = ["ImageData", "MEMORY_BUDGET"]

# An ImageFolder split whose uint8 tensor would be at most this many bytes is decoded once
# into memory; a larger one is decoded image by image as it is read.
MEMORY_BUDGET = 512 * 2**20
_UNSET: Any = object()


def fits_in_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` of decoded images may be held in memory (see ``MEMORY_BUDGET``)."""
    return nbytes <= MEMORY_BUDGET


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
        if not self._origin.eager or not fits_in_memory(size) or not len(self):
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
