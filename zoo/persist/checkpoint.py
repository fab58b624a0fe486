"""Checkpoints: a directory with model.safetensors, config.json, metrics.json and README.md.

Two kinds. **full** holds every tensor. **delta** holds only the tensors that differ from
the pretrained base (trained parameters, BN statistics of trained groups, the head,
adapters); loading rebuilds the base from the registry (``zoo.models.build.model_from_config``)
and checks the sha256 of its weights file before applying the delta.

How the folder is written (staged, then moved into place), locked and read without
following links is ``zoo.persist.folder``; what config.json records is
``zoo.persist.config``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.core._io import file_sha256, write_text_atomic
from zoo.core.arguments import CHECKPOINT_KINDS
from zoo.core.errors import CheckpointError, UnknownNameError, ZooError
from zoo.models.build import build_loaded, model_from_config
from zoo.persist.card import model_card
from zoo.persist.config import (
    FORMAT_VERSION,
    add_export_config,
    base_is_registered,
    check_checkpoint_kwargs,
    check_rebuilds,
    checkpoint_backbone,
    config_from_model,
    not_for_timm,
    plugin_record,
    strategy_from_config,
    strategy_record,
)
from zoo.persist.folder import (
    CARD_FILE,
    CHECKPOINT_FILES,
    CONFIG_FILE,
    HISTORY_FILE,
    MARKER,
    METRICS_FILE,
    MODEL_FILE,
    STAGING,
    check_save_target,
    listed_files,
    open_checkpoint,
    recover,
)
from zoo.persist.locks import writer_lock
from zoo.persist.validate import validate_safetensors

if TYPE_CHECKING:
    from zoo.core.spec import Backbone


# --------------------------------------------------------------------------- saving


def _tensors_for_save(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, with tensors that share storage made independent."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ident is not None and ident in seen:
            t = t.clone()
        elif ident is not None:
            seen[ident] = key
        out[key] = t.contiguous()
    return out


def delta_state(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that are new or differ (in shape or value) from ``base``."""
    delta = {}
    for key, value in model.state_dict().items():
        ref = base.get(key)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype \
                or not torch.equal(ref.to(value.device), value):
            delta[key] = value
    return delta


def _delta_tensors(exported: nn.Module, config: Mapping[str, Any], strategy: Any,
                   prepared: bool) -> dict[str, torch.Tensor]:
    """What a delta stores: what differs from the rebuilt base, plus every tensor the base
    does not get from its weights (a new head, adapters), even if it happens to match."""
    fresh: set[str] = set()
    base = model_from_config(config, strategy if prepared else None, fresh=fresh).state_dict()
    tensors = delta_state(exported, base)
    state = exported.state_dict()
    tensors.update({key: state[key] for key in fresh if key in state and key not in tensors})
    return tensors


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    kind: str = "auto",
    metrics: Mapping[str, Any] | None = None,
    strategy: Any = None,
    history: Any = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a checkpoint directory and return its path.

    ``kind="delta"`` stores only what differs from the pretrained base; ``"full"`` stores
    every tensor; ``"auto"`` is a delta when the base can be rebuilt from the registry (a
    registered weights tag), else full. An explicit ``"delta"`` that cannot be one is saved
    full with a warning. The model must come from ``zoo.create_model``/``zoo.finetune`` (it
    carries its zoo config), or ``config`` must say which backbone it is. ``directory`` must
    be new, empty or a zoo checkpoint (which is replaced); a folder holding other files is
    refused, and so is a second save to the same folder while one runs.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ZooError(f"checkpoint kind must be 'auto', 'delta' or 'full', got {kind!r}")
    directory = Path(directory)
    check_save_target(directory, [n for n in CHECKPOINT_FILES
                                  if n != HISTORY_FILE or history is not None])
    config = dict(config or getattr(model, "zoo_config", None) or config_from_model(model))
    if strategy is not None:  # what loading needs to prepare the model the same way
        config["strategy"] = strategy_record(strategy)
    elif config.get("strategy"):
        strategy = strategy_from_config(config)
    exported = strategy.export(model) if strategy is not None else model
    names_base = set(model_from_config(config, meta=True).state_dict())
    prepared = set(exported.state_dict()) != names_base
    if prepared:
        check_rebuilds(exported, config, strategy)
    if kind != "full" and not base_is_registered(config):
        # Nobody could rebuild a random base or weights that are not a tag of the backbone
        # (a Backbone object's own weights, a local file): only a full checkpoint loads.
        if kind == "delta":
            base = config.get("weights") or {}
            warnings.warn(
                f"saving a full checkpoint, not the delta asked for: its base "
                f"({base.get('source') or base.get('tag') or 'random initialisation'}) is not "
                f"registered weights of backbone {config['backbone']!r}, so a delta could not "
                "be rebuilt elsewhere; register the weights in a plugin to get deltas",
                stacklevel=2)
        kind = "full"
    elif kind == "auto":
        kind = "delta"
    if kind == "delta":
        tensors = _delta_tensors(exported, config, strategy, prepared)
    else:
        tensors = exported.state_dict()
    config.update(kind=kind, prepared=prepared, format_version=FORMAT_VERSION)
    config["backbone_plugin"] = plugin_record(config["backbone"])
    add_export_config(config)
    config.setdefault("architecture", not_for_timm(config))
    _write_checkpoint(directory, _tensors_for_save(tensors), config, dict(metrics or {}),
                      history)
    return directory


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                      metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` with its header's metadata in sorted order.

    safetensors keeps the metadata in a hash map, so its order (and the file's bytes and
    sha256) would change from process to process; sorting it in place makes the same
    tensors give the same file, so a repeated run gives a bitwise identical checkpoint.
    """
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the same JSON in another order: it always fits
            handle.seek(8)
            handle.write(text.ljust(length))


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      metrics: dict[str, Any], history: Any) -> None:
    """Write the files into the staging folder, then move them into place (see ``recover``)."""
    directory.mkdir(parents=True, exist_ok=True)
    with writer_lock(directory, required=True):
        recover(directory)  # a save that died before: finish or discard it
        staging = directory / STAGING
        staging.mkdir()
        _save_safetensors(tensors, staging / MODEL_FILE,
                          {"format": "pt", "zoo_kind": config["kind"]})
        texts = {METRICS_FILE: json.dumps(metrics, indent=2, default=str) + "\n",
                 CARD_FILE: model_card(config, metrics)}
        if history is not None:
            texts[HISTORY_FILE] = json.dumps(history, indent=2, default=str) + "\n"
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        config["files"] = {name: file_sha256(staging / name) for name in (MODEL_FILE, *texts)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n",
                                           encoding="utf-8")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        # Only files the previous save listed are removed (never one zoo did not write).
        remove = sorted(set(CHECKPOINT_FILES) & (listed_files(directory) or set())
                        - set(config["files"]) - {CONFIG_FILE})
        moves = sorted(p.name for p in staging.iterdir())
        write_text_atomic(staging / MARKER, json.dumps({"files": moves, "remove": remove}))
        recover(directory)


# --------------------------------------------------------------------------- loading


def _fd_path(handle: BinaryIO) -> str:
    """A path naming the already open file itself (not whatever the name points to now)."""
    fd = handle.fileno()
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def _read_open_tensors(handle: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    """Load the open safetensors file after validating its header."""
    alias = _fd_path(handle)
    try:
        validate_safetensors(alias)
        return load_file(alias)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(alias, str(path))) from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path}: "
                              f"{str(exc).replace(alias, str(path))}") from None


def load_checkpoint(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    allow_untrusted_base: bool = False) -> nn.Module:
    """Load a checkpoint directory (full or delta) as an ``nn.Module`` in eval mode.

    A delta rebuilds its base from the registry and refuses a base whose weights file has
    a different sha256 than the one the checkpoint was trained from, and a delta that lacks
    a tensor the base does not provide. Tensors whose dtype the model does not use, and
    builder arguments the backbone does not declare safe, are refused; non-finite tensors
    load with a warning.
    """
    directory = Path(directory)
    with open_checkpoint(directory) as (config, handles):
        tensors = _read_open_tensors(handles[MODEL_FILE], directory / MODEL_FILE)
    spec = checkpoint_backbone(config, directory)
    check_checkpoint_kwargs(spec, config.get("builder_kwargs") or {}, str(directory))
    try:
        strategy = strategy_from_config(config) if config.get("prepared") else None
    except UnknownNameError as exc:
        raise CheckpointError(f"checkpoint needs strategy plugin: {exc}") from None
    if config["kind"] == "full":
        model = _load_full(spec, config, strategy, tensors, directory)
    else:
        fresh: set[str] = set()
        model = model_from_config(config, strategy, allow_untrusted_base=allow_untrusted_base,
                                  fresh=fresh)
        _check_delta(tensors, fresh, directory)
        _load_strict(model, tensors, directory, partial=True)
    _warn_non_finite(tensors, directory)
    model.zoo_config = config  # type: ignore[assignment]
    model.zoo_weights = config.get("weights")  # type: ignore[assignment]
    return model.to(device).eval()


def _load_full(spec: Backbone, config: Mapping[str, Any], strategy: Any,
               tensors: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    """A full checkpoint's model: built without random initialisation where possible
    (``build_loaded``), its tensors checked to fit the backbone exactly."""
    kwargs = dict(config.get("builder_kwargs") or {})
    if strategy is None:
        try:
            reference = model_from_config(config, pretrained=False, meta=True)
        except Exception:  # a builder that computes with real tensors: checked after the build
            reference = None
        if reference is not None:
            _check_fit(reference.state_dict(), tensors, directory, partial=False)
        loaded = build_loaded(spec, config["num_classes"], tensors, kwargs)
        if loaded is not None:
            return loaded
    model = model_from_config(config, strategy, pretrained=False)
    _load_strict(model, tensors, directory, partial=False)
    return model


def _check_delta(tensors: Mapping[str, torch.Tensor], fresh: set[str], directory: Path) -> None:
    """Refuse an empty delta, or one missing tensors the base would fill with random values."""
    if not tensors:
        raise CheckpointError(f"checkpoint {directory} is an empty delta: it holds no tensors, "
                              "so it is not a trained model; save it again from the model")
    missing = sorted(fresh - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {directory} is a partial delta: it lacks "
                              f"{len(missing)} tensors its base does not provide (e.g. "
                              f"{missing[:3]}), which would load random; save it again")


def _dtype_fits(tensor: torch.Tensor, own: torch.Tensor) -> bool:
    """The same dtype, or a narrower float (F16/BF16 weights load into F32 without loss)."""
    return tensor.dtype == own.dtype or (
        tensor.is_floating_point() and own.is_floating_point()
        and tensor.element_size() < own.element_size())


def _check_fit(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
               directory: Path, partial: bool) -> None:
    """Refuse tensors the model does not have, or has with another shape or dtype."""
    unknown = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and own[k].shape != tensors[k].shape]
    dtypes = [f"{k} is {tensors[k].dtype}, not {own[k].dtype}" for k in tensors
              if k in own and not _dtype_fits(tensors[k], own[k])]
    missing = [] if partial else [k for k in own if k not in tensors]
    if unknown or wrong or dtypes or missing:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its backbone: "
            + "; ".join(part for part in (
                f"unknown tensors {unknown[:3]}" if unknown else "",
                f"wrong shapes {wrong[:3]}" if wrong else "",
                f"wrong dtypes {dtypes[:3]}" if dtypes else "",
                f"missing tensors {missing[:3]}" if missing else "") if part)
        )


def _load_strict(model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path,
                 partial: bool) -> None:
    _check_fit(model.state_dict(), tensors, directory, partial)
    model.load_state_dict(tensors, strict=False)


def _warn_non_finite(tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Warn that a checkpoint holds NaN or infinite values: its predictions are not numbers."""
    bad = sum(1 for t in tensors.values()
              if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()))
    if bad:
        warnings.warn(f"checkpoint {directory} has {bad} tensors with NaN or infinite values: "
                      "its outputs will not be numbers (it was saved from a diverged run?)",
                      RuntimeWarning, stacklevel=3)
