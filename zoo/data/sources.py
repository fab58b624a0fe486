"""Where images come from: image files, decoded safely at their own size, and the items of a
torch Dataset, read as they are asked for.

An :class:`~zoo.data.imagedata.ImageData` read from either remembers its source, so it can
fit each original image to a model's geometry once. Files are untrusted input: only regular
files are opened, symbolic links inside a dataset are never followed, and a pixel mode with
no known value range is refused rather than decoded to a wrong picture.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from zoo.core.errors import ZooError
from zoo.data.transforms import Geometry, resize_crop

__all__ = ["IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# At most this many image headers (evenly spaced) are read to pick an ImageFolder's size.
HEADER_SAMPLE = 1000
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "F", *_INT_MODES})
# Modes whose convert("L"/"RGB") Pillow does right (8 bits a channel); others are scaled
# (_INT_MODES, "F") or refused.
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX",
                                "RGBa", "CMYK", "YCbCr", "LAB", "HSV"})
# How many items (evenly spaced) are read twice to see whether a Dataset changes.
RANDOMNESS_PROBES = 4


class _Source(Protocol):
    """Where a lazy ImageData reads its original images from (picklable, for DataLoader
    workers): files or a torch Dataset, each image at its own size."""

    eager: bool  # whether all its images may be read up front (a Dataset may change)

    def load(self, i: int) -> Tensor: ...

    def identity(self, indices: Sequence[int]) -> bytes | None: ...

    def refusal(self, indices: Sequence[int]) -> str | None: ...


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


def _as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ZooError(f"image_size must be a positive int or (height, width); got {image_size!r}")
    return size  # type: ignore[return-value]


def _common_format(paths: list[Path], root: Path) -> tuple[tuple[int, int], bool, bool, int]:
    """From (a sample of) the images' headers: the most common (height, width), whether all
    of them are grey, whether their sizes differ, and their mean area in pixels."""
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
