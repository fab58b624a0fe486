"""Reading a PEFT LoRA adapter folder back into a zoo model (``zoo.load_peft_adapter``).

The tensors map onto zoo's LoRA adapters as ``zoo.deploy.peft_interop`` describes. The folder
may come from a stranger: its files are read without following links, the safetensors
header is checked before any tensor is read, the rank is bounded, PEFT features zoo's LoRA
does not have are refused, and every tensor must fit the base model exactly.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from zoo.core.errors import CheckpointError, ZooError
from zoo.deploy.peft_interop import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    check_peft_layer,
    lora_adapters,
)
from zoo.models.build import create_model, replace_head
from zoo.models.strategy import make_strategy
from zoo.persist.config import check_checkpoint_kwargs, config_from_model
from zoo.persist.validate import validate_config, validate_safetensors
from zoo.plugins.registry import get_backbone

_MAX_CONFIG_BYTES = 1024 * 1024
MAX_RANK = 1024  # as zoo's LoRA: a rank from a stranger's file must not allocate gigabytes


def load_peft_adapter(folder: str | os.PathLike[str], base: str | nn.Module | None = None, *,
                      weights: str | None = None) -> nn.Module:
    """A zoo model with the PEFT LoRA adapter in ``folder`` applied to its base, in eval mode.

    ``base`` is a registered backbone name or a model built by zoo (adapted in place); by
    default the backbone zoo recorded in the adapter. The base weights are ``weights``, else
    those recorded, else the backbone's default. The result carries a zoo config, so
    ``zoo.save_checkpoint`` and ``zoo.export`` work on it.
    """
    folder = Path(folder)
    config, tensors, meta = _read_adapter(folder)
    rank, alpha = _lora_settings(config, folder)
    adapted = {k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors
               if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not adapted:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    plain = {k[len(PREFIX):]: v for k, v in tensors.items()
             if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    model, zoo_config = _base_model(base, weights, meta, plain, folder)
    for path in sorted(adapted):
        _require_module(model, path, folder)
        check_peft_layer(model, path)
    strategy = _prepare(model, zoo_config, rank, alpha, sorted(adapted), folder)
    _load_adapters(model, tensors, rank, folder)
    _load_plain(model, plain, folder)
    zoo_config.update(strategy={"name": strategy.name, "options": strategy.options()},
                      prepared=True)
    model.zoo_config = zoo_config  # type: ignore[assignment]
    return model.eval()


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """adapter_config.json, the tensors and zoo's metadata (empty if none), read without
    following links out of the folder and with the safetensors header checked first."""
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder (a folder holding "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with _open_plain(folder, ADAPTER_CONFIG) as handle:
        raw = handle.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    with _open_plain(folder, ADAPTER_WEIGHTS) as handle:
        alias = f"/proc/self/fd/{handle.fileno()}"
        where = str(folder / ADAPTER_WEIGHTS)
        try:
            validate_safetensors(alias)
            with safe_open(alias, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(alias, where)) from None
        except Exception as exc:
            raise CheckpointError(f"{where} is corrupt: {type(exc).__name__}") from None
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0][:80]!r} does not start with {PREFIX!r}, "
                              "so it is not a PEFT adapter saved by save_pretrained")
    return config, tensors, _zoo_metadata(metadata.get("zoo"), where)


@contextlib.contextmanager
def _open_plain(folder: Path, name: str) -> Any:
    """Open ``folder/name`` for reading, refusing a link or anything but a regular file."""
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: it has no {name}") \
            from None
    except OSError:
        raise CheckpointError(f"{folder / name} is a symbolic link or cannot be read: zoo reads "
                              "only plain files in an adapter folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{folder / name} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        yield handle


def _zoo_metadata(text: str | None, where: str) -> dict[str, Any]:
    """The zoo config recorded by ``export_peft``, validated like a config.json."""
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: its 'zoo' metadata is not valid JSON") from None
    return validate_config(meta, f"{where} (zoo metadata)")


def _lora_settings(config: Mapping[str, Any], folder: Path) -> tuple[int, float]:
    """``(rank, zoo alpha)`` from adapter_config.json; PEFT features zoo lacks are refused."""
    where = folder / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {str(config.get('peft_type'))[:40]!r}; "
                              "zoo reads LoRA adapters only")
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise CheckpointError(f"{where}: r must be a whole number from 1 to {MAX_RANK}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"{where}: lora_alpha must be a finite number above 0")
    unsupported = [key for key, ok in (
        ("use_dora", not config.get("use_dora")), ("bias", config.get("bias", "none") == "none"),
        ("lora_bias", not config.get("lora_bias")),
        ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("rank_pattern", not config.get("rank_pattern")),
        ("alpha_pattern", not config.get("alpha_pattern")),
        ("target_parameters", not config.get("target_parameters")),
        ("layer_replication", not config.get("layer_replication"))) if not ok]
    if unsupported:
        raise CheckpointError(f"{where}: {unsupported[0]} is set, which zoo's LoRA does not "
                              "support (one rank and alpha, adapters on weights only)")
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); zoo by alpha / r
        alpha = alpha * math.sqrt(rank)
    return rank, float(alpha)


def _base_model(base: str | nn.Module | None, weights: str | None, meta: Mapping[str, Any],
                plain: Mapping[str, torch.Tensor], folder: Path) -> tuple[nn.Module, dict]:
    """The base model the adapter applies to, and its zoo config (from the adapter's)."""
    if isinstance(base, nn.Module):
        model = base
        name = getattr(model, "zoo_backbone", None) or (
            getattr(model, "zoo_config", None) or {}).get("backbone")
        if name is None:
            raise ZooError("base= must be a model built by zoo (zoo.create_model), or a "
                           "registered backbone name")
    else:
        name = base or meta.get("backbone")
        if name is None:
            raise ZooError(f"{folder} was not written by zoo, so it does not say its base: pass "
                           "base='BACKBONE' (a registered name) and weights='TAG'")
    spec = get_backbone(name)
    recorded = meta.get("weights") or {}
    if not isinstance(base, nn.Module):
        kwargs = dict(meta.get("builder_kwargs") or {}) if name == meta.get("backbone") else {}
        check_checkpoint_kwargs(spec, kwargs, str(folder))
        tag = weights or (recorded.get("tag") if name == meta.get("backbone") else None) \
            or spec.default_weights
        if tag is None:
            raise ZooError(f"backbone {name!r} has no default weights: pass weights='TAG', the "
                           "base weights the adapter was trained on")
        model = create_model(spec, weights=tag, **kwargs)
    actual = (getattr(model, "zoo_weights", None) or {}).get("sha256")
    if recorded.get("sha256") and actual and actual != recorded["sha256"] \
            and name == meta.get("backbone"):
        raise CheckpointError(f"the base weights have sha256 {actual[:12]}..., but the adapter in "
                              f"{folder} was trained on {recorded['sha256'][:12]}...; it needs "
                              "the exact base weights it was made from")
    head = plain.get(f"{spec.head}.weight")
    if head is not None and head.dim() == 2 \
            and model.get_submodule(spec.head).weight.shape != head.shape:
        replace_head(model, spec.head, int(head.shape[0]))
    config = config_from_model(model)
    if getattr(model, "zoo_config", None):
        config.update({k: v for k, v in model.zoo_config.items()
                       if k in ("class_names", "preprocessing", "builder_kwargs", "dataset")})
    if meta and name == meta.get("backbone"):
        config.update({k: meta[k] for k in ("preprocessing", "builder_kwargs", "dataset")
                       if meta.get(k)})
        if meta.get("class_names") and len(meta["class_names"]) == config["num_classes"]:
            config["class_names"] = meta["class_names"]
    return model, config


def _require_module(model: nn.Module, path: str, folder: Path) -> None:
    try:
        model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} adapts {path[:80]!r}, which the base "
                              "model does not have: is it the adapter of another model?") \
            from None


def _prepare(model: nn.Module, config: Mapping[str, Any], rank: int, alpha: float,
             paths: list[str], folder: Path) -> Any:
    """Add zoo LoRA adapters to exactly ``paths`` (the ``modules`` option)."""
    spec = get_backbone(config["backbone"])
    groups = spec.layer_groups(model)
    head = next(g for g in groups if g.name == "head")
    in_head = [p for p in paths if head.owns(p + ".weight")]
    if in_head:
        raise CheckpointError(f"{folder}: the adapter adapts {in_head[0]!r} in the head; zoo's "
                              "LoRA trains the head fully instead (PEFT: modules_to_save)")
    strategy = make_strategy("lora", {"rank": rank, "alpha": alpha,
                                      "modules": [glob.escape(p) for p in paths]})
    strategy.check([g.name for g in groups], model, groups)
    strategy.prepare(model, groups)
    missed = sorted(set(paths) - set(lora_adapters(model)))
    if missed:
        raise CheckpointError(f"{folder}: zoo's LoRA cannot adapt {missed[0]!r} (outside the "
                              "backbone's layer groups?)")
    return strategy


def _load_adapters(model: nn.Module, tensors: Mapping[str, torch.Tensor], rank: int,
                   folder: Path) -> None:
    """Copy PEFT's A and B into zoo's adapters, after checking their shapes."""
    for path, delta in lora_adapters(model).items():
        weight = model.get_submodule(path).parametrizations.weight.original
        shapes = {"lora_A": (rank, *weight.shape[1:]),
                  "lora_B": (weight.shape[0], rank, *[1] * (weight.dim() - 2))}
        for name, shape in shapes.items():
            key = f"{PREFIX}{path}.{name}.weight"
            tensor = tensors.get(key)
            if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
                got = "missing" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {key[:100]} should be a "
                                      f"float tensor of shape {shape}, got {got}")
            with torch.no_grad():
                getattr(delta, name).copy_(tensor.reshape(getattr(delta, name).shape))


def _load_plain(model: nn.Module, plain: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Load the modules_to_save tensors (the head), which must fit the model exactly."""
    own = model.state_dict()
    for key, tensor in plain.items():
        if key not in own or own[key].shape != tensor.shape or (
                own[key].dtype != tensor.dtype
                and not (own[key].is_floating_point() and tensor.is_floating_point())):
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensor {PREFIX}{key[:80]} does not "
                                  "fit the base model (unknown name, shape or dtype)")
    model.load_state_dict(dict(plain), strict=False)
