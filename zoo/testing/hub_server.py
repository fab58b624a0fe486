"""A small Hugging Face Hub-compatible HTTP server, for tests and for local or air-gapped hubs.

It speaks the subset of the Hub API that the ``huggingface_hub`` client (2.4.0) uses to create
repos, push commits and download files, so the real client can be tested end to end without
the internet. Run it with::

    python -m zoo.testing.hub_server --root DIR --port 8080 --token hf_local

or from Python::

    with HubServer(root=tmp_path, token="hf_test") as server:
        HfApi(endpoint=server.endpoint, token="hf_test").create_repo("user/model")

Storage under ``root``: ``blobs/<sha256[:2]>/<sha256>`` holds file contents once each, and
``repos/<models|datasets|spaces>/<namespace>/<name>.json`` holds a repo's commits, branches,
tags and pull-request refs. Every commit maps each path to
``{sha256, git_sha1, size, lfs}``. Files are written atomically (temp file + ``os.replace``).

Xet is not spoken. Either keep ``upload_mode="regular"`` (every file travels base64 in the
commit body) or use ``upload_mode="lfs"`` with ``HF_HUB_DISABLE_XET=1`` set in the client, so
large files go through the git-LFS batch API with the ``basic`` transfer. Downloads are always
plain HTTP because ``/resolve`` never sends ``X-Xet-Hash``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import copy
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

UploadMode = Literal["regular", "lfs"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
# In "lfs" upload mode these files (and any file of at least LFS_MIN_SIZE bytes) go through LFS.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".onnx", ".gguf")
LFS_MIN_SIZE = 1024 * 1024
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PR_RE = re.compile(r"refs/pr/(\d+)")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]+")
_CHUNK = 1024 * 1024


class ErrorAnswer(Exception):
    """An error answered to the client: HTTP status, optional ``X-Error-Code`` and a message."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` (what the client compares for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that stands in git for an LFS file."""
    text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    return text.encode()


def _now() -> str:
    """Current UTC time in the Hub's format (``2024-01-31T12:00:00.000Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old or the whole new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_name(name: str, what: str) -> str:
    """Reject names that are not Hub-like (this also rules out path traversal)."""
    if not _NAME_RE.fullmatch(name) or ".." in name or name.endswith(".git"):
        raise ErrorAnswer(400, f"invalid {what} {name!r}")
    return name


def _check_path(path: str) -> str:
    """Reject file paths with empty, '.' or '..' segments."""
    if not path or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise ErrorAnswer(400, f"invalid file path {path!r}")
    return path


def _git_sha1_of_file(path: Path) -> str:
    """``git_blob_sha1`` of a file, read in chunks (LFS files can be large)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_oid(entry: dict) -> str:
    """Git object id shown in tree listings: the pointer's for LFS files, the blob's otherwise."""
    if entry["lfs"]:
        return git_blob_sha1(lfs_pointer(entry["sha256"], entry["size"]))
    return entry["git_sha1"]


def _file_json(path: str, entry: dict) -> dict:
    """A tree / paths-info entry for a file, with ``lfs`` for LFS files (never ``xetHash``)."""
    out: dict[str, Any] = {"type": "file", "oid": _file_oid(entry), "size": entry["size"]}
    out["path"] = path
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return out


def _dir_json(path: str, files: dict) -> dict:
    """A tree entry for a folder; its oid is a stable hash of what it contains."""
    prefix = path + "/"
    inside = sorted((p, e) for p, e in files.items() if p.startswith(prefix))
    content = "\n".join(f"{p} {_file_oid(e)}" for p, e in inside)
    return {"type": "directory", "oid": hashlib.sha1(content.encode()).hexdigest(), "path": path}


class _Store:
    """Blobs and repos on disk; every read-modify-write of a repo holds ``lock``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "repos").mkdir(parents=True, exist_ok=True)

    # --- blobs -------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (if new) and return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha, len(data)):
            _atomic_write(self.blob_path(sha), data)
        return sha

    def put_stream(self, chunks: Iterator[bytes], sha256: str, size: int) -> None:
        """Store a streamed upload, keeping it only if it hashes to ``sha256`` with ``size``."""
        path = self.blob_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        digest, written = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    written += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != sha256 or written != size:
                raise ErrorAnswer(400, "uploaded content does not match the announced oid and size")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # --- repos -------------------------------------------------------------------------------

    def repo_file(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = repo_id.split("/")
        return self.root / "repos" / f"{repo_type}s" / namespace / f"{name}.json"

    def load(self, repo_type: str, repo_id: str) -> dict | None:
        path = self.repo_file(repo_type, repo_id)
        with self.lock:
            return json.loads(path.read_text()) if path.is_file() else None

    def save(self, repo: dict) -> None:
        with self.lock:
            data = json.dumps(repo, indent=1, sort_keys=True).encode()
            _atomic_write(self.repo_file(repo["type"], repo["id"]), data)

    def create(self, repo_type: str, repo_id: str, private: bool, sdk: str | None) -> bool:
        """Create an empty repo with one empty commit on ``main``; False if it exists."""
        with self.lock:
            if self.load(repo_type, repo_id) is not None:
                return False
            repo: dict[str, Any] = {
                "type": repo_type,
                "id": repo_id,
                "private": private,
                "gated": False,
                "createdAt": _now(),
                "branches": {},
                "tags": {},
                "pulls": {},
                "commits": {},
            }
            if sdk:
                repo["sdk"] = sdk
            sha = self.add_commit(repo, None, {}, "initial commit", "", [])
            repo["branches"][DEFAULT_BRANCH] = sha
            self.save(repo)
            return True

    def delete(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            path = self.repo_file(repo_type, repo_id)
            if not path.is_file():
                return False
            path.unlink()
            return True

    @staticmethod
    def add_commit(
        repo: dict, parent: str | None, files: dict, title: str, message: str, ops: list[str]
    ) -> str:
        """Add a commit object to ``repo`` (in memory) and return its 40-hex id."""
        commit = {
            "parent": parent,
            "title": title,
            "message": message,
            "date": _now(),
            "operations": ops,
            "files": files,
        }
        salt = {"nonce": time.time_ns(), "random": secrets.token_hex(8)}
        sha = hashlib.sha1(json.dumps([commit, salt], sort_keys=True).encode()).hexdigest()
        repo["commits"][sha] = commit
        return sha

    @staticmethod
    def resolve(repo: dict, rev: str) -> str | None:
        """The commit id that ``rev`` (branch, tag, ``refs/...`` or full sha) points to."""
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["tags"]:
            return repo["tags"][rev]
        if rev.startswith("refs/heads/"):
            return repo["branches"].get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return repo["tags"].get(rev[len("refs/tags/") :])
        if match := _PR_RE.fullmatch(rev):
            return repo["pulls"].get(match[1])
        if _SHA1_RE.fullmatch(rev) and rev in repo["commits"]:
            return rev
        return None


def _revision_not_found(rev: str) -> ErrorAnswer:
    return ErrorAnswer(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def _entry_not_found(path: str, commit: str) -> ErrorAnswer:
    return ErrorAnswer(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit})


class _Handler(BaseHTTPRequestHandler):
    """One HTTP connection; routes each request to a method of this class."""

    protocol_version = "HTTP/1.1"
    server_version = "zoo-hub-server"
    timeout = 120
    server: _HTTPServer

    # --- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._track(self.connection, add=False)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The default logs the raw request line, which holds upload signatures: log the path only.
        if self.server.hub.verbose:
            path = urlsplit(self.path).path
            status = getattr(code, "value", code)
            sys.stderr.write(f"{self.address_string()} {self.command} {path} {status}\n")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub._record(method, url.path)
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        self._body_read = not chunked and self.headers.get("Content-Length", "0").strip() == "0"
        self.query = parse_qs(url.query)
        self.segments = url.path.split("/")[1:]
        try:
            self._route(method)
        except ErrorAnswer as err:
            self._send_error(err)
        except Exception as err:  # a bug: report it without 5xx, which the client would retry
            traceback.print_exc()
            self._send_error(ErrorAnswer(400, f"server error: {type(err).__name__}"))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json; charset=utf-8",
        headers: dict | None = None,
    ) -> None:
        self.send_response(status)
        if not self._body_read:
            self.send_header("Connection", "close")  # an unread body would corrupt the next request
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, content_type: str | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(status, body, content_type or "application/json; charset=utf-8")

    def _send_error(self, err: ErrorAnswer) -> None:
        message = err.message.encode("ascii", "backslashreplace").decode().replace("\n", " ")
        headers = {"X-Error-Message": message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers=headers)

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, chunk by chunk (Content-Length or chunked transfer encoding)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                yield from self._read_exactly(size)
                self.rfile.readline(1024)  # CRLF after the chunk
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_read = True

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            data = self.rfile.read(min(size, _CHUNK))
            if not data:
                raise ErrorAnswer(400, "request body ended early")
            size -= len(data)
            yield data

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> dict:
        body = self._body()
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ErrorAnswer(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ErrorAnswer(400, "request body must be a JSON object")
        return data

    def _base_url(self) -> str:
        """``http://host:port`` exactly as the client addressed us (URLs must match it)."""
        host = self.headers.get("Host", "")
        if not _HOST_RE.fullmatch(host):
            host = f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        return f"http://{host}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"

    # --- auth --------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        """True for the configured token (or anyone if none is configured), False if anonymous.

        A wrong token is an error on every request, like on the Hub.
        """
        token = self.server.hub.token
        header = self.headers.get("Authorization")
        if token is None:
            return True
        if not header:
            return False
        if hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
            return True
        raise ErrorAnswer(401, INVALID_CREDENTIALS)

    def _require_write(self) -> None:
        if not self._authorized():
            raise ErrorAnswer(401, "You must be authenticated with a token to do this")

    def _read_repo(self, repo_type: str, repo_id: str) -> dict:
        """The repo if the caller may read it; private repos look exactly like missing ones."""
        authorized = self._authorized()
        repo = self.server.hub.store.load(repo_type, repo_id)
        if repo is None or (repo["private"] and not authorized):
            status = 404 if self.headers.get("Authorization") else 401
            raise ErrorAnswer(status, "Repository not found", "RepoNotFound")
        return repo

    def _write_repo(self, repo_type: str, repo_id: str) -> dict:
        self._require_write()
        repo = self.server.hub.store.load(repo_type, repo_id)
        if repo is None:
            raise ErrorAnswer(404, "Repository not found", "RepoNotFound")
        return repo

    # --- routing -----------------------------------------------------------------------------

    def _route(self, method: str) -> None:
        seg = self.segments
        if seg[0] == "api" and len(seg) >= 2:
            self._route_api(method, seg[1:])
            return
        repo_type = "model"
        if seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 3:
            namespace, name, rest = unquote(seg[0]), unquote(seg[1]), seg[2:]
            if name.endswith(".git") and method in ("POST", "PUT"):
                repo_id = f"{_check_name(namespace, 'namespace')}/{_check_name(name[:-4], 'name')}"
                if rest == ["info", "lfs", "objects", "batch"] and method == "POST":
                    return self._lfs_batch(repo_type, repo_id)
                if len(rest) == 2 and rest[0] == "lfs-upload" and method == "PUT":
                    return self._lfs_upload(repo_type, repo_id, rest[1])
                if len(rest) == 2 and rest[0] == "lfs-verify" and method == "POST":
                    return self._lfs_verify(repo_type, repo_id, rest[1])
            elif rest[0] == "resolve" and len(rest) >= 3 and method in ("GET", "HEAD"):
                repo_id = f"{_check_name(namespace, 'namespace')}/{_check_name(name, 'name')}"
                return self._resolve(repo_type, repo_id, rest[1:])
        raise ErrorAnswer(404, f"unsupported: {method} {urlsplit(self.path).path}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        route = (method, "/".join(seg))
        if route == ("GET", "whoami-v2"):
            return self._whoami()
        if route == ("POST", "validate-yaml"):
            self._body()
            return self._send_json({"errors": [], "warnings": []})
        if route == ("POST", "repos/create"):
            return self._create_repo()
        if route == ("DELETE", "repos/delete"):
            return self._delete_repo()
        if seg[0] in REPO_TYPES and len(seg) >= 3:
            repo_type = REPO_TYPES[seg[0]]
            namespace = _check_name(unquote(seg[1]), "namespace")
            repo_id = f"{namespace}/{_check_name(unquote(seg[2]), 'name')}"
            action, rest = (seg[3], seg[4:]) if len(seg) > 3 else ("", [])
            rev = unquote("/".join(rest))
            handlers = {
                ("GET", ""): lambda: self._repo_info(repo_type, repo_id, DEFAULT_BRANCH),
                ("GET", "revision"): lambda: self._repo_info(repo_type, repo_id, rev),
                ("POST", "preupload"): lambda: self._preupload(repo_type, repo_id, rev),
                ("POST", "commit"): lambda: self._commit(repo_type, repo_id, rev),
                ("GET", "tree"): lambda: self._tree(repo_type, repo_id, rest),
                ("POST", "paths-info"): lambda: self._paths_info(repo_type, repo_id, rev),
                ("GET", "refs"): lambda: self._refs(repo_type, repo_id),
                ("GET", "commits"): lambda: self._commits(repo_type, repo_id, rev),
                ("POST", "branch"): lambda: self._create_branch(repo_type, repo_id, rev),
                ("DELETE", "branch"): lambda: self._delete_ref(repo_type, repo_id, "branches", rev),
                ("POST", "tag"): lambda: self._create_tag(repo_type, repo_id, rev),
                ("DELETE", "tag"): lambda: self._delete_ref(repo_type, repo_id, "tags", rev),
                ("PUT", "settings"): lambda: self._settings(repo_type, repo_id),
            }
            if (method, action) in handlers:
                return handlers[(method, action)]()
            if action.startswith("xet-"):
                raise ErrorAnswer(
                    400,
                    "this server does not speak xet: set HF_HUB_DISABLE_XET=1 in the client "
                    "or run the server with upload_mode='regular'",
                )
        raise ErrorAnswer(404, f"unsupported: {method} /api/{'/'.join(seg)}")

    # --- account and repos -------------------------------------------------------------------

    def _whoami(self) -> None:
        if not self._authorized():
            raise ErrorAnswer(401, "You must be authenticated with a token to do this")
        name = self.server.hub.username
        self._send_json(
            {
                "type": "user",
                "id": name,
                "name": name,
                "fullname": name,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local", "role": "write"},
                },
            }
        )

    def _repo_from_body(self, body: dict) -> tuple[str, str]:
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise ErrorAnswer(400, f"unsupported repo type {repo_type!r}")
        namespace = body.get("organization") or self.server.hub.username
        name = body.get("name")
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise ErrorAnswer(400, "name and organization must be strings")
        return repo_type, f"{_check_name(namespace, 'namespace')}/{_check_name(name, 'name')}"

    def _create_repo(self) -> None:
        body = self._json_body()
        self._require_write()
        repo_type, repo_id = self._repo_from_body(body)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = self._repo_url(repo_type, repo_id)
        if not self.server.hub.store.create(repo_type, repo_id, private, body.get("sdk")):
            # The client reads `url` from a 409 when exist_ok=True.
            body = json.dumps({"error": "You already created this repo", "url": url}).encode()
            self._send(409, body, headers={"X-Error-Message": "You already created this repo"})
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        self._require_write()
        repo_type, repo_id = self._repo_from_body(body)
        if not self.server.hub.store.delete(repo_type, repo_id):
            raise ErrorAnswer(404, "Repository not found", "RepoNotFound")
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        store = self.server.hub.store
        with store.lock:
            repo = self._write_repo(repo_type, repo_id)
            if "private" in body:
                repo["private"] = bool(body["private"])
            if "visibility" in body:
                repo["private"] = body["visibility"] == "private"
            if "gated" in body:
                repo["gated"] = body["gated"] or False
            store.save(repo)
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        sha = _Store.resolve(repo, rev)
        if sha is None:
            raise _revision_not_found(rev)
        commit = repo["commits"][sha]
        lies = self.server.hub._answer_lies("commit", "file_name")
        with_blobs = self.query.get("blobs", [""])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                info = _file_json(path, entry)
                sibling.update(size=info["size"], blobId=info["oid"])
                if "lfs" in info:
                    lfs = dict(info["lfs"])
                    lfs["sha256"] = lfs.pop("oid")
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        if "file_name" in lies:
            siblings.append({"rfilename": lies["file_name"]})
        info = {
            "_id": repo_id,
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": lies.get("commit", sha),
            "private": repo["private"],
            "gated": repo["gated"],
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo["createdAt"],
            "lastModified": commit["date"],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if "sdk" in repo:
            info["sdk"] = repo["sdk"]
        self._send_json(info)

    # --- upload ------------------------------------------------------------------------------

    def _upload_mode(self, path: str, size: int) -> UploadMode:
        if self.server.hub.upload_mode == "regular":
            return "regular"
        return "lfs" if size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES) else "regular"

    def _preupload(self, repo_type: str, repo_id: str, rev: str) -> None:
        body = self._json_body()
        repo = self._write_repo(repo_type, repo_id)
        sha = _Store.resolve(repo, rev)
        if sha is None:
            raise _revision_not_found(rev)
        stored = repo["commits"][sha]["files"]
        answer = []
        for item in body.get("files", []):
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise ErrorAnswer(400, "each file needs a path and a size")
            mode = self._upload_mode(path, size)
            info: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in stored:
                # The client skips a file whose local hash equals this oid (hash depends on mode).
                entry = stored[path]
                info["oid"] = entry["sha256"] if mode == "lfs" else entry["git_sha1"]
            answer.append(info)
        self._send_json({"files": answer, "commitOid": sha})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        self._write_repo(repo_type, repo_id)
        if body.get("operation") != "upload":
            raise ErrorAnswer(400, "only the 'upload' LFS operation is supported")
        hub, base = self.server.hub, self._base_url()
        prefix = f"{base}/{URL_PREFIXES[repo_type]}{repo_id}.git"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not _SHA256_RE.fullmatch(str(oid)) or not isinstance(size, int):
                raise ErrorAnswer(400, "each LFS object needs a sha256 oid and an int size")
            if hub.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: already stored
                continue
            # The client sends no Authorization header on the PUT: sign the URL instead.
            sig = hub._sign_upload((repo_type, repo_id, oid, size))
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{prefix}/lfs-upload/{oid}?sig={sig}"},
                        "verify": {"href": f"{prefix}/lfs-verify/{oid}?sig={sig}"},
                    },
                }
            )
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        self._send_json(answer, content_type="application/vnd.git-lfs+json")

    def _signed_object(self, repo_type: str, repo_id: str, oid: str) -> tuple:
        sig = self.query.get("sig", [""])[0]
        target = self.server.hub._signed(sig)
        if target is None or target[:3] != (repo_type, repo_id, oid):
            raise ErrorAnswer(403, "invalid or expired upload signature")
        return target

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        _, _, _, size = self._signed_object(repo_type, repo_id, oid)
        self.server.hub.store.put_stream(self._body_chunks(), oid, size)
        self._send(200)

    def _lfs_verify(self, repo_type: str, repo_id: str, oid: str) -> None:
        self._body()
        _, _, _, size = self._signed_object(repo_type, repo_id, oid)
        if not self.server.hub.store.has_blob(oid, size):
            raise ErrorAnswer(400, f"LFS object {oid} was not uploaded")
        self.server.hub._forget_upload(self.query["sig"][0])
        self._send_json({"success": True})

    def _parse_commit(self) -> tuple[dict, list[tuple[str, str, dict | None]]]:
        """Read the NDJSON commit body: the header, then (kind, path, entry) per operation.

        Regular files are stored as blobs here, before taking the repo lock.
        """
        store = self.server.hub.store
        header: dict | None = None
        ops: list[tuple[str, str, dict | None]] = []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise ErrorAnswer(400, "malformed NDJSON commit line") from None
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise ErrorAnswer(400, "only base64 file content is supported")
                try:
                    data = base64.b64decode(value["content"], validate=True)
                except (binascii.Error, KeyError, TypeError):
                    raise ErrorAnswer(400, "invalid base64 file content") from None
                entry = {
                    "sha256": store.put_bytes(data),
                    "git_sha1": git_blob_sha1(data),
                    "size": len(data),
                    "lfs": False,
                }
                ops.append(("file", _check_path(value.get("path", "")), entry))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.fullmatch(str(oid)):
                    raise ErrorAnswer(400, "lfsFile needs a sha256 oid")
                if not store.has_blob(oid, size):
                    raise ErrorAnswer(400, f"LFS object {oid} was not uploaded")
                if size is None:
                    size = store.blob_path(oid).stat().st_size
                # git_sha1 lets a later regular-mode preupload recognise an unchanged file.
                git_sha1 = _git_sha1_of_file(store.blob_path(oid))
                entry = {"sha256": oid, "git_sha1": git_sha1, "size": size, "lfs": True}
                ops.append(("lfsFile", _check_path(value.get("path", "")), entry))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, _check_path(str(value.get("path", "")).rstrip("/")), None))
            else:
                raise ErrorAnswer(400, f"unsupported commit operation {key!r}")
        if header is None:
            raise ErrorAnswer(400, "the commit has no header line")
        return header, ops

    def _commit(self, repo_type: str, repo_id: str, rev: str) -> None:
        self._write_repo(repo_type, repo_id)  # auth before storing any blob
        header, ops = self._parse_commit()
        create_pr = self.query.get("create_pr", [""])[0] in ("1", "true", "True")
        store = self.server.hub.store
        with store.lock:
            repo = self._write_repo(repo_type, repo_id)
            head = _Store.resolve(repo, rev)
            if head is None:
                raise _revision_not_found(rev)
            parent = header.get("parentCommit")
            if create_pr:
                ref_kind, ref_name = "pulls", str(len(repo["pulls"]) + 1)
                parent = parent or head
                if parent not in repo["commits"]:
                    raise ErrorAnswer(412, "parentCommit is not a commit of this repo")
            else:
                ref_kind, ref_name = self._branch_ref(repo, rev)
                if parent is not None and parent != head:
                    raise ErrorAnswer(412, "A commit has happened since; refresh and try again")
                parent = head
            files = copy.deepcopy(repo["commits"][parent]["files"])
            for kind, path, entry in ops:
                if entry is not None:
                    files[path] = entry
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        # The client looks for this exact phrase to add a hint about folders.
                        raise ErrorAnswer(
                            404,
                            f"A file with this name doesn't exist: {path}",
                            "EntryNotFound",
                            {"X-Repo-Commit": head},
                        )
                else:
                    inside = [p for p in files if p.startswith(path + "/")]
                    if not inside:
                        raise _entry_not_found(path + "/", head)
                    for p in inside:
                        del files[p]
            title = str(header.get("summary") or "commit")
            message = str(header.get("description") or "")
            sha = store.add_commit(repo, parent, files, title, message, [p for _, p, _ in ops])
            repo[ref_kind][ref_name] = sha
            store.save(repo)
        url = self._repo_url(repo_type, repo_id)
        answer = {"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{url}/discussions/{ref_name}"
        self._send_json(answer)

    @staticmethod
    def _branch_ref(repo: dict, rev: str) -> tuple[str, str]:
        """Where a commit to ``rev`` goes: a branch or an open pull-request ref."""
        name = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        if name in repo["branches"]:
            return "branches", name
        if (match := _PR_RE.fullmatch(rev)) and match[1] in repo["pulls"]:
            return "pulls", match[1]
        raise ErrorAnswer(400, f"can only commit to a branch or a pull request, not {rev!r}")

    # --- read --------------------------------------------------------------------------------

    def _split_revision(self, repo: dict, segments: list[str], need_rest: bool) -> tuple[str, str]:
        """Split ``rev/path...`` segments; the client encodes '/' in revisions, others may not."""
        limit = len(segments) - 1 if need_rest else len(segments)
        for k in range(1, limit + 1):
            rev = unquote("/".join(segments[:k]))
            sha = _Store.resolve(repo, rev)
            if sha is not None:
                return sha, unquote("/".join(segments[k:]))
        raise _revision_not_found(unquote(segments[0]) if segments else "")

    def _resolve(self, repo_type: str, repo_id: str, segments: list[str]) -> None:
        repo = self._read_repo(repo_type, repo_id)
        if repo["gated"] and not self._authorized():
            raise ErrorAnswer(401, "Access to this repo is restricted", "GatedRepo")
        sha, path = self._split_revision(repo, segments, need_rest=True)
        lies = self.server.hub._answer_lies("etag", "commit")
        entry = repo["commits"][sha]["files"].get(path)
        blob = entry and self.server.hub.store.blob_path(entry.get("blob", entry["sha256"]))
        if entry is None or not blob.is_file():
            raise _entry_not_found(path, lies.get("commit", sha))
        size = blob.stat().st_size
        etag = lies.get("etag") or f'"{entry["sha256"] if entry["lfs"] else entry["git_sha1"]}"'
        headers = {"X-Repo-Commit": lies.get("commit", sha), "ETag": etag, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{size}"
                raise ErrorAnswer(416, "Requested range not satisfiable", headers=headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "HEAD":
            return
        with blob.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                data = f.read(min(remaining, _CHUNK))
                if not data:
                    break
                self.wfile.write(data)
                remaining -= len(data)

    def _tree(self, repo_type: str, repo_id: str, segments: list[str]) -> None:
        repo = self._read_repo(repo_type, repo_id)
        sha, base = self._split_revision(repo, segments, need_rest=False)
        recursive = self.query.get("recursive", [""])[0].lower() in ("1", "true")
        files = repo["commits"][sha]["files"]
        prefix = base + "/" if base else ""
        found_files, dirs = [], set()
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if recursive or len(parts) == 1:
                found_files.append(_file_json(path, entry))
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            for i in range(1, depth + 1):
                dirs.add(prefix + "/".join(parts[:i]))
        if base and not found_files and not dirs:
            raise _entry_not_found(base, sha)
        entries = found_files + [_dir_json(d, files) for d in dirs]
        self._send_json(self._with_lying_entry(sorted(entries, key=lambda e: e["path"])))

    def _paths_info(self, repo_type: str, repo_id: str, rev: str) -> None:
        form = parse_qs(self._body().decode())
        repo = self._read_repo(repo_type, repo_id)
        sha = _Store.resolve(repo, rev)
        if sha is None:
            raise _revision_not_found(rev)
        files = repo["commits"][sha]["files"]
        answer = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in files:
                answer.append(_file_json(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                answer.append(_dir_json(path, files))
        self._send_json(self._with_lying_entry(answer))

    def _with_lying_entry(self, entries: list[dict]) -> list[dict]:
        """``entries`` plus, in hostile mode, a copy of the first file under the hostile name."""
        name = self.server.hub._answer_lies("file_name").get("file_name")
        files = [e for e in entries if e["type"] == "file"]
        return entries + [{**files[0], "path": name}] if name and files else entries

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._read_repo(repo_type, repo_id)

        def refs(kind: str, prefix: str) -> list[dict]:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": sha}
                for name, sha in sorted(repo[kind].items())
            ]

        pulls = [
            {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": sha}
            for n, sha in sorted(repo["pulls"].items(), key=lambda item: int(item[0]))
        ]
        self._send_json(
            {
                "branches": refs("branches", "refs/heads/"),
                "converts": [],
                "tags": refs("tags", "refs/tags/"),
                "pullRequests": pulls,
            }
        )

    def _commits(self, repo_type: str, repo_id: str, rev: str) -> None:
        repo = self._read_repo(repo_type, repo_id)
        sha = _Store.resolve(repo, rev)
        if sha is None:
            raise _revision_not_found(rev)
        history = []
        while sha is not None:
            commit = repo["commits"][sha]
            history.append(
                {
                    "id": sha,
                    "title": commit["title"],
                    "message": commit["message"],
                    "date": commit["date"],
                    "authors": [{"user": self.server.hub.username}],
                }
            )
            sha = commit["parent"]
        self._send_json(history)

    # --- refs --------------------------------------------------------------------------------

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        body = self._json_body()
        store = self.server.hub.store
        with store.lock:
            repo = self._write_repo(repo_type, repo_id)
            self._check_ref_name(branch)
            if branch in repo["branches"]:
                raise ErrorAnswer(409, f"Branch {branch} already exists")
            start = body.get("startingPoint") or DEFAULT_BRANCH
            sha = _Store.resolve(repo, start)
            if sha is None:
                raise _revision_not_found(start)
            repo["branches"][branch] = sha
            store.save(repo)
        self._send_json({})

    def _create_tag(self, repo_type: str, repo_id: str, rev: str) -> None:
        body = self._json_body()
        store = self.server.hub.store
        with store.lock:
            repo = self._write_repo(repo_type, repo_id)
            tag = body.get("tag")
            if not isinstance(tag, str):
                raise ErrorAnswer(400, "the body needs a 'tag'")
            self._check_ref_name(tag)
            if tag in repo["tags"]:
                raise ErrorAnswer(409, f"Tag {tag} already exists")
            sha = _Store.resolve(repo, rev)
            if sha is None:
                raise _revision_not_found(rev)
            repo["tags"][tag] = sha
            store.save(repo)
        self._send_json({})

    def _delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        store = self.server.hub.store
        with store.lock:
            repo = self._write_repo(repo_type, repo_id)
            if kind == "branches" and name == DEFAULT_BRANCH:
                raise ErrorAnswer(403, "The default branch cannot be deleted")
            if name not in repo[kind]:
                raise _revision_not_found(name)
            del repo[kind][name]
            store.save(repo)
        self._send_json({})

    @staticmethod
    def _check_ref_name(name: str) -> None:
        bad = not name or name.startswith(("refs/", "/", "-")) or name.endswith("/")
        if bad or ".." in name or _SHA1_RE.fullmatch(name) or any(c in name for c in " ~^:?*[\\"):
            raise ErrorAnswer(400, f"invalid branch or tag name {name!r}")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for a single ``bytes=`` range, or None if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or match[1] == match[2] == "":
        return None
    if match[1] == "":
        start, end = max(size - int(match[2]), 0), size - 1
    else:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start > end or start >= size:
        return None
    return start, end


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """A Hub-compatible server on ``host:port`` (port 0 picks a free one), storing under ``root``.

    ``token``: if set, writes need ``Authorization: Bearer <token>``, private repos are only
    visible with it, and a wrong token is refused everywhere; if None, anyone may do anything.
    ``upload_mode``: "regular" (every file inline in the commit; works with xet installed) or
    "lfs" (large and weight files through git-LFS; needs ``HF_HUB_DISABLE_XET=1`` in the client).
    :meth:`tamper` and :meth:`set_hostile` make it behave like a compromised Hub, for tests.
    Use as a context manager, or call :meth:`start` / :meth:`stop` (or :meth:`serve_forever`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        token: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        upload_mode: UploadMode = "regular",
        username: str = "user",
        verbose: bool = False,
        record_requests: bool = True,
    ) -> None:
        if upload_mode not in ("regular", "lfs"):
            raise ValueError(f"upload_mode must be 'regular' or 'lfs', not {upload_mode!r}")
        self.token = token
        self.upload_mode: UploadMode = upload_mode
        self.username = _check_name(username, "username")
        self.verbose = verbose
        self.store = _Store(Path(root))
        self.requests: list[tuple[str, str]] = []
        self._record_requests = record_requests
        self._uploads: dict[str, tuple] = {}
        self._lies: dict[str, str] = {}
        self._honest_answers = 0
        self._connections: set[socket.socket] = set()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.hub = self

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """The URL to give the client, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections (so a stopped hub is really gone)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        with self._state_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tamper(
        self, repo_id: str, path: str, new_bytes: bytes, *, repo_type: str = "model"
    ) -> None:
        """Serve ``new_bytes`` for ``path`` in every commit, keeping the recorded hashes.

        Simulates a compromised server: tree listings and ETags still show the original hashes,
        but downloads get the new bytes. Resolve reports the new size.
        """
        blob = self.store.put_bytes(new_bytes)
        with self.store.lock:
            repo = self.store.load(repo_type, repo_id)
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            entries = [c["files"][path] for c in repo["commits"].values() if path in c["files"]]
            if not entries:
                raise KeyError(f"{path!r} is in no commit of {repo_id!r}")
            for entry in entries:
                entry["blob"] = blob
            self.store.save(repo)

    def set_hostile(
        self,
        *,
        etag: str | None = None,
        commit: str | None = None,
        file_name: str | None = None,
        honest_answers: int = 0,
    ) -> None:
        """Answer like a malicious Hub from now on; with no lie given, answer honestly again.

        ``etag`` is sent verbatim as every file's ``ETag`` / ``X-Linked-Etag`` (the client
        names cache blobs after it), ``commit`` as the commit id (``X-Repo-Commit``, repo info
        ``sha``), and ``file_name`` is added to every tree listing, paths-info answer and
        ``siblings``. The first ``honest_answers`` answers that would lie are honest instead:
        a server that changes its story between a client's checks and its download.
        """
        lies = {"etag": etag, "commit": commit, "file_name": file_name}
        with self._state_lock:
            self._lies = {kind: lie for kind, lie in lies.items() if lie is not None}
            self._honest_answers = honest_answers

    def repo_state(self, repo_id: str, *, repo_type: str = "model") -> dict:
        """A copy of the stored repo (commits with their files and operations, branches, tags)."""
        repo = self.store.load(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    # --- used by the handler -----------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        if self._record_requests:
            with self._state_lock:
                self.requests.append((method, path))

    def _answer_lies(self, *kinds: str) -> dict[str, str]:
        """The lies (kind -> value) to tell in one answer about ``kinds``; {} when honest."""
        with self._state_lock:
            lies = {kind: self._lies[kind] for kind in kinds if kind in self._lies}
            if lies and self._honest_answers > 0:
                self._honest_answers -= 1
                return {}
            return lies

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._state_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _sign_upload(self, target: tuple) -> str:
        sig = secrets.token_urlsafe(24)
        with self._state_lock:
            self._uploads[sig] = target
        return sig

    def _signed(self, sig: str) -> tuple | None:
        with self._state_lock:
            return self._uploads.get(sig)

    def _forget_upload(self, sig: str) -> None:
        with self._state_lock:
            self._uploads.pop(sig, None)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve a hub until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding blobs and repos")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=None, help="token required for writes and private repos")
    parser.add_argument("--upload-mode", choices=["regular", "lfs"], default="regular")
    parser.add_argument("--username", default="user")
    parser.add_argument("--verbose", action="store_true", help="print one line per request")
    args = parser.parse_args(argv)
    server = HubServer(
        args.root,
        token=args.token,
        port=args.port,
        host=args.host,
        upload_mode=args.upload_mode,
        username=args.username,
        verbose=args.verbose,
        record_requests=False,
    )
    print(f"zoo hub server on {server.endpoint} (root {args.root})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
