"""Building models from the registry: random or pretrained, with a head sized to the task."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zoo.core.errors import CheckpointError, IncompatibleError, WeightsError, ZooError
from zoo.core.spec import Backbone, LayerGroup, Weights
from zoo.data.transforms import transform_from_config
from zoo.plugins.registry import get_backbone
from zoo.weights.cache import registered_for_path
from zoo.weights.load import load_state_dict, weights_spec

if TYPE_CHECKING:
    from zoo.data.transforms import BatchTransform
    from zoo.models.strategy import FreezeStrategy


def replace_head(model: nn.Module, head: str, num_classes: int, *, force: bool = False
                 ) -> nn.Module:
    """Swap the ``nn.Linear`` at ``head`` for a freshly initialised one with ``num_classes``.

    Without ``force`` a head that already has ``num_classes`` outputs is kept.
    """
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise ZooError(f"head {head!r} is a {type(old).__name__}, expected nn.Linear")
    if old.out_features == num_classes and not force:
        return model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent_path, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return model


def num_outputs(model: nn.Module, backbone: Backbone) -> int:
    """The number of classes the model's head predicts."""
    return int(model.get_submodule(backbone.head).out_features)


def create_model(
    name: str | Backbone,
    *,
    num_classes: int | None = None,
    weights: str | os.PathLike[str] | Weights | None = None,
    **builder_kwargs: Any,
) -> nn.Module:
    """Build backbone ``name``: random (``weights=None``) or pretrained, head sized to the task.

    ``weights`` is a tag of the backbone, ``"default"``, a ``Weights`` spec, or a path to a
    local weights file. A ``num_classes`` that differs from the weights' classes replaces
    only the head; every other tensor keeps its pretrained value.
    """
    backbone = get_backbone(name) if isinstance(name, str) else name
    if weights is None:
        model = _build(backbone, num_classes, builder_kwargs)
        model.zoo_weights = None  # type: ignore[assignment]
        return model
    spec = weights_spec(backbone, weights)
    state, sha256 = load_state_dict(backbone, spec)
    model = build_loaded(backbone, spec.num_classes, state, builder_kwargs)
    if model is None:
        model = _build(backbone, spec.num_classes, builder_kwargs)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ZooError(
                f"weights {spec.tag!r} do not fit backbone {backbone.name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
                "check the weights' key conversion"
            )
    if num_classes is not None:
        replace_head(model, backbone.head, num_classes)
    model.zoo_weights = {"tag": spec.tag, "sha256": sha256,  # type: ignore[assignment]
                         "source": spec.source}
    return model


def model_for_task(backbone: Backbone, num_classes: int,
                   weights: str | os.PathLike[str] | Weights | None = None, *,
                   keep_head: bool = False, **builder_kwargs: Any) -> nn.Module:
    """``create_model`` for a new task, as training builds it: on pretrained weights the head
    is always new, even one that already has ``num_classes`` outputs (the source task's
    classifier would start confidently wrong: CIFAR-10 -> MNIST, digits 0-4 -> 5-9), unless
    ``keep_head``."""
    model = create_model(backbone, num_classes=num_classes, weights=weights, **builder_kwargs)
    if model.zoo_weights is not None and not keep_head:
        replace_head(model, backbone.head, num_classes, force=True)
    return model


def _build(backbone: Backbone, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    if kwargs:
        backbone = dataclasses.replace(backbone,
                                       builder_kwargs={**backbone.builder_kwargs, **kwargs})
    model = backbone.build(num_classes)
    model.zoo_backbone = backbone.name  # type: ignore[assignment]
    return model


def build_loaded(backbone: Backbone, num_classes: int | None, state: dict[str, torch.Tensor],
                 builder_kwargs: dict[str, Any] | None = None) -> nn.Module | None:
    """The model with ``state`` as its tensors, built without running its initialisers.

    Random initialisation is wasted work when every tensor is overwritten (0.7 s of a
    ViT-B/16 build on 2 CPUs), so the model is built on the meta device and the state's
    tensors are assigned in. Returns None (build normally instead) when that is not exactly
    equivalent: the builder fails on meta, the state does not cover every tensor with the
    right shape, or the model has non-persistent buffers or shared parameters. Also None
    while ``torch._dynamo`` is not imported: initialisers on the meta device import it
    (1-1.5 s), which only pays off once something else has (any ``torch.optim`` optimizer).
    """
    if "torch._dynamo" not in sys.modules:
        return None
    try:
        with torch.device("meta"):
            model = _build(backbone, num_classes, dict(builder_kwargs or {}))
    except Exception:  # a builder that computes with real tensors; the normal build works
        return None
    own = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    shared = len(list(model.named_parameters(remove_duplicate=False))) != \
        len(list(model.named_parameters()))
    if (shared or set(state) != set(own) or not buffers <= set(own)
            or any(state[k].shape != own[k].shape for k in own)):
        return None
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, target in own.items():
        # Each tensor becomes a parameter trained in place: it must own its memory.
        tensor = state[key].detach().to(target.dtype)
        alone = (tensor.is_contiguous() and tensor.untyped_storage().data_ptr() not in storages
                 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
        tensors[key] = tensor if alone else tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensors[key].untyped_storage().data_ptr())
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def model_from_config(config: Mapping[str, Any], strategy: FreezeStrategy | None = None, *,
                      pretrained: bool = True, meta: bool = False,
                      allow_untrusted_base: bool = False,
                      fresh: set[str] | None = None) -> nn.Module:
    """The model a checkpoint's config.json describes, before its own tensors are loaded.

    Its backbone with ``builder_kwargs``, the base weights it was trained from (the exact
    file, checked by sha256; skipped with ``pretrained=False``), a head of ``num_classes``,
    then ``strategy.prepare`` (adapters). ``meta`` builds on the meta device: names and
    shapes only, nothing fetched. Base weights that are not a registered tag of the backbone
    are refused unless ``allow_untrusted_base``. ``fresh``, if given, receives the names of
    the tensors that do not come from the weights (a new head, adapters): random at every
    build, so a delta checkpoint must hold them.
    """
    spec = get_backbone(config["backbone"])
    kwargs = dict(config.get("builder_kwargs") or {})
    num_classes = config["num_classes"]
    weights = config.get("weights") if pretrained else None
    loaded: set[int] = set()
    if meta:
        with torch.device("meta"):
            model = _build(spec, None if weights else num_classes, kwargs)
    elif weights:
        model = _base_model(spec, weights, kwargs, allow_untrusted_base)
        loaded = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    else:
        model = create_model(spec, num_classes=num_classes, **kwargs)
    if weights:
        replace_head(model, spec.head, num_classes)
    if strategy is not None:
        model = strategy.prepare(model, spec.layer_groups(model))
    if fresh is not None:
        fresh.update(k for k, t in model.state_dict().items()
                     if t.numel() and t.data_ptr() not in loaded)
    return model


def _base_model(spec: Backbone, weights: Mapping[str, Any], kwargs: dict[str, Any],
                allow_untrusted_base: bool) -> nn.Module:
    """The backbone with a config's base ``weights`` ({tag, sha256, source}) loaded, refused
    unless they are the very file (sha256) the checkpoint was trained from."""
    tag = weights.get("tag")
    target = tag
    if tag not in {w.tag for w in spec.weights}:
        source = weights.get("source", "")
        if not allow_untrusted_base:
            raise CheckpointError(
                f"the checkpoint's base weights ({source or tag!r}) are not a registered "
                f"weights tag of {spec.name!r}; pass allow_untrusted_base=True only if "
                "you trust where it points"
            )
        target = source.removeprefix("file:")
    try:
        model = create_model(spec, weights=target, **kwargs)
    except WeightsError as exc:
        raise CheckpointError(
            f"cannot rebuild the base weights {tag!r} of {spec.name!r} that this delta "
            f"checkpoint applies to: {exc}"
        ) from exc
    actual = (model.zoo_weights or {}).get("sha256")
    if weights.get("sha256") and actual != weights["sha256"]:
        raise CheckpointError(
            f"base weights {tag!r} of {spec.name!r} have sha256 {actual[:12]}..., but the "
            f"checkpoint was trained from {weights['sha256'][:12]}...; it needs the exact "
            "base weights it was made from"
        )
    return model


def layer_groups(name: str | Backbone) -> list[str]:
    """The backbone's layer-group names in order, input to output, ``head`` last."""
    backbone = get_backbone(name) if isinstance(name, str) else name
    return [g.name for g in backbone.layer_groups()]


def assign_groups(model: nn.Module, groups: Sequence[LayerGroup],
                  backbone_name: str = "model") -> dict[str, str]:
    """Map every parameter name to its group's name; each must belong to exactly one group."""
    owner: dict[str, str] = {}
    problems: list[str] = []
    for pname, _ in model.named_parameters():
        found = [g.name for g in groups if g.owns(pname)]
        if len(found) != 1:
            problems.append(f"{pname} in {found or 'no group'}")
        else:
            owner[pname] = found[0]
    if problems:
        raise IncompatibleError(
            f"layer groups of {backbone_name!r} must cover every parameter exactly once: "
            + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        )
    return owner


def transforms_for(name: str | Backbone, weights: str | Weights | None = "default", *,
                   augment: bool = False) -> BatchTransform:
    """The eval (or augmented train) transform matching the backbone's weights' preprocessing,
    built by the one factory, ``zoo.data.transforms.transform_from_config``."""
    return transform_from_config(preprocessing_for(name, weights), augment=augment)


def preprocessing_for(name: str | Backbone, weights: str | Weights | None = "default"
                      ) -> dict[str, Any]:
    """The ``preprocessing`` config (input size, mean, std, crop_pct, interpolation) of a
    backbone's weights: the registered weights' own, else the backbone's defaults."""
    backbone = get_backbone(name) if isinstance(name, str) else name
    plain = {"input_size": backbone.input_size, "mean": backbone.mean, "std": backbone.std}
    if weights is None or (weights == "default" and backbone.default_weights is None):
        return plain
    if isinstance(weights, str | os.PathLike) and Path(weights).suffix:
        # A file: the preprocessing of the registered weights it holds (by sha256), if any.
        weights = registered_for_path(backbone, weights)  # type: ignore[assignment]
        if weights is None:
            return plain
    spec = weights_spec(backbone, weights)
    crop = spec.input_size[-1] / spec.resize_size if spec.resize_size else 1.0
    return {"input_size": spec.input_size, "mean": spec.mean, "std": spec.std,
            "crop_pct": min(crop, 1.0), "interpolation": spec.interpolation
            if spec.interpolation in ("bilinear", "bicubic") else "bilinear"}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
