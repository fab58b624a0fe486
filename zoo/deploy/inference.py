"""Inference from Python: top-k predictions and feature vectors for images.

Every image, whatever form it comes in (a file, a PIL image, a CHW tensor), is fitted by
the checkpoint's own :meth:`BatchTransform.prepare_image`, exactly as training and
``evaluate`` fit their images; only the model's forward pass is batched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from zoo.core._io import atomic_write
from zoo.core.errors import ZooError
from zoo.core.spec import resolve_callable
from zoo.data.sources import _as_chw, load_image
from zoo.data.transforms import BatchTransform, transform_from_config
from zoo.models.groups import compose
from zoo.persist.hub import from_pretrained
from zoo.plugins.registry import get_backbone
from zoo.training.device import resolve_device

__all__ = ["embed", "load_model", "predict", "save_embeddings"]

EMBEDDING_FORMATS = (".npy", ".safetensors")


def load_model(target: nn.Module | str | os.PathLike[str]) -> nn.Module:
    """A model as given, or loaded from a checkpoint folder, ``hf-hub:REPO`` or ``OWNER/NAME``
    on the Hub (``zoo.persist.hub.from_pretrained``, which tells them apart)."""
    if isinstance(target, nn.Module):
        return target
    return from_pretrained(os.fspath(target))


def _config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "zoo_config", None)
    if not config or "preprocessing" not in config:
        raise ZooError("the model carries no zoo config (preprocessing, classes); load it with "
                       "zoo.load_checkpoint or use the model finetune returned")
    return config


def _transform(model: nn.Module) -> BatchTransform:
    return transform_from_config(_config(model)["preprocessing"])


def _image_list(images: Any) -> list[Any]:
    """One image or a sequence of them (an N x C x H x W tensor counts as N images)."""
    if isinstance(images, str | os.PathLike) or hasattr(images, "convert"):
        return [images]
    if isinstance(images, Tensor):
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    items = list(images)
    if not items:
        raise ZooError("no images given; pass paths, PIL images or CHW tensors")
    return items


def _decoded(image: Any, channels: int) -> Tensor:
    """One image as a CHW uint8/float tensor at its own size."""
    if isinstance(image, str | os.PathLike):
        return load_image(image, channels=channels)
    if isinstance(image, np.ndarray):
        raise ZooError("numpy arrays are ambiguous (HWC or CHW?); pass torch.from_numpy(a)"
                       ".permute(2, 0, 1) for an H x W x C array")
    return _as_chw(image)


def _inputs(images: Any, transform: BatchTransform, batch_size: int,
            device: torch.device) -> Iterator[Tensor]:
    """Batches of model input, each image fitted by ``transform.prepare_image``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ZooError(f"batch_size must be a positive int; got {batch_size!r}")
    items = _image_list(images)
    for start in range(0, len(items), batch_size):
        chunk = [transform.prepare_image(_decoded(image, transform.input_size[0]))
                 for image in items[start:start + batch_size]]
        yield torch.cat(chunk).to(device)


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _probabilities(model: nn.Module, images: Any, batch_size: int,
                   device: str | torch.device | None) -> Tensor:
    dev = _device(model, device)
    transform = _transform(model)
    was_training = model.training
    model.eval().to(dev)
    try:
        out = [model(x).float().softmax(1).cpu()
               for x in _inputs(images, transform, batch_size, dev)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def class_names(model: nn.Module, count: int) -> list[str]:
    """The model's class names (indices as names where it has none)."""
    names = _config(model).get("class_names")
    return list(names) if names and len(names) == count else [str(i) for i in range(count)]


def predict(model: nn.Module | str | os.PathLike[str], images: Any, *, top_k: int = 5,
            batch_size: int = 32, device: str | torch.device | None = None
            ) -> list[list[tuple[str, float]]]:
    """The ``top_k`` classes and their probabilities for each image (paths, PIL images, or
    uint8 / float [0, 1] CHW tensors), best first, fitted with the checkpoint's
    preprocessing; ``model`` may be a model, a checkpoint folder or a Hub repo."""
    return [[(name, p) for _, name, p in row]
            for row in predict_indexed(model, images, top_k=top_k, batch_size=batch_size,
                                       device=device)]


def predict_indexed(model: nn.Module | str | os.PathLike[str], images: Any, *, top_k: int = 5,
                    batch_size: int = 32, device: str | torch.device | None = None
                    ) -> list[list[tuple[int, str, float]]]:
    """As :func:`predict`, with each class's index too: ``(index, name, probability)``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ZooError(f"top_k must be 1 or more; got {top_k!r}")
    net = load_model(model)
    probs = _probabilities(net, images, batch_size, device)
    names = class_names(net, probs.shape[1])
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[(i, names[i], p) for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def _head(model: nn.Module) -> nn.Module:
    spec = get_backbone(_config(model)["backbone"])
    try:
        return model.get_submodule(spec.head)
    except AttributeError:
        raise ZooError(f"the model has no head module {spec.head!r}; was it built by zoo for "
                       f"{spec.name}?") from None


def _prefix(model: nn.Module, at: str) -> Any:
    """The forward function from the input to the output of layer group ``at``."""
    spec = get_backbone(_config(model)["backbone"])
    if not spec.stages:
        raise ZooError(f"backbone {spec.name} declares no stages, so embed(at=...) cannot cut "
                       "it at a group; use at=None for the head's input")
    stages = list(resolve_callable(spec.stages)(model))
    ends = [stage.groups[-1] for stage in stages]
    if at not in ends:
        raise ZooError(f"cannot cut {spec.name} after group {at!r}; embed(at=...) takes one of "
                       f"{', '.join(ends[:-1])} (or None for the head's input)")
    return compose(stages[:ends.index(at) + 1])


@torch.no_grad()
def embed(model: nn.Module | str | os.PathLike[str], images: Any, *, at: str | None = None,
          batch_size: int = 32, device: str | torch.device | None = None) -> Tensor:
    """Feature vectors for images (as :func:`predict` takes them), as an N x ... float32 CPU
    tensor: the head's input (N x D) by default, or the output of layer group ``at`` (e.g.
    ``"layer3"``, a group boundary of the backbone's stages)."""
    net = load_model(model)
    dev = _device(net, device)
    transform = _transform(net)
    forward = _prefix(net, at) if at is not None else None
    captured: list[Tensor] = []
    hook = None
    if forward is None:
        hook = _head(net).register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].detach().float().cpu()))
    was_training = net.training
    net.eval().to(dev)
    out: list[Tensor] = []
    try:
        for x in _inputs(images, transform, batch_size, dev):
            if forward is None:
                net(x)
                out.append(captured.pop())
            else:
                out.append(forward(x).detach().float().cpu())
    finally:
        net.train(was_training)
        if hook is not None:
            hook.remove()
    return torch.cat(out)


def check_embedding_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """``path`` if embeddings may be written there: a known suffix, and no file there
    unless ``overwrite``; checked before any work is done."""
    out = Path(path)
    if out.suffix.lower() not in EMBEDDING_FORMATS:
        raise ZooError(f"--out must end in {' or '.join(EMBEDDING_FORMATS)}; got {out.name}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ZooError(f"{out} already exists; pass --overwrite to replace it or choose "
                       "another --out")
    if out.is_dir():
        raise ZooError(f"{out} is a folder; --out names the file to write")
    return out


def save_embeddings(embeddings: Tensor, path: str | os.PathLike[str], *,
                    overwrite: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write embeddings to ``.npy`` or ``.safetensors`` (tensor ``"embeddings"``)
    atomically; an existing file is replaced only with ``overwrite``."""
    out = check_embedding_path(path, overwrite)
    array = embeddings.detach().cpu().contiguous()
    with atomic_write(out) as handle:
        if out.suffix.lower() == ".npy":
            np.save(handle, array.numpy(), allow_pickle=False)
        else:
            handle.write(safetensors_bytes({"embeddings": array}, metadata=dict(sorted(
                (metadata or {}).items()))))
    return out
