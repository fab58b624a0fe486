"""The numbers a comparison reports, derived from the runs' records: time to the target
accuracy, speed-up and gain over scratch, the mean and spread over seeds, the ranking, and
the generated sentences that say who won and by how much.

Pure Python (no torch): ``write_report`` and the tests call it on records alone.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SCRATCH = "scratch"


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


def format_mean(mean: float | None, std: float | None, digits: int) -> str:
    """``mean`` with thousands separators and ``digits`` decimals, "± std" when there is a
    spread over seeds, "-" when there is no value."""
    if mean is None:
        return "-"
    text = f"{mean:,.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def kept_epochs(row: Mapping[str, Any]) -> str:
    """The epoch(s) the kept checkpoints came from: "3", or "2-4" over seeds."""
    low, high = row["kept_epochs"][0], row["kept_epochs"][-1]
    return str(low) if low == high else f"{low}-{high}"


def _speed_phrase(speedup: float, std: float | None) -> str:
    """'3.0 times faster' or '1.4 times slower': never a factor below one called faster."""
    if speedup >= 1:
        return f"{format_mean(speedup, std, 1)} times faster"
    return f"{format_mean(1 / speedup, None, 1)} times slower"


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
    names = ", ".join(f"`{r['strategy']}` ({acc(r)}, {format_mean(r['train_time_s'], None, 1)} s)"
                      for r in cheapest)
    return (f"`{backbone}`: no clear winner: {names} are tied within the spread over "
            f"{top['seeds']} seeds (cheapest first)"), cheapest[0]


def _versus_scratch(win: Mapping[str, Any], base: Mapping[str, Any], acc: Any) -> str:
    """The chosen run against scratch: gain in points and how much sooner it got there."""
    sign = "+" if win["delta_points"] >= 0 else ""
    text = (f", `{win['strategy']}` is {sign}"
            f"{format_mean(win['delta_points'], win['delta_points_std'], 1)} points over scratch "
            f"({acc(base)})")
    chance = base.get("chance_accuracy")
    if chance is not None and base["best_accuracy"] <= chance:
        return text + (f"; scratch never beat chance ({chance:.1f}%, always guessing the "
                       "commonest class), so a time to reach its best means nothing")
    target = f"{win['target_accuracy']:.1f}%"
    if win["time_to_target_s"] is None:
        return text + f"; it never reached scratch's best accuracy ({target})"
    text += (f"; it reached scratch's best accuracy ({target}) in "
             f"{format_mean(win['time_to_target_s'], win['time_to_target_s_std'], 1)} s")
    if win["speedup"] is not None:
        text += (f", {_speed_phrase(win['speedup'], win['speedup_std'])} than scratch "
                 f"({format_mean(base['time_to_target_s'], None, 1)} s)")
    if win["reached"] < win["seeds"]:
        text += f" (in {win['reached']} of {win['seeds']} seeds)"
    return text


def summary_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The generated sentences: the winner (only when its lead beats the spread over seeds,
    else the tie, cheapest first), the chance level, its gain over scratch and its speed."""
    def acc(row: Mapping[str, Any], key: str = "kept_accuracy") -> str:
        """The kept checkpoints' accuracy and the epoch(s) it came from."""
        return (format_mean(row[key], row[key + "_std"], 1) + "%"
                + f" (kept epoch{'s' if len(row['kept_epochs']) > 1 else ''} {kept_epochs(row)})")

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
