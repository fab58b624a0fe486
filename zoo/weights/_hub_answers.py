"""Checks on what a Hub answers, before the Hub client can use it: the Hub is not trusted.

The Hub client names cache files after what the server answers (the commit id, the ETag,
the xet hash, file names), so each must be in the Hub's own format (hex of the right
length, a plain relative path) or the answer is refused with a ``HubError``.
``zoo.weights._hf`` installs ``check_answer`` as a response hook for every zoo call.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from zoo.core.errors import HubError

COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")  # a path segment Windows reads as a drive
_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a git blob sha1 or an LFS sha256
# API answers whose JSON names commits and files: repo info, tree listings, paths-info.
_LISTING_PATH = re.compile(
    r"/api/(models|datasets|spaces)/[^/]+/[^/]+(/(revision|tree|paths-info)/.*)?$")


def printable(text: str, limit: int = 300) -> str:
    """Server-supplied text made safe to print on one line: control characters become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def unsafe_name(path: Any) -> bool:
    """Whether ``path`` could leave the folder it is joined to: absolute, '..', '.', empty
    segments, a backslash, a drive (``C:``; any ':' on Windows) or a control character."""
    if not isinstance(path, str):
        return True
    parts = path.split("/")
    return (path.startswith("/") or "\\" in path or not path.isprintable()
            or (":" in path and os.name == "nt")
            or any(part in ("", ".", "..") or _DRIVE.match(part) for part in parts))


def _refuse(response: Any, what: str, value: Any, expected: str) -> None:
    url = response.request.url
    port = f":{url.port}" if url.port else ""
    raise HubError(f"{url.scheme}://{url.host}{port} answered an unsafe {what} "
                   f"{printable(repr(value), 80)} where a Hub sends {expected}: refusing it "
                   "(the Hub client would use it as a path in its cache; the Hub may be "
                   "malicious)")


def _check_listing(response: Any, data: Any) -> None:
    """Check the commit ids, file names and hashes in a repo-info, tree or paths-info answer."""
    for entry in data if isinstance(data, list) else [data]:
        if not isinstance(entry, dict):
            continue
        if "sha" in entry and not COMMIT.fullmatch(str(entry["sha"])):
            _refuse(response, "commit id", entry["sha"], "40 hex digits")
        names = [s.get("rfilename") for s in entry.get("siblings") or [] if isinstance(s, dict)]
        names += [entry["path"]] if "path" in entry else []
        for name in names:
            if unsafe_name(name):
                _refuse(response, "file name", name, "a relative path inside the repo")
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
        for what, value, pattern, expected in (
                ("git object id", entry.get("oid"), COMMIT, "40 hex digits"),
                ("LFS sha256", lfs.get("oid"), SHA256, "64 hex digits"),
                ("xet hash", entry.get("xetHash"), SHA256, "64 hex digits")):
            if value is not None and not pattern.fullmatch(str(value)):
                _refuse(response, what, value, expected)


def check_answer(response: Any) -> None:
    """An httpx response hook: refuse a Hub answer whose metadata is not in the Hub's format.

    The Hub client builds cache paths from the commit id (``X-Repo-Commit``, repo info
    ``sha``), the ETag, the xet hash and the file names it is sent: each must be hex of the
    right length or a plain relative path, checked before the client reads the answer.
    """
    headers, request = response.headers, response.request
    commit = headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT.fullmatch(commit):
        _refuse(response, "commit id (X-Repo-Commit)", commit, "40 hex digits")
    etag = headers.get("X-Linked-Etag") or (headers.get("ETag") if request.method == "HEAD"
                                            and response.status_code < 400 else None)
    # The client strips a leading W/ and quotes the same way before using it.
    if etag is not None and not _ETAG.fullmatch(etag.lstrip("W/").strip('"')):
        _refuse(response, "ETag", etag, "a 40- or 64-hex-digit file hash")
    xet = headers.get("X-Xet-Hash")
    if xet is not None and not SHA256.fullmatch(xet):
        _refuse(response, "xet hash", xet, "64 hex digits")
    if response.status_code == 200 and _LISTING_PATH.search(request.url.path):
        response.read()
        with contextlib.suppress(ValueError):  # not JSON: the client reports that itself
            _check_listing(response, response.json())
