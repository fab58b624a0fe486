"""The input transform: where an image lands in a model's input, and the one factory that
builds the batch transform from a preprocessing config.

:func:`resize_crop` fits an image to a :class:`Geometry` (timm's and torchvision's
evaluation transform); :class:`BatchTransform` turns a batch of uint8 or float images into
the normalised float input a model expects, on whatever device the batch is on, without a
Python loop over samples. :func:`transform_from_config` is the only place a transform is
built from a ``preprocessing`` section (a checkpoint's, or a backbone's or weights' metadata).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.core.errors import ZooError

if TYPE_CHECKING:
    from zoo.data.imagedata import ImageData

__all__ = [
    "BatchTransform",
    "Geometry",
    "prepare_inputs",
    "resize_crop",
    "transform_from_config",
]

_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- geometry


# An image more elongated than this, relative to the model's input, first loses the ends of
# its long side (the centre crop would drop them anyway), so resizing stays small.
MAX_ASPECT = 4


@dataclass(frozen=True)
class Geometry:
    """Where an image of any size lands in a model's input: resized, keeping its aspect
    ratio, until it covers ``size / crop_pct`` (the shorter side, for a square input), then
    centre-cropped to ``size``: timm's and torchvision's evaluation transform."""

    size: tuple[int, int]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ZooError(f"an image size must be (height, width); got {self.size!r}")
        if not 0 < self.crop_pct <= 1:
            raise ZooError(f"crop_pct must be in (0, 1]; got {self.crop_pct!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ZooError(f"interpolation must be 'bilinear' or 'bicubic'; "
                           f"got {self.interpolation!r}")

    @property
    def resize_size(self) -> tuple[int, int]:
        """The (height, width) the resized image covers before the crop (timm's floor)."""
        h, w = self.size
        return (max(h, math.floor(h / self.crop_pct + 1e-6)),
                max(w, math.floor(w / self.crop_pct + 1e-6)))

    def key(self) -> str:
        """A stable string naming this geometry, for cache keys and fingerprints."""
        h, w = self.size
        return f"fit-v1:{h}x{w}:crop={self.crop_pct!r}:{self.interpolation}-antialias"


def _covering(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size (aspect ratio kept) at which an image first covers ``target``; a square
    target sets the shorter side and truncates the longer, as torchvision's Resize does."""
    th, tw = target
    if th * width >= tw * height:
        return th, max(tw, int(th * width / height))
    return max(th, int(tw * height / width)), tw


def resize_crop(images: Tensor, geometry: Geometry) -> Tensor:
    """Fit a CHW image, or an N x C x H x W batch of one size, to ``geometry``: resize
    (antialiased, keeping the aspect ratio) to cover ``geometry.resize_size``, then take the
    centre ``geometry.size`` crop. The one definition of a model's input geometry: training,
    ``evaluate`` and ``predict`` all call it. uint8 stays uint8 (rounded), floats float."""
    single = images.ndim == 3
    x = images[None] if single else images
    if x.ndim != 4:
        raise ZooError(f"resize_crop needs a C x H x W image or an N x C x H x W batch; got "
                       f"shape {tuple(images.shape)}")
    target = geometry.resize_size
    th, tw = geometry.size
    height, width = x.shape[-2:]
    if height * target[1] > MAX_ASPECT * width * target[0]:  # far too tall: keep the middle
        keep = max(1, round(MAX_ASPECT * width * target[0] / target[1]))
        x = x[..., (height - keep) // 2:(height - keep) // 2 + keep, :]
    elif width * target[0] > MAX_ASPECT * height * target[1]:  # far too wide
        keep = max(1, round(MAX_ASPECT * height * target[1] / target[0]))
        x = x[..., (width - keep) // 2:(width - keep) // 2 + keep]
    height, width = x.shape[-2:]
    nh, nw = _covering(height, width, target)
    if (nh, nw) == (height, width) == (th, tw):
        return images
    out = _to_float(x)
    if (nh, nw) != (height, width):
        out = F.interpolate(out, size=(nh, nw), mode=geometry.interpolation, antialias=True,
                            align_corners=False)
        if geometry.interpolation == "bicubic":
            out = out.clamp(0.0, 1.0)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    out = out[..., top:top + th, left:left + tw]
    if x.dtype == torch.uint8:
        out = (out * 255).round().clamp(0, 255).to(torch.uint8)
    out = out.contiguous()
    return out[0] if single else out


# --------------------------------------------------------------------------- transforms


def _to_float(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255
    return images.to(torch.float32)


def _match_channels(images: Tensor, channels: int) -> Tensor:
    """Expand grey to RGB or reduce RGB to grey (ITU-R 601 luma) along dim -3."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if have == 3 and channels == 1:
        luma = torch.tensor(_LUMA, dtype=torch.float32, device=images.device).view(3, 1, 1)
        grey = (_to_float(images) * luma).sum(dim=-3, keepdim=True)
        if images.dtype == torch.uint8:
            return (grey * 255).round().clamp(0, 255).to(torch.uint8)
        return grey
    raise ZooError(f"cannot turn {have}-channel images into {channels}-channel input")


@dataclass(frozen=True)
class BatchTransform:
    """Turns a uint8/float N x C x H x W batch into the normalised float32 input a model
    expects: to [0, 1], fit to the input geometry, optional augmentation, grey to RGB,
    normalise.

    The geometry (``input_size``, ``crop_pct``, ``interpolation``) is applied by
    :func:`resize_crop`, as timm and torchvision evaluate: resize keeping the aspect ratio
    to ``size / crop_pct``, centre-crop ``size``. With ``resize=False`` the images were
    already fitted one by one (:meth:`ImageData.at`, :func:`prepare_inputs`) and must have
    the input size. ``augment`` pads each image by 1/8 of its size (reflecting), crops it
    back at a random offset and flips half of them horizontally, drawn from ``generator``.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    resize: bool = True

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.input_size)
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(size) != 3 or min(size) < 1:
            raise ZooError(f"input_size must be (C, H, W); got {self.input_size!r}")
        if len(mean) != size[0] or len(std) != size[0]:
            raise ZooError(f"mean and std need {size[0]} values for input_size {size}; got "
                           f"{len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ZooError(f"std values must be positive; got {std}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "augment", bool(self.augment))
        object.__setattr__(self, "resize", bool(self.resize))
        if not 0 < float(self.crop_pct) <= 1:
            raise ZooError(f"crop_pct must be in (0, 1]; got {self.crop_pct!r}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ZooError(f"interpolation must be 'bilinear' or 'bicubic'; "
                           f"got {self.interpolation!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @property
    def geometry(self) -> Geometry:
        """Where an image lands in the input (see :class:`Geometry`)."""
        return Geometry(self.input_size[1:], self.crop_pct, self.interpolation)  # type: ignore[arg-type]

    @property
    def deterministic(self) -> bool:
        """True when the same batch always gives the same output (no augmentation)."""
        return not self.augment

    def cache_key(self) -> str:
        """A stable string naming this transform, for cache keys."""
        c, h, w = self.input_size
        return (f"batch-transform-v2:size={c}x{h}x{w}:mean={','.join(map(repr, self.mean))}"
                f":std={','.join(map(repr, self.std))}:{self.geometry.key()}"
                f":fit={'batch' if self.resize else 'per-image'}"
                f":augment={'pad-crop-flip' if self.augment else 'none'}")

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise ZooError(f"{type(self).__name__} needs an N x C x H x W batch; got shape "
                           f"{tuple(images.shape)}")
        c, h, w = self.input_size
        x = _to_float(images)
        if self.resize:
            x = resize_crop(x, self.geometry)
        elif tuple(x.shape[2:]) != (h, w):
            raise ZooError(f"images are {tuple(x.shape[2:])} but this transform takes images "
                           f"already fitted to {(h, w)}; fit them with ImageData.at or use "
                           "resize=True")
        x = _match_channels(x, c)
        if self.augment:
            x = self._augment(x, generator)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        return (x - mean) / std

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The training augmentation of a fitted float batch: pad, crop and flip."""
        return _pad_crop_flip(x, generator)

    def prepare_image(self, image: Tensor) -> Tensor:
        """One decoded C x H x W image (e.g. from :func:`load_image`) as a 1 x C x H x W model
        input, fitted exactly as every file is in training and ``evaluate``; never augmented."""
        fitted = resize_crop(image, self.geometry) if self.resize else image
        return replace(self, resize=False, augment=False)(fitted[None])


def prepare_inputs(transform: BatchTransform, *datasets: ImageData | None
                   ) -> tuple[BatchTransform, list[ImageData | None]]:
    """The transform and data to train or evaluate with, so every image gets one geometry.

    Images read from files or a torch Dataset (any sizes) are fitted one by one to the
    transform's geometry, as ``predict`` fits a file, and the transform then only
    normalises (and augments). Same-size tensors and built-in sets stay as they are, on the
    fast path: the transform fits whole batches with the same :func:`resize_crop`.
    """
    present = [d for d in datasets if d is not None]
    if not transform.resize or not any(d._origin is not None for d in present):
        return transform, list(datasets)
    geometry = transform.geometry
    return (replace(transform, resize=False),
            [d.at(geometry) if d is not None else None for d in datasets])


def _pad_crop_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random translation (pad by 1/8, crop back) and horizontal flip, one gather per batch."""
    n, c, h, w = x.shape
    pad = max(1, round(min(h, w) / 8))
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    device = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=device) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def transform_from_config(pre: Mapping[str, Any], *, augment: bool = False) -> BatchTransform:
    """The :class:`BatchTransform` a ``preprocessing`` config describes: ``input_size``,
    ``mean`` and ``std``, with optional ``crop_pct`` (1.0) and ``interpolation``
    ("bilinear"). Checkpoints record this section, and ``transforms_for`` builds one from a
    backbone's weights, so training, ``evaluate`` and ``predict`` fit images alike."""
    return BatchTransform(tuple(pre["input_size"]), tuple(pre["mean"]), tuple(pre["std"]),  # type: ignore[arg-type]
                          augment=augment, crop_pct=pre.get("crop_pct", 1.0),
                          interpolation=pre.get("interpolation", "bilinear"))
