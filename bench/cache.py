"""The frozen-prefix cache at dataset size 4,096: in memory vs spilled to a memory-mapped
file by a small ``cache_memory=`` budget.

Runs go through ``finetune(..., cache_memory=...)`` and the process-wide store (cleared
before and after each run, so nothing is reused between runs). For each run: time, peak RSS
delta, peak anonymous-memory delta (heap; a mapped file's pages are not in it), the bytes
the store holds in memory (must stay within the budget) and the bytes spilled to disk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zoo
from bench import loops
from bench.common import CASES, MiB, PeakGPU, PeakRSS, dataset, loadavg, local_base, table
from bench.training import KEEP_HEAD
from zoo.data.feature_cache import shared_store


@dataclass(frozen=True)
class CacheRun:
    model: str
    strategy: str
    n: int
    epochs: int
    cache_memory: int | None  # None: zoo's default budget (2 GiB, less on a small machine)


def default_plan(quick: bool = False, n: int = 4096) -> list[CacheRun]:
    budget_lp = 1 * MiB        # ResNet-18 pooled features at 4,096 images: 8 MiB
    budget_partial = 32 * MiB  # ResNet-18 layer2 output (128x8x8) at 4,096 images: 128 MiB
    epochs = 1 if quick else 3
    return [
        CacheRun("resnet18", "linear_probe", n, epochs, None),
        CacheRun("resnet18", "linear_probe", n, epochs, budget_lp),
        CacheRun("resnet18", "partial", n, epochs, None),
        CacheRun("resnet18", "partial", n, epochs, budget_partial),
    ]


class _Probe(zoo.Callback):
    """Reads the store's state at the end of epoch 1 (the cache is filled during it)."""

    def __init__(self, store: Any, info: dict[str, Any]) -> None:
        self.store, self.info = store, info

    def on_epoch_end(self, run: Any, epoch: int, record: dict[str, Any]) -> None:
        if epoch == 0:
            self.info["memory_bytes"] = self.store.memory_bytes
            self.info["spilled_bytes"] = sum(p.stat().st_size
                                             for p, _ in self.store._spilled.values())
            self.info["budget"] = self.store.memory_budget


def run(plan: Sequence[CacheRun], workdir: Path, log: Any = print,
        device: str = "cpu") -> dict[str, Any]:
    rows = []
    for item in plan:
        case = CASES[item.model]
        base = local_base(case, workdir)
        data = dataset(item.n, case.image_size)
        model = base.build(device)
        loops.warm_up(model, data.x, base.mean, base.std, channels_last=case.convnet)
        del model
        store = shared_store()
        store.clear()
        info: dict[str, Any] = {}
        probe = _Probe(store, info)
        load = loadavg()
        options = dict(case.partial) if item.strategy == "partial" else {}
        with PeakRSS() as rss, PeakGPU(device) as gpu:
            start = time.perf_counter()
            out = zoo.finetune(base.backbone, item.strategy, (data.x, data.y),
                               epochs=item.epochs, strategy_options=options,
                               weights="default", num_classes=10,
                               builder_kwargs=case.builder_kwargs, quiet=True,
                               cache_memory=item.cache_memory, callbacks=[probe], seed=0,
                               device=device, **KEEP_HEAD)
            elapsed = time.perf_counter() - start
        store.clear()
        budget = info.get("budget", 0)
        row = {
            "model": item.model, "strategy": item.strategy, "n": item.n,
            "epochs": item.epochs, "cache_memory": item.cache_memory, "budget": budget,
            "time_s": elapsed, "peak_rss_mib": rss.peak_delta / MiB,
            "peak_anon_mib": rss.peak_anon_delta / MiB,
            "peak_gpu_mib": gpu.peak_delta / MiB, "device": device,
            "cache_in_memory_mib": info.get("memory_bytes", 0) / MiB,
            "cache_spilled_mib": info.get("spilled_bytes", 0) / MiB,
            "within_budget": info.get("memory_bytes", 0) <= budget,
            "feature_cache": out.metrics.get("feature_cache"),
            "train_accuracy": out.metrics.get("train_accuracy"),
            "loadavg": [load, loadavg()],
        }
        rows.append(row)
        log(f"  cache {item.model} {item.strategy} N={item.n} budget="
            f"{'default' if item.cache_memory is None else item.cache_memory // MiB}MiB "
            f"{elapsed:.1f}s in-mem {row['cache_in_memory_mib']:.1f}MiB "
            f"spilled {row['cache_spilled_mib']:.1f}MiB")
    return {"runs": rows}


def tables(data: dict[str, Any]) -> str:
    gpu = any(r.get("device", "cpu") != "cpu" for r in data["runs"])
    rows = [[r["model"], r["strategy"], r["n"], r["epochs"],
             f"default {r['budget'] / MiB:.0f}" if r["cache_memory"] is None
             else f"{r['cache_memory'] / MiB:.0f}",
             f"{r['time_s']:.1f}", f"{r['cache_in_memory_mib']:.1f}",
             f"{r['cache_spilled_mib']:.1f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['peak_anon_mib']:.0f}", "met" if r["within_budget"] else "MISSED",
             f"{r['train_accuracy']:.3f}"]
            + ([f"{r.get('peak_gpu_mib', 0):.0f}"] if gpu else [])
            for r in data["runs"]]
    return table(["model", "strategy", "N", "E", "budget MiB", "time s", "cache RAM MiB",
                  "spilled MiB", "peak RSS MiB", "peak anon MiB", "RAM <= budget",
                  "train acc", *(["peak GPU MiB"] if gpu else [])], rows,
                 "Feature cache: in memory vs spilled to a memory-mapped file")
