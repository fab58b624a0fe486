"""What a comparison measures besides accuracy: peak memory while a run trains, and the
machine it ran on.

Peak memory on CPU is the process's peak RSS, sampled at ~20 Hz, both absolute and above the
RSS at the run's start, after freed memory was handed back to the OS (RSS is process-wide:
caches that outlive a run count for the run that filled them); on CUDA it is
``max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import sys
import threading
from typing import Any

import psutil
import torch


class PeakMemory:
    """Peak memory while the block runs: RSS sampled by a thread, or CUDA max allocated."""

    def __init__(self, device: Any, interval: float = 0.05) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
            return self
        release_freed_memory()
        process = psutil.Process()
        self.start_mb = self.peak_mb = process.memory_info().rss / 2**20

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)

        self._thread = threading.Thread(target=sample, name="zoo-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, psutil.Process().memory_info().rss / 2**20)

    @property
    def kind(self) -> str:
        """``"cuda_max_allocated"`` or ``"rss"``."""
        return "cuda_max_allocated" if self.cuda else "rss"


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``).

    Without it the allocator keeps what an earlier run freed, the next run reuses it, and
    its RSS barely rises: the first run of a sweep would look far hungrier than the rest.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine() -> dict[str, Any]:
    """The machine the comparison ran on: CPU model and cores, torch version, device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
