"""Locks on a checkpoint folder: one writer at a time, readers that see one save whole.

A save holds ``LOCK_FILE`` exclusively for its whole run (a second writer gets a
``CheckpointError``; the file's presence also marks a folder zoo writes to) and moves its
files into place holding ``READ_LOCK_FILE`` exclusively; readers open the files they need
under a shared ``READ_LOCK_FILE`` lock. Lock files are opened relative to the folder the
user named, never through a symbolic link, and a folder that cannot be written to (a
pulled Hub snapshot) is simply read without locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from zoo.core.errors import CheckpointError

LOCK_FILE = ".zoo-lock"  # one writer at a time; its presence marks a folder zoo writes to
READ_LOCK_FILE = ".zoo-read-lock"  # readers share it; a save's final moves hold it alone
LOCK_TIMEOUT_S = 60.0

_held = threading.local()  # the folders whose writer lock this thread holds


def _held_keys() -> set[tuple[int, int]]:
    if not hasattr(_held, "keys"):
        _held.keys = set()
    return _held.keys


def _folder_key(directory: Path) -> tuple[int, int]:
    info = os.stat(directory)
    return info.st_dev, info.st_ino


def holds_writer_lock(directory: Path) -> bool:
    """Whether this thread holds ``directory``'s writer lock (it is the save in progress)."""
    return _folder_key(directory) in _held_keys()


def open_lock_file(directory: Path, name: str, *, create: bool) -> int | None:
    """A descriptor on a lock file, never through a link; None where it does not exist (and
    ``create`` is False) or cannot be created (a read-only folder)."""
    path = directory / name
    modes = [os.O_RDWR | os.O_CREAT] if create else []
    for mode in (*modes, os.O_RDONLY):
        try:
            fd = os.open(path, mode | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{path} is a symbolic link: zoo never follows links in "
                                      "a checkpoint folder; remove it") from None
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"{path} is not a regular file: remove it")
        return fd
    return None


@contextlib.contextmanager
def writer_lock(directory: Path, *, required: bool) -> Iterator[bool]:
    """Hold the folder's writer lock; yields False when it cannot be taken (another writer
    holds it, or the folder is read-only) unless ``required``, which raises instead."""
    fd = open_lock_file(directory, LOCK_FILE, create=True)
    if fd is None:
        if required:
            raise CheckpointError(f"cannot create {directory / LOCK_FILE}: zoo needs to write "
                                  "into the checkpoint folder to save")
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if required:
                raise CheckpointError(f"another zoo process is saving to {directory}: wait "
                                      "for it to finish, or save elsewhere") from None
            yield False
            return
        key = _folder_key(directory)
        _held_keys().add(key)
        try:
            yield True
        finally:
            _held_keys().discard(key)
    finally:
        os.close(fd)


def writer_alive(directory: Path) -> bool:
    """Whether another thread or process holds the folder's writer lock right now."""
    fd = open_lock_file(directory, LOCK_FILE, create=False)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def read_lock(directory: Path, *, exclusive: bool) -> Iterator[bool]:
    """Hold ``READ_LOCK_FILE`` (shared for readers, exclusive for a save's moves), waiting up
    to ``LOCK_TIMEOUT_S``. A reader yields False where the file does not exist."""
    fd = open_lock_file(directory, READ_LOCK_FILE, create=exclusive)
    if fd is None:
        if exclusive:
            raise CheckpointError(f"cannot create {directory / READ_LOCK_FILE}: zoo needs to "
                                  "write into the checkpoint folder to save")
        yield False
        return
    try:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline, delay = time.monotonic() + LOCK_TIMEOUT_S, 0.001
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for "
                                          f"another zoo process using {directory}") from None
                time.sleep(delay)
                delay = min(2 * delay, 0.05)
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_fd(directory: Path) -> Iterator[int]:
    """A descriptor on the checkpoint folder (the path the user named may be a link)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"checkpoint directory {directory} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)
