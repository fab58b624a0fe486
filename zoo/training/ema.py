"""An exponential moving average of a model's weights (``--ema DECAY``).

The average often generalises better than the last weights; the trainer evaluates both
each epoch and keeps the better. Every floating-point tensor of the state dict is averaged
(BatchNorm running statistics included, so the averaged weights come with matching
statistics); integer buffers such as ``num_batches_tracked`` are copied.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from zoo.core.errors import ZooError


class ModelEma:
    """``ema = decay * ema + (1 - decay) * weights`` after every ``update(model)``.

    With ``warmup=True`` the decay starts low and grows as ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so early averages are not dominated by the random start. The average
    lives on ``device`` (default: the model's).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, *, warmup: bool = False,
                 device: torch.device | str | None = None) -> None:
        if not (math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ZooError(f"EMA decay must be between 0 and 1 (e.g. 0.999), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.device = torch.device(device) if device is not None else None
        self.shadow: dict[str, Tensor] = {
            name: t.detach().clone().to(self.device or t.device)
            for name, t in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each step)."""
        decay = self.current_decay()
        live = model.state_dict()
        if live.keys() != self.shadow.keys():
            raise ZooError("the model's tensors changed since the EMA was created; create "
                           "ModelEma after the model is complete (adapters, new head)")
        for name, average in self.shadow.items():
            value = live[name].detach().to(average.device)
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        """The averaged tensors and the update count (for resume)."""
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        shadow = state["shadow"]
        if not isinstance(shadow, Mapping) or shadow.keys() != self.shadow.keys():
            raise ZooError("the saved EMA does not fit this model (different tensors)")
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])  # type: ignore[arg-type]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (in place: optimizers keep working)."""
        live = model.state_dict()
        for name, average in self.shadow.items():
            live[name].copy_(average)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with the averaged weights swapped in; the raw weights come back after,
        even if the block raises."""
        backup = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                live = model.state_dict()
                for name, value in backup.items():
                    live[name].copy_(value)
