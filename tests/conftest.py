"""Shared fixtures: a private ZOO_HOME per test, tiny real data, throwaway backbones.

No ImageNet weights exist offline, so "pretrained" bases are made here: a seeded random
model is saved to a local file named like torch.hub's (``resnet18-<sha256[:8]>.pth``) and
declared as a backbone's ``file:`` weights with its full sha256, through a throwaway plugin
object that is unregistered when the test ends (the registry rebuilds when plugins change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import zoo
from zoo.core._io import file_sha256
from zoo.plugins.manager import get_plugin_manager
from zoo.training.callbacks import Callback, Run

# Each registered plugin object gets its own name (pluggy refuses a name twice).
_PLUGIN_NUMBERS = itertools.count(1)


@pytest.fixture(autouse=True)
def zoo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own zoo data folder (weights cache, feature spill files)."""
    home = tmp_path / "zoo-home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    return home


def _is_loopback(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it would be resolved and reached over the network
        return False


@pytest.fixture(autouse=True, scope="session")
def network_only_on_loopback() -> Iterator[None]:
    """No test reaches past 127.0.0.1: a connection to any other address fails at once, so a
    test that would download (a weights URL, the real Hub) fails instead of fetching."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise ConnectionRefusedError(f"tests may only connect to 127.0.0.1, not {address}")

    def connect(sock: socket.socket, address: Any) -> None:
        refuse(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        refuse(sock, address)
        return real_connect_ex(sock, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex  # type: ignore
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: the tensors in these tests are tiny, and with two threads
    on a busy two-core machine OpenMP's spinning makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """``single_torch_thread`` for a whole test module."""
    with single_torch_thread():
        yield


# --------------------------------------------------------------------------- a tiny backbone


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, one strided conv-BN-ReLU block, average pool, linear head."""

    def __init__(self, *, num_classes: int = 10, bias: bool = True, bn: bool = True) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if bn else nn.Identity()

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), norm(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=bias),
                                   norm(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes, bias=bias)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.block(self.stem(x)))


def tiny_stages(model: TinyNet) -> list[zoo.Stage]:
    return [zoo.Stage(("stem",), model.stem), zoo.Stage(("block",), model.block),
            zoo.Stage(("head",), model.forward_head)]


TINY = zoo.Backbone(
    name="tiny_cnn",
    builder=TinyNet,
    groups=(zoo.LayerGroup("stem", ("stem",)), zoo.LayerGroup("block", ("block",)),
            zoo.LayerGroup("head", ("head",))),
    head="head",
    num_classes=10,
    input_size=(3, 16, 16),
    description="a three-group test network",
    stages=tiny_stages,
)


# --------------------------------------------------------------------------- registration


class BackbonePlugin:
    """A throwaway plugin registering the given backbones."""

    def __init__(self, *backbones: zoo.Backbone) -> None:
        self.backbones = backbones

    @zoo.hookimpl
    def register_backbones(self, register: Callable[[zoo.Backbone], None]) -> None:
        for backbone in self.backbones:
            register(backbone)


@contextlib.contextmanager
def registered(*backbones: zoo.Backbone) -> Iterator[tuple[zoo.Backbone, ...]]:
    """Register ``backbones`` through a plugin object for the duration of the block."""
    pm = get_plugin_manager()
    plugin = BackbonePlugin(*backbones)
    pm.register(plugin, name=f"test-backbones-{next(_PLUGIN_NUMBERS)}")
    try:
        yield backbones
    finally:
        pm.unregister(plugin)


@pytest.fixture
def register_backbones() -> Iterator[Callable[..., tuple[zoo.Backbone, ...]]]:
    """``register_backbones(spec, ...)`` registers specs until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda *specs: stack.enter_context(registered(*specs))


@pytest.fixture
def tiny(register_backbones: Callable[..., Any]) -> zoo.Backbone:
    """The tiny three-group backbone (stem, block, head), registered as ``tiny_cnn``."""
    register_backbones(TINY)
    return TINY


# --------------------------------------------------------------------------- pretrained bases


@pytest.fixture(scope="session")
def base_weights_file(tmp_path_factory: pytest.TempPathFactory
                      ) -> Callable[..., tuple[Path, str]]:
    """``base_weights_file(arch, seed=0)``: a seeded random model's weights file and sha256.

    ``arch`` is a registered name or a ``Backbone``; files are made once per session.
    """
    directory = tmp_path_factory.mktemp("base-weights")
    made: dict[tuple[str, int], tuple[Path, str]] = {}

    def make(arch: str | zoo.Backbone, seed: int = 0) -> tuple[Path, str]:
        name = arch if isinstance(arch, str) else arch.name
        if (name, seed) not in made:
            torch.manual_seed(seed)
            model = zoo.create_model(arch)
            tmp = directory / f"{name}-seed{seed}.tmp"
            torch.save(model.state_dict(), tmp)
            sha = file_sha256(tmp)
            path = directory / f"{name}-{sha[:8]}.pth"
            tmp.rename(path)
            made[(name, seed)] = (path, sha)
        return made[(name, seed)]

    return make


def with_local_weights(spec: zoo.Backbone, path: Path, sha256: str, name: str) -> zoo.Backbone:
    """``spec`` renamed to ``name`` whose default weights are the local file ``path``."""
    return dataclasses.replace(
        spec, name=name, aliases=(),
        weights=(zoo.Weights(tag="local", source=f"file:{path}", sha256=sha256,
                             num_classes=spec.num_classes),),
        default_weights="local")


@pytest.fixture
def pretrained(base_weights_file: Callable[..., tuple[Path, str]],
               register_backbones: Callable[..., Any]) -> Callable[..., str]:
    """``pretrained("resnet18")`` registers ``test_resnet18`` with local "pretrained" weights.

    Also accepts a ``Backbone`` (e.g. ``TINY``); ``seed`` picks other weights and ``name``
    another registered name. Returns the registered name.
    """

    def make(arch: str | zoo.Backbone = "resnet18", *, seed: int = 0,
             name: str | None = None) -> str:
        spec = zoo.get_backbone(arch) if isinstance(arch, str) else arch
        path, sha = base_weights_file(arch, seed)
        local = with_local_weights(spec, path, sha, name or f"test_{spec.name}")
        register_backbones(local)
        return local.name

    return make


# --------------------------------------------------------------------------- tiny real data


@pytest.fixture(scope="session")
def digits() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``digits(per_class, split="train")``: the real 8x8 digits as a uint8 ``(x, y)`` pair."""

    def take(per_class: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = zoo.load_data("digits", split, limit_per_class=per_class)
        assert data.tensors is not None
        return data.tensors

    return take


def quick_finetune(backbone: str, strategy: str, train: Any, val: Any = None,
                   **kwargs: Any) -> zoo.FinetuneResult:
    """``zoo.finetune`` with the small, fast settings the runner tests share (1 epoch of
    batches of 10 at 16 px, lr 1e-2, quiet); keyword arguments override them."""
    options: dict[str, Any] = dict(epochs=1, batch_size=10, lr=1e-2, quiet=True,
                                   image_size=16)
    options.update(kwargs)
    return zoo.finetune(backbone, strategy, train, val, **options)


class InterruptAfter(Callback):
    """Stops the run like Ctrl-C would, right after epoch ``epoch`` (0-based) is saved."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- torchrun


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, tmp_path: Path, out: Path) -> None:
    """Run ``script`` (given ``out`` as its argument) on 2 CPU ranks with torchrun, on the
    loopback interface only; fail with the ranks' output if it does not exit cleanly."""
    path = tmp_path / "train.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "ZOO_HOME": str(tmp_path / "zoo-home")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(path), str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# --------------------------------------------------------------------------- terminal summary


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """After a run that included test_reliability.py, say how many malformed inputs its
    tests tried and how many faults they injected (its ``COUNTS``)."""
    reliability = Path(__file__).with_name("test_reliability.py")
    module = next((m for m in list(sys.modules.values())
                   if getattr(m, "__file__", None) == str(reliability)), None)
    ran = any(getattr(report, "when", None) == "call"
              and report.nodeid.split("::")[0].endswith(reliability.name)
              for reports in terminalreporter.stats.values() for report in reports)
    if module is not None and ran:
        counts = module.COUNTS
        terminalreporter.write_line(
            f"reliability: {counts['malformed inputs']} malformed inputs tried, "
            f"{counts['faults injected']} faults injected")
