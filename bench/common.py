"""Shared pieces: machine description, peak-RSS sampling, data, local "pretrained" bases,
and aligned tables."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

import zoo
from zoo.core._io import file_sha256
from zoo.core.table import table_lines
from zoo.experiments.measure import release_freed_memory as release_memory

MiB = 1024 * 1024


# --------------------------------------------------------------------------- machine


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (the GPU's name and memory for a CUDA device)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg": [round(x, 2) for x in load],
        **gpu_info(device),
    }


def gpu_info(device: str) -> dict[str, Any]:
    """The CUDA card behind ``device`` ({} for a CPU): name, memory, capability, CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(dev)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
            "gpu_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported()}


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): timings end after it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> float:
    """The 1-minute load average (other work on the machine perturbs timings)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


# --------------------------------------------------------------------------- memory


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_and_anon(process: psutil.Process) -> tuple[int, int]:
    """(resident set size, its anonymous part) in bytes; file-backed pages (a memory-mapped
    cache file, shared libraries) are in the first but not the second."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            fields = handle.read().split()
        resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
        return resident, resident - shared
    except (OSError, IndexError, ValueError):
        rss = process.memory_info().rss
        return rss, rss


class PeakRSS:
    """Samples this process's resident set size at ``hz`` in a thread.

    ``peak_delta`` is the highest RSS seen minus the RSS when sampling started (bytes);
    ``peak_anon_delta`` the same for anonymous memory only (heap: what a memory-mapped
    spill file does not add to). tracemalloc does not see torch's allocations, hence RSS.
    """

    def __init__(self, hz: float = 100.0) -> None:
        self.interval = 1.0 / hz
        self.process = psutil.Process()
        self.baseline = self.peak = self.baseline_anon = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        rss, anon = _rss_and_anon(self.process)
        self.peak = max(self.peak, rss)
        self.peak_anon = max(self.peak_anon, anon)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        release_memory()
        self.baseline, self.baseline_anon = _rss_and_anon(self.process)
        self.peak, self.peak_anon = self.baseline, self.baseline_anon
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()

    @property
    def peak_delta(self) -> int:
        return self.peak - self.baseline

    @property
    def peak_anon_delta(self) -> int:
        return self.peak_anon - self.baseline_anon


class PeakGPU:
    """Peak CUDA memory of a block: ``torch.cuda.max_memory_allocated`` minus what was
    allocated when it started (bytes; 0 on CPU). Tensors alive before (data, an earlier
    model) are in the baseline, not the peak."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.baseline = self.peak = 0

    def __enter__(self) -> PeakGPU:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.baseline)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """The same uint8 tensors for zoo and the hand loop: train (first ``n``) and a held-out
    evaluation set (the last images of mnist5k, never trained on)."""

    x: torch.Tensor
    y: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


_MNIST: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
EVAL_SIZE = 500


def mnist_rgb(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 mnist5k digits (train split then val split) as N x 3 x size x size uint8."""
    if size not in _MNIST:
        train = zoo.load_data("mnist5k", "train")
        val = zoo.load_data("mnist5k", "val")
        assert train.tensors is not None and val.tensors is not None
        images = torch.cat([train.tensors[0], val.tensors[0]])
        labels = torch.cat([train.tensors[1], val.tensors[1]])
        x = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        x = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        _MNIST[size] = (x.contiguous(), labels)
    return _MNIST[size]


def dataset(n: int, size: int, eval_size: int = EVAL_SIZE) -> Data:
    """``n`` training images and the last ``eval_size`` images (never trained on) for
    evaluation; ``n + eval_size`` must not exceed 5,000."""
    x, y = mnist_rgb(size)
    if n + eval_size > len(x):
        raise ValueError(f"{n} training + {eval_size} evaluation images: mnist5k has {len(x)}")
    return Data(x[:n].clone(), y[:n].clone(), x[-eval_size:], y[-eval_size:])


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelCase:
    """One backbone as benchmarked: its input size, builder options and partial freeze."""

    key: str
    backbone: str | zoo.Backbone  # a registered name, or a Backbone object (a slim stand-in)
    image_size: int
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=dict)
    init: str = "random"  # "random" or "default" (start from the backbone's real weights)
    note: str = ""
    convnet: bool = True  # the hand loop on a GPU uses channels_last for convnets only


CASES: dict[str, ModelCase] = {
    "resnet18": ModelCase("resnet18", "resnet18", 64, partial={"freeze_to": "layer2"},
                          note="in-tree torchvision-style ResNet-18, 64x64"),
    "vit_b_16": ModelCase("vit_b_16", "vit_b_16", 32, {"image_size": 32},
                          partial={"frozen_groups": 7}, convnet=False,
                          note="in-tree ViT-B/16 built for 32x32 (2x2 patches + class token)"),
    "lite0": ModelCase("lite0", "timm/tf_efficientnet_lite0", 64,
                       partial={"frozen_groups": 4}, init="default",
                       note="timm tf_efficientnet_lite0 from its real ImageNet weights, 64x64"),
}


@dataclass
class LocalBase:
    """A backbone whose default weights are a local file (the bench's "pretrained" base)."""

    case: ModelCase
    backbone: zoo.Backbone
    path: Path
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model the hand loop trains: the same builder and the same base weights."""
        model = zoo.create_model(self.backbone, weights="default", **self.case.builder_kwargs)
        return model.to(device)

    def group_members(self, model: torch.nn.Module) -> list[tuple[str, tuple[str, ...]]]:
        """(group name, member paths) in order, input to output."""
        return [(g.name, tuple(g.members)) for g in self.backbone.layer_groups(model)]


def local_base(case: ModelCase, workdir: Path, num_classes: int = 10) -> LocalBase:
    """Save the case's starting weights (seeded random, or its real ones) with a
    ``num_classes`` head to a file, and declare them as the backbone's default weights."""
    spec = case.backbone if isinstance(case.backbone, zoo.Backbone) else \
        zoo.get_backbone(case.backbone)
    path = workdir / f"{case.key.replace('/', '-')}-{num_classes}-base.pth"
    mean, std = spec.mean, spec.std
    if case.init == "default":
        w = spec.get_weights()
        mean, std = w.mean, w.std
    if not path.is_file():
        torch.manual_seed(1234)
        weights = "default" if case.init == "default" else None
        model = zoo.create_model(spec, weights=weights, num_classes=num_classes,
                                 **case.builder_kwargs)
        torch.save(model.state_dict(), path)
        del model
    sha = file_sha256(path)
    size = case.image_size
    weights = zoo.Weights(tag="local", source=f"file:{path}", sha256=sha,
                          num_classes=num_classes, input_size=(3, size, size),
                          resize_size=None, mean=mean, std=std)
    backbone = dataclasses.replace(spec, weights=(weights,), default_weights="local",
                                   input_size=(3, size, size))
    return LocalBase(case, backbone, path, sha, tuple(mean), tuple(std))


def normalizer(mean: Sequence[float], std: Sequence[float]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images to ``(x / 255 - mean) / std`` in float32: what a hand loop does per batch,
    written with the same float operations as zoo's transform so both see identical bits."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {m.device: (m, s)}

    def normalize(images: torch.Tensor) -> torch.Tensor:
        if images.device not in on:
            on[images.device] = (m.to(images.device), s.to(images.device))
        mean_, std_ = on[images.device]
        return (images.to(torch.float32) / 255 - mean_) / std_

    return normalize


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             mean: Sequence[float], std: Sequence[float], batch_size: int = 250) -> float:
    """Top-1 accuracy on uint8 images (moved to the model's device; bf16 autocast on a GPU),
    every module in eval mode; flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    normalize = normalizer(mean, std)
    device = next(model.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    correct = 0
    try:
        for start in range(0, len(x), batch_size):
            xb = normalize(x[start:start + batch_size].to(device))
            with autocast:
                pred = model(xb).argmax(1).cpu()
            correct += int((pred == y[start:start + batch_size]).sum())
    finally:
        for m, flag in flags:
            m.training = flag
    return correct / len(x)


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["s"]`` is the wall time in seconds."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


# --------------------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """An aligned plain-text table under ``title`` (zoo's renderer; columns of numbers
    right-aligned)."""
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = {i for i in range(len(headers)) if cells and all(_numeric(r[i]) for r in cells)}
    out = [title, "=" * len(title)] if title else []
    return "\n".join(out + table_lines([list(headers), *cells], right=numeric, rule=True))


def _numeric(text: str) -> bool:
    text = text.strip().lstrip("~").rstrip("x%*")
    if text in ("-", ""):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
