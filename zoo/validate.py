"""Validation of untrusted input: checkpoint configs, safetensors headers, finetune arguments.

Everything here reads bytes and JSON only; nothing is executed or unpickled. Each problem
raises ``CheckpointError`` with a message that starts "checkpoint is corrupt:" (damaged
bytes) or names the field that is wrong. The limits below bound what a small hostile file
can make zoo allocate; each is well above what any real model uses (the largest label set
among timm's 1,800 pretrained configs is Bamboo's 115,217 classes, the largest input 1024
pixels a side, the smallest crop_pct 0.875; real headers are a few hundred KB).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zoo.errors import CheckpointError, ZooError

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 16 * 1024 * 1024  # about 100,000 tensors; real models have < 5,000
MAX_TENSOR_DIMS = 32
MAX_CLASSES = 200_000  # a resnet50 head of this size is 1.6 GB
MAX_INPUT_SIDE = 4096  # pixels, for input sides, the resize before the crop, and image_size
MAX_CHANNELS = 16  # grey, RGB(A), multispectral (Sentinel-2 has 13 bands)
MIN_CROP_PCT = 0.05


def validate_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a safetensors file's header against its size; return the parsed header.

    Checks: the 8-byte header length fits the file, the header is a JSON object, each
    tensor has a known dtype, a non-negative integer shape and offsets that match
    ``prod(shape) * dtype size``, lie inside the data area and neither overlap nor leave gaps.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"checkpoint is corrupt: {path} is {size} bytes, too short "
                                  "for a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"checkpoint is corrupt: {path} declares a {header_len}-byte "
                                  f"header but the file has {size} bytes (truncated?)")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"checkpoint is corrupt: {path} declares a {header_len}-byte "
                                  f"header; zoo reads headers up to {MAX_HEADER_BYTES} bytes")
        raw = handle.read(header_len)
    return validate_header(raw, size - 8 - header_len, str(path))


def validate_header(raw: bytes, data_len: int, where: str = "file") -> dict[str, Any]:
    """Validate a safetensors JSON header describing a data area of ``data_len`` bytes."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint is corrupt: {where}: {what}")

    if len(raw) > MAX_HEADER_BYTES:
        raise corrupt(f"the header has {len(raw)} bytes; zoo reads headers up to "
                      f"{MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise corrupt("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise corrupt("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise corrupt(f"tensor {name!r} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
        ):
            raise corrupt(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets
        )):
            raise corrupt(f"tensor {name!r} has bad data_offsets {offsets!r}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise corrupt(f"tensor {name!r} lies outside the data ({start}..{end} of "
                          f"{data_len} bytes; truncated?)")
        if end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise corrupt(f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
        spans.append((start, end, name))
    spans.sort()
    position = 0
    for start, end, name in spans:
        if start != position:
            raise corrupt(f"tensor {name!r} overlaps another or leaves a gap at byte {start}")
        position = end
    if position != data_len:
        raise corrupt(f"the data area has {data_len} bytes but the tensors use {position}")
    return header


def _require(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Any,
             optional: bool = False) -> Any:
    value = config.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CheckpointError(f"{path}: field {key!r} must be {names}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number that is not a bool and not NaN or infinite."""
    return _is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                              and math.isfinite(value))


def is_plain(value: Any, depth: int = 0) -> bool:
    """JSON-like data (lists, tuples, string-keyed dicts, at most 4 deep) whose numbers are
    finite: what a strategy option may hold."""
    if isinstance(value, list | tuple):
        return depth < 4 and all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth < 4 and all(isinstance(k, str) and is_plain(v, depth + 1)
                                 for k, v in value.items())
    return value is None or isinstance(value, str | bool) or _is_number(value)


def validate_config(config: Any, path: Any = "config.json") -> dict[str, Any]:
    """Check a checkpoint's config.json against the schema zoo writes; return it.

    Sizes are bounded (``MAX_CLASSES``, ``MAX_INPUT_SIDE``...) so that a small hostile
    config cannot make zoo allocate gigabytes before anything else is checked.
    """
    from zoo.checkpoint import FORMAT_VERSION

    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = config.get("format_version", 1)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        known = "1" if FORMAT_VERSION == 1 else f"1 to {FORMAT_VERSION}"
        raise CheckpointError(f"{path}: format_version {_short(version)} is not one this zoo "
                              f"reads (it reads {known}); a newer zoo may")
    _require(config, "backbone", str, path)
    num_classes = _require(config, "num_classes", int, path)
    if not 1 <= num_classes <= MAX_CLASSES:
        raise CheckpointError(f"{path}: num_classes must be between 1 and {MAX_CLASSES}, "
                              f"got {num_classes}")
    kind = _require(config, "kind", str, path)
    if kind not in ("full", "delta"):
        raise CheckpointError(f"{path}: kind must be 'full' or 'delta', got {_short(kind)}")
    names = _require(config, "class_names", list, path, optional=True)
    if names is not None and (len(names) != num_classes
                              or not all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: class_names must be {num_classes} strings")
    weights = _require(config, "weights", dict, path, optional=True)
    if kind == "delta" and not weights:
        raise CheckpointError(f"{path}: a delta checkpoint must name its base weights")
    if weights:
        _require(weights, "tag", str, path)
        sha = _require(weights, "sha256", str, path, optional=True)
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise CheckpointError(f"{path}: weights.sha256 must be 64 hex digits")
        _require(weights, "source", str, path, optional=True)
    strategy = _require(config, "strategy", dict, path, optional=True)
    if strategy is not None:
        _require(strategy, "name", str, path)
        options = _require(strategy, "options", dict, path, optional=True)
        if options and not all(is_plain(v) for v in options.values()):
            raise CheckpointError(f"{path}: strategy.options values must be strings, finite "
                                  "numbers or lists of them")
    _require(config, "prepared", bool, path, optional=True)
    pre = _require(config, "preprocessing", dict, path, optional=True)
    if pre is not None:
        _check_preprocessing(pre, path)
    kwargs = _require(config, "builder_kwargs", dict, path, optional=True)
    if kwargs:
        _check_builder_kwargs(kwargs, path)
    files = _require(config, "files", dict, path, optional=True)
    if files:
        for name, digest in files.items():
            if not isinstance(digest, str) or len(digest) != 64:
                raise CheckpointError(f"{path}: files[{name!r}] must be a sha256 hex digest")
    return config


def _check_preprocessing(pre: Mapping[str, Any], path: Any) -> None:
    """Input size, mean/std, crop and interpolation: bounded, so resizing stays small."""
    size = pre.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(d) for d in size)
            and 1 <= size[0] <= MAX_CHANNELS and all(1 <= d <= MAX_INPUT_SIDE for d in size[1:])):
        raise CheckpointError(f"{path}: preprocessing.input_size must be [C, H, W] with C "
                              f"from 1 to {MAX_CHANNELS} and H, W from 1 to {MAX_INPUT_SIDE}, "
                              f"got {_short(size)}")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not (isinstance(values, list) and len(values) == size[0]
                and all(_is_number(v) for v in values)) or (
                key == "std" and any(v <= 0 for v in values)):
            raise CheckpointError(f"{path}: preprocessing.{key} must be {size[0]} numbers"
                                  + (" > 0" if key == "std" else ""))
    crop = pre.get("crop_pct", 1.0)
    if not (_is_number(crop) and MIN_CROP_PCT <= crop <= 1
            and max(size[1:]) / crop <= MAX_INPUT_SIDE):
        raise CheckpointError(f"{path}: preprocessing.crop_pct must be a number from "
                              f"{MIN_CROP_PCT} to 1 that keeps the resize (side / crop_pct) "
                              f"within {MAX_INPUT_SIDE} pixels, got {_short(crop)}")
    if pre.get("interpolation", "bilinear") not in ("bilinear", "bicubic"):
        raise CheckpointError(f"{path}: preprocessing.interpolation must be 'bilinear' or "
                              f"'bicubic', got {_short(pre.get('interpolation'))}")


def _check_builder_kwargs(kwargs: Mapping[str, Any], path: Any) -> None:
    """Plain finite values; sizes (``image_size``, ``patch_size``...) within the input bound."""
    for key, value in kwargs.items():
        if not (isinstance(value, str | bool) or _is_number(value)):
            raise CheckpointError(f"{path}: builder_kwargs values must be plain finite numbers "
                                  f"or strings, got {key}={_short(value)}")
        if key.endswith("size") and not (_is_int(value) and 1 <= value <= MAX_INPUT_SIDE):
            raise CheckpointError(f"{path}: builder_kwargs.{key} must be a whole number from 1 "
                                  f"to {MAX_INPUT_SIDE}, got {_short(value)}")


# --------------------------------------------------------------------------- API arguments

Rule = tuple[Callable[[Any], bool], str]
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1


def _int_in(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low and (high is None or v <= high)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and str(value) != ""


def _checkpoint_kind(value: Any) -> bool:
    from zoo.checkpoint import CHECKPOINT_KINDS

    return isinstance(value, str) and value in CHECKPOINT_KINDS


def _is_flag(value: Any) -> bool:
    return isinstance(value, bool)


FINETUNE_RULES: dict[str, Rule] = {
    "backbone": (lambda v: (isinstance(v, str) and v != "") or hasattr(v, "layer_groups"),
                 "a backbone name or a zoo.Backbone"),
    "strategy": (lambda v: (isinstance(v, str) and v != "") or hasattr(v, "plan"),
                 "a strategy name or a FreezeStrategy"),
    "train": (lambda v: v is not None, "a dataset name, a folder, an (x, y) pair or a Dataset"),
    "epochs": (_int_in(1, MAX_EPOCHS), f"a whole number from 1 to {MAX_EPOCHS}"),
    "batch_size": (_int_in(1), "a whole number >= 1"),
    "lr": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "weights": (_optional(_is_path), "a weights tag, a file path or None"),
    "num_classes": (_optional(_int_in(1, MAX_CLASSES)),
                    f"None or a whole number from 1 to {MAX_CLASSES}"),
    "strategy_options": (_optional(lambda v: isinstance(v, Mapping) and all(
        isinstance(k, str) and is_plain(x) for k, x in v.items())),
        "None or a dict of option names to strings, finite numbers or lists of them"),
    "output_dir": (_optional(lambda v: _is_path(v) and (Path(v).is_dir()
                                                        or not os.path.lexists(v))),
                   "a folder path, not an existing file"),
    "resume": (_optional(_is_path), "None or the folder of an earlier run"),
    "seed": (_int_in(0, MAX_SEED), f"a whole number from 0 to {MAX_SEED}"),
    "scheduler": (lambda v: v is None or callable(v) or (isinstance(v, str) and v in (
        "cosine", "linear", "step", "onecycle", "constant")),
        "'cosine', 'linear', 'step', 'onecycle', 'constant', None or a callable "
        "optimizer -> scheduler"),
    "augment": (lambda v: isinstance(v, bool) or (isinstance(v, str) and v in (
        "none", "light", "standard", "strong")) or callable(v),
        "True, False, 'none', 'light', 'standard', 'strong', an Augmentation or a "
        "torchvision v2 transform"),
    "optimizer": (lambda v: isinstance(v, str) and v in ("adamw", "sgd"), "'adamw' or 'sgd'"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number from 0 to below 1"),
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1,
                        "a number from 0 to below 1"),
    "warmup_epochs": (lambda v: _is_number(v) and 0 <= v <= MAX_EPOCHS,
                      "a number of epochs >= 0 (fractions allowed)"),
    "accumulate": (_int_in(1, 4096), "a whole number of batches from 1 to 4096"),
    "clip_grad": (_optional(lambda v: _is_number(v) and v > 0), "None or a number > 0"),
    "ema": (_optional(lambda v: _is_number(v) and 0 < v < 1),
            "None or an EMA decay between 0 and 1 (e.g. 0.999)"),
    "loggers": (_optional(lambda v: isinstance(v, list | tuple) and all(
        isinstance(n, str) and n for n in v)), "None or a list of logger names"),
    "limit_per_class": (_optional(_int_in(1)), "None or a whole number >= 1"),
    "cache_memory": (_optional(_int_in(0)), "None or a number of bytes >= 0"),
    "cache_views": (_int_in(0), "a whole number >= 0"),
    "checkpoint_kind": (_checkpoint_kind, "'auto', 'delta' or 'full'"),
    "num_workers": (_optional(_int_in(0)), "None (automatic) or a whole number >= 0"),
    "builder_kwargs": (_optional(lambda v: isinstance(v, Mapping) and all(
        isinstance(k, str) for k in v)), "None or a dict of keyword arguments"),
    "image_size": (_optional(_int_in(1, MAX_INPUT_SIDE)),
                   f"None or a whole number from 1 to {MAX_INPUT_SIDE}"),
    "callbacks": (lambda v: isinstance(v, list | tuple), "a list of Callback objects"),
    "amp": (_optional(_is_flag), "True, False or None"),
    "keep": (lambda v: isinstance(v, str) and v in ("best", "last"), "'best' or 'last'"),
    "patience": (_optional(_int_in(1, MAX_EPOCHS)),
                 f"None or a whole number of epochs from 1 to {MAX_EPOCHS}"),
    "channels_last": (_optional(_is_flag), "True, False or None"),
    **{flag: (_is_flag, "True or False")
       for flag in ("strict", "cache", "quiet", "compile", "keep_head",
                    "overwrite")},
}


def check_arguments(values: Mapping[str, Any],
                    rules: Mapping[str, Rule] = FINETUNE_RULES) -> None:
    """Raise ``ZooError`` for the first of ``values`` that breaks its rule (unknown names
    pass); called before anything is built, so a bad argument costs nothing."""
    for name, (ok, wanted) in rules.items():
        if name in values and not ok(values[name]):
            raise ZooError(f"{name} must be {wanted}, got {_short(values[name])}")
