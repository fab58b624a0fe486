"""The checkpoint folder: which files zoo writes there, and how it opens, stages and replaces them.

Saving never leaves a half-written checkpoint: every file is first written into the staging
folder ``STAGING`` and fsynced, a ``COMPLETE`` marker (``MARKER``) is written, then the files
are moved into place (``recover``). A save killed before the marker leaves the previous
checkpoint untouched; one killed after it is rolled forward by the next load or save.

Checkpoint folders may come from strangers, and they hold the user's work, so:

- zoo moves, deletes, reads and uploads only the names in ``CHECKPOINT_FILES``, and never
  through a symbolic link: files are opened relative to a descriptor on the folder with
  ``O_NOFOLLOW``; a staging folder that is a link or holds anything zoo did not write is
  refused, and so is a file that links out of the folder (a Hugging Face cache snapshot's
  links into its own ``blobs`` folder excepted).
- zoo writes only into a new or empty folder or one that is already a zoo checkpoint (it
  holds ``LOCK_FILE`` or a valid config.json), and deletes only files that its previous save
  listed in config.json's ``files``.
- Readers open every file they need together under the shared read lock (``zoo.persist.locks``),
  so they see the old checkpoint or the new one, whole. A reader finishes an interrupted save
  only when no writer is alive, and a folder it cannot write to (a pulled snapshot) is read
  without locks, checked by the sha256 that config.json records for the weights.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from zoo.core.errors import CheckpointError, ZooError
from zoo.persist.locks import (
    LOCK_FILE,
    folder_fd,
    holds_writer_lock,
    open_lock_file,
    read_lock,
    writer_alive,
    writer_lock,
)
from zoo.persist.validate import validate_config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
HISTORY_FILE = "history.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE, HISTORY_FILE)
RESUME_FILE = "resume.pt"  # written by the trainer after every epoch of a run with output_dir
STAGING = ".zoo-staging"
MARKER = "COMPLETE"
# Temp files a save killed midway leaves in its staging folder: atomic_write's for the
# marker, and the one safetensors' save_file writes before renaming (Rust's tempfile).
_MARKER_TEMP = re.compile(r"\.COMPLETE\.[A-Za-z0-9_]+\.tmp|\.tmp[A-Za-z0-9]{6}")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_READ_ATTEMPTS = 40  # a reader racing a writer retries, 50 ms apart, before calling it corrupt


# --------------------------------------------------------------------------- output folders


def check_output_dir(directory: str | os.PathLike[str] | None, *, overwrite: bool = False,
                     resume: str | os.PathLike[str] | None = None) -> None:
    """Refuse, before any training, a folder zoo must not write a checkpoint into.

    Accepted: a missing or empty folder, the folder of the run being resumed, or a zoo
    checkpoint folder (one that already holds a checkpoint or run only with ``overwrite``).
    Refused: an existing file, or a folder holding files zoo did not write.
    """
    if directory is None:
        return
    path = Path(directory)
    if resume is not None and os.path.lexists(path) and os.path.lexists(resume) \
            and os.path.samefile(path, resume):
        return
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is an existing file, not a folder: name a new or empty "
                              "folder for the checkpoint")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not _is_zoo_folder(path, entries):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise CheckpointError(f"{path} is not empty ({shown}) and is not a zoo checkpoint: zoo "
                              "only writes into a new or empty folder or over its own "
                              "checkpoint, so choose another folder")
    if STAGING in entries:  # an interrupted save: finished now (a hostile one refused)
        recover(path)
    if not overwrite and {CONFIG_FILE, MODEL_FILE, RESUME_FILE} & set(entries):
        raise CheckpointError(f"{path} already holds a zoo checkpoint: pass --overwrite "
                              f"(overwrite=True) to replace it, or --resume {path} "
                              "(resume=...) to continue its run")


def claim_output_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (if needed) and mark it as a folder zoo writes to (``LOCK_FILE``),
    so a later run recognises it as zoo's."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(path, LOCK_FILE, create=True)
    if fd is not None:
        os.close(fd)
    return path


def _is_zoo_folder(path: Path, entries: Collection[str]) -> bool:
    """Whether zoo wrote into ``path``: it holds zoo's lock file or a valid config.json."""
    if LOCK_FILE in entries and stat.S_ISREG(os.lstat(path / LOCK_FILE).st_mode):
        return True
    if CONFIG_FILE not in entries:
        return False
    try:
        read_config(path)
    except (ZooError, OSError):
        return False
    return True


def listed_files(directory: Path) -> set[str] | None:
    """The files the folder's current config.json says zoo wrote; None when it does not say
    (no config, or one written before zoo listed every file)."""
    try:
        files = read_config(directory).get("files") or {}
    except (ZooError, OSError):
        return None
    return set(files) | {CONFIG_FILE} if METRICS_FILE in files else None


def check_save_target(directory: Path, names: Collection[str]) -> None:
    """Refuse a save that would replace a file zoo did not write, or write through a link."""
    check_output_dir(directory, overwrite=True)
    listed = listed_files(directory) if directory.is_dir() else None
    for name in names:
        path = directory / name
        if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
            raise CheckpointError(f"{path} is a symbolic link or not a regular file: zoo never "
                                  "writes through links; remove it or save elsewhere")
        if listed is not None and name not in listed and path.exists():
            raise CheckpointError(f"{path} was not written by zoo (its config.json does not list "
                                  "it): move it away or save elsewhere; zoo never replaces "
                                  "files it did not create")


# --------------------------------------------------------------------------- staging


def recover(directory: str | os.PathLike[str]) -> None:
    """Finish an interrupted save: move its files into place if its ``COMPLETE`` marker was
    written, else discard it. Does nothing while another writer is alive or where the folder
    cannot be written to; refuses a staging folder that zoo did not leave."""
    directory = Path(directory)
    if not os.path.lexists(directory / STAGING):
        return
    if holds_writer_lock(directory):  # this thread is the writer
        _finish_staging(directory)
        return
    with writer_lock(directory, required=False) as taken:
        if not taken:
            return
        try:
            _finish_staging(directory)
        except OSError as exc:  # a read-only folder: leave it to a reader that can write
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise


def _finish_staging(directory: Path) -> None:
    """Roll the staging folder forward (if complete) and remove it; the writer lock is held."""
    where = directory / STAGING
    with folder_fd(directory) as folder:
        try:
            staging = os.open(STAGING, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=folder)
        except FileNotFoundError:
            return
        except OSError:
            raise CheckpointError(f"{where} is a symbolic link or not a folder, so zoo did not "
                                  f"leave it: refusing to use {directory}; remove it") from None
        try:
            names = os.listdir(staging)
            unknown = [n for n in names if n not in (*CHECKPOINT_FILES, MARKER)
                       and not _MARKER_TEMP.fullmatch(n)]
            if unknown:
                raise CheckpointError(f"{where} holds {unknown[0]!r}, which zoo does not write: "
                                      f"refusing to use {directory}; remove {where}")
            for name in names:
                _regular_or_absent(staging, name, where / name)
            plan = _staged_plan(staging, where)
            if plan is not None:
                moves = [n for n in plan[0] if n in names]  # the rest were moved already
                for name in (*moves, *plan[1]):
                    _regular_or_absent(folder, name, directory / name)
                with read_lock(directory, exclusive=True):
                    for name in moves:
                        os.replace(name, name, src_dir_fd=staging, dst_dir_fd=folder)
                    for name in plan[1]:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=folder)
                    os.fsync(folder)
            for name in os.listdir(staging):
                os.unlink(name, dir_fd=staging)
        finally:
            os.close(staging)
        os.rmdir(STAGING, dir_fd=folder)
        os.fsync(folder)


def _regular_or_absent(folder: int, name: str, path: Path) -> None:
    """Refuse a link, folder or device where zoo expects one of its own files."""
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is a symbolic link or not a regular file: zoo never "
                              "moves or writes through links; remove it")


def _staged_plan(staging: int, where: Path) -> tuple[list[str], list[str]] | None:
    """The COMPLETE marker's (files to move, files to remove), checked against
    ``CHECKPOINT_FILES``; None when the save did not finish writing."""
    try:
        fd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        text = handle.read(64 * 1024).decode("utf-8", "replace")
    try:
        plan = json.loads(text) if text.lstrip().startswith("{") else {"files": text.split()}
        moves, removes = list(plan["files"]), list(plan.get("remove", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{where / MARKER} is damaged, so zoo cannot finish the save it "
                              f"marks: remove {where}") from None
    for name in (*moves, *removes):
        if not isinstance(name, str) or name not in CHECKPOINT_FILES:
            raise CheckpointError(f"{where / MARKER} names {str(name)[:60]!r}, which is not a "
                                  "checkpoint file, so zoo did not write it: refusing to use "
                                  f"{where.parent}; remove {where}")
    return list(moves), list(removes)


# --------------------------------------------------------------------------- reading


def _open_inside(directory: Path, folder: int, name: str) -> BinaryIO | None:
    """Open ``directory/name`` for reading, never through a link that leaves the folder;
    None when it does not exist."""
    path = directory / name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
        fd = _open_link(directory, name)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file: a checkpoint holds plain files")
    return os.fdopen(fd, "rb")


def _open_link(directory: Path, name: str) -> int:
    """Open what the link ``directory/name`` points to, if it stays inside the folder (or, in
    a Hugging Face cache snapshot ``.../snapshots/<commit>/``, inside that repo's blobs)."""
    target = Path(os.path.realpath(directory / name))
    roots = [Path(os.path.realpath(directory))]
    if directory.parent.name == "snapshots":
        roots.append(Path(os.path.realpath(directory.parent.parent / "blobs")))
    if not any(target.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{directory / name} is a symbolic link that leaves the checkpoint "
                              "folder: zoo never follows such links (copy the file in instead)")
    try:
        return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"cannot read {directory / name}: {exc.strerror}") from None


def _parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    if len(raw) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"checkpoint is corrupt: {path} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} is not valid JSON ({exc})") from None
    return validate_config(config, path)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's config.json, validated."""
    directory = Path(directory)
    with folder_fd(directory) as folder:
        handle = _open_inside(directory, folder, CONFIG_FILE)
    if handle is None:
        raise CheckpointError(f"{directory} is not a zoo checkpoint: it has no {CONFIG_FILE}")
    with handle:
        return _parse_config(handle.read(_MAX_CONFIG_BYTES + 1), directory / CONFIG_FILE)


def _open_files(directory: Path, names: Collection[str], stack: contextlib.ExitStack
                ) -> tuple[bool, dict[str, Any], dict[str, BinaryIO]]:
    """Open config.json, model.safetensors and those of ``names`` that config.json lists,
    holding the shared read lock; return (locked, config, handles)."""
    with folder_fd(directory) as folder, read_lock(directory, exclusive=False) as locked:
        handles: dict[str, BinaryIO] = {}
        for name in (CONFIG_FILE, MODEL_FILE):
            handle = _open_inside(directory, folder, name)
            if handle is None and name == CONFIG_FILE \
                    and os.path.lexists(directory / "adapter_config.json"):
                raise CheckpointError(f"{directory} is a PEFT adapter, not a zoo checkpoint: "
                                      "load it with zoo.load_peft_adapter(DIR, BACKBONE)")
            if handle is None:
                raise CheckpointError(
                    f"checkpoint is corrupt: {directory} has no {name}" if name == MODEL_FILE
                    else f"{directory} is not a zoo checkpoint: it has no {name}")
            handles[name] = stack.enter_context(handle)
        config = _parse_config(handles[CONFIG_FILE].read(_MAX_CONFIG_BYTES + 1),
                               directory / CONFIG_FILE)
        listed = set(config.get("files") or {})
        for name in names:
            if name in CHECKPOINT_FILES and name not in handles \
                    and (name in listed or METRICS_FILE not in listed):
                handle = _open_inside(directory, folder, name)
                if handle is not None:
                    handles[name] = stack.enter_context(handle)
    return locked, config, handles


def _matches(config: Mapping[str, Any], model: BinaryIO) -> bool:
    """Whether the weights file has the sha256 config.json records (True if none is)."""
    expected = (config.get("files") or {}).get(MODEL_FILE)
    if not expected:
        return True
    digest = hashlib.file_digest(model, "sha256").hexdigest()
    model.seek(0)
    return digest == expected


@contextlib.contextmanager
def open_checkpoint(directory: str | os.PathLike[str],
                    names: Collection[str] = (CONFIG_FILE, MODEL_FILE)
                    ) -> Iterator[tuple[dict[str, Any], dict[str, BinaryIO]]]:
    """Open a checkpoint's files: yields (validated config, name -> binary file at offset 0).

    Always config.json and model.safetensors, and those of ``names`` that config.json lists
    (files of an older save left beside it are not part of it). The files are opened
    together under the shared read lock, so they all belong to one save, and the weights
    match config.json's sha256; a reader racing a save retries. Never follows a link out of
    the folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with contextlib.ExitStack() as stack:
        for attempt in range(1, _READ_ATTEMPTS + 1):
            recover(directory)
            with contextlib.ExitStack() as files:
                locked, config, handles = _open_files(directory, names, files)
                handles[CONFIG_FILE].seek(0)
                if _matches(config, handles[MODEL_FILE]):
                    stack.enter_context(files.pop_all())
                    break
            racing = writer_alive(directory) or os.path.lexists(directory / STAGING) \
                or (attempt == 1 and not locked)
            if not racing or attempt == _READ_ATTEMPTS:
                raise CheckpointError(f"checkpoint is corrupt: {directory / MODEL_FILE} does "
                                      "not match the sha256 recorded in config.json (modified "
                                      "or partly written)")
            time.sleep(0.05)
        yield config, handles
