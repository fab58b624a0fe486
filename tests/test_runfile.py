"""Issue 15 (run files): run.yaml round trip, keys checked against finetune's signature,
bad files are one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

import zoo
from zoo.core.errors import ZooError
from zoo.training.runfile import load_run, run_keys, write_run

SETTINGS = {"backbone": "cifar_resnet20", "strategy": "partial", "train": "digits",
            "epochs": 2, "batch_size": 32, "lr": 0.003, "weight_decay": 0.05,
            "strategy_options": {"freeze_to": "layer2"}, "seed": 7, "cache_views": 0,
            "augment": False, "output_dir": Path("runs/a"), "image_size": None}


def test_round_trip(tmp_path: Path) -> None:
    """Issue 15 run files: what write_run saves, load_run gives back as finetune kwargs
    (paths as strings); the file is YAML a person can read; nothing else is written."""
    path = write_run(tmp_path / "run.yaml", SETTINGS)
    loaded = load_run(path)
    assert loaded == {**SETTINGS, "output_dir": "runs/a"}
    assert "lr: 0.003" in path.read_text() and "freeze_to: layer2" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
    assert set(loaded) <= set(run_keys())


def test_unknown_key_names_it_and_lists_the_valid_ones(tmp_path: Path) -> None:
    """Issue 15 run files: an unknown key is a clear one-line error naming it."""
    path = tmp_path / "run.yaml"
    path.write_text("backbone: x\nlrr: 0.1\n")
    with pytest.raises(ZooError, match=r"unknown setting 'lrr'; valid settings: backbone, "
                                       r"strategy, train") as info:
        load_run(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ZooError, match="unknown setting 'epoch'"):
        write_run(tmp_path / "other.yaml", {"epoch": 3})
    assert not (tmp_path / "other.yaml").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "must hold a mapping"),
    ("epochs: [1, 2\n", "not valid YAML"),
    ("epochs: -1\n", "epochs must be"),
    ("!!python/object:os.system {}\n", "not valid YAML"),
])
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    """Issue 15 run files: non-mappings, broken YAML, bad values and unsafe tags refused."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ZooError, match=message):
        load_run(path)


def test_values_a_file_cannot_hold_are_named(tmp_path: Path) -> None:
    """Issue 15 run files: callables (custom schedulers, callbacks) cannot be saved."""
    with pytest.raises(ZooError, match="run setting scheduler is a function"):
        write_run(tmp_path / "run.yaml", {"scheduler": lambda opt: None})
    with pytest.raises(ZooError, match=r"lr is nan"):
        write_run(tmp_path / "run.yaml", {"lr": float("nan")})
    assert not (tmp_path / "run.yaml").exists()


def test_finetune_keys_are_all_accepted() -> None:
    """Issue 15 run files: the valid keys are exactly finetune's parameters."""
    import inspect

    assert run_keys() == list(inspect.signature(zoo.finetune).parameters)
