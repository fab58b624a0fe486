"""Peak memory: each run in a fresh process, measured by the kernel's high-water mark.

An in-process RSS delta depends on what ran before (heap that an earlier run freed but the
allocator kept is reused without showing up), so every (model, strategy, N, loop) run here
gets its own ``python -m bench.memory --child`` process: imports, data, base weights and a
warm-up step first, then the high-water mark is reset (``/proc/self/clear_refs``) and the run
is timed against it. Peak = ``VmHWM`` during the run minus the RSS just before it, so the
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


def child(cell: MemoryCell, loop: str, workdir: Path) -> dict[str, Any]:
    """Run one loop of ``cell`` in this (fresh) process and measure its peak."""
    import torch

    from bench import loops
    from bench.common import CASES, dataset, local_base, release_memory
    from bench.training import Cell, run_naive, run_zoo

    case = CASES[cell.model]
    base = local_base(case, workdir)
    data = dataset(cell.n, case.image_size, eval_size=1)
    model = base.build()
    loops.warm_up(model, data.x, base.mean, base.std)
    del model
    release_memory()
    before_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    spec = Cell(cell.model, cell.strategy, cell.n, cell.epochs, ())
    if loop == "zoo":
        result, trained = run_zoo(base, spec, data, cache_memory=cell.cache_memory)
    else:
        result, trained = run_naive(base, spec, data)
    peak_kib = _status_kib("VmHWM")
    del trained
    anon = result.extra.get("peak_anon")
    return {**asdict(cell), "loop": loop, "peak_mib": (peak_kib - before_kib) / 1024,
            "peak_anon_mib": anon / MiB if anon is not None else None,
            "baseline_mib": before_kib / 1024, "time_s": result.epoch_end_s[-1],
            "torch_threads": torch.get_num_threads(),
            "cache_mib": result.extra.get("cache_memory_bytes", 0) / MiB}


def run(plan: Sequence[MemoryCell], workdir: Path, log: Any = print) -> dict[str, Any]:
    """Every cell, both loops, each in its own process."""
    rows = []
    for cell in plan:
        for loop in LOOPS if cell.cache_memory is None else ("zoo",):
            command = [sys.executable, "-m", "bench.memory", "--child", json.dumps(asdict(cell)),
                       "--loop", loop, "--workdir", str(workdir)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                log(f"  {cell} {loop}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            budget = "" if cell.cache_memory is None else f" budget {cell.cache_memory // MiB}M"
            log(f"  {cell.model:9} {cell.strategy:13} N={cell.n:5} {loop:5}{budget} "
                f"peak {row['peak_mib']:7.1f} MiB ({row['time_s']:.1f} s)")
    return {"rows": rows}


def tables(data: dict[str, Any]) -> str:
    rows = data["rows"]
    found = {(r["model"], r["strategy"], r["n"], r["loop"]): r for r in rows
             if r.get("cache_memory") is None}
    out = []
    for row in rows:
        if row["loop"] != "zoo":
            continue
        key = (row["model"], row["strategy"], row["n"])
        naive = found.get((*key, "naive"))
        full = found.get((row["model"], "full", row["n"], "zoo"))
        below = "-" if row["strategy"] == "full" or full is None else (
            "met" if row["peak_mib"] < full["peak_mib"] else "MISSED")
        budget = "default" if row.get("cache_memory") is None else \
            f"{row['cache_memory'] // MiB} MiB"
        out.append([row["model"], row["strategy"], row["n"], row["epochs"], budget,
                    naive["peak_mib"] if naive else None, row["peak_mib"],
                    row.get("peak_anon_mib"), row["cache_mib"],
                    full["peak_mib"] if full else None, below])
    return table(["model", "strategy", "N", "E", "cache budget", "naive MiB", "zoo MiB",
                  "zoo heap MiB", "cache in RAM", "zoo full MiB", "frozen < full"], out,
                 "Peak memory (fresh process per run; VmHWM minus RSS before the run)") + (
        "\n  The data, the interpreter and the imports are in the baseline, not the peak."
        "\n  zoo heap: anonymous memory only (sampled at 100 Hz): a memory-mapped spill"
        "\n  file's pages count in VmHWM but are reclaimable page cache.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--child", required=True, help="a MemoryCell as JSON")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    cell = MemoryCell(**json.loads(args.child))
    print(json.dumps(child(cell, args.loop, Path(args.workdir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
