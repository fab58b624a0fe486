"""The comparison's three PNG figures: accuracy against epoch, against training time and
against trainable parameters (matplotlib's Agg canvas, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zoo.core._io import atomic_write
from zoo.experiments.analysis import SCRATCH

PLOTS = ("accuracy_vs_epoch.png", "accuracy_vs_time.png", "accuracy_vs_trainable_params.png")


def _figure() -> tuple[Any, Any]:
    """A 9 x 5 inch figure on an Agg canvas (no display needed) and its one axes."""
    figure = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: Path) -> None:
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", bbox_inches="tight")


def _colours(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
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


def write_plots(records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                output_dir: Path) -> tuple[Path, ...]:
    """Draw the three figures of ``PLOTS`` into ``output_dir`` from the derived records and
    the table rows; each backbone + strategy pair keeps one colour across all three."""
    paths = tuple(output_dir / name for name in PLOTS)
    colours = _colours(records)
    _plot_curves(records, paths[0], "epoch", "epoch", colours)
    _plot_curves(records, paths[1], "time_s", "training time (s)", colours)
    _plot_params(rows, paths[2], colours)
    return paths
