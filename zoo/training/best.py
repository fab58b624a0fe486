"""Which epoch's weights a run keeps (``keep="best"`` or ``"last"``), and when ``patience``
stops it: a callback that watches each epoch's validation numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.training.callbacks import Callback, Run


class BestEpoch(Callback):
    """Which epoch's weights a run keeps, and when ``patience`` stops it.

    Epochs rank by validation accuracy, ties broken by the lower validation loss; on a full
    tie the earlier epoch stays. With ``keep="best"`` each improvement stores a CPU copy of
    the tensors the run can change (``zoo.models.groups.changing_tensors``; frozen ones
    never move), and ``restore`` puts them back at the end. ``patience=N`` stops the run
    after N epochs in a row without improvement. Without validation data the last epoch is
    kept. With an EMA (``ema_val_accuracy`` in the records) each epoch scores as the better
    of its raw and averaged weights, and ``kept_weights`` says which the kept copy holds.
    """

    def __init__(self, keep: str, patience: int | None, names: Sequence[str],
                 has_val: bool) -> None:
        self.keep = keep if has_val else "last"
        self.note = None if has_val or keep == "last" else \
            "no validation data: kept the last epoch (keep='best' needs val)"
        self.patience = patience
        self.names = list(names) if self.keep == "best" else []
        self.epoch: int | None = None  # 0-based index of the best epoch so far
        self.score: tuple[float, float] | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.stopped_early = False
        self.source = "raw"  # which weights of the best epoch: "raw" or "ema"

    def _improves(self, epoch: int, record: Mapping[str, Any]) -> bool:
        """Whether ``epoch`` beats the best so far (then it becomes the best); also decides
        ``stopped_early``."""
        if "val_accuracy" not in record:
            return False
        score, source = (record["val_accuracy"], -record["val_loss"]), "raw"
        if "ema_val_accuracy" in record:
            averaged = (record["ema_val_accuracy"], -record["ema_val_loss"])
            if averaged > score:
                score, source = averaged, "ema"
        better = self.score is None or score > self.score
        if better:
            self.epoch, self.score, self.source = epoch, score, source
        self.stopped_early = self.patience is not None and epoch - self.epoch >= self.patience
        return better

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        """Note the epoch (after the history took it); ask the run to stop on patience."""
        if self.update(run.model, epoch, record, run.ema):
            run.stop = True

    def update(self, model: nn.Module, epoch: int, record: Mapping[str, Any],
               ema: Any = None) -> bool:
        """Note ``epoch``'s record, copying the weights (the EMA's when they scored better)
        when it improves; True when the run should stop (``patience`` epochs without
        improvement)."""
        if self._improves(epoch, record) and self.names:
            state = ema.shadow if self.source == "ema" and ema is not None \
                else model.state_dict()
            self.tensors = {n: state[n].detach().to("cpu", copy=True) for n in self.names}
        return self.stopped_early

    def restore(self, model: nn.Module) -> None:
        """Put the kept epoch's tensors back into ``model`` (in place: same parameters)."""
        state = model.state_dict()
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                state[name].copy_(tensor)

    def kept(self, history: Sequence[Mapping[str, Any]]) -> int:
        """The index in ``history`` of the epoch kept."""
        return self.epoch if self.keep == "best" and self.epoch is not None else len(history) - 1

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """What metrics.json records about the choice."""
        info: dict[str, Any] = {
            "keep": self.keep, "kept_epoch": history[self.kept(history)]["epoch"],
            "last_val_accuracy": history[-1].get("val_accuracy"),
            "patience": self.patience, "stopped_early": self.stopped_early,
            "kept_weights": self.source if self.keep == "best" else "raw"}
        if self.note:
            info["keep_note"] = self.note
        return info

    def state(self) -> dict[str, Any] | None:
        """The best-so-far for the resume state (only when copies are kept)."""
        return {"epoch": self.epoch, "tensors": self.tensors} if self.tensors else None

    def load(self, saved: Any, model: nn.Module, history: Sequence[Mapping[str, Any]],
             where: Path) -> None:
        """Continue from a resume state: replay the history's scores, then take the saved
        copy of the best epoch; without one (saved with keep='last', or by an older zoo) the
        resumed weights, the last epoch's, count as the best so far."""
        for epoch, record in enumerate(history):
            self._improves(epoch, record)
        if not self.names or self.epoch is None:
            return
        if not (isinstance(saved, dict) and saved.get("epoch") == self.epoch):
            print(f"zoo: {where} holds no copy of the best epoch's weights; the resumed ones "
                  f"(epoch {len(history)}) count as the best so far", file=sys.stderr)
            self.score = None
            self.update(model, len(history) - 1, history[-1])
            return
        own, tensors = model.state_dict(), saved["tensors"]
        if set(tensors) != set(self.names) or any(
                t.shape != own[n].shape or t.dtype != own[n].dtype for n, t in tensors.items()):
            raise ZooError(f"{where} does not fit this run (its copy of the best epoch holds "
                           "other tensors); delete it to start again")
        self.tensors = dict(tensors)
