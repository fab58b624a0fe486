"""Loggers are callbacks: ``metrics.csv``, TensorBoard, a live line per epoch, and any a
plugin registers with the ``register_loggers`` hook (W&B, MLflow, ...).

``make_loggers(["csv", "tensorboard"], output_dir)`` builds them by name; a factory takes
``(output_dir, **options)`` and returns a :class:`zoo.training.callbacks.Callback`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from zoo.core._io import write_text_atomic
from zoo.core.errors import PluginError, UnknownNameError, ZooError
from zoo.plugins.registry import call_each, claim
from zoo.training.callbacks import Callback, Run

if TYPE_CHECKING:
    from zoo.training.trainer import FinetuneResult

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """A history record as flat scalars: ``{"lrs": {"head": 0.1}}`` -> ``{"lr/head": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            prefix = "lr" if key == "lrs" else key
            flat.update({f"{prefix}/{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class CsvLogger(Callback):
    """``metrics.csv`` in the run folder, one row per epoch, rewritten atomically after each
    epoch from the run's whole history (so a resumed run's file holds every epoch)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / METRICS_FILE

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        rows = [flatten(r) for r in run.history]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, buffer.getvalue())


class TensorBoardLogger(Callback):
    """Scalars per epoch under ``<run>/tensorboard`` (needs ``pip install 'zoo[tensorboard]'``)."""

    def __init__(self, output_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: zoo[tensorboard]
        except ImportError:
            raise ZooError("TensorBoard logging needs the tensorboard package: "
                           "pip install 'zoo[tensorboard]'") from None
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        for key, value in flatten(record).items():
            if key != "epoch" and finite(value):
                self.writer.add_scalar(key, value, global_step=record.get("epoch", epoch + 1))
        self.writer.flush()

    def on_train_end(self, run: Run, result: FinetuneResult) -> None:
        self.writer.close()


def format_epoch(record: Mapping[str, Any], epochs: int | None = None) -> str:
    """One plain line for an epoch: loss, accuracy, val accuracy, lr, time."""
    total = f"/{epochs}" if epochs else ""
    parts = [f"epoch {record.get('epoch', '?')}{total}"]
    for key, label, spec in (("train_loss", "loss", ".4f"), ("train_accuracy", "acc", ".4f"),
                             ("val_loss", "val loss", ".4f"),
                             ("val_accuracy", "val acc", ".4f")):
        if isinstance(record.get(key), int | float):
            parts.append(f"{label} {record[key]:{spec}}")
    lrs = record.get("lrs")
    if isinstance(lrs, Mapping) and lrs:
        parts.append(f"lr {max(lrs.values()):.2e}")
    if isinstance(record.get("epoch_time_s"), int | float):
        parts.append(f"{record['epoch_time_s']:.1f} s")
    return "  ".join(parts)


class ConsoleLogger(Callback):
    """The live line per epoch, printed as the epoch ends (to stderr by default): on a
    terminal and in a log file alike one plain line, never carriage-return frames."""

    def __init__(self, output_dir: str | Path | None = None, stream: IO[str] | None = None
                 ) -> None:
        self.stream = stream

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        print(format_epoch(record, run.epochs), file=stream, flush=True)


# --------------------------------------------------------------------------- registry

LoggerFactory = Callable[..., Callback]
BUILTIN: dict[str, LoggerFactory] = {"csv": CsvLogger, "tensorboard": TensorBoardLogger,
                                     "console": ConsoleLogger}


def logger_factories() -> dict[str, LoggerFactory]:
    """Built-in loggers and those plugins register (``register(name, factory)``)."""
    found: dict[str, LoggerFactory] = dict(BUILTIN)
    owners = dict.fromkeys(found, "zoo")

    def add(plugin: str, name: str, factory: LoggerFactory) -> None:
        claim(owners, "logger", name, plugin)
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered logger {name!r} with a "
                              f"non-callable factory {factory!r}")
        found[name] = factory

    call_each("register_loggers", add)
    return found


def make_loggers(names: Sequence[str], output_dir: str | Path | None,
                 options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Callback]:
    """The loggers named in ``names`` for a run writing to ``output_dir`` (file loggers
    need one); ``options[name]`` are keyword arguments for that logger's factory."""
    factories = logger_factories()
    result = []
    for name in names:
        if name not in factories:
            raise UnknownNameError.for_name("logger", name, sorted(factories))
        if output_dir is None and name in ("csv", "tensorboard"):
            raise ZooError(f"the {name} logger writes into the run folder; pass output_dir "
                           "(--out)")
        kwargs = dict((options or {}).get(name, {}))
        result.append(factories[name](output_dir, **kwargs))
    return result


def default_loggers(names: Sequence[str] | None, out: Path | None, quiet: bool
                    ) -> list[Callback]:
    """A run's logger callbacks: ``names``, or by default ``metrics.csv`` when there is a run
    folder and the live line per epoch unless ``quiet`` (which also drops "console")."""
    if names is None:
        names = ["csv"] if out is not None else []
        names = names if quiet else [*names, "console"]
    elif quiet:
        names = [n for n in names if n != "console"]
    return make_loggers(list(names), out)


def finite(value: Any) -> bool:
    """True for a real, finite number (what loggers write as a scalar)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
