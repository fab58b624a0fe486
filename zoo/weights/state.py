"""Reading a weights file as a state dict: safetensors or a plain pickle, never code.

Pickles load with ``torch.load(weights_only=True)``; a file holding a wrapped state dict
(``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped, and a registered ``convert``
function maps another library's key names onto the backbone's.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from zoo.core.errors import WeightsError
from zoo.core.spec import Backbone, Weights, resolve_callable


def read_file(path: Path, name: str | None = None) -> Any:
    """What a weights file holds: safetensors, or a pickle loaded with ``weights_only=True``.

    The format follows the suffix of ``name`` (default: the file's own name).
    """
    try:
        if Path(name or path.name).suffix == ".safetensors":
            return load_file(path, device="cpu")
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path} holds objects that torch.load(weights_only=True) refuses: zoo never "
            "unpickles code; re-save it as a plain state dict or as safetensors"
        ) from exc
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights {path} ({type(exc).__name__}: {exc}); it may be "
            "truncated or corrupt: delete it and fetch again"
        ) from exc


def is_tensor_map(obj: Any) -> bool:
    """Whether ``obj`` is a mapping of string names to tensors (a state dict)."""
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def as_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``obj`` if it is a state dict, or its single 'state_dict' / 'model' state dict."""
    if is_tensor_map(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        inner = [k for k in ("state_dict", "model") if is_tensor_map(obj.get(k))]
        if len(inner) == 1:
            return dict(obj[inner[0]])
    what = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{source} holds {what}, not a state dict of tensors: declare the weights with a "
        "convert function that extracts one"
    )


def converted_state(backbone: Backbone, spec: Weights, obj: Any, path: Path
                    ) -> dict[str, torch.Tensor]:
    """``obj`` (a loaded weights file) as a state dict, through ``spec.convert`` if any."""
    if spec.convert is None:
        return as_state_dict(obj, spec.source)
    try:
        state = resolve_callable(spec.convert)(obj)
    except (ValueError, KeyError) as exc:
        raise WeightsError(
            f"weights {spec.tag!r} of {backbone.name!r}: the key conversion failed on "
            f"{path}: {exc}"
        ) from exc
    if not is_tensor_map(state):
        raise WeightsError(
            f"weights {spec.tag!r} of {backbone.name!r}: convert {spec.convert!r} must return "
            "a dict of name -> tensor"
        )
    return dict(state)

