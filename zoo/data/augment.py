"""Training-time augmentation: presets, any torchvision v2 pipeline, mixup/cutmix.

``--augment none|light|standard|strong``:

- ``none``: no augmentation (the input pipeline is deterministic, so frozen features cache);
- ``light``: RandomResizedCrop (area 25-100 %) + horizontal flip;
- ``standard``: RandomResizedCrop (area 8-100 %, timm's default) + flip + TrivialAugmentWide;
- ``strong``: ``standard`` + mixup (alpha 0.8) / cutmix (alpha 1.0), half each, with
  soft targets: train it with :func:`soft_target_cross_entropy`.

Presets run batched on the batch's device (:mod:`zoo.data.augment_ops`), each image with its own
draw from the ``torch.Generator`` it is given, so a seeded run repeats and the frozen-prefix
cache can precompute ``cache_views=K`` augmented views. ``Augmentation(pipeline=...)`` takes
any v2 transform instead, applied image by image. Evaluation never augments: an
:class:`AugmentTransform` with ``augment=False`` is the plain eval transform.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.core.errors import ZooError
from zoo.data import augment_ops
from zoo.data.transforms import BatchTransform

PRESETS = ("none", "light", "standard", "strong")
_CROP_SCALE = {"light": (0.25, 1.0), "standard": (0.08, 1.0), "strong": (0.08, 1.0)}


@dataclass(frozen=True)
class Augmentation:
    """What augments a training batch of float [0, 1] N x C x H x W images.

    ``preset`` is one of :data:`PRESETS`; ``pipeline`` (any torchvision v2 transform taking
    and returning a C x H x W float image of the same size) replaces the preset and is
    applied to each image in turn, its randomness seeded from the generator. ``key`` names
    a custom pipeline in cache keys (default: its ``repr``).
    """

    preset: str = "none"
    pipeline: Callable[[Tensor], Tensor] | None = None
    key: str | None = None
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.pipeline is None and self.preset not in PRESETS:
            raise ZooError(f"unknown augmentation preset {self.preset!r}; use one of "
                           f"{', '.join(PRESETS)}, or pass a torchvision v2 pipeline")
        if self.pipeline is not None and not callable(self.pipeline):
            raise ZooError("pipeline must be a torchvision v2 transform (a callable), got "
                           f"{type(self.pipeline).__name__}")

    @property
    def deterministic(self) -> bool:
        """True when a batch always gives the same output: only the ``none`` preset."""
        return self.pipeline is None and self.preset == "none"

    @property
    def mixes(self) -> bool:
        """True when batches are mixed (mixup/cutmix): targets become soft, see
        :meth:`batch_mix`."""
        return self.pipeline is None and self.preset == "strong"

    def cache_key(self) -> str:
        """A stable string naming this augmentation, for feature-cache keys."""
        if self.pipeline is not None:
            return f"v2-pipeline:{self.key or repr(self.pipeline)}"
        return f"preset:{self.preset}:v1"

    def batch_mix(self, num_classes: int, label_smoothing: float = 0.0) -> MixupCutmix | None:
        """The batch mixer this augmentation asks for (``strong``), else None."""
        if not self.mixes:
            return None
        return MixupCutmix(num_classes, mixup_alpha=self.mixup_alpha,
                           cutmix_alpha=self.cutmix_alpha, label_smoothing=label_smoothing)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment float [0, 1] images; ``generator`` (CPU or the batch's device) makes it
        repeatable. Mixup/cutmix is not applied here: it changes the labels too."""
        if self.pipeline is not None:
            return _per_image(self.pipeline, x, generator)
        if self.preset == "none":
            return x
        x = augment_ops.random_resized_crop(x, generator, scale=_CROP_SCALE[self.preset])
        x = augment_ops.random_hflip(x, generator)
        if self.preset in ("standard", "strong"):
            x = augment_ops.trivial_augment(x, generator)
        return x


def as_augmentation(augment: Any) -> Augmentation:
    """``finetune``'s ``augment`` argument as an :class:`Augmentation`: a preset name, an
    ``Augmentation``, a v2 transform, False/None (``none``) or True (``light``)."""
    if isinstance(augment, Augmentation):
        return augment
    if augment is None or augment is False:
        return Augmentation("none")
    if augment is True:
        return Augmentation("light")
    if isinstance(augment, str):
        return Augmentation(augment)
    if callable(augment):
        return Augmentation(pipeline=augment)
    raise ZooError(f"augment must be one of {', '.join(PRESETS)}, a torchvision v2 transform "
                   f"or an Augmentation, got {type(augment).__name__}")


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run a block whose code draws from torch's global RNGs with a seed taken from
    ``generator``, restoring the global RNG states after (no generator: global RNG as is)."""
    if generator is None:
        yield
        return
    seed = int(augment_ops._randint(2**62, (1,), generator))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _per_image(pipeline: Callable[[Tensor], Tensor], x: Tensor,
               generator: torch.Generator | None) -> Tensor:
    with _seeded(generator, x.device):
        out = [pipeline(image) for image in x]
    shapes = {tuple(o.shape) for o in out}
    if shapes != {tuple(x.shape[1:])}:
        raise ZooError(f"the augmentation pipeline changed the image shape from "
                       f"{tuple(x.shape[1:])} to {sorted(shapes)}; it must keep the input size "
                       "(crop with a size equal to the model input)")
    return torch.stack(out).to(x.dtype).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class AugmentTransform(BatchTransform):
    """A :class:`zoo.data.transforms.BatchTransform` whose augmentation is an :class:`Augmentation`:
    fit to the input geometry, match channels, augment (when ``augment``), normalise.

    It is a drop-in for the runner: ``replace(t, augment=False)`` is the eval transform,
    ``deterministic`` and ``cache_key()`` drive the frozen-prefix cache and ``cache_views``.
    """

    augmentation: Augmentation = Augmentation("none")

    @classmethod
    def wrap(cls, base: BatchTransform, augment: Any) -> AugmentTransform:
        """``base``'s geometry and normalisation with ``augment`` (see :func:`as_augmentation`)."""
        values = {f.name: getattr(base, f.name) for f in fields(BatchTransform)}
        augmentation = as_augmentation(augment)
        values["augment"] = not augmentation.deterministic
        return cls(**values, augmentation=augmentation)

    @property
    def deterministic(self) -> bool:
        """True when the same batch always gives the same output."""
        return not self.augment or self.augmentation.deterministic

    def cache_key(self) -> str:
        """The base transform's key with this augmentation's (none when off)."""
        base = replace(self, augment=False)
        key = BatchTransform.cache_key(base)  # type: ignore[arg-type]
        return key + (f":aug={self.augmentation.cache_key()}" if self.augment else "")

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The batch through this transform's :class:`Augmentation`."""
        return self.augmentation(x.contiguous(), generator)

    def describe(self) -> dict[str, Any]:
        """The augmentation as plain values, for run files and configs."""
        aug = asdict(self.augmentation)
        aug["pipeline"] = None if self.augmentation.pipeline is None else "custom"
        return aug


# --------------------------------------------------------------------------- mixup / cutmix


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against probability targets (rows summing to 1), averaged over the
    batch: the loss that matches mixup/cutmix and label smoothing."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot targets with ``smoothing`` spread evenly: 1 - s + s/C on the label, s/C else."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


@dataclass(frozen=True)
class MixupCutmix:
    """Mixes each batch with itself reversed (as timm's batch mode does): mixup blends whole
    images, cutmix pastes a box; the targets mix in the same proportion (the box's true
    area for cutmix). ``prob`` is the chance a batch is mixed at all, ``switch_prob`` the
    chance it is cutmix when both alphas are positive."""

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not 0 <= self.prob <= 1:
            raise ZooError("mixup/cutmix alphas must be >= 0 and prob in [0, 1]")

    def __call__(self, images: Tensor, labels: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(mixed images, soft targets)``; each target row sums to 1."""
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        draws = augment_ops._uniform((2,), generator).tolist()
        seed = int(augment_ops._randint(2**62, (1,), generator))
        cut = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or draws[1] < self.switch_prob)
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        if draws[0] >= self.prob or alpha == 0:
            return images, targets
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        partner = images.flip(0)
        if cut:
            images, lam = self._cutmix(images, partner, lam, seed)
        else:
            images = images * lam + partner * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)

    @staticmethod
    def _cutmix(images: Tensor, partner: Tensor, lam: float, seed: int) -> tuple[Tensor, float]:
        """Paste a box of area ~(1 - lam) from ``partner``; returns the images and the kept
        area fraction."""
        h, w = images.shape[-2:]
        ratio = (1.0 - lam) ** 0.5
        ch, cw = int(h * ratio), int(w * ratio)
        rng = np.random.default_rng(seed + 1)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        out = images.clone()
        out[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        return out, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
