"""``python -m bench``: run the benchmarks, print tables, write a JSON file.

    python -m bench                      # everything (about 15 min on 2 CPUs)
    python -m bench --quick              # a short pass over every section
    python -m bench --only training      # one section (training, augment, memory, cache,
                                         # checkpoints, startup)
    python -m bench --only training --models resnet18 --sizes 32 --epochs 1   # tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import SECTIONS


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a fast look")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--out", default="bench-results.json", help="where to write JSON")
    parser.add_argument("--models", help="training, memory: comma-separated subset of "
                        "resnet18,lite0,vit_b_16")
    parser.add_argument("--strategies", help="training: comma-separated subset of "
                        "linear_probe,partial,full")
    parser.add_argument("--cell", action="append", metavar="MODEL:STRATEGY[:N]",
                        help="training: keep only these cells of the plan (repeatable), "
                        "e.g. resnet18:partial:512")
    parser.add_argument("--sizes", help="training: dataset sizes, e.g. 512,4096 (replaces "
                        "the plan's grid); memory: keep only these sizes")
    parser.add_argument("--epochs", type=int, help="training: epochs of every cell "
                        "(replaces the plan's grid)")
    parser.add_argument("--eval-size", type=int, default=500,
                        help="training: held-out images for accuracy (default 500)")
    parser.add_argument("--repeats", type=int, help="augment: interleaved runs of each loop "
                        "(default 3)")
    parser.add_argument("--cache-size", type=int, default=4096,
                        help="cache: dataset size (default 4096)")
    parser.add_argument("--checkpoint-model", default="resnet50",
                        help="checkpoints: backbone (default resnet50)")
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="memory: fresh-process runs per cell; the median is kept")
    parser.add_argument("--workdir", help="where base weights and checkpoints go "
                        "(default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:N]: where zoo and the hand loop train (default cpu)")
    return parser.parse_args(argv)


def training_plan(args: argparse.Namespace) -> list[Any]:
    from bench import training

    plan = training.default_plan(args.quick)
    if args.sizes or args.epochs:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        cells, seen = [], set()
        for c in plan:
            for n in sizes or [c.n]:
                epochs = args.epochs or c.epochs
                key = (c.model, c.strategy, n, epochs)
                if key in seen:
                    continue
                seen.add(key)
                report = tuple(e for e in (1, 5, 10) if e <= epochs)
                if epochs not in report:
                    report = (*report, epochs)
                cells.append(training.Cell(c.model, c.strategy, n, epochs, report))
        plan = cells
    if args.cell:
        keep = [c.split(":") for c in args.cell]
        plan = [c for c in plan if any(
            k[0] == c.model and k[1] == c.strategy and (len(k) < 3 or int(k[2]) == c.n)
            for k in keep)]
    if args.models:
        wanted = args.models.split(",")
        plan = [c for c in plan if c.model in wanted]
    if args.strategies:
        wanted = args.strategies.split(",")
        plan = [c for c in plan if c.strategy in wanted]
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sections = args.only or list(SECTIONS)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Spill files and any weights cache go to a private ZOO_HOME unless one is set.
    os.environ.setdefault("ZOO_HOME", str(workdir / "zoo-home"))

    import torch

    from bench.common import machine

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(args.device), "args": vars(args),
                               "sections": {}}
    info = results["machine"]
    gpu = (f"; {info['gpu']} ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']})"
           if "gpu" in info else "")
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, "
          f"{info['memory_gib']} GiB; torch {info['torch']} ({info['torch_threads']} threads); "
          f"load {info['loadavg']}{gpu}; device {args.device}", flush=True)
    printed: list[str] = []

    def section(name: str, fn: Any, render: Any) -> None:
        print(f"\n[{name}]", flush=True)
        t0 = time.perf_counter()
        data = fn()
        data["elapsed_s"] = time.perf_counter() - t0
        results["sections"][name] = data
        text = render(data)
        printed.append(text)
        print("\n" + text, flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    def log(line: str) -> None:
        print(line, flush=True)

    if "training" in sections:
        from bench import training

        plan = training_plan(args)
        section("training", lambda: training.run(plan, workdir, log, args.eval_size,
                                                 device=args.device),
                training.tables)
    if "augment" in sections and torch.device(args.device).type != "cpu":
        print("\n[augment] skipped: the augmented hand loop is written for CPU", flush=True)
    elif "augment" in sections:
        from bench import augment

        plan_a = augment.default_plan(args.quick)
        if args.sizes or args.epochs:
            plan_a = [replace(c, n=int(args.sizes.split(",")[0]) if args.sizes else c.n,
                              epochs=args.epochs or c.epochs) for c in plan_a]
        if args.repeats:
            plan_a = [replace(c, repeats=args.repeats) for c in plan_a]
        section("augment", lambda: augment.run(plan_a, workdir, log, args.eval_size),
                augment.tables)
    if "memory" in sections:
        from bench import memory

        plan_m = memory.default_plan(args.quick)
        if args.models:
            plan_m = [c for c in plan_m if c.model in args.models.split(",")]
        if args.sizes:
            plan_m = [c for c in plan_m if str(c.n) in args.sizes.split(",")]
        section("memory", lambda: memory.run(plan_m, workdir, log,
                                             repeats=1 if args.quick else args.memory_repeats,
                                             device=args.device),
                memory.tables)
    if "cache" in sections:
        from bench import cache

        plan_c = cache.default_plan(args.quick, n=args.cache_size)
        section("cache", lambda: cache.run(plan_c, workdir, log, device=args.device),
                cache.tables)
    if "checkpoints" in sections:
        from bench import checkpoints
        from bench.common import ModelCase

        case = checkpoints.CASE if args.checkpoint_model == "resnet50" else ModelCase(
            args.checkpoint_model, args.checkpoint_model, 32,
            partial=checkpoints.CASE.partial)
        section("checkpoints",
                lambda: checkpoints.run(workdir, repeats=1 if args.quick else 3, case=case,
                                        log=log, device=args.device),
                checkpoints.tables)
    if "startup" in sections:
        from bench import startup

        runs = 2 if args.quick else args.startup_runs
        section("startup", lambda: startup.run(runs, log=log), startup.tables)

    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = machine(args.device)["loadavg"]
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n\n" + "\n\n".join(printed))
    print(f"\nall tables ({results['elapsed_s']:.0f} s; load at the end "
          f"{results['machine']['loadavg_end']}); results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
