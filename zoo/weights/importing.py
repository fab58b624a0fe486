"""Importing a weights file carried in by hand (``zoo weights import``, ``zoo.import_weights``).

The file goes exactly where a download of its tag would go, after checking its sha256
against the registry and that its tensors fit the backbone, so ``weights="TAG"`` and delta
checkpoints on it then work offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from zoo.core.errors import WeightsError
from zoo.core.spec import Backbone, Weights
from zoo.plugins.registry import get_backbone
from zoo.weights.cache import (
    CHUNK,
    download_limit,
    locked_temp,
    part_pattern,
    path_sha256,
    record_sha256,
    registered_match,
    sweep,
)
from zoo.weights.sources import (
    HUB_FILES,
    expected_sha256,
    hub_cache_dir,
    sha_matches,
    source_kind,
    url_cache_path,
    user_path,
)
from zoo.weights.state import converted_state, read_file


def import_weights(name: str | Backbone, file: str | os.PathLike[str], tag: str | None = None,
                   *, force: bool = False) -> Path:
    """Put a weights file fetched elsewhere into the cache, exactly where a download of the
    tag would go, so that ``weights="TAG"`` (and delta checkpoints on it) work offline.

    ``name`` may be ``"NAME:TAG"``; without a tag, the registered weights with the file's
    sha256 are meant, else the default ones. The file's sha256 must match the registered
    one; ``force`` records it where the registry declares none. Its tensors must fit the
    backbone after the tag's converter. Returns the cached file's path.
    """
    if isinstance(name, str) and tag is None and ":" in name:
        name, _, tag = name.rpartition(":")
    backbone = get_backbone(name) if isinstance(name, str) else name
    path = user_path(file)
    if path is None or not path.is_file():
        raise WeightsError(f"no weights file at {file}: check the path")
    if not backbone.weights:
        raise WeightsError(f"backbone {backbone.name!r} registers no weights to import into: "
                           "pass the file as weights=PATH instead")
    if tag is None:
        spec = registered_match(backbone, path_sha256(path)) or backbone.get_weights()
    else:
        spec = backbone.get_weights(tag)
    return import_file(backbone, spec, path, force=force)


def import_file(backbone: Backbone, spec: Weights, path: Path, *, force: bool = False) -> Path:
    """Copy ``path`` into ``spec``'s cache place if its sha256 checks and it fits."""
    kind = source_kind(spec.source)
    if kind in ("file", "package"):
        raise WeightsError(
            f"weights {spec.tag!r} of {backbone.name!r} are read in place from {spec.source}, "
            "not cached: there is nothing to import (pass the file as weights=PATH instead)"
        )
    expected = expected_sha256(spec)
    if expected is None and not force:
        raise WeightsError(
            f"the registry declares no sha256 for weights {spec.tag!r} of {backbone.name!r}, so "
            f"zoo cannot tell whether {path} holds them: check the file, then import it with "
            "--force (force=True) to record its sha256"
        )
    if kind == "url":
        dest = url_cache_path(spec.source)
    else:
        dest = hub_cache_dir(spec.source) / HUB_FILES[0 if path.suffix == ".safetensors" else 1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep(dest.parent, part_pattern(dest))
    fd, tmp = locked_temp(tempfile.mkstemp, dest.parent, f".{dest.name}.", ".part")
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy(path, out, download_limit(spec))
            if not sha_matches(expected, actual):
                raise WeightsError(
                    f"{path} is not weights {spec.tag!r} of {backbone.name!r}: its sha256 is "
                    f"{actual}, the registry declares {_shown(expected)}; nothing was imported: "
                    "check that you carried in the right file"
                )
            state = converted_state(backbone, spec, read_file(tmp, dest.name), path)
            _check_fits(backbone, spec, state, path)
            os.replace(tmp, dest)
        record_sha256(dest, actual)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _shown(expected: str | None) -> str:
    return f"{expected}..." if expected and len(expected) < 64 else str(expected)


def _copy(path: Path, out: Any, limit: tuple[int, str]) -> str:
    """Copy ``path`` into ``out`` (at most ``limit`` bytes, fsynced); return its sha256."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > limit[0]:
                raise WeightsError(f"{path} is larger than the {limit[0]} bytes allowed by "
                                   f"{limit[1]}; nothing was imported: check the file")
            out.write(chunk)
            digest.update(chunk)
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def _check_fits(backbone: Backbone, spec: Weights, state: dict[str, torch.Tensor],
                path: Path) -> None:
    """Refuse ``state`` unless it loads into the backbone built for ``spec`` as
    ``create_model`` loads it (built on the meta device; a builder that cannot be is skipped)."""
    try:
        with torch.device("meta"):
            model = backbone.build(spec.num_classes)
    except Exception:
        return
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that differ
        problem = " ".join(str(exc).split())[:300]
    else:
        if not missing and not unexpected:
            return
        problem = (f"{len(missing)} missing tensors (e.g. {missing[:2]}), {len(unexpected)} "
                   f"unexpected (e.g. {unexpected[:2]})")
    raise WeightsError(
        f"{path} does not fit backbone {backbone.name!r} as weights {spec.tag!r}: {problem}; "
        "nothing was imported: check the file and the tag"
    )
