"""zoo.compare: the backbone x strategy sweep against scratch, its report files and resume.

One real sweep (2 backbones x 3 strategies x 1 epoch on 100 real 8x8 digits at 16 px) is
run once for the module; the other tests read its files. Summaries and multi-seed
aggregation are checked on hand-made records, with no training.
"""

from __future__ import annotations

import csv
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import single_torch_thread

import zoo
from zoo.core.errors import IncompatibleError, ZooError
from zoo.experiments.analysis import derive
from zoo.experiments.plots import PLOTS
from zoo.experiments.report import ComparisonResult, format_table, write_report
from zoo.experiments.sweep import Budget, compare, run_name
from zoo.training.callbacks import Callback

BACKBONES = ["cifar_resnet20", "resnet18"]
STRATEGIES = ["linear_probe", "partial"]  # scratch is added by compare
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CountRuns(Callback):
    """Counts the runs that actually train."""

    def __init__(self) -> None:
        self.started = 0

    def on_train_start(self, run: Any) -> None:
        self.started += 1


def sweep_kwargs(out: Path, counter: CountRuns) -> dict[str, Any]:
    val = zoo.load_data("digits", "val", limit_per_class=10)
    return dict(epochs=1, output_dir=out, image_size=16, limit_per_class=10, weights=None,
                batch_size=50, quiet=True, callbacks=[counter], val=val)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ComparisonResult, Path]]:
    out = tmp_path_factory.mktemp("compare") / "report"
    with pytest.MonkeyPatch.context() as mp, single_torch_thread():
        mp.setenv("ZOO_HOME", str(out.parent / "zoo-home"))
        counter = CountRuns()
        result = compare(BACKBONES, STRATEGIES, "digits", **sweep_kwargs(out, counter))
    assert counter.started == 6
    yield result, out


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of the report's results table (header and separator dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("| ").split(" | ")] for line in lines[1:]]


def number(cell: str) -> float:
    return float(cell.replace(",", "").replace("+", "").rstrip("x"))


# --------------------------------------------------------------------------- the sweep


@pytest.mark.slow
def test_sweep_writes_every_file_and_keeps_each_checkpoint(sweep):
    result, out = sweep
    assert result.output_dir == out
    for path in (result.report_path, result.json_path, result.csv_path, *result.plot_paths):
        assert path.is_file() and path.parent == out
    assert [p.name for p in result.plot_paths] == list(PLOTS)
    assert len(result.records) == 6
    for r in result.records:
        run_dir = out / "runs" / run_name(r["backbone"], r["strategy"], r["seed"])
        assert (run_dir / "record.json").is_file()
        assert (run_dir / "model.safetensors").stat().st_size == r["checkpoint_bytes"] > 0
        assert not (run_dir / "resume.pt").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_records_hold_the_measurements(sweep):
    result, _ = sweep
    pairs = {(r["backbone"], r["strategy"]) for r in result.records}
    assert pairs == {(b, s) for b in BACKBONES for s in [*STRATEGIES, "scratch"]}
    for r in result.records:
        assert r["epochs"] == 1 and len(r["history"]) == 1
        assert 0 <= r["last_accuracy"] <= r["kept_accuracy"] == r["best_accuracy"] <= 1
        assert r["kept_epoch"] == 1 and r["keep"] == "best"
        assert r["epoch_time_s"] > 0 and r["wall_time_s"] >= r["train_time_s"] > 0
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert r["peak_memory_abs_mb"] > 0 and r["peak_memory_mb"] >= 0
        assert r["memory_kind"] == "rss"
        if r["strategy"] == "scratch":
            assert r["baseline"] and r["delta_vs_scratch_points"] == 0
            assert r["target_accuracy"] == r["best_accuracy"]
            assert r["speedup_vs_scratch"] == pytest.approx(1.0)
        if r["strategy"] == "linear_probe":
            assert r["trainable_params"] < r["total_params"] / 10
    data = json.loads(result.json_path.read_text())
    assert data["settings"]["epochs"] == 1 and data["settings"]["seeds"] == [0]
    assert {"cpu", "cpu_cores_logical", "torch", "cuda"} <= set(data["machine"])


@pytest.mark.slow
def test_report_table_lists_every_run_marks_scratch_and_equals_results_json(sweep):
    result, _ = sweep
    data = json.loads(result.json_path.read_text())
    rows = data["summary"]["table"]
    cells = markdown_rows(result.report_path.read_text())
    assert len(cells) == len(rows) == 6
    for row, c in zip(rows, cells, strict=True):
        assert c[1] == row["backbone"]
        assert c[2] == row["strategy"] + (" (baseline)" if row["baseline"] else "")
        assert number(c[3]) == row["kept_accuracy"]
        assert c[4] == "1" and row["kept_epochs"] == [1]
        assert number(c[5]) == row["best_accuracy"]
        assert c[6] == "baseline" if row["baseline"] else number(c[6]) == row["delta_points"]
        assert c[7] == "never" if row["time_to_target_s"] is None \
            else number(c[7]) == row["time_to_target_s"]
        assert int(number(c[10])) == row["trainable_params"]
        assert int(number(c[11])) == row["total_params"]
        assert number(c[14]) == row["checkpoint_mb"]
    # and the JSON rows are the records, rounded as shown
    by_pair = {(r["backbone"], r["strategy"]): r for r in data["records"]}
    for row in rows:
        record = by_pair[(row["backbone"], row["strategy"])]
        assert row["kept_accuracy"] == round(100 * record["kept_accuracy"], 1)
        assert row["best_accuracy"] == round(100 * record["best_accuracy"], 1)
    kept = [r["kept_accuracy"] for r in rows]
    assert kept == sorted(kept, reverse=True)
    assert sum("scratch (baseline)" in line for line in result.report_path.read_text()
               .splitlines()) == 2


@pytest.mark.slow
def test_terminal_table_is_aligned_and_complete(sweep):
    result, _ = sweep
    text = format_table(result)
    lines = text.splitlines()
    assert len(lines) == 2 + 6
    assert "kept acc %" in lines[0] and "kept epoch" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    for r in result.records:
        assert any(r["backbone"] in line and r["strategy"] in line for line in lines[2:])
    assert text.count("(baseline)") == 2


@pytest.mark.slow
def test_summary_names_a_winner_and_compares_it_with_scratch(sweep):
    result, _ = sweep
    text = result.report_path.read_text()
    lines = result.summary["lines"]
    assert lines and all(line in text for line in lines)
    for backbone in BACKBONES:
        line = next(x for x in lines if x.startswith(f"`{backbone}`"))
        assert "ranked first" in line and "not significant" in line  # one seed
        assert "won" not in line and "points over scratch" in line
        assert "times faster than scratch" in line or "times slower than scratch" in line \
            or "never reached" in line or "never beat chance" in line
    assert lines[0].startswith("Chance level")


@pytest.mark.slow
def test_plots_are_valid_pngs(sweep):
    from PIL import Image

    result, _ = sweep
    for path in result.plot_paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.slow
def test_results_csv_parses_with_one_row_per_run(sweep):
    result, _ = sweep
    with result.csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    by_run = {r["run"]: r for r in result.records}
    for row in rows:
        record = by_run[row["run"]]
        assert float(row["kept_accuracy"]) == record["kept_accuracy"]
        assert int(row["kept_epoch"]) == record["kept_epoch"]
        assert int(row["trainable_params"]) == record["trainable_params"]
        assert int(row["checkpoint_bytes"]) == record["checkpoint_bytes"]


@pytest.mark.slow
def test_a_second_call_resumes_without_running_anything_again(sweep, tmp_path, monkeypatch):
    result, out = sweep
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")}
    counter = CountRuns()
    again = compare(BACKBONES, STRATEGIES, "digits", **sweep_kwargs(out, counter))
    assert counter.started == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*")} == before
    assert [r["kept_accuracy"] for r in again.records] == \
        [r["kept_accuracy"] for r in result.records]
    assert again.summary["table"] == result.summary["table"]


@pytest.mark.slow
def test_a_deleted_record_reruns_only_that_run(sweep, tmp_path, monkeypatch):
    _, out = sweep
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    (out / "runs" / run_name("cifar_resnet20", "partial", 0) / "record.json").unlink()
    counter = CountRuns()
    with single_torch_thread():
        again = compare(BACKBONES, STRATEGIES, "digits", **sweep_kwargs(out, counter))
    assert counter.started == 1
    assert len(again.records) == 6


# --------------------------------------------------------------------------- refusals


def test_incompatible_pairs_are_refused_before_anything_trains(tmp_path):
    with pytest.raises(IncompatibleError, match="partial") as info:
        compare(["cifar_resnet20"], ["partial"], "digits", epochs=1, output_dir=tmp_path,
                strategy_options={"partial": {"frozen_groups": 9}}, quiet=True)
    assert "nothing was trained" in str(info.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "epochs"),
    (dict(epochs=1, budget=0), "budget"),
    (dict(epochs=1, seeds=()), "seeds"),
    (dict(epochs=1, target_accuracy=80), "fraction"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ZooError, match=message):
        compare(["cifar_resnet20"], ["full"], "digits", output_dir=tmp_path, **kwargs)


def test_missing_weights_are_refused_before_anything_trains(tmp_path):
    with pytest.raises(ZooError, match="no weights file"):
        compare(["cifar_resnet20"], ["linear_probe"], "digits", epochs=1, output_dir=tmp_path,
                weights=str(tmp_path / "missing.pth"), quiet=True)
    assert not (tmp_path / "runs").exists()


def test_zoo_compare_is_the_function_even_after_importing_the_experiments_package():
    import zoo.experiments.sweep  # noqa: F401

    assert zoo.compare is compare


def test_tensor_data_needs_validation_data(tmp_path, digits):
    with pytest.raises(ZooError, match="validation"):
        compare(["cifar_resnet20"], ["full"], digits(2), epochs=1, output_dir=tmp_path)


# --------------------------------------------------------------------------- analysis


def fake(backbone: str, strategy: str, seed: int, accuracies: list[float],
         step_s: float = 10.0, params: int = 1000, kept: int = -1) -> dict[str, Any]:
    """A record as compare writes it; ``kept`` indexes the epoch kept (default: the last)."""
    history = [{"epoch": i + 1, "accuracy": a, "time_s": step_s * (i + 1),
                "epoch_time_s": step_s} for i, a in enumerate(accuracies)]
    return {"run": run_name(backbone, strategy, seed), "backbone": backbone,
            "strategy": strategy, "seed": seed, "baseline": strategy == "scratch",
            "weights": None, "epochs": len(history), "best_accuracy": max(accuracies),
            "kept_accuracy": accuracies[kept], "kept_epoch": history[kept]["epoch"],
            "last_accuracy": accuracies[-1], "epoch_time_s": step_s,
            "train_time_s": step_s * len(history), "wall_time_s": step_s * len(history) + 1,
            "trainable_params": params, "total_params": 5000, "peak_memory_mb": 10.0,
            "peak_memory_abs_mb": 500.0, "memory_kind": "rss", "checkpoint_bytes": 2**20,
            "stopped_by_budget": False, "history": history}


def test_budget_stops_a_run_after_the_epoch_that_crosses_it():
    stopper = Budget(10.0)
    run = types.SimpleNamespace(epochs=5, stop=False)
    stopper.on_epoch_end(run, 0, {"time_s": 6.0})
    assert not run.stop
    stopper.on_epoch_end(run, 1, {"time_s": 12.0})
    assert run.stop and stopper.stopped
    last = Budget(10.0)
    run = types.SimpleNamespace(epochs=2, stop=False)
    last.on_epoch_end(run, 1, {"time_s": 12.0})  # the last epoch: nothing was cut short
    assert not run.stop and not last.stopped


def test_time_to_scratch_best_and_speedup():
    records = [fake("net", "scratch", 0, [0.2, 0.4, 0.5, 0.45], step_s=10),
               fake("net", "full", 0, [0.6, 0.8, 0.9, 0.9], step_s=10),
               fake("net", "linear_probe", 0, [0.3, 0.35, 0.4, 0.42], step_s=1)]
    by = {r["strategy"]: r for r in derive(records)}
    assert by["scratch"]["target_accuracy"] == 0.5
    assert by["scratch"]["time_to_target_s"] == 30 and by["scratch"]["epochs_to_target"] == 3
    assert by["full"]["time_to_target_s"] == 10 and by["full"]["speedup_vs_scratch"] == 3.0
    assert by["full"]["delta_vs_scratch_points"] == pytest.approx(45.0)
    assert by["linear_probe"]["time_to_target_s"] is None
    assert by["linear_probe"]["speedup_vs_scratch"] is None
    explicit = {r["strategy"]: r for r in derive(records, target_accuracy=0.4)}
    assert explicit["linear_probe"]["time_to_target_s"] == 3
    assert explicit["full"]["speedup_vs_scratch"] == 2.0  # 20 s vs 10 s


def test_several_seeds_give_mean_and_std_in_report_and_json(tmp_path):
    records = [fake("net", "scratch", s, [0.2, 0.3 + 0.02 * s]) for s in (0, 1, 2)]
    records += [fake("net", "full", s, [0.7 + 0.01 * s, 0.8 + 0.02 * s], params=4000)
                for s in (0, 1, 2)]
    result = write_report(records, tmp_path, settings={"seeds": [0, 1, 2]})
    rows = {r["strategy"]: r for r in result.summary["table"]}
    full = rows["full"]
    assert full["seeds"] == 3
    assert full["kept_accuracy"] == 82.0 and full["kept_accuracy_std"] == 2.0
    assert full["delta_points"] == 50.0 and full["delta_points_std"] == 0.0
    cells = {c[2]: c for c in markdown_rows(result.report_path.read_text())}
    assert cells["full"][3] == "82.0 ± 2.0"
    assert cells["scratch (baseline)"][3] == "32.0 ± 2.0"
    assert "82.0 ± 2.0%" in result.summary["lines"][0]
    assert "times faster than scratch" in result.summary["lines"][0]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["table"] == result.summary["table"]
    assert "± 2.0" in format_table(result)


def test_a_scratch_only_backbone_is_a_reference_row(tmp_path):
    records = [fake("net", "scratch", 0, [0.2, 0.3]), fake("net", "full", 0, [0.7, 0.8]),
               fake("big", "scratch", 0, [0.1, 0.25])]
    result = write_report(records, tmp_path)
    assert any(line.startswith("`big` (scratch only") for line in result.summary["lines"])
    assert result.summary["winner"] == {"backbone": "net", "strategy": "full",
                                        "kept_accuracy": 80.0}


def with_chance(record: dict[str, Any], chance: float) -> dict[str, Any]:
    return {**record, "chance_accuracy": chance}


def test_a_lead_within_the_spread_over_seeds_is_a_tie_listed_cheapest_first(tmp_path):
    """Issue 13.5: partial "won" when it tied linear probe, which cost a sixth of the time."""
    records = [fake("net", "scratch", s, [0.3, 0.4]) for s in (0, 1, 2)]
    records += [fake("net", "partial", s, [0.8, f], step_s=60)
                for s, f in zip((0, 1, 2), (0.90, 0.88, 0.89), strict=True)]
    records += [fake("net", "linear_probe", s, [0.8, f], step_s=10)
                for s, f in zip((0, 1, 2), (0.91, 0.86, 0.87), strict=True)]
    lines = write_report(records, tmp_path, settings={"seeds": [0, 1, 2]}).summary["lines"]
    line = next(x for x in lines if x.startswith("`net`"))
    assert "won" not in line and "tied" in line
    assert line.index("`linear_probe`") < line.index("`partial`")  # cheapest first


def test_a_lead_beyond_the_spread_over_seeds_names_a_winner(tmp_path):
    records = [fake("net", "scratch", s, [0.3, 0.4]) for s in (0, 1)]
    records += [fake("net", "full", s, [0.8, 0.90 + 0.01 * s]) for s in (0, 1)]
    records += [fake("net", "linear_probe", s, [0.7, 0.80 + 0.01 * s]) for s in (0, 1)]
    lines = write_report(records, tmp_path, settings={"seeds": [0, 1]}).summary["lines"]
    assert any(x.startswith("`net`: **`full` won**") for x in lines)


def test_scratch_below_chance_makes_no_speed_claim(tmp_path):
    """Issue 13.5: "reached scratch's best N times sooner" means nothing when scratch only
    ever guessed the commonest class."""
    records = [with_chance(fake("net", "scratch", 0, [0.5, 0.5]), 0.5),
               with_chance(fake("net", "full", 0, [0.8, 0.9]), 0.5)]
    result = write_report(records, tmp_path)
    text = " ".join(result.summary["lines"])
    assert "Chance level (always guessing the commonest validation class): 50.0%" in text
    assert "scratch never beat chance (50.0%" in text and "faster" not in text
    assert "Chance level" in result.report_path.read_text()


def test_a_slower_run_is_called_slower_never_a_fraction_faster(tmp_path):
    records = [fake("net", "scratch", 0, [0.5, 0.6], step_s=10),
               fake("net", "full", 0, [0.4, 0.7], step_s=20)]
    result = write_report(records, tmp_path)
    line = next(x for x in result.summary["lines"] if x.startswith("`net`"))
    assert "2.0 times slower than scratch" in line and "faster" not in line
    assert "2.0x slower" in format_table(result)
