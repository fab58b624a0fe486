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


def default_plan(quick: bool) -> list[MemoryCell]:
    if quick:
        return [MemoryCell("resnet18", s, 256, 2) for s in ("linear_probe", "partial", "full")]
    cells = []
    for model, sizes in (("resnet18", (512, 4096)), ("lite0", (512, 4096)),
                         ("vit_b_16", (512,))):
        for n in sizes:
            for strategy in ("linear_probe", "partial", "full"):
                cells.append(MemoryCell(model, strategy, n, 1 if strategy == "full" else 2))
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
    run = run_zoo if loop == "zoo" else run_naive
    result, trained = run(base, Cell(cell.model, cell.strategy, cell.n, cell.epochs, ()), data)
    peak_kib = _status_kib("VmHWM")
    del trained
    return {**asdict(cell), "loop": loop, "peak_mib": (peak_kib - before_kib) / 1024,
            "baseline_mib": before_kib / 1024, "time_s": result.epoch_end_s[-1],
            "torch_threads": torch.get_num_threads(),
            "cache_mib": result.extra.get("cache_memory_bytes", 0) / MiB}


def run(plan: Sequence[MemoryCell], workdir: Path, log: Any = print) -> dict[str, Any]:
    """Every cell, both loops, each in its own process."""
    rows = []
    for cell in plan:
        for loop in LOOPS:
            command = [sys.executable, "-m", "bench.memory", "--child", json.dumps(asdict(cell)),
                       "--loop", loop, "--workdir", str(workdir)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                log(f"  {cell} {loop}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(f"  {cell.model:9} {cell.strategy:13} N={cell.n:5} {loop:5} "
                f"peak {row['peak_mib']:7.1f} MiB ({row['time_s']:.1f} s)")
    return {"rows": rows}


def tables(data: dict[str, Any]) -> str:
    found = {(r["model"], r["strategy"], r["n"], r["loop"]): r for r in data["rows"]}
    rows = []
    for (model, strategy, n, loop), row in found.items():
        if loop != "zoo":
            continue
        naive = found.get((model, strategy, n, "naive"))
        full = found.get((model, "full", n, "zoo"))
        below = "-" if strategy == "full" or full is None else (
            "met" if row["peak_mib"] < full["peak_mib"] else "MISSED")
        rows.append([model, strategy, n, row["epochs"], naive["peak_mib"] if naive else None,
                     row["peak_mib"], row["cache_mib"], full["peak_mib"] if full else None,
                     below])
    return table(["model", "strategy", "N", "E", "naive MiB", "zoo MiB", "of which cache",
                  "zoo full MiB", "frozen < full"], rows,
                 "Peak memory (fresh process per run; VmHWM minus RSS before the run)") + (
        "\n  The data, the interpreter and the imports are in the baseline, not the peak.")


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
