"""Issue 15 through ``zoo.finetune``: the training options fine-tuners expect (augmentation
presets and mixup, optimizer choice and no decay on norms/biases, per-batch schedules with
warmup, gradient accumulation, EMA, loggers, run files), each shown doing what it says on
the tiny three-group network of conftest.py and 20 real digits.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, quick_finetune

import zoo
from zoo.core.errors import ZooError
from zoo.data.transforms import transform_from_config
from zoo.training.callbacks import Callback, Run
from zoo.training.optim import schedule_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return digits(2)


@pytest.fixture(scope="module")
def val_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return digits(3, "val")


finetune = quick_finetune


class SeeOptimizer(Callback):
    """Keeps the run's optimizer as training starts."""

    optimizer: torch.optim.Optimizer

    def on_train_start(self, run: Run) -> None:
        self.optimizer = run.optimizer


# --------------------------------------------------------------------------- optimisation


@pytest.mark.slow
def test_accumulate_matches_a_batch_n_times_larger(tiny: zoo.Backbone, train_xy: Any) -> None:
    """Issue 15 optimisation: ``accumulate=2`` with batches of 10 ends with the weights of
    batches of 20 (a BatchNorm-free model, where the two are the same computation)."""
    common = dict(weights=None, epochs=3, builder_kwargs={"bn": False}, lr=5e-2)
    small = finetune("tiny_cnn", "full", train_xy, batch_size=10, accumulate=2, **common)
    large = finetune("tiny_cnn", "full", train_xy, batch_size=20, **common)
    one = finetune("tiny_cnn", "full", train_xy, batch_size=10, **common)
    a, b, c = (r.model.state_dict() for r in (small, large, one))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[n], c[n]) for n in a)  # without accumulation: other steps
    assert [h["lr"] for h in small.history] == pytest.approx([h["lr"] for h in large.history])


def test_warmup_lr_trace_in_the_history(tiny: zoo.Backbone, train_xy: Any) -> None:
    """Issue 15 optimisation: the schedule steps per batch after a fractional warmup; each
    epoch's ``lr`` in the history is the rate it started with (2 steps an epoch here)."""
    result = finetune("tiny_cnn", "full", train_xy, weights=None, epochs=4, lr=0.1,
                      scheduler="linear", warmup_epochs=1.5)
    expected = [0.1 * schedule_factor(2 * e, 8, "linear", warmup_steps=3) for e in range(4)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.1 / 3) and expected[1] == pytest.approx(0.1)


def test_sgd_with_no_decay_on_norms_and_biases(tiny: zoo.Backbone, train_xy: Any) -> None:
    """Issue 15 optimisation: ``optimizer="sgd"`` with ``momentum``; BatchNorm weights and
    every bias get no weight decay, and each layer group keeps its own rate."""
    seen = SeeOptimizer()
    finetune("tiny_cnn", "full", train_xy, weights=None, optimizer="sgd", momentum=0.8,
             weight_decay=0.05, label_smoothing=0.1, callbacks=[seen])
    opt = seen.optimizer
    assert isinstance(opt, torch.optim.SGD)
    for group in opt.param_groups:
        assert group["momentum"] == 0.8
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    assert {g["name"] for g in opt.param_groups} == {"stem", "block", "head"}


class FirstLogits(Callback):
    """The untrained model's logits on the training images, as training starts."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def on_train_start(self, run: Run) -> None:
        transform = transform_from_config(run.model.zoo_config["preprocessing"])
        with torch.no_grad():
            self.logits = run.model(transform(self.images)).float()


def test_label_smoothing_loss_is_the_hand_computed_one(tiny: zoo.Backbone,
                                                       train_xy: Any) -> None:
    """Issue 15 optimisation: with ``label_smoothing=0.1`` the first (whole-data) batch's
    loss is (1 - s) * -log p(label) + s * mean over classes of -log p(class)."""
    common = dict(weights=None, batch_size=20, builder_kwargs={"bn": False})
    plain, smooth = FirstLogits(train_xy[0]), FirstLogits(train_xy[0])
    a = finetune("tiny_cnn", "full", train_xy, callbacks=[plain], **common)
    b = finetune("tiny_cnn", "full", train_xy, label_smoothing=0.1, callbacks=[smooth],
                 **common)
    torch.testing.assert_close(plain.logits, smooth.logits)  # the same start
    logp = torch.log_softmax(plain.logits, dim=1)
    nll = -logp.gather(1, train_xy[1].long()[:, None])[:, 0]
    by_hand = (0.9 * nll - 0.1 * logp.mean(dim=1)).mean()
    assert a.history[0]["train_loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert b.history[0]["train_loss"] == pytest.approx(float(by_hand), rel=1e-5)


# --------------------------------------------------------------------------- augmentation


def test_augment_presets_and_evaluation_never_augments(base: str, train_xy: Any,
                                                       val_xy: Any) -> None:
    """Issue 15 augmentation: ``augment="standard"`` turns the frozen-prefix cache off unless
    ``cache_views=K``; validation numbers are those of the plain eval transform."""
    plain = finetune(base, "linear_probe", train_xy, val_xy, augment="standard", epochs=2)
    assert "hits" not in plain.metrics.get("feature_cache", {})
    views = finetune(base, "linear_probe", train_xy, val_xy, augment="standard", epochs=2,
                     cache_views=2)
    assert views.metrics["feature_cache"]["misses"] >= 2
    assert views.config["training"]["augment"] == "standard"
    again = zoo.evaluate(views.model, val_xy)
    assert again["accuracy"] == pytest.approx(views.metrics["val_accuracy"])


def test_strong_mixes_with_soft_targets_and_refuses_cached_views(base: str, train_xy: Any,
                                                                 val_xy: Any) -> None:
    """Issue 15 augmentation: ``augment="strong"`` (mixup/cutmix) trains with soft targets;
    cached views cannot hold mixed images, so asking for them is one clear error."""
    result = finetune(base, "partial", train_xy, val_xy, augment="strong", epochs=2)
    assert all(0.0 <= h["train_accuracy"] <= 1.0 for h in result.history)
    with pytest.raises(ZooError, match="cache_views cannot hold mixup/cutmix"):
        finetune(base, "partial", train_xy, val_xy, augment="strong", cache_views=2)


@pytest.fixture
def base(pretrained: Callable[..., str]) -> str:
    return pretrained(TINY)


# --------------------------------------------------------------------------- EMA


def test_ema_is_evaluated_and_kept_when_better(tiny: zoo.Backbone, train_xy: Any,
                                               val_xy: Any) -> None:
    """Issue 15 EMA: each epoch scores the raw and the averaged weights (they differ); here
    the EMA of epoch 1 scores best, and the returned model holds exactly those weights."""
    result = finetune("tiny_cnn", "full", train_xy, val_xy, weights=None, epochs=4,
                      batch_size=5, lr=0.2, optimizer="sgd", ema=0.5)
    assert all(h["ema_val_loss"] != h["val_loss"] for h in result.history)
    assert result.metrics["kept_weights"] == "ema"
    kept = result.history[result.metrics["kept_epoch"] - 1]
    assert kept["ema_val_accuracy"] > kept["val_accuracy"]
    assert result.metrics["val_accuracy"] == kept["ema_val_accuracy"]
    again = zoo.evaluate(result.model, val_xy)
    assert again["accuracy"] == pytest.approx(kept["ema_val_accuracy"])
    assert again["loss"] == pytest.approx(kept["ema_val_loss"], rel=1e-5)


# --------------------------------------------------------------------------- loggers, run file


def test_csv_and_tensorboard_hold_the_epochs(base: str, train_xy: Any, val_xy: Any,
                                             tmp_path: Path) -> None:
    """Issue 15 visibility: a run folder gets metrics.csv (by default) and, with the
    tensorboard logger, event files holding every epoch's scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    finetune(base, "linear_probe", train_xy, val_xy, epochs=3, output_dir=out,
             loggers=["csv", "tensorboard"])
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_accuracy", "lr", "lr/head"} <= set(rows[0])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_accuracy")] == [1, 2, 3]
    assert (out / "model.safetensors").is_file()


def test_console_line_per_epoch(base: str, train_xy: Any, val_xy: Any,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15 visibility: unless quiet, one plain line per epoch as it ends (loss, acc,
    val acc, lr, time), no carriage-return frames in a log."""
    finetune(base, "linear_probe", train_xy, val_xy, epochs=2, quiet=False)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("epoch ")]
    assert len(lines) == 2 and "val acc" in lines[0] and " lr " in lines[0]
    assert "\r" not in "".join(lines)


def test_run_file_replays_to_the_same_checkpoint(base: str, tmp_path: Path) -> None:
    """Issue 15 run files: every run folder holds run.yaml; ``zoo.finetune(**load_run(...))``
    gives a bitwise identical model.safetensors."""
    first = finetune(base, "partial", "digits", limit_per_class=2, epochs=2,
                     augment="light", optimizer="sgd", warmup_epochs=0.5, ema=0.9,
                     output_dir=tmp_path / "a")
    settings = zoo.load_run(tmp_path / "a" / "run.yaml")
    assert settings["augment"] == "light" and settings["ema"] == 0.9
    assert "output_dir" not in settings
    again = zoo.finetune(**settings, output_dir=tmp_path / "b", quiet=True)
    assert first.checkpoint is not None and again.checkpoint is not None
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_flags_and_config_replay(base: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15 run files and CLI: ``zoo finetune`` takes the new flags and writes run.yaml;
    ``--config run.yaml`` replays it to a bitwise identical checkpoint, and a flag given on
    the command line overrides the file."""
    from zoo.cli import main

    first = tmp_path / "first"
    argv = ["finetune", "--backbone", base, "--strategy", "partial", "--data", "digits",
            "--limit-per-class", "2", "--epochs", "2", "--image-size", "16", "--quiet",
            "--augment", "standard", "--optimizer", "sgd", "--momentum", "0.8",
            "--label-smoothing", "0.1", "--warmup-epochs", "0.5", "--scheduler", "linear",
            "--accumulate", "2", "--batch-size", "5", "--clip-grad", "1.0", "--ema", "0.9",
            "--weight-decay", "0.02", "--out", str(first)]
    assert main(argv) == 0
    settings = zoo.load_run(first / "run.yaml")
    assert (settings["augment"], settings["accumulate"], settings["clip_grad"]) == \
        ("standard", 2, 1.0)
    assert (first / "metrics.csv").is_file()
    replay = tmp_path / "replay"
    assert main(["finetune", "--config", str(first / "run.yaml"), "--out", str(replay)]) == 0
    assert (first / "model.safetensors").read_bytes() == \
        (replay / "model.safetensors").read_bytes()
    shorter = tmp_path / "shorter"
    assert main(["finetune", "--config", str(first / "run.yaml"), "--epochs", "1",
                 "--out", str(shorter)]) == 0
    assert zoo.load_run(shorter / "run.yaml")["epochs"] == 1
    assert zoo.load_run(shorter / "run.yaml")["optimizer"] == "sgd"  # the rest replayed
    capsys.readouterr()


def test_cli_help_shows_every_default_and_plan_matches_finetune(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15 parity: finetune's and compare's --help give each default; compare takes
    every finetune option; plan and finetune default to the same epochs."""
    from zoo.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    finetune_p, compare_p, plan_p = (sub.choices[n] for n in ("finetune", "compare", "plan"))
    for p in (finetune_p, compare_p):
        text = " ".join(p.format_help().split())
        for flag in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--scheduler"):
            assert flag in text
        assert "(default: cosine)" in text and "(default: 0.01)" in text
    compare_flags = {s for a in compare_p._actions for s in a.option_strings}
    finetune_only = {"--backbone", "--strategy", "--out", "--overwrite", "--resume",
                     "--checkpoint", "--config"}
    missing = {s for a in finetune_p._actions for s in a.option_strings} - compare_flags \
        - finetune_only
    assert not missing
    assert plan_p.get_default("epochs") == finetune_p.get_default("epochs") == 3


def test_compare_takes_per_strategy_options() -> None:
    """Issue 15 parity: ``zoo compare --option partial.freeze_to=block`` reaches only the
    partial runs; an unknown strategy prefix is one clear error."""
    from zoo.cli.common import UsageError
    from zoo.cli.compare import per_strategy_options

    assert per_strategy_options(["partial.freeze_to=block", "lr_scale=2"],
                                ["partial", "scratch", "full"]) == \
        {"partial": {"freeze_to": "block", "lr_scale": 2}, "full": {"lr_scale": 2}}
    with pytest.raises(UsageError, match="'gradual' is not one of --strategies"):
        per_strategy_options(["gradual.every=2"], ["partial"])
