"""The frozen-prefix activation cache.

When the first groups of a model are frozen for a whole phase and the input pipeline is
deterministic (the transform, and the data: see ``decide_cache``), their output for a given
sample never changes: compute it once, then train the rest of the network on it every
epoch. Entries are keyed by everything the output depends on (backbone, base weights,
group boundary, data fingerprint, transform and its geometry) and kept in memory up to
``cache_memory`` bytes; past that they spill to a memory-mapped file under
``$ZOO_HOME/features``. A process-wide store lets a sweep reuse one backbone's features
for every strategy that freezes the same prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from zoo.core.paths import zoo_home

if TYPE_CHECKING:
    from zoo.data.imagedata import ImageData

DEFAULT_CACHE_MEMORY = 2 * 1024**3


def default_cache_memory() -> int:
    """The default budget: 2 GiB, or a quarter of the memory available now if that is less,
    so that the cache leaves room for training on a small machine (Linux reads
    ``MemAvailable``; elsewhere 2 GiB)."""
    try:
        text = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in text.splitlines()
                             if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return DEFAULT_CACHE_MEMORY
    return min(DEFAULT_CACHE_MEMORY, available // 4)


@dataclass(frozen=True)
class CacheKey:
    """Everything a cached activation depends on."""

    backbone: str
    weights_sha256: str
    boundary: str
    data_fingerprint: str
    transform: str
    view: int = 0

    def digest(self) -> str:
        """A short stable hash of the key, used for file names."""
        text = "|".join(str(v) for v in self.__dict__.values())
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_dir() -> Path:
    return zoo_home() / "features"


class FeatureStore:
    """Cached activations, in memory up to a byte budget, then memory-mapped on disk."""

    def __init__(self, memory_budget: int | None = None) -> None:
        self.memory_budget = default_cache_memory() if memory_budget is None else memory_budget
        self._memory: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._spilled: dict[CacheKey, tuple[Path, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory (memory-mapped entries are not counted)."""
        return sum(t.numel() * t.element_size() for t in self._memory.values())

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The cached activations for ``key``, or None."""
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        if key in self._spilled:
            self.hits += 1
            return self._spilled[key][1]
        return None

    def get_or_compute(self, key: CacheKey, compute: Callable[[], Iterator[torch.Tensor]],
                       count: int) -> torch.Tensor:
        """The activations for ``key``; computed batch by batch from ``compute()`` if absent.

        ``compute`` yields the activations of consecutive batches (``count`` rows in all).
        They are written straight into their final home, so at most one batch is in flight
        beyond the budget.
        """
        cached = self.get(key)
        if cached is not None:
            return cached
        self.misses += 1
        batches = compute()
        first = next(batches).detach().to("cpu")
        row_bytes = first[0].numel() * first.element_size()
        needed = row_bytes * count
        if needed <= self.memory_budget:  # an entry that can never fit must not evict others
            self._make_room(needed)
        if needed <= self.memory_budget - self.memory_bytes:
            out = torch.empty((count, *first.shape[1:]), dtype=first.dtype)
            self._memory[key] = out
        else:
            out = self._memmap(key, (count, *first.shape[1:]), first.dtype)
        try:
            start = 0
            for batch in (first, *(b.detach().to("cpu") for b in batches)):
                out[start:start + len(batch)] = batch
                start += len(batch)
            if start != count:
                raise RuntimeError(f"feature cache expected {count} rows, got {start}")
        except BaseException:
            self.drop(key)
            raise
        return out

    def _make_room(self, needed: int) -> None:
        while self._memory and self.memory_bytes + needed > self.memory_budget:
            self._memory.popitem(last=False)

    def _memmap(self, key: CacheKey, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=key.digest() + "-", suffix=".f32", dir=directory)
        os.close(fd)
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        array = np.memmap(name, dtype=np_dtype, mode="w+", shape=shape)
        tensor = torch.from_numpy(array)
        self._spilled[key] = (Path(name), tensor)
        return tensor

    def drop(self, key: CacheKey) -> None:
        """Forget ``key`` (deleting its spill file, if any)."""
        self._memory.pop(key, None)
        spilled = self._spilled.pop(key, None)
        if spilled is not None:
            spilled[0].unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget everything (spill files included)."""
        for key in list(self._memory) + list(self._spilled):
            self.drop(key)

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __del__(self) -> None:
        for path, _ in getattr(self, "_spilled", {}).values():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def decide_cache(wanted: bool, *datasets: ImageData | None) -> tuple[bool, str | None]:
    """Whether a run may cache features of ``datasets``, and if the data forbid it, why (one
    line for the log and the run's metrics).

    ``wanted`` is the run's own choice (cache on, and a deterministic transform or fixed
    augmented views). Only inputs known not to change between reads are cached: zoo's
    folders, tensors and built-in sets, or a torch Dataset declaring ``deterministic = True``
    (see ``ImageData.cache_refusal``); a cached random augmentation would be replayed every
    epoch.
    """
    if not wanted:
        return False, None
    for data in datasets:
        reason = data.cache_refusal() if data is not None else None
        if reason is not None:
            return False, f"feature cache off: {reason}"
    return True, None


_shared: FeatureStore | None = None


def shared_store(memory_budget: int | None = None) -> FeatureStore:
    """The process-wide store (a sweep's runs share it); its budget updated if given."""
    global _shared
    if _shared is None:
        _shared = FeatureStore(memory_budget)
    elif memory_budget is not None:
        _shared.memory_budget = memory_budget
    return _shared
