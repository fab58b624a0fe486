"""Loggers are callbacks: ``metrics.csv``, TensorBoard, a live line per epoch, and any a
plugin registers with the ``register_loggers`` hook (W&B, MLflow, ...).

``make_loggers(["csv", "tensorboard"], output_dir)`` builds them by name; a factory takes
``(output_dir, **options)`` and returns a :class:`zoo.training.runner.Callback`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from zoo.core.errors import DuplicateNameError, PluginError, UnknownNameError, ZooError
from zoo.training.runner import Callback, FinetuneResult, Run

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
        from zoo.core._io import write_text_atomic

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
            from torch.utils.tensorboard import SummaryWriter
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


def is_terminal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default: stderr) is a terminal: only then draw progress bars."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress_bar(total: int, desc: str, stream: IO[str] | None = None,
                 quiet: bool = False) -> Any:
    """A tqdm bar on a terminal; disabled in a log file (no carriage-return frames)."""
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, desc=desc, file=stream, leave=False, unit="batch",
                disable=quiet or not is_terminal(stream))


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
    from zoo.plugins.manager import get_plugin_manager

    found: dict[str, LoggerFactory] = dict(BUILTIN)
    owners = {name: "zoo" for name in found}
    hook = get_plugin_manager().hook.register_loggers
    for impl in hook.get_hookimpls():
        plugin = impl.plugin_name

        def register(name: str, factory: LoggerFactory, _plugin: str = plugin) -> None:
            if name in owners:
                raise DuplicateNameError(f"logger {name!r} is registered by both "
                                         f"{owners[name]!r} and plugin {_plugin!r}; block one "
                                         "of them in registry.toml or via ZOO_LOAD_PLUGINS")
            if not callable(factory):
                raise PluginError(f"plugin {_plugin!r} registered logger {name!r} with a "
                                  f"non-callable factory {factory!r}")
            owners[name] = _plugin
            found[name] = factory

        try:
            impl.function(register=register)
        except (DuplicateNameError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} raised in register_loggers: "
                              f"{type(exc).__name__}: {exc}") from exc
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


def finite(value: Any) -> bool:
    """True for a real, finite number (what loggers write as a scalar)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
