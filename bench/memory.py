"""Peak memory: each run in a fresh process, measured by the kernel's high-water mark.

An in-process RSS delta depends on what ran before (heap that an earlier run freed but the
allocator kept is reused without showing up), so every (model, strategy, N, loop) run here
gets its own ``python -m bench.memory --child`` process: imports, data, base weights and a
warm-up step first, then the high-water mark is reset (``/proc/self/clear_refs``) and the run
is measured against it. Peak = ``VmHWM`` during the run minus the RSS just before it, so the
training data and the interpreter count for neither loop. Linux only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import MiB, table

LOOPS = ("zoo", "naive")


@dataclass(frozen=True)
class MemoryCell:
    """One run: ``epochs`` covers the cache's first (extraction) and a cached epoch."""

    model: str
    strategy: str
    n: int
    epochs: int
    cache_memory: int | None = None  # zoo's cache budget in bytes (None: the default)


def default_plan(quick: bool) -> list[MemoryCell]:
    if quick:
        return [MemoryCell("resnet18", s, 256, 2) for s in ("linear_probe", "partial", "full")]
    cells = []
    for model, sizes in (("resnet18", (512, 4096)), ("lite0", (512, 4096)),
                         ("vit_b_16", (512,))):
        for n in sizes:
            for strategy in ("linear_probe", "partial", "full"):
                cells.append(MemoryCell(model, strategy, n, 1 if strategy == "full" else 2))
    # The largest cache (ResNet-18's layer2 output, 128 MiB) spilled to a memory-mapped file.
    cells.insert(6, MemoryCell("resnet18", "partial", 4096, 2, cache_memory=32 * MiB))
    return cells


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def child(cell: MemoryCell, loop: str, workdir: Path, device: str = "cpu") -> dict[str, Any]:
    """Run one loop of ``cell`` in this (fresh) process and measure its peak (host memory,
    and on a GPU ``torch.cuda.max_memory_allocated`` too)."""
    import torch

    from bench import loops
    from bench.common import CASES, dataset, local_base, release_memory
    from bench.training import Cell, run_naive, run_zoo

    case = CASES[cell.model]
    base = local_base(case, workdir)
    data = dataset(cell.n, case.image_size, eval_size=1)
    model = base.build(device)
    loops.warm_up(model, data.x, base.mean, base.std, channels_last=case.convnet)
    del model
    release_memory()
    if device != "cpu":
        torch.cuda.empty_cache()
    before_kib = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        exact = True
    except OSError:  # some sandboxes refuse it: fall back to the 100 Hz samples
        exact = False
    spec = Cell(cell.model, cell.strategy, cell.n, cell.epochs, ())
    if loop == "zoo":
        result, trained = run_zoo(base, spec, data, cache_memory=cell.cache_memory,
                                  device=device)
    else:
        result, trained = run_naive(base, spec, data, device=device)
    peak_mib = (_status_kib("VmHWM") - before_kib) / 1024 if exact else result.peak_rss / MiB
    del trained
    anon = result.extra.get("peak_anon")
    return {**asdict(cell), "loop": loop, "peak_mib": peak_mib,
            "method": "VmHWM" if exact else "sampled",
            "peak_anon_mib": anon / MiB if anon is not None else None,
            "baseline_mib": before_kib / 1024, "time_s": result.epoch_end_s[-1],
            "torch_threads": torch.get_num_threads(),
            "cache_mib": result.extra.get("cache_memory_bytes", 0) / MiB,
            "device": device, "peak_gpu_mib": result.extra.get("peak_gpu", 0) / MiB}


def run(plan: Sequence[MemoryCell], workdir: Path, log: Any = print,
        repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Every cell, both loops, each run in its own process ``repeats`` times; the row with
    the median peak is kept (identical runs differ by tens of MiB: allocator timing)."""
    rows = []
    for cell in plan:
        for loop in LOOPS if cell.cache_memory is None else ("zoo",):
            command = [sys.executable, "-m", "bench.memory", "--child", json.dumps(asdict(cell)),
                       "--loop", loop, "--workdir", str(workdir), "--device", device]
            runs = []
            for _ in range(repeats):
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    log(f"  {cell} {loop}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    break
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            runs.sort(key=lambda r: r["peak_mib"])
            row = {**runs[len(runs) // 2], "peaks_mib": [r["peak_mib"] for r in runs]}
            rows.append(row)
            budget = "" if cell.cache_memory is None else f" budget {cell.cache_memory // MiB}M"
            peaks = ", ".join(f"{p:.0f}" for p in row["peaks_mib"])
            gpu = f", GPU {row['peak_gpu_mib']:.0f} MiB" if device != "cpu" else ""
            log(f"  {cell.model:9} {cell.strategy:13} N={cell.n:5} {loop:5}{budget} "
                f"peak {row['peak_mib']:7.1f} MiB (runs {peaks}){gpu}")
    return {"rows": rows, "repeats": repeats, "device": device}


def tables(data: dict[str, Any]) -> str:
    """Peaks of both loops, and zoo's frozen strategies against its full fine-tune.

    The comparison uses heap (anonymous) memory: a cache spilled to a memory-mapped file
    counts in VmHWM but is page cache the kernel can drop.
    """
    rows = data["rows"]
    gpu = data.get("device", "cpu") != "cpu"
    found = {(r["model"], r["strategy"], r["n"], r["loop"]): r for r in rows
             if r.get("cache_memory") is None}
    out = []
    for row in rows:
        if row["loop"] != "zoo":
            continue
        naive = found.get((row["model"], row["strategy"], row["n"], "naive"))
        full = found.get((row["model"], "full", row["n"], "zoo"))
        heap, full_heap = row.get("peak_anon_mib"), full and full.get("peak_anon_mib")
        below = "-" if row["strategy"] == "full" or heap is None or full_heap is None else (
            "met" if heap < full_heap else "MISSED")
        budget = "default" if row.get("cache_memory") is None else \
            f"{row['cache_memory'] // MiB} MiB"
        spread = row.get("peaks_mib") or [row["peak_mib"]]
        out.append([row["model"], row["strategy"], row["n"], row["epochs"], budget,
                    naive["peak_mib"] if naive else None, row["peak_mib"],
                    f"{min(spread):.0f}-{max(spread):.0f}", heap, row["cache_mib"],
                    full_heap, below])
        if gpu:
            naive_gpu = naive.get("peak_gpu_mib") if naive else None
            ratio = row["peak_gpu_mib"] / naive_gpu if naive_gpu else None
            out[-1] += [naive_gpu, row["peak_gpu_mib"],
                        "-" if ratio is None else
                        f"{ratio:.2f}x {'met' if ratio <= 1.1 else 'MISSED'}"]
    return table(["model", "strategy", "N", "E", "cache budget", "naive MiB", "zoo MiB",
                  "zoo range", "zoo heap MiB", "cache in RAM", "zoo full heap",
                  "frozen < full",
                  *(["naive GPU MiB", "zoo GPU MiB", "GPU zoo/naive <= 1.1"] if gpu else [])],
                 out,
                 "Peak memory (fresh process per run; VmHWM minus RSS before the run)") + (
        f"\n  Median of {data.get('repeats', 1)} runs each (zoo range: lowest-highest VmHWM)."
        "\n  The data, the interpreter and the imports are in the baseline, not the peak."
        "\n  heap: anonymous memory only (sampled at 100 Hz); a memory-mapped spill file's"
        "\n  pages count in VmHWM but are reclaimable page cache. frozen < full compares heaps.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--child", required=True, help="a MemoryCell as JSON")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cell = MemoryCell(**json.loads(args.child))
    print(json.dumps(child(cell, args.loop, Path(args.workdir), args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
