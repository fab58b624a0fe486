"""Callbacks: code that hooks into a run without touching the trainer (``zoo.Callback``).

The trainer's own chores are callbacks too, called in this order after each epoch: the NaN
guard (a diverged run stops before it saves anything), the history, the best-epoch keeper
(``zoo.training.best``), the resume state (``resume.pt``), then the user's callbacks and
the loggers. The progress bar draws one tick per batch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.core._io import atomic_write
from zoo.core.errors import ZooError
from zoo.core.spec import Backbone
from zoo.models.strategy import FreezeStrategy, Plan
from zoo.persist.folder import claim_output_dir

if TYPE_CHECKING:
    from zoo.training.best import BestEpoch
    from zoo.training.trainer import FinetuneResult

RESUME_FILE = "resume.pt"


@dataclass
class Run:
    """The live state of a run, shared with callbacks."""

    backbone: Backbone
    strategy: FreezeStrategy
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    group_names: list[str]
    epochs: int
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)
    plan: Plan | None = None
    stop: bool = False
    batches: int = 0  # training batches per epoch on this rank
    ema: Any = None  # the moving average of the weights (``ema=DECAY``), if any


class Callback:
    """Hooks into a run; override what you need. ``run`` is the live ``Run``."""

    def on_train_start(self, run: Run) -> None:
        """Called once, after set-up and before the first epoch."""

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        """Called before each epoch (after its freeze plan is applied)."""

    def on_batch_end(self, run: Run, epoch: int, batch: int, loss: torch.Tensor) -> None:
        """Called after each training batch (0-based ``batch``) with its loss, a tensor on the
        device: reading it (``float(loss)``) waits for the GPU, so do it sparingly."""

    def on_train_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        """Called after an epoch's training batches, before validation, with the record so
        far (training loss and accuracy, learning rates)."""

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        """Called after each epoch with its history record."""

    def on_train_end(self, run: Run, result: FinetuneResult) -> None:
        """Called once the run finished and its checkpoint is written."""


# --------------------------------------------------------------------------- progress


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
    stream = sys.stderr if stream is None else stream
    return tqdm(total=total, desc=desc, file=stream, leave=False, unit="batch",
                disable=quiet or not is_terminal(stream))


class ProgressBar(Callback):
    """A bar over each epoch's batches, drawn only on a terminal (stderr by default)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.bar: Any = None

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        self.bar = progress_bar(run.batches, f"epoch {epoch + 1}/{run.epochs}", self.stream)

    def on_batch_end(self, run: Run, epoch: int, batch: int, loss: torch.Tensor) -> None:
        self.bar.update(1)

    def on_train_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        self.bar.close()


class History(Callback):
    """Appends each epoch's record to ``run.history`` (what resume, the keeper, loggers and
    the result read)."""

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        run.history.append(record)


# --------------------------------------------------------------------------- NaN guard


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (one device sync)."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    return [name for (name, _), ok in zip(floats, flags, strict=True) if not ok]


def check_finite(model: nn.Module, epoch: int, losses: Mapping[str, float], out: Path | None,
                 lr: float, weights: bool = True) -> None:
    """Stop a diverged run before it saves anything: a loss or weight that is NaN or inf.

    The message names the epoch (1-based) and the last good resume state, if one was saved.
    """
    problem = next((f"{what} became {value}" for what, value in losses.items()
                    if not math.isfinite(value)), None)
    if problem is None and weights:
        bad = non_finite_tensors(model.state_dict())
        if bad:
            problem = f"the weights became nan/inf ({len(bad)} tensors, e.g. {bad[0]!r})"
    if problem is None:
        return
    where = (f"; the last good state is in {out / RESUME_FILE} (after epoch {epoch})"
             if out is not None and epoch > 0 else "")
    raise ZooError(f"{problem} in epoch {epoch + 1}{where}; lower the learning rate "
                   f"(--lr, now {lr:g}) and start again")


class NanGuard(Callback):
    """Stops the run with a clear error when the training loss (checked before validation),
    the validation loss or a weight becomes NaN or infinite; ``out`` and ``lr`` go into the
    message (where the last good state is, what to lower)."""

    def __init__(self, out: Path | None, lr: float) -> None:
        self.out = out
        self.lr = lr

    def on_train_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        check_finite(run.model, epoch, {"training loss": record["train_loss"]}, self.out,
                     self.lr, weights=False)

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        check_finite(run.model, epoch, {"validation loss": record.get("val_loss", 0.0)},
                     self.out, self.lr)


# --------------------------------------------------------------------------- resume state

# What a resume state holds, and the keys the trainer reads from each history record.
_RESUME_FIELDS = {"epoch": int, "model": dict, "optimizer": dict, "rng": torch.Tensor,
                  "history": list, "config": dict}
_RECORD_KEYS = ("epoch", "train_loss", "train_accuracy", "trainable_params", "epoch_time_s",
                "time_s")
_SAME_RUN = ("backbone", "num_classes", "strategy")  # config keys a resumed run must share


class ResumeState(Callback):
    """``resume.pt`` in the run folder, rewritten (atomically) after every epoch: weights,
    optimizer, scheduler, RNG, history and the best epoch so far. ``restore`` continues a run
    from it; a resumed run ends with the same weights as an uninterrupted one (CPU)."""

    def __init__(self, out: Path | None, config: Mapping[str, Any], keeper: BestEpoch,
                 main: bool = True) -> None:
        self.out = out
        self.config = config
        self.keeper = keeper
        self.main = main  # only rank 0 writes

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        if self.out is not None and self.main:
            self.save(run, epoch)

    def save(self, run: Run, epoch: int) -> None:
        """Write the state after ``epoch`` (0-based)."""
        assert self.out is not None
        claim_output_dir(self.out)  # marks the folder as a zoo run, for check_output_dir
        state = {
            "epoch": epoch,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "rng": torch.get_rng_state(),
            "history": run.history,
            "config": {k: self.config[k] for k in _SAME_RUN},
            "best": self.keeper.state(),  # the best epoch so far and a copy of its weights
        }
        with atomic_write(self.out / RESUME_FILE) as handle:
            torch.save(state, handle)

    def restore(self, directory: Path, run: Run) -> int:
        """Load ``directory``'s state into ``run`` (and the keeper); returns the epoch to
        continue from. A missing, damaged or foreign state is a ZooError."""
        path = directory / RESUME_FILE
        if not path.is_file():
            raise ZooError(f"nothing to resume in {directory}: no {RESUME_FILE} (a run with "
                           "output_dir writes one after every epoch)")
        state = read_resume(path)
        saved = state["config"]
        mine = {k: self.config[k] for k in _SAME_RUN}
        if saved != mine:
            raise ZooError(f"{path} belongs to a different run ({saved}); resume it with the "
                           "same backbone, strategy and options")
        _load_state(path, state, run)
        run.history[:] = state["history"]
        self.keeper.load(state.get("best"), run.model, run.history, path)
        return state["epoch"] + 1


def _load_state(path: Path, state: Mapping[str, Any], run: Run) -> None:
    """Weights, optimizer, scheduler and RNG from ``state``; a misfit is a ZooError."""
    own, saved_model = run.model.state_dict(), state["model"]
    misfits = sorted(set(own) ^ set(saved_model)) + [
        k for k in own if k in saved_model and own[k].shape != saved_model[k].shape]
    try:
        if misfits:
            raise ValueError(f"tensors {misfits[:3]} are missing, unknown or of another shape")
        run.model.load_state_dict(saved_model)
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scheduler is not None and state.get("scheduler") is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = exc if isinstance(exc, ValueError) and misfits else type(exc).__name__
        raise ZooError(f"{path} does not fit this run ({reason}); delete it to start "
                       "again") from None


def read_resume(path: Path) -> dict[str, Any]:
    """Load and check a resume state; a damaged, foreign or diverged file is a ZooError."""
    fix = "delete it to start again, or resume another run's folder"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch.load raises many types for a damaged or foreign file
        raise ZooError(f"{path} is corrupt or not a zoo resume state "
                       f"({type(exc).__name__}); {fix}") from None
    if not isinstance(state, dict) or any(
        not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)
        for key, kind in _RESUME_FIELDS.items()
    ) or state["epoch"] < 0 or not all(
        isinstance(r, dict) and all(k in r for k in _RECORD_KEYS) for r in state["history"]
    ) or not all(isinstance(t, torch.Tensor) for t in state["model"].values()) or not all(
        "val_accuracy" not in r or _numbers(r.get("val_accuracy"), r.get("val_loss"))
        for r in state["history"]
    ) or not _is_best_state(state.get("best")):
        raise ZooError(f"{path} is not a zoo resume state (missing or wrong fields); {fix}")
    best = (state.get("best") or {}).get("tensors", {})
    bad = non_finite_tensors({**state["model"], **{f"best epoch's {k}": t
                                                   for k, t in best.items()}})
    if bad:
        raise ZooError(f"{path} holds nan/inf weights ({len(bad)} tensors, e.g. {bad[0]!r}); "
                       f"{fix}")
    return state


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _is_best_state(best: Any) -> bool:
    """None, or {"epoch": int, "tensors": {name: tensor}} as ``BestEpoch.state`` writes."""
    return best is None or (
        isinstance(best, dict) and isinstance(best.get("epoch"), int)
        and not isinstance(best["epoch"], bool) and isinstance(best.get("tensors"), dict)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                for k, t in best["tensors"].items()))
