"""Fetching weights: declared source -> download (or cache hit) -> sha256 check -> cache.

A URL is streamed into a locked ``.part`` file in the cache while its sha256 is computed,
checked, then moved into place with ``os.replace``. A file that fails the check, a transfer
cut short, or one that grows past its limit (the declared ``size_bytes``, else
``$ZOO_MAX_DOWNLOAD_BYTES``) leaves nothing in the cache. A Hub repo's file arrives
through ``zoo.weights._hf`` in a throwaway Hub cache. Every use re-hashes the cached file and
checks it against both the record and the declaration, so a cached file that was changed is
never used: it is downloaded afresh, or refused when that fails. A cached file is used
without any network access.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from zoo.core._io import file_sha256
from zoo.core.errors import WeightsError
from zoo.core.spec import Weights
from zoo.weights._hf import hub_download
from zoo.weights.cache import (
    CHUNK,
    TEMP_NAME,
    download_limit,
    locked_temp,
    part_pattern,
    record_sha256,
    recorded_sha256,
    sweep,
)
from zoo.weights.sources import (
    HUB_FILES,
    cached_path,
    expected_sha256,
    hub_cache_dir,
    hub_repo,
    local_file,
    package_file,
    sha_matches,
    source_kind,
    url_cache_path,
)

_TIMEOUT_S = 60.0
_HUB_TEMP = re.compile(rf"\.download-{TEMP_NAME}")


def fetch(spec: Weights, *, force: bool = False) -> Path:
    """The local weights file for ``spec``: downloaded and verified if not cached yet.

    ``force`` downloads again even when a verified copy is cached (URL and Hub sources).
    """
    return fetch_with_sha256(spec, force=force)[0]


def fetch_with_sha256(spec: Weights, *, force: bool = False) -> tuple[Path, str]:
    """``fetch``, also returning the file's sha256 (always computed, so always checked)."""
    kind = source_kind(spec.source)
    expected = expected_sha256(spec)
    if kind in ("file", "package"):
        path = local_file(spec.source) if kind == "file" else package_file(spec.source, spec.tag)
        if not path.is_file():
            raise WeightsError(f"weights {spec.tag!r}: no file at {path}: check the path")
        actual = file_sha256(path)
        if not sha_matches(expected, actual):
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
            return _download_url(spec.source, url_cache_path(spec.source), expected,
                                 download_limit(spec))
        return _download_hub(spec.source, expected, download_limit(spec))
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
    if recorded is None and expected is not None and sha_matches(expected, actual):
        record_sha256(path, actual)
        recorded = actual
    if recorded is None:
        return actual, (f"cached weights {path} have no sha256 record (zoo did not cache them, "
                        "or the record was deleted) and no declared hash, so they cannot be "
                        "trusted")
    if recorded != actual:
        return actual, (f"cached weights {path} were changed after zoo cached them (sha256 "
                        f"{actual[:16]}..., recorded {recorded[:16]}...)")
    if not sha_matches(expected, actual):
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
    sweep(dest.parent, part_pattern(dest))
    fd, tmp = locked_temp(tempfile.mkstemp, dest.parent, f".{dest.name}.", ".part")
    try:
        # The file stays open (and locked) until it is renamed, so no sweep can take it.
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, limit)
            if not sha_matches(expected, actual):
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
            while chunk := r.read(min(CHUNK, most + 1 - size)):
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
    repo, revision = hub_repo(source)
    folder = hub_cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    sweep(folder, _HUB_TEMP, directories=True)
    failures: list[str] = []
    fd, tmp = locked_temp(tempfile.mkdtemp, folder, ".download-", directory=True)
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
            if not sha_matches(expected, actual):
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
