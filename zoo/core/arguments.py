"""Rules every argument and config value must meet, checked before anything is built.

Pure Python (no torch): the same rules serve the Python API, the CLI, run files and the
checkpoint schema, so each bound is written once. The limits bound what a small hostile file
can make zoo allocate; each is well above what any real model uses.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zoo.core.errors import ZooError

CHECKPOINT_KINDS = ("auto", "delta", "full")
MAX_CLASSES = 200_000  # a resnet50 head of this size is 1.6 GB
MAX_INPUT_SIDE = 4096  # pixels, for input sides, the resize before the crop, and image_size
MAX_CHANNELS = 16  # grey, RGB(A), multispectral (Sentinel-2 has 13 bands)


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
