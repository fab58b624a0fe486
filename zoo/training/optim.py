"""Optimisation pieces for the trainer: optimizer with no decay on norms and biases, label
smoothing, per-batch schedules with warmup, gradient accumulation and clipping.

They compose with zoo's per-layer-group learning rates: each layer group stays one entry
(its ``name`` and ``lr`` kept) split into a decayed and an undecayed param group, and every
schedule is a multiplier on each param group's own base rate, so layer-wise decay and
discriminative rates survive warmup and annealing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from zoo.core.errors import ZooError
from zoo.models.strategy import Plan
from zoo.training.ema import ModelEma

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "step", "onecycle", "constant")

# --------------------------------------------------------------------------- optimizer


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay, as timm's trainer decides: every 1-D tensor
    (norm weights, biases), every ``.bias``, and what ``model.no_weight_decay()`` lists
    (position embeddings, class tokens)."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or name.endswith(".bias") or name in extra
            or any(name.startswith(f"{e}.") for e in extra)}


def split_decay(groups: Sequence[Mapping[str, Any]], weight_decay: float,
                skip: Iterable[Tensor] | None = None) -> list[dict[str, Any]]:
    """Each param group as a decayed and an undecayed group (empty halves dropped), every
    other key (``name``, ``lr``, ...) kept. ``skip`` are the tensors without decay (default:
    the 1-D ones)."""
    skipped = {id(p) for p in skip} if skip is not None else None
    result: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        quiet = [p for p in params if (p.ndim <= 1 if skipped is None else id(p) in skipped)]
        quiet_ids = {id(p) for p in quiet}
        loud = [p for p in params if id(p) not in quiet_ids]
        for chosen, decay in ((loud, weight_decay), (quiet, 0.0)):
            if chosen:
                result.append({**group, "params": chosen, "weight_decay": decay})
    return result


def build_optimizer(groups: Sequence[Mapping[str, Any]] | nn.Module, name: str = "adamw", *,
                    lr: float = 1e-3, weight_decay: float = 0.01, momentum: float = 0.9,
                    model: nn.Module | None = None, decay_norm_and_bias: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW or SGD (with Nesterov ``momentum``) over ``groups`` (zoo's per-layer groups,
    each ``{"params", "lr", "name"}``; or a module: one group), with no weight decay on norms
    and biases unless ``decay_norm_and_bias``. Pass ``model`` to also exempt what its
    ``no_weight_decay()`` names."""
    if isinstance(groups, nn.Module):
        model = model or groups
        groups = [{"params": list(groups.parameters()), "lr": lr, "name": "all"}]
    if name not in OPTIMIZERS:
        raise ZooError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ZooError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
    if decay_norm_and_bias:
        param_groups = [{**g, "params": list(g["params"]), "weight_decay": weight_decay}
                        for g in groups]
    else:
        skip = None
        if model is not None:
            names = no_decay_names(model)
            skip = [p for n, p in model.named_parameters() if n in names]
        param_groups = split_decay(groups, weight_decay, skip)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def param_groups(model: nn.Module, owner: Mapping[str, str], plans: Sequence[Plan],
                 names: Sequence[str], lr: float) -> list[dict[str, Any]]:
    """One entry per layer group, in order, each ``{"params", "lr", "name"}``: every group is
    registered from the start, at the rate it will train with (its first trainable epoch's
    ``lr_scale``; frozen all along: the first plan's), so any scheduler sees them all."""
    params: dict[str, list[nn.Parameter]] = {n: [] for n in names}
    for pname, p in model.named_parameters():
        params[owner[pname]].append(p)
    groups = []
    for group in names:
        active = next((p[group] for p in plans if p[group].trainable), plans[0][group])
        groups.append({"params": params[group], "lr": lr * active.lr_scale, "name": group})
    return groups


def make_optimizer(model: nn.Module, owner: Mapping[str, str], plans: Sequence[Plan],
                   names: Sequence[str], lr: float, weight_decay: float, name: str = "adamw",
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD with each layer group at the lr it will train with (``param_groups``),
    split into a decayed and an undecayed half (no decay on norms and biases)."""
    return build_optimizer(param_groups(model, owner, plans, names, lr), name, lr=lr,
                           weight_decay=weight_decay, momentum=momentum, model=model)


def classification_loss(label_smoothing: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss: cross-entropy with ``label_smoothing`` for class-index targets;
    probability targets (mixup/cutmix, already smoothed) use the soft-target form."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ZooError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        if targets.is_floating_point():
            return torch.sum(-targets * F.log_softmax(logits.float(), -1), -1).mean()
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    return loss


# --------------------------------------------------------------------------- schedules


def schedule_factor(step: int, total_steps: int, name: str = "cosine", *, warmup_steps: int = 0,
                    min_factor: float = 0.0, step_every: int | None = None,
                    gamma: float = 0.1) -> float:
    """The multiplier on every base rate at optimizer step ``step`` (0-based) of
    ``total_steps``: a linear warmup from 1/warmup_steps to 1 over the first
    ``warmup_steps``, then ``name`` from 1 towards ``min_factor``."""
    if name == "onecycle":
        return _one_cycle(step, total_steps, warmup_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    done = min(done, 1.0)
    if name == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * done))
    if name == "linear":
        return 1 - (1 - min_factor) * done
    if name == "step":
        every = step_every or max(1, math.ceil((total_steps - warmup_steps) / 3))
        return gamma ** ((step - warmup_steps) // every)
    if name == "constant":
        return 1.0
    raise ZooError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULES)}")


def _one_cycle(step: int, total: int, warmup: int, div: float = 25.0,
               final_div: float = 1e4) -> float:
    """torch's OneCycleLR shape (cosine up from 1/div, cosine down to 1/(div*final_div)),
    the rise lasting ``warmup`` steps (default 30 %)."""
    rise = warmup or max(1, round(0.3 * total))
    start, end = 1 / div, 1 / (div * final_div)
    if step < rise:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / rise))
    done = min(1.0, (step - rise) / max(1, total - rise))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * done))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "cosine", *, epochs: int,
                    steps_per_epoch: int, warmup_epochs: float = 0.0, min_factor: float = 0.0,
                    step_epochs: float | None = None, gamma: float = 0.1) -> LambdaLR:
    """A schedule stepped once per optimizer step (call ``.step()`` after each), scaling each
    param group's own base rate. ``warmup_epochs`` may be a fraction (0.5: half an epoch);
    ``step_epochs`` is the ``step`` schedule's period (default: a third of the run)."""
    if name not in SCHEDULES:
        raise ZooError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULES)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ZooError(f"epochs and steps per epoch must be >= 1, got {epochs}, "
                       f"{steps_per_epoch}")
    if not (math.isfinite(warmup_epochs) and 0 <= warmup_epochs <= epochs):
        raise ZooError(f"warmup_epochs must be between 0 and epochs ({epochs}), "
                       f"got {warmup_epochs}")
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    every = max(1, round(step_epochs * steps_per_epoch)) if step_epochs else None

    def factor(step: int) -> float:
        return schedule_factor(step, total, name, warmup_steps=warmup, min_factor=min_factor,
                               step_every=every, gamma=gamma)

    return LambdaLR(optimizer, factor)


def make_schedulers(choice: Any, optimizer: torch.optim.Optimizer, epochs: int, steps: int,
                    warmup_epochs: float) -> tuple[Any, Any]:
    """``(per-batch schedule, per-epoch schedule)``: a name gives the first (stepped after
    each optimizer step, ``build_scheduler``), a callable ``optimizer -> scheduler`` the
    second; None gives neither (a constant rate after ``warmup_epochs``, if any)."""
    if choice is None:
        if warmup_epochs:
            return build_scheduler(optimizer, "constant", epochs=epochs, steps_per_epoch=steps,
                                   warmup_epochs=warmup_epochs), None
        return None, None
    if isinstance(choice, str) and choice in SCHEDULES:
        return build_scheduler(optimizer, choice, epochs=epochs, steps_per_epoch=steps,
                               warmup_epochs=warmup_epochs), None
    if callable(choice):
        return None, choice(optimizer)
    raise ZooError(f"unknown scheduler {choice!r}; use one of {', '.join(SCHEDULES)}, None "
                   "or a callable")


# --------------------------------------------------------------------------- stepping


class GradientStep:
    """Backward and optimizer step with gradient accumulation and clipping.

    ``backward(loss)`` scales the loss by 1/``accumulate`` and, every ``accumulate`` calls,
    clips the gradient norm to ``clip_grad`` (if set), steps the optimizer (through the AMP
    ``scaler`` if given), zeroes the gradients and steps the per-batch ``scheduler``: the
    same update as one batch ``accumulate`` times larger. ``flush()`` steps a partial
    accumulation at the end of an epoch, its gradients rescaled to a mean.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, accumulate: int = 1,
                 clip_grad: float | None = None, scaler: Any = None, scheduler: Any = None
                 ) -> None:
        if accumulate < 1:
            raise ZooError(f"accumulate must be >= 1, got {accumulate}")
        if clip_grad is not None and not (math.isfinite(clip_grad) and clip_grad > 0):
            raise ZooError(f"clip_grad must be a positive number, got {clip_grad}")
        self.optimizer = optimizer
        self.accumulate = accumulate
        self.clip_grad = clip_grad
        self.scaler = scaler
        self.scheduler = scheduler
        self.pending = 0
        self.steps = 0
        self.last_grad_norm: float | None = None

    @property
    def will_step(self) -> bool:
        """True when the next ``backward`` completes an accumulation (DDP: sync only then,
        wrapping the others in ``model.no_sync()``)."""
        return self.pending + 1 >= self.accumulate

    def backward(self, loss: Tensor) -> bool:
        """Accumulate ``loss``'s gradients; returns True when this call stepped."""
        scaled = loss / self.accumulate
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.pending += 1
        if self.pending < self.accumulate:
            return False
        self._step()
        return True

    def flush(self) -> bool:
        """Step what a partial accumulation holds (rescaled to its own mean); True if so."""
        if self.pending == 0:
            return False
        factor = self.accumulate / self.pending
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self._step()
        return True

    def _step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.pending = 0
        self.steps += 1


@dataclass
class StepParts:
    """What a training batch needs besides the model: the loss, the stepper (accumulation,
    clipping, AMP scaler, per-batch schedule), the mixup/cutmix mixer and the EMA."""

    loss: Callable[[Tensor, Tensor], Tensor]
    stepper: GradientStep
    mixer: Any = None
    ema: Any = None


def step_parts(optimizer: torch.optim.Optimizer, model: nn.Module, label_smoothing: float,
               accumulate: int, clip_grad: float | None, scaler: Any, batch_schedule: Any,
               mixer: Any, ema: float | None) -> StepParts:
    """The loss, stepper and (with ``ema=DECAY``) the moving average of ``model``'s weights,
    which starts from the weights as they are now."""
    stepper = GradientStep(optimizer, accumulate=accumulate, clip_grad=clip_grad, scaler=scaler,
                           scheduler=batch_schedule)
    average = ModelEma(model, ema) if ema is not None else None
    return StepParts(classification_loss(label_smoothing), stepper, mixer, average)
