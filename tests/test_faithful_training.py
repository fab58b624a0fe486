"""What zoo trains and saves is what the user gets (issue 13, items 2, 6 and 8).

- 13.2: a run keeps its best epoch by validation accuracy (``keep="best"``, the default),
  says which one (``kept_epoch``), can stop early (``patience``), and the checkpoint, the
  returned model, the resume state and ``zoo compare`` all agree on it.
- 13.6: under ``torchrun`` every rank reports the same metrics and holds the same model,
  every training sample is used every epoch, and validation is sharded and summed.
- 13.8: ``zoo finetune`` without ``--out`` saves the run in a new folder under ``runs/``.

A later epoch is made deterministically worse by ``Sabotage``, a callback that wipes the
head and stops learning from a given epoch on (what a too-high learning rate does, without
the luck): the run's peak is then known in advance.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, InterruptAfter, torchrun

import zoo
from zoo.cli import main
from zoo.cli.training import new_run_dir
from zoo.core.errors import ZooError
from zoo.training.best import BestEpoch
from zoo.training.callbacks import RESUME_FILE, Callback, Run
from zoo.training.device import rank_share

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def colours(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 12x12 RGB images of three classes: class c has its channel c brighter."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 150, (n, 3, 12, 12), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 15
    return x, y


TRAIN, VAL = colours(60, 0), colours(30, 1)


class Sabotage(Callback):
    """From epoch ``start`` (0-based) on, the head answers class 0 for everything and the
    learning rate is 0: validation accuracy drops to a third and stays there."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if epoch >= self.start:
            with torch.no_grad():
                run.model.head.weight.zero_()
                run.model.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
            for group in run.optimizer.param_groups:
                group["lr"] = 0.0


def finetune(strategy: str = "full", **kwargs: Any) -> zoo.FinetuneResult:
    options: dict[str, Any] = dict(epochs=4, batch_size=10, lr=1e-2, quiet=True, image_size=16,
                                   weights=None, callbacks=[Sabotage(2)])
    options.update(kwargs)
    return zoo.finetune(TINY.name, strategy, TRAIN, options.pop("val", VAL), **options)


def accuracies(result: zoo.FinetuneResult) -> list[float]:
    return [h["val_accuracy"] for h in result.history]


# --------------------------------------------------------------------------- 13.2 keep best


@pytest.mark.slow
def test_the_best_epoch_is_kept_returned_and_saved(tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.2: the checkpoint held the last epoch even when an earlier one was better."""
    result = finetune(output_dir=tmp_path / "run")
    acc = accuracies(result)
    peak = max(acc)
    assert peak > acc[-1] == 1 / 3  # the sabotage worked: epochs 3 and 4 are worse
    m = result.metrics
    assert m["keep"] == "best" and m["kept_epoch"] in (1, 2)
    assert m["val_accuracy"] == acc[m["kept_epoch"] - 1] == peak == m["best_val_accuracy"]
    assert m["last_val_accuracy"] == acc[-1] and m["epochs"] == 4
    assert result.config["training"]["keep"] == "best"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["kept_epoch"] == m["kept_epoch"] and saved["val_accuracy"] == peak

    # what is returned and what was saved score exactly the recorded best, not the last
    assert zoo.evaluate(result.model, VAL)["accuracy"] == peak
    assert zoo.evaluate(zoo.load_checkpoint(tmp_path / "run"), VAL)["accuracy"] == peak


def test_keep_last_keeps_the_last_epoch(tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.2: keep="last" is the old behaviour, and says so."""
    result = finetune(keep="last", output_dir=tmp_path / "run")
    m = result.metrics
    assert m["keep"] == "last" and m["kept_epoch"] == 4
    assert m["val_accuracy"] == m["last_val_accuracy"] == 1 / 3 < m["best_val_accuracy"]
    assert zoo.evaluate(zoo.load_checkpoint(tmp_path / "run"), VAL)["accuracy"] == 1 / 3
    assert not (tmp_path / "run" / RESUME_FILE).exists() or \
        torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)["best"] is None


def test_patience_stops_after_n_epochs_without_improvement(tiny: zoo.Backbone) -> None:
    """Issue 13.2: patience=N stops the run N epochs after its best one."""
    result = finetune(epochs=8, patience=2)
    kept = result.metrics["kept_epoch"]
    assert result.metrics["stopped_early"] and result.metrics["patience"] == 2
    assert len(result.history) == kept + 2 < 8
    assert result.metrics["val_accuracy"] == max(accuracies(result))
    assert zoo.evaluate(result.model, VAL)["accuracy"] == result.metrics["val_accuracy"]


def test_ties_go_to_the_lower_validation_loss_then_to_the_earlier_epoch() -> None:
    """Issue 13.2: the documented tie-break, on hand-made epoch records."""
    keeper = BestEpoch("best", patience=None, names=[], has_val=True)
    records = [(0.5, 1.0), (0.5, 0.8), (0.5, 0.8), (0.4, 0.1), (0.5, 0.9)]
    model = torch.nn.Linear(1, 1)
    for epoch, (acc, loss) in enumerate(records):
        keeper.update(model, epoch, {"val_accuracy": acc, "val_loss": loss})
    assert keeper.kept([{}] * len(records)) == 1


def test_only_tensors_that_can_change_are_copied(tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.2: the copy of the best epoch holds what training moves (trained parameters,
    statistics of BatchNorm layers that train) and nothing frozen; the resume state has it."""
    for strategy, options, expected in [
        ("linear_probe", None, {"head.weight", "head.bias"}),
        ("partial", {"frozen_groups": 1},
         {"block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias",
          "block.1.running_mean", "block.1.running_var", "block.1.num_batches_tracked",
          "head.weight", "head.bias"}),
    ]:
        out = tmp_path / strategy
        finetune(strategy, strategy_options=options, epochs=1, callbacks=[],
                 output_dir=out)
        best = torch.load(out / RESUME_FILE, weights_only=True)["best"]
        assert best["epoch"] == 0 and set(best["tensors"]) == expected


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_epoch_found_before_the_interruption(
        tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.2: the resume state carries the best-so-far, so a run interrupted after its
    peak and resumed still keeps the peak (its weights are no longer in memory)."""
    straight = finetune(output_dir=tmp_path / "A")
    with pytest.raises(ZooError, match="interrupted"):
        finetune(output_dir=tmp_path / "B", callbacks=[Sabotage(2), InterruptAfter(1)])
    resumed = finetune(resume=tmp_path / "B")
    assert resumed.metrics["kept_epoch"] == straight.metrics["kept_epoch"]
    assert resumed.metrics["val_accuracy"] == straight.metrics["val_accuracy"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert zoo.evaluate(zoo.load_checkpoint(tmp_path / "B"), VAL)["accuracy"] == \
        straight.metrics["val_accuracy"]


def test_without_validation_data_the_last_epoch_is_kept_and_patience_is_refused(
        tiny: zoo.Backbone) -> None:
    """Issue 13.2: keep="best" needs validation data: without it the last epoch is kept and
    metrics say why; patience cannot work without it and is refused before training."""
    result = finetune(val=None, epochs=2, callbacks=[])
    assert result.metrics["keep"] == "last" and result.metrics["kept_epoch"] == 2
    assert "no validation data" in result.metrics["keep_note"]
    with pytest.raises(ZooError, match="patience .* needs validation data") as info:
        finetune(val=None, patience=2)
    assert "\n" not in str(info.value)
    with pytest.raises(ZooError, match="keep must be 'best' or 'last'"):
        finetune(keep="first")


@pytest.mark.slow
def test_compare_reports_the_kept_checkpoint_and_its_epoch(tiny: zoo.Backbone,
                                                           tmp_path: Path) -> None:
    """Issue 13.2: compare's accuracy column is the kept checkpoint's, with its epoch."""
    from zoo.experiments.report import format_table
    from zoo.experiments.sweep import compare

    result = compare([TINY.name], ["full"], TRAIN, VAL, epochs=3, output_dir=tmp_path,
                     image_size=16, weights=None, batch_size=10, lr=1e-2, quiet=True,
                     callbacks=[Sabotage(2)])
    for record in result.records:
        history = [h["accuracy"] for h in record["history"]]
        assert record["kept_accuracy"] == record["best_accuracy"] == max(history[:2])
        assert record["kept_epoch"] in (1, 2) and record["last_accuracy"] == 1 / 3
        model = zoo.load_checkpoint(tmp_path / record["checkpoint"])
        assert zoo.evaluate(model, VAL)["accuracy"] == record["kept_accuracy"]
    header = format_table(result).splitlines()[0]
    assert "kept acc %" in header and "kept epoch" in header and "final" not in header
    assert "kept epoch" in " ".join(result.summary["lines"])


# --------------------------------------------------------------------------- 13.8 runs/


@pytest.mark.slow
def test_cli_finetune_without_out_saves_the_model_in_a_new_runs_folder(
        tiny: zoo.Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.8: `zoo finetune` without --out trained the model and threw it away."""
    monkeypatch.chdir(tmp_path)
    command = ["finetune", "--backbone", TINY.name, "--strategy", "linear_probe", "--data",
               "digits", "--limit-per-class", "2", "--epochs", "2", "--image-size", "16",
               "--weights", "none", "--quiet"]
    folders = []
    for extra in ([], ["--keep", "last", "--patience", "1"]):
        assert main(command + extra) == 0
        printed = capsys.readouterr().out.splitlines()
        (folder,) = [p for p in (tmp_path / "runs").iterdir() if p not in folders]
        folders.append(folder)
        name = folder.relative_to(tmp_path)
        assert printed[0].startswith(f"saving the run to {name}")  # said at the start...
        assert printed[-1] == f"checkpoint: {name}"  # ...and at the end
        assert any(line.startswith("kept epoch") for line in printed)
        assert folder.name.startswith(f"{TINY.name}-linear_probe-")
        assert zoo.load_checkpoint(folder).zoo_config["num_classes"] == 10
    assert json.loads((folders[1] / "metrics.json").read_text())["keep"] == "last"


def test_cli_finetune_that_fails_leaves_no_empty_runs_folder(
        tiny: zoo.Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.8: a run refused before training does not litter runs/."""
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--backbone", TINY.name, "--strategy", "full", "--data",
                 "digits", "--weights", "none", "--patience", "0"]) == 2
    assert "patience must be" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []


def test_new_run_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    """Issue 13.8: a folder that exists (even one of zoo's) is never written into."""
    now = datetime.datetime(2025, 1, 2, 3, 4, 5)
    taken = tmp_path / "runs" / "timm-vit-full-20250102-030405"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    first = new_run_dir("timm/vit", "full", tmp_path / "runs", now)
    second = new_run_dir("timm/vit", "full", tmp_path / "runs", now)
    assert (first.name, second.name) == (taken.name + "-2", taken.name + "-3")
    assert first.is_dir() and not any(first.iterdir())
    assert (taken / "notes.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1


# --------------------------------------------------------------------------- 13.6 DDP


def test_every_rank_gets_as_many_samples_and_every_sample_is_used() -> None:
    """Issue 13.6: len % world samples were dropped each epoch; now the order is padded by
    repeating its start, as DistributedSampler does."""
    for n, world in [(41, 2), (10, 3), (2, 4), (12, 4)]:
        order = torch.randperm(n)
        shares = [rank_share(order, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        assert set(torch.cat(shares).tolist()) == set(range(n))
        assert sum(len(s) for s in shares) == n + (-n) % world
    assert torch.equal(rank_share(order, 0, 1), order)


SCRIPT = textwrap.dedent("""
    import hashlib, json, sys

    import torch
    import torch.distributed as dist

    import zoo

    def colours(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 3
        x = torch.randint(0, 150, (n, 3, 12, 12), generator=g, dtype=torch.uint8)
        x[torch.arange(n), y] += 15
        return x, y

    out = sys.argv[1]
    result = zoo.finetune(
        "cifar_resnet20", "full", colours(41, 0), colours(31, 1), epochs=2, batch_size=8,
        lr=1e-2, weights=None, image_size=16, output_dir=out, checkpoint_kind="full",
        quiet=True)

    def digest(tensors):
        h = hashlib.sha256()
        for key, value in sorted(tensors):
            h.update(key.encode() + value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    timing = ("time_s", "epoch_time_s", "train_time_s")
    rank = dist.get_rank()
    report = {
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "params": digest(result.model.named_parameters()),
        "buffers": digest(result.model.named_buffers()),
        "metrics": {k: v for k, v in result.metrics.items() if k not in timing},
        "history": [{k: v for k, v in h.items() if k not in timing} for h in result.history],
    }
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()
""")


def digest(tensors: Any) -> str:
    h = hashlib.sha256()
    for key, value in sorted(tensors):
        h.update(key.encode() + value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_ranks_report_the_same_metrics_and_save_the_same_model(
        tmp_path: Path) -> None:
    """Issue 13.6: validation accuracy depended on the rank and BatchNorm statistics differed
    between ranks. 41 training and 31 validation images on 2 ranks: neither divides."""
    out = tmp_path / "run"
    torchrun(SCRIPT, tmp_path, out)

    rank0, rank1 = (json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["checkpoint"] == str(out) and rank1["checkpoint"] is None
    for key in ("params", "buffers", "metrics", "history"):
        assert rank0[key] == rank1[key], key
    # the checkpoint is that model, and the sharded, summed validation is the whole set's
    model = zoo.load_checkpoint(out)
    assert digest(model.named_parameters()) == rank0["params"]
    assert digest(model.named_buffers()) == rank0["buffers"]
    scores = zoo.evaluate(model, colours(31, 1))
    assert scores["accuracy"] == rank0["metrics"]["val_accuracy"]
    assert scores["loss"] == pytest.approx(rank0["metrics"]["val_loss"], rel=1e-5)
