"""The comparison's report files: ``results.json`` (settings, machine, summary, every
record), ``results.csv``, ``report.md`` with the table and the plots, and the text table
``zoo compare`` prints. All are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.core._io import write_json_atomic, write_text_atomic
from zoo.core.table import markdown_table, table
from zoo.experiments.analysis import derive, format_mean, kept_epochs, summary_lines, table_rows
from zoo.experiments.measure import machine
from zoo.experiments.plots import write_plots

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
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


HEADERS = ("#", "backbone", "strategy", "kept acc %", "kept epoch", "best acc %",
           "vs scratch (pts)",
           "time to target (s)", "speed-up", "s/epoch", "trainable params", "total params",
           "peak mem +MB", "peak mem MB", "checkpoint MB")


def _headers(summary: Mapping[str, Any]) -> list[str]:
    """``HEADERS`` with the time column naming its target."""
    headers = list(HEADERS)
    target = summary.get("target_accuracy")
    headers[7] = "time to scratch best (s)" if target is None else \
        f"time to {100 * target:.1f}% (s)"
    return headers


def _cells(row: Mapping[str, Any]) -> list[str]:
    """A table row's cells, formatted from its (already rounded) numbers."""
    if row["time_to_target_s"] is None:
        reach = "never"
    else:
        reach = format_mean(row["time_to_target_s"], row["time_to_target_s_std"], 1)
        if row["reached"] < row["seeds"]:
            reach += f" ({row['reached']}/{row['seeds']})"
    speed = "-" if row["speedup"] is None else (
        format_mean(row["speedup"], row["speedup_std"], 1) + "x" if row["speedup"] >= 1
        else f"{1 / row['speedup']:.1f}x slower")
    delta = "baseline" if row["baseline"] else (
        "-" if row["delta_points"] is None else
        ("+" if row["delta_points"] >= 0 else "") + format_mean(row["delta_points"],
                                                         row["delta_points_std"], 1))
    return [
        str(row["rank"]), row["backbone"],
        row["strategy"] + (" (baseline)" if row["baseline"] else ""),
        format_mean(row["kept_accuracy"], row["kept_accuracy_std"], 1), kept_epochs(row),
        format_mean(row["best_accuracy"], row["best_accuracy_std"], 1),
        delta, reach, speed,
        format_mean(row["epoch_time_s"], row["epoch_time_s_std"], 2),
        f"{row['trainable_params']:,}", f"{row['total_params']:,}",
        format_mean(row["peak_memory_mb"], row["peak_memory_mb_std"], 0),
        format_mean(row["peak_memory_abs_mb"], row["peak_memory_abs_mb_std"], 0),
        format_mean(row["checkpoint_mb"], row["checkpoint_mb_std"], 2),
    ]


def format_table(result: ComparisonResult | Mapping[str, Any], markdown: bool = False) -> str:
    """The comparison as an aligned text table (or a Markdown one), best first."""
    summary = result.summary if isinstance(result, ComparisonResult) else result
    rows = [_headers(summary), *(_cells(r) for r in summary["table"])]
    numbers = [i for i in range(len(HEADERS)) if i not in (1, 2)]  # all but the names
    if markdown:
        return markdown_table(rows, right=numbers)
    return table(rows, right=numbers, rule=True)


def write_report(records: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike[str], *,
                 settings: Mapping[str, Any] | None = None,
                 target_accuracy: float | None = None) -> ComparisonResult:
    """Write results.json, results.csv, report.md and the plots for ``records``."""
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
    plots = write_plots(derived, rows, out)
    write_text_atomic(out / REPORT_MD, _markdown(summary, settings or {}, info))
    return ComparisonResult(tuple(derived), summary, out, out / REPORT_MD, out / RESULTS_JSON,
                            out / RESULTS_CSV, plots)


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """One CSV row per run with the ``CSV_FIELDS`` columns; a missing value is empty."""
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
    """report.md: the sentences, the table, what the columns mean, the plots, the settings."""
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
