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
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoo.core.arguments import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_INPUT_SIDE,
    _is_int,
    _is_number,
    _short,
    is_plain,
)
from zoo.core.errors import CheckpointError
from zoo.persist.config import FORMAT_VERSION

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 16 * 1024 * 1024  # about 100,000 tensors; real models have < 5,000
MAX_TENSOR_DIMS = 32
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


def validate_config(config: Any, path: Any = "config.json") -> dict[str, Any]:
    """Check a checkpoint's config.json against the schema zoo writes; return it.

    Sizes are bounded (``MAX_CLASSES``, ``MAX_INPUT_SIDE``...) so that a small hostile
    config cannot make zoo allocate gigabytes before anything else is checked.
    """
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

