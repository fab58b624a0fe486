"""Pretrained weights: one path for every backbone, from what the user names to a state dict.

what the user names (a tag, "default", a spec, a file) -> ``weights_spec`` -> ``fetch``
(``zoo.weights.download``: download or cache hit, sha256 check) -> ``read_file`` and key
conversion (``zoo.weights.state``) -> the state dict ``create_model`` loads. The source
kinds are ``zoo.weights.sources``; the cache's records, limits and checks
``zoo.weights.cache``; ``import_weights`` (``zoo.weights.importing``) puts a file carried
in by hand where a download would have put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.core.errors import UnknownNameError, WeightsError
from zoo.core.spec import Backbone, Weights, resolve_callable
from zoo.plugins.registry import get_backbone
from zoo.weights.cache import path_sha256, recorded_sha256, registered_match
from zoo.weights.download import fetch, fetch_with_sha256
from zoo.weights.importing import import_file
from zoo.weights.sources import cached_path, expected_sha256, source_kind, user_path
from zoo.weights.state import as_state_dict, converted_state, is_tensor_map, read_file


def weights_spec(backbone: Backbone, weights: str | os.PathLike[str] | Weights) -> Weights:
    """The ``Weights`` meant by ``weights``: a spec, a tag, "default", or a local file.

    A file (a path, ``file:PATH`` or ``file:///PATH``) whose sha256 is one of the backbone's
    registered weights is that tag: it is imported into the cache (see ``import_weights``)
    and gets the tag's converter and preprocessing. Any other file becomes
    ``Weights(tag=<its absolute path>, source="file:<path>")`` with the backbone's
    preprocessing, the first of the backbone's converters that makes it fit (if it needs
    one), and ``num_classes`` read from its head weight.
    """
    if isinstance(weights, Weights):
        return weights
    tags = [w.tag for w in backbone.weights]
    if isinstance(weights, str) and (weights == "default" or weights in tags):
        return backbone.get_weights(weights)
    path = user_path(weights)
    if path is not None:
        if not path.is_file():
            raise WeightsError(f"no weights file at {path}: check the path")
        sha256 = path_sha256(path)
        registered = registered_match(backbone, sha256)
        if registered is None:
            return _local_spec(backbone, path, sha256)
        if source_kind(registered.source) in ("file", "package"):
            return dataclasses.replace(registered, source=f"file:{path}")
        cached = cached_path(registered)
        if cached is None or recorded_sha256(cached) != sha256:
            import_file(backbone, registered, path)
        return registered
    raise UnknownNameError.for_name(
        "weights tag", str(weights), tags,
        context=f" for backbone {backbone.name!r} (it has: {', '.join(tags) or 'none'}; "
        "or pass a path to a weights file)",
    )


def _local_spec(backbone: Backbone, path: Path, sha256: str) -> Weights:
    """The spec of a file that is none of the backbone's registered weights."""
    obj = read_file(path)
    head = f"{backbone.head}.weight"
    plain = None
    with contextlib.suppress(WeightsError):
        plain = as_state_dict(obj, f"file:{path}")
    candidates: list[tuple[Any, Any]] = [(None, plain)]
    for convert in dict.fromkeys(w.convert for w in backbone.weights if w.convert is not None):
        try:
            candidates.append((convert, resolve_callable(convert)(obj)))
        except Exception:  # a registered converter that does not understand this file
            continue
    for convert, state in candidates:
        if is_tensor_map(state) and head in state:
            return Weights(
                tag=str(path), source=f"file:{path}", sha256=sha256,
                num_classes=int(state[head].shape[0]), input_size=backbone.input_size,
                mean=backbone.mean, std=backbone.std, convert=convert,
            )
    keys = list(plain or (obj if isinstance(obj, Mapping) else {}))
    registered = ", ".join(f"{w.tag} ({(expected_sha256(w) or 'no sha256')[:12]})"
                           for w in backbone.weights) or "none"
    raise WeightsError(
        f"{path} does not fit backbone {backbone.name!r}: it has no tensor {head!r}, not even "
        f"after the backbone's converters (its keys look like {', '.join(map(str, keys[:3]))}), "
        f"and its sha256 {sha256[:12]}... is none of the registered weights ({registered}). "
        f"If it holds one of those, import it: zoo weights import {backbone.name}:TAG {path} "
        "(--force where no sha256 is declared); else save the model's state_dict(), or "
        "declare Weights with a convert"
    )


def load_state_dict(backbone: Backbone, spec: Weights) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch ``spec``'s file, load it, convert its keys; return (state dict, file's sha256)."""
    path, sha256 = fetch_with_sha256(spec)
    return converted_state(backbone, spec, read_file(path), path), sha256


def load_weights(name: str | Backbone,
                 weights: str | os.PathLike[str] | Weights = "default") -> dict[str, torch.Tensor]:
    """The converted state dict of a backbone's weights, ready for ``model.load_state_dict``."""
    backbone = get_backbone(name) if isinstance(name, str) else name
    return load_state_dict(backbone, weights_spec(backbone, weights))[0]


def download(name: str, tag: str | None = None) -> Path:
    """Fetch a backbone's weights into the cache (``zoo weights download NAME[:TAG]``)."""
    if tag is None and ":" in name:
        name, _, tag = name.rpartition(":")
    backbone = get_backbone(name)
    return fetch(weights_spec(backbone, tag or "default"))
