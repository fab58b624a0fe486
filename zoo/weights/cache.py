"""The weights cache's bookkeeping: sha256 records, size limits, temp files, and lookups.

Every file zoo caches gets its full sha256 recorded beside it (``<file>.sha256``, in
``sha256sum`` format) the first time, declared hash or not; ``zoo.weights.download`` checks
every use against the record, and ``verify_cache`` re-hashes the whole cache. A download
without a declared ``size_bytes`` may take at most ``$ZOO_MAX_DOWNLOAD_BYTES`` (default
8 GiB). A download writes into a temp file it holds an advisory lock on, so the temp files
of a killed download are swept by the next one and a live one's never are.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then left for the user
    fcntl = None  # type: ignore[assignment]

from zoo.core._io import file_sha256
from zoo.core.errors import WeightsError
from zoo.core.spec import Backbone, Weights
from zoo.plugins.registry import get_backbone, list_backbones
from zoo.weights.sources import (
    RECORD_SUFFIX,
    cached_path,
    expected_sha256,
    source_kind,
    user_path,
    weights_dir,
)

CHUNK = 1024 * 1024  # files are copied and hashed 1 MiB at a time
MAX_DOWNLOAD_ENV = "ZOO_MAX_DOWNLOAD_BYTES"
DEFAULT_MAX_DOWNLOAD_BYTES = 8 * 1024**3  # no weights file zoo knows comes close
TEMP_NAME = "[a-z0-9_]{8}"  # the random part tempfile.mkstemp/mkdtemp put in a name
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- sha256 records ------------------------------------------------------------------------


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


# --- limits --------------------------------------------------------------------------------


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


def download_limit(spec: Weights) -> tuple[int, str]:
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


def sweep(folder: Path, pattern: re.Pattern[str], *, directories: bool = False) -> None:
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


def part_pattern(dest: Path) -> re.Pattern[str]:
    """The names of ``dest``'s download temp files: ``.<name>.<8 random>.part``."""
    return re.compile(rf"\.{re.escape(dest.name)}\.{TEMP_NAME}\.part")


def locked_temp(make: Any, folder: Path, prefix: str, suffix: str = "",
                directory: bool = False) -> tuple[int, Path]:
    """A new temp file (or folder) from ``make``, opened and locked against ``sweep``."""
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


# --- which registered weights a file is ----------------------------------------------------


_SHA_MEMO: dict[tuple[str, int, int, int, int], str] = {}


def path_sha256(path: Path) -> str:
    """``file_sha256`` of a file the user named, remembered while the file is unchanged."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        if len(_SHA_MEMO) > 64:
            _SHA_MEMO.clear()
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


def registered_match(backbone: Backbone, sha256: str) -> Weights | None:
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
        elif source_kind(w.source) in ("url", "hf-hub"):
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
    return registered_match(backbone, path_sha256(path))


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
