"""Issue 15 (visibility): loggers as callbacks — metrics.csv, TensorBoard, a live plain
line per epoch, progress bars only on a terminal, and the register_loggers hook."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

import zoo
from zoo.core.errors import DuplicateNameError, UnknownNameError, ZooError
from zoo.plugins.manager import get_plugin_manager
from zoo.training.callbacks import Callback, Run, is_terminal, progress_bar
from zoo.training.loggers import (
    ConsoleLogger,
    CsvLogger,
    flatten,
    format_epoch,
    logger_factories,
    make_loggers,
)


class FakeRun(Run):
    """A Run holding only what loggers read (history, epochs)."""

    def __init__(self, epochs: int) -> None:
        self.history = []
        self.epochs = epochs


def record(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.5 + epoch / 10,
            "lrs": {"body": 1e-4, "head": 1e-3}, "val_loss": 0.9 / epoch,
            "val_accuracy": 0.6, "trainable_params": 10, "epoch_time_s": 1.25, "time_s": 2.5}


def play(loggers: list[Callback], epochs: int = 3) -> FakeRun:
    run = FakeRun(epochs)
    for cb in loggers:
        cb.on_train_start(run)
    for e in range(epochs):
        run.history.append(record(e + 1))
        for cb in loggers:
            cb.on_epoch_end(run, e, run.history[-1])
    for cb in loggers:
        cb.on_train_end(run, None)  # type: ignore[arg-type]
    return run


def test_csv_logger_writes_one_row_per_epoch(tmp_path: Path) -> None:
    """Issue 15 (done when): metrics.csv exists and holds the epochs (lrs flattened per
    group); no temp files are left behind."""
    play([CsvLogger(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[1]["train_loss"]) == 0.5 and float(rows[0]["lr/head"]) == 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_tensorboard_logger_writes_event_files_holding_the_epochs(tmp_path: Path) -> None:
    """Issue 15 (done when): the TensorBoard files exist and hold the epochs (read back with
    tensorboard's EventAccumulator)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    play(make_loggers(["tensorboard"], tmp_path))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train_loss", "val_accuracy", "lr/head"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([1.0, 0.5, 1 / 3])


def test_console_line_is_one_plain_line_per_epoch() -> None:
    """Issue 15 visibility: loss, accuracy, val accuracy, lr and time in one line per epoch,
    no carriage returns, as each epoch ends."""
    stream = io.StringIO()
    play([ConsoleLogger(stream=stream)], epochs=2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0] == ("epoch 1/2  loss 1.0000  acc 0.6000  val loss 0.9000  val acc 0.6000  "
                        "lr 1.00e-03  1.2 s")
    assert format_epoch({"epoch": 1, "train_loss": 0.5}) == "epoch 1  loss 0.5000"


def test_progress_bars_only_on_a_terminal() -> None:
    """Issue 15 visibility: a log file gets no carriage-return frames from progress bars."""
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, tty = io.StringIO(), Tty()
    assert not is_terminal(log) and is_terminal(tty)
    for stream in (log, tty):
        bar = progress_bar(5, "epoch 1/1", stream)
        for _ in range(5):
            bar.update(1)
        bar.close()
    assert log.getvalue() == "" and "\r" in tty.getvalue()


class WandbLike(Callback):
    def __init__(self, output_dir: Path | None, project: str = "default") -> None:
        self.project = project
        self.seen: list[int] = []

    def on_epoch_end(self, run: Run, epoch: int, record: dict) -> None:
        self.seen.append(record["epoch"])


class LoggerPlugin:
    @zoo.hookimpl
    def register_loggers(self, register):  # the hook's name, as plugins write it
        register("wandb_like", WandbLike)


def test_register_loggers_hook_adds_a_logger_by_name(tmp_path: Path) -> None:
    """Issue 15 visibility: a plugin adds a logger through register_loggers; it is chosen
    by name with options; a duplicate name is refused naming both owners."""
    pm = get_plugin_manager()
    plugin = LoggerPlugin()
    pm.register(plugin, name="logger-plugin")
    try:
        assert {"csv", "tensorboard", "console", "wandb_like"} <= set(logger_factories())
        (logger,) = make_loggers(["wandb_like"], tmp_path, {"wandb_like": {"project": "p"}})
        play([logger])
        assert logger.project == "p" and logger.seen == [1, 2, 3]
        clash = type("Clash", (), {"register_loggers": zoo.hookimpl(
            lambda self, register: register("csv", WandbLike))})()
        pm.register(clash, name="clash-plugin")
        try:
            with pytest.raises(DuplicateNameError, match="'csv'.*'clash-plugin'"):
                logger_factories()
        finally:
            pm.unregister(clash)
    finally:
        pm.unregister(plugin)


def test_unknown_logger_and_file_loggers_without_a_folder_are_clear_errors() -> None:
    """Issue 15 visibility: one-line errors."""
    with pytest.raises(UnknownNameError, match="unknown logger 'cvs'.*'csv'"):
        make_loggers(["cvs"], None)
    with pytest.raises(ZooError, match="pass output_dir"):
        make_loggers(["csv"], None)
    assert flatten({"lrs": {"a": 1}, "x": torch.tensor(1).item()}) == {"lr/a": 1, "x": 1}
