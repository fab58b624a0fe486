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
- peak memory, absolute and above the level at the run's start (``PeakMemory`` in
  ``zoo.experiments.measure``: process RSS on CPU, ``max_memory_allocated`` on CUDA).

``budget`` (seconds) caps each run's training time: a callback stops the run after the
epoch that crosses it, and the record says ``stopped_by_budget``. For each backbone and seed
``scratch`` runs first. Every run gets its own feature cache, so a linear probe pays for
its own feature extraction and timings do not depend on the order of runs. All files are
written atomically.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zoo.core._io import write_json_atomic
from zoo.core.arguments import check_arguments
from zoo.core.errors import IncompatibleError, ZooError
from zoo.data.feature_cache import FeatureStore
from zoo.experiments.analysis import SCRATCH
from zoo.experiments.measure import PeakMemory
from zoo.experiments.report import ComparisonResult, write_report
from zoo.models.strategy import make_strategy, plan
from zoo.persist.folder import MODEL_FILE
from zoo.plugins.registry import canonical_backbone_name, get_backbone, get_strategy
from zoo.training.callbacks import Callback
from zoo.training.device import resolve_device
from zoo.training.runner import finetune
from zoo.weights.download import fetch
from zoo.weights.load import weights_spec

RECORD_FILE = "record.json"


class Budget(Callback):
    """Stops a run after the epoch whose ``time_s`` crosses ``seconds``; ``stopped`` says
    whether it cut the run short."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.stopped = False

    def on_epoch_end(self, run: Any, epoch: int, record: dict[str, Any]) -> None:
        if record["time_s"] >= self.seconds and epoch + 1 < run.epochs:
            run.stop = True
            self.stopped = True


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
    """``data`` as JSON for the settings: a name or path as is, else its type, name and size."""
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
    """The runner's epoch records cut to what a comparison keeps, ``val_accuracy`` named
    ``accuracy``."""
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
    budget = settings["budget"]
    kwargs = dict(options)
    callbacks = list(kwargs.pop("callbacks", ()))
    stopper = Budget(budget) if budget is not None else None
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
    accuracy, or with ``keep="last"`` its last; the report says which epoch each kept. With
    ``resume`` a run whose ``record.json`` exists with the same settings is not run again.
    Prints one line per run unless ``quiet``; ``format_table(result)`` (in
    ``zoo.experiments.report``) gives the table to print at the end.
    """
    seeds = _check(backbones, strategies, train, val, epochs=epochs, budget=budget,
                   target_accuracy=target_accuracy, seeds=seeds, keep=keep, patience=patience,
                   finetune_kwargs=finetune_kwargs)
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
    settings = {  # the sweep's, in results.json and report.md
        "device": str(resolve_device(finetune_kwargs.get("device"))), "backbones": names,
        "strategies": sorted({s for _, s, _ in runs}), "train": _describe_data(train),
        "val": _describe_data(val), "epochs": epochs, "budget_s": budget, "seeds": seeds,
        "target_accuracy": target_accuracy, "batch_size": batch_size, "lr": lr,
        "image_size": image_size, "limit_per_class": limit_per_class, "keep": keep,
        "patience": patience, "weights": weights, "strategy_options": options_by_strategy,
        "builder_kwargs": builder_kwargs,
        "finetune_kwargs": {k: v for k, v in finetune_kwargs.items() if k != "callbacks"},
    }
    started = time.perf_counter()
    records = []
    for i, (backbone, strategy, seed) in enumerate(runs, 1):
        own = {"image_size": _for_backbone(image_size, backbone, names, None),
               "weights": _for_backbone(weights, backbone, names, "default"),
               "strategy_options": options_by_strategy.get(strategy, {}),
               "builder_kwargs": _for_backbone(builder_kwargs, backbone, names, None, True)}
        label = f"[{i}/{len(runs)}] {backbone} + {strategy} (seed {seed})"
        run_dir = out / "runs" / run_name(backbone, strategy, seed)
        records.append(_run_or_reuse((backbone, strategy, seed), run_dir, label, own, common,
                                     settings, train, val, resume=resume, quiet=quiet))
    settings["sweep_wall_time_s"] = time.perf_counter() - started
    return write_report(records, out, settings=settings, target_accuracy=target_accuracy)


def _check(backbones: Sequence[str], strategies: Any, train: Any, val: Any, *, epochs: int,
           budget: float | None, target_accuracy: float | None, seeds: Sequence[int],
           keep: str, patience: int | None, finetune_kwargs: Mapping[str, Any]) -> list[int]:
    """Refuse ``compare``'s arguments that cannot work, before anything is built; returns
    the seeds as a list of ints."""
    if isinstance(backbones, str) or not backbones:
        raise ZooError("compare needs a list of one or more backbones")
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
    return seeds


def _run_or_reuse(run: tuple[str, str, int], run_dir: Path, label: str, own: Mapping[str, Any],
                  common: Mapping[str, Any], settings: Mapping[str, Any], train: Any, val: Any,
                  *, resume: bool, quiet: bool) -> dict[str, Any]:
    """One run of the sweep: its record from an earlier sweep with the same settings (with
    ``resume``), else a fresh fine-tune whose record is written to ``run_dir``.

    ``own`` holds the run's image size, weights, strategy options and builder arguments;
    ``common`` the ``finetune`` arguments every run shares.
    """
    backbone, strategy, seed = run
    run_settings = json.loads(json.dumps({
        "data": [settings["train"], settings["val"]],
        "budget": settings["budget_s"],
        **own,
        **{k: v for k, v in common.items() if k != "callbacks"},
    }, default=str))
    record = _read_record(run_dir / RECORD_FILE) if resume else None
    if record is not None and record.get("settings") == run_settings:
        if not quiet:
            print(f"{label}: done before, skipped", flush=True)
        return record
    if not quiet:
        print(f"{label} ...", flush=True)
    options = {
        **common,
        "image_size": run_settings["image_size"],
        "weights": run_settings["weights"],
        "strategy_options": own["strategy_options"] or None,
        "builder_kwargs": own["builder_kwargs"],
        "quiet": quiet,
    }
    record = _run_one(backbone, strategy, seed, run_dir, run_settings, train, val, options)
    write_json_atomic(run_dir / RECORD_FILE, record)
    if not quiet:
        print(f"{label}: {record['kept_accuracy']:.1%} kept (epoch {record['kept_epoch']}),"
              f" {record['best_accuracy']:.1%} best, {record['train_time_s']:.1f} s",
              flush=True)
    return record


def _read_record(path: Path) -> dict[str, Any] | None:
    """A finished run's record, or None when it is missing or unreadable (run it again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
