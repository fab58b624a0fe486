"""Issue 12.6: weights files are checked on every use, whether or not a hash is declared.

zoo records the sha256 of every file it caches (``<file>.sha256`` beside it) and re-checks
it on every use; a download stops at the declared ``size_bytes`` (else at
``$ZOO_MAX_DOWNLOAD_BYTES``) and leaves no ``.part`` file, not even after a kill. Every
server here is a hostile one on 127.0.0.1, built by the test.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import zoo
from zoo.core._io import file_sha256
from zoo.core.errors import WeightsError
from zoo.weights.cache import recorded_sha256
from zoo.weights.download import fetch
from zoo.weights.load import load_state_dict

try:
    import fcntl
except ImportError:  # the sweep needs advisory locks
    fcntl = None  # type: ignore[assignment]


class HostileServer(ThreadingHTTPServer):
    """Serves ``files`` by name; ``/endless`` streams zeros until the client hangs up, and
    ``/liar`` announces a terabyte. Counts the bytes it managed to send."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.sent = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        if name in self.server.files:
            data = self.server.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif name == "liar":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(b"\0" * 1024)
        elif name == "endless":
            self.send_response(200)  # no Content-Length: the body ends when the server stops
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
                    self.server.sent += len(chunk)
            except OSError:
                pass
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[HostileServer]:
    srv = HostileServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def cache_files(zoo_home: Path) -> list[str]:
    """Every file (not folder) under the weights cache, as sorted relative paths."""
    root = zoo_home / "weights"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def weights_bytes(seed: int = 0) -> bytes:
    """A small real state-dict file's bytes."""
    import io

    gen = torch.Generator().manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(32, 32, generator=gen)}, buffer)
    return buffer.getvalue()


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- downloads that never end ----------------------------------------------------------------


def test_endless_stream_stops_at_the_maximum_and_leaves_nothing(
        server: HostileServer, zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.6: a weights URL without a declared size stops at $ZOO_MAX_DOWNLOAD_BYTES."""
    monkeypatch.setenv("ZOO_MAX_DOWNLOAD_BYTES", str(1024 * 1024))
    spec = zoo.Weights(tag="t", source=server.url("endless"))  # no hash, no size: like timm/*
    with pytest.raises(WeightsError) as err:
        fetch(spec)
    message = one_line(err)
    assert "larger than the 1048576 bytes allowed by ZOO_MAX_DOWNLOAD_BYTES" in message
    assert cache_files(zoo_home) == []  # no .part file, no record
    assert server.sent < 16 * 1024 * 1024  # it stopped reading, it did not drain the stream


def test_declared_size_bounds_the_download(server: HostileServer, zoo_home: Path) -> None:
    """Issue 12.6: the declared size_bytes bounds a download: endless, announced or not."""
    small = zoo.Weights(tag="t", source=server.url("endless"), size_bytes=100_000)
    with pytest.raises(WeightsError, match="allowed by the declared size_bytes of weights 't'"):
        fetch(small)
    liar = zoo.Weights(tag="t", source=server.url("liar"), size_bytes=100_000)
    with pytest.raises(WeightsError) as err:
        fetch(liar)
    assert "announces 1000000000000 bytes" in one_line(err)
    assert cache_files(zoo_home) == []

    data = weights_bytes()
    server.files["exact.pth"] = data
    assert fetch(zoo.Weights(tag="t", source=server.url("exact.pth"),
                                size_bytes=len(data))).read_bytes() == data


def test_a_bad_maximum_is_a_clear_error(server: HostileServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.6: the documented maximum is validated, not silently ignored."""
    monkeypatch.setenv("ZOO_MAX_DOWNLOAD_BYTES", "lots")
    with pytest.raises(WeightsError) as err:
        fetch(zoo.Weights(tag="t", source=server.url("endless")))
    assert "ZOO_MAX_DOWNLOAD_BYTES='lots' is not a positive number" in one_line(err)
    assert server.requests == []


# --- files changed after they were cached ----------------------------------------------------


def test_sha256_is_recorded_for_files_without_a_declared_hash(
        server: HostileServer, zoo_home: Path) -> None:
    """Issue 12.6: the first download records the file's full sha256 beside it."""
    data = weights_bytes()
    server.files["plain.pth"] = data
    path = fetch(zoo.Weights(tag="t", source=server.url("plain.pth")))
    sha = hashlib.sha256(data).hexdigest()
    assert recorded_sha256(path) == sha
    record = path.with_name("plain.pth.sha256")
    assert record.read_text() == f"{sha}  plain.pth\n"  # `sha256sum -c` reads it too
    assert sorted(p.name for p in path.parent.iterdir()) == ["plain.pth", "plain.pth.sha256"]


def test_cached_file_edited_after_download_is_never_used(
        server: HostileServer, zoo_home: Path) -> None:
    """Issue 12.6: a cached file changed on disk is downloaded afresh, or refused when that
    fails; the changed bytes never reach a model."""
    good = weights_bytes(seed=0)
    server.files["plain.pth"] = good
    spec = zoo.Weights(tag="t", source=server.url("plain.pth"))
    backbone = zoo.get_backbone("resnet18")
    path = fetch(spec)
    evil = weights_bytes(seed=1)
    path.write_bytes(evil)

    with pytest.warns(UserWarning, match="changed after zoo cached them"):
        state, sha = load_state_dict(backbone, spec)
    assert sha == hashlib.sha256(good).hexdigest() and path.read_bytes() == good
    assert server.requests == ["plain.pth", "plain.pth"]

    path.write_bytes(evil)
    del server.files["plain.pth"]  # offline now (or the server is gone)
    with pytest.warns(UserWarning), pytest.raises(WeightsError) as err:
        load_state_dict(backbone, spec)
    message = one_line(err)
    assert "were changed after zoo cached them" in message and "it was not used" in message
    assert "zoo weights import" in message
    # the changed file is refused every time, and never silently accepted as the new normal
    assert recorded_sha256(path) == hashlib.sha256(good).hexdigest()


def test_cached_file_without_a_record_is_fetched_again(server: HostileServer) -> None:
    """Issue 12.6: a cached file with no record and no declared hash cannot be trusted."""
    data = weights_bytes()
    server.files["plain.pth"] = data
    spec = zoo.Weights(tag="t", source=server.url("plain.pth"))
    path = fetch(spec)
    path.with_name("plain.pth.sha256").unlink()
    with pytest.warns(UserWarning, match="no sha256 record"):
        assert fetch(spec) == path
    assert server.requests == ["plain.pth", "plain.pth"]
    assert recorded_sha256(path) == hashlib.sha256(data).hexdigest()

    # with a declared hash, the declaration vouches for it: recorded without a request
    path.with_name("plain.pth.sha256").unlink()
    declared = zoo.Weights(tag="t", source=spec.source, sha256=hashlib.sha256(data).hexdigest())
    assert fetch(declared) == path and len(server.requests) == 2
    assert recorded_sha256(path) == declared.sha256


def test_hub_cached_file_is_recorded_and_rechecked(
        tmp_path: Path, zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.6: an hf-hub: file without a declared hash (every timm/* backbone) is recorded
    and re-checked; a stale temp folder of a killed Hub download is swept."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from zoo.testing.hub_server import HubServer

    save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer(tmp_path / "hub", token="hf_test") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("user/tiny")
        api.upload_file(repo_id="user/tiny", path_or_fileobj=tmp_path / "model.safetensors",
                        path_in_repo="model.safetensors")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        spec = zoo.Weights(tag="t", source="hf-hub:user/tiny")
        folder = zoo_home / "weights" / "hf-hub" / "user--tiny"
        folder.mkdir(parents=True)
        stale = folder / ".download-abcd1234"
        (stale / "blobs").mkdir(parents=True)
        (stale / "blobs" / "half").write_bytes(b"x" * 1000)

        path = fetch(spec)
        assert recorded_sha256(path) == file_sha256(tmp_path / "model.safetensors")
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors",
                                                             "model.safetensors.sha256"]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline now: no retries
    path.write_bytes(path.read_bytes()[:-1] + b" ")  # edited after download
    with pytest.warns(UserWarning), pytest.raises(WeightsError, match="it was not used"):
        load_state_dict(zoo.get_backbone("resnet18"), spec)


# --- .part files ---------------------------------------------------------------------------


@pytest.mark.skipif(fcntl is None, reason="stale .part files are told apart by flock")
def test_stale_part_files_are_swept_and_nothing_else(
        server: HostileServer, zoo_home: Path, tmp_path: Path) -> None:
    """Issue 12.6: a killed download's .part file goes on the next download of that file;
    a live download's, other files' and anything not zoo's own stay."""
    data = weights_bytes()
    server.files["plain.pth"] = data
    folder = zoo_home / "weights" / f"127.0.0.1_{server.server_address[1]}"
    folder.mkdir(parents=True)
    stale = folder / ".plain.pth.k3x_9qz1.part"
    stale.write_bytes(b"half a download")
    live = folder / ".plain.pth.abcdefgh.part"
    live.write_bytes(b"another process is writing this")
    keep = [folder / ".other.pth.k3x_9qz1.part", folder / "plain.pth.part",
            folder / ".plain.pth.TOOLONG99.part", folder / "notes.txt"]
    for p in keep:
        p.write_bytes(b"not zoo's to delete")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    link = folder / ".plain.pth.linklink.part"
    link.symlink_to(outside)

    with open(live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        assert fetch(zoo.Weights(tag="t", source=server.url("plain.pth"))).is_file()
    assert not stale.exists()
    assert live.exists() and all(p.read_bytes() == b"not zoo's to delete" for p in keep)
    assert link.is_symlink() and outside.read_text() == "keep me"


@pytest.mark.skipif(fcntl is None, reason="stale .part files are told apart by flock")
@pytest.mark.slow
def test_download_killed_midway_leaves_a_part_that_the_next_download_removes(
        server: HostileServer, zoo_home: Path) -> None:
    """Issue 12.6: kill -9 during a download, then download again: no .part is left."""
    source = server.url("endless")
    code = ("import zoo; from zoo.weights.download import fetch; "
            f"fetch(zoo.Weights(tag='t', source={source!r}))")
    env = {**os.environ, "ZOO_HOME": str(zoo_home)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    folder = zoo_home / "weights" / f"127.0.0.1_{server.server_address[1]}"
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in folder.glob(".endless.*.part")):
            assert child.poll() is None and time.monotonic() < deadline, "no download started"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert len(list(folder.glob(".endless.*.part"))) == 1  # what a kill leaves behind

    server.files["endless"] = weights_bytes()  # the next try finds a proper file
    path = fetch(zoo.Weights(tag="t", source=source))
    assert sorted(p.name for p in folder.iterdir()) == [path.name, path.name + ".sha256"]
