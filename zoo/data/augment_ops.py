"""Batched augmentation kernels: every image of an N x C x H x W float batch gets its own
random draw, in a few whole-batch tensor operations on the batch's device.

torchvision's v2 transforms draw one set of parameters per call, so a batch passed to them
gets the same crop (or the same TrivialAugment op) for every image; calling them image by
image costs milliseconds per image. These kernels reproduce the v2 operations
(``RandomResizedCrop``, ``RandomHorizontalFlip``, ``TrivialAugmentWide``) with per-image
parameters drawn from a ``torch.Generator``, so a run repeats exactly given its seed.
Images are float in [0, 1]; every output stays in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms.v2 import TrivialAugmentWide
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

# TrivialAugmentWide's op names and magnitude bins, exactly as torchvision defines them.
TRIVIAL_SPACE = TrivialAugmentWide._AUGMENTATION_SPACE
TRIVIAL_OPS = tuple(TRIVIAL_SPACE)
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, shape, generator=generator, device=device)


def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator | None
                              ) -> Tensor:
    """``n`` crop boxes (x1, y1, x2, y2) drawn as v2.RandomResizedCrop draws one: up to ten
    tries of an area fraction in ``scale`` and a log-uniform aspect in ``ratio``, else the
    centre crop of the clamped aspect."""
    tries = 10
    area = _uniform((n, tries), generator) * (scale[1] - scale[0]) + scale[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(_uniform((n, tries), generator) * (log_hi - log_lo) + log_lo)
    target = area * (height * width)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(1, keepdim=True)
    found = valid.any(1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(_uniform((n,), generator) * (height - h + 1))
    left = torch.floor(_uniform((n,), generator) * (width - w + 1))
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


def random_resized_crop(x: Tensor, generator: torch.Generator | None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Crop a random box from each image and resize it back to the batch's size (bilinear,
    averaging over the box when it shrinks, as antialiasing does): one ``roi_align`` call."""
    n, _, height, width = x.shape
    boxes = random_resized_crop_boxes(n, height, width, scale, ratio, generator)
    index = torch.arange(n, dtype=x.dtype, device=x.device)[:, None]
    rois = torch.cat([index, boxes.to(x.device, x.dtype)], dim=1)
    return roi_align(x, rois, (height, width), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True).clamp_(0.0, 1.0)


def random_hflip(x: Tensor, generator: torch.Generator | None, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (_uniform((x.shape[0],), generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def trivial_augment(x: Tensor, generator: torch.Generator | None, num_bins: int = 31) -> Tensor:
    """TrivialAugmentWide with its own op and magnitude for each image: each op runs once on
    the images that drew it."""
    n, _, height, width = x.shape
    ops = _randint(len(TRIVIAL_OPS), (n,), generator).cpu()
    bins = _randint(num_bins, (n,), generator).cpu()
    negate = _uniform((n,), generator).cpu() <= 0.5
    out = x.clone()
    for op_id in ops.unique().tolist():
        name = TRIVIAL_OPS[op_id]
        chosen = (ops == op_id).nonzero()[:, 0]
        magnitudes_fn, signed = TRIVIAL_SPACE[name]
        table = magnitudes_fn(num_bins, height, width)
        if table is None:
            magnitude = torch.zeros(len(chosen))
        else:
            magnitude = table[bins[chosen]].to(torch.float32)
            if signed:
                magnitude = torch.where(negate[chosen], -magnitude, magnitude)
        index = chosen.to(x.device)
        out[index] = apply_trivial_op(x[index], name, magnitude)
    return out


def apply_trivial_op(x: Tensor, name: str, magnitude: Tensor) -> Tensor:
    """One TrivialAugmentWide op on a batch, image i at ``magnitude[i]``, as v2 applies it."""
    if name == "Identity":
        return x
    if name in GEOMETRIC_OPS:
        return _affine_batch(x, name, magnitude.tolist())
    factor = magnitude.to(x.device, x.dtype).view(-1, 1, 1, 1)
    if name == "Brightness":
        return (x * (1.0 + factor)).clamp(0.0, 1.0)
    if name == "Color":
        return x if x.shape[1] == 1 else _blend(x, _grey(x), 1.0 + factor)
    if name == "Contrast":
        grey = _grey(x) if x.shape[1] == 3 else x
        return _blend(x, grey.mean(dim=(-3, -2, -1), keepdim=True), 1.0 + factor)
    if name == "Sharpness":
        return _sharpen(x, 1.0 + factor)
    if name == "Posterize":
        levels = torch.pow(2.0, factor)
        return (x * levels).floor().clamp(min=torch.zeros_like(levels), max=levels - 1) / levels
    if name == "Solarize":
        return torch.where(x >= factor, 1.0 - x, x)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    raise ValueError(f"unknown TrivialAugment op {name!r}")


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(-3)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    return (a * ratio + b * (1.0 - ratio)).clamp(0.0, 1.0)


def _sharpen(x: Tensor, factor: Tensor) -> Tensor:
    """v2.adjust_sharpness per image: blend with a 3x3 smoothing, borders unchanged."""
    c, height, width = x.shape[-3:]
    if height <= 2 or width <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=x.dtype, device=x.device)
    blurred = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    inner = x[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = inner + (1.0 - factor) * (blurred - inner)
    return out.clamp(0.0, 1.0)


def _affine_batch(x: Tensor, name: str, magnitudes: list[float]) -> Tensor:
    """The geometric ops, one inverse-affine grid per image, nearest sampling, zero fill:
    the grid v2's ``affine_image``/``rotate_image`` build, stacked for the batch."""
    n, _, height, width = x.shape
    rows = []
    for m in magnitudes:
        centre = [-width * 0.5, -height * 0.5]  # v2 passes center=[0, 0] for shears
        if name == "ShearX":
            matrix = _get_inverse_affine_matrix(centre, 0.0, [0.0, 0.0], 1.0,
                                                [math.degrees(math.atan(m)), 0.0])
        elif name == "ShearY":
            matrix = _get_inverse_affine_matrix(centre, 0.0, [0.0, 0.0], 1.0,
                                                [0.0, math.degrees(math.atan(m))])
        elif name == "TranslateX":
            matrix = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(m)), 0.0], 1.0,
                                                [0.0, 0.0])
        elif name == "TranslateY":
            matrix = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(m))], 1.0,
                                                [0.0, 0.0])
        else:  # Rotate: v2 negates the angle for rotate
            matrix = _get_inverse_affine_matrix([0.0, 0.0], -(m % 360), [0.0, 0.0], 1.0,
                                                [0.0, 0.0])
        rows.append(matrix)
    theta = torch.tensor(rows, dtype=x.dtype, device=x.device).view(n, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
    base[..., 0] = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width,
                                  device=x.device)
    base[..., 1] = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height,
                                  device=x.device)[:, None]
    base[..., 2] = 1.0
    scale = torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
    grid = base.view(1, height * width, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale)
    return F.grid_sample(x, grid.view(n, height, width, 2), mode="nearest",
                         padding_mode="zeros", align_corners=False)
