"""The learning-rate range test (Leslie Smith, 2015; fastai's ``lr_find``).

Train a copy of the model for ~100 batches while the rate grows exponentially from
``start_lr`` to ``end_lr``; record the smoothed loss; stop once it exceeds ``diverge`` times
the best. The suggested rate is where the loss falls fastest (steepest descent against
log lr); the minimum's rate / 10 is given too. The caller's model is never touched.
"""

from __future__ import annotations

import copy
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.core._io import atomic_write
from zoo.core.errors import ZooError
from zoo.core.spec import Backbone
from zoo.data.dataset import load_data
from zoo.data.imagedata import ImageData
from zoo.data.transforms import BatchTransform, prepare_inputs
from zoo.models.build import model_for_task, transforms_for
from zoo.models.groups import FreezeState
from zoo.models.strategy import FreezeStrategy, make_strategy
from zoo.plugins.registry import get_backbone
from zoo.training.device import Batches, resolve_device
from zoo.training.optim import build_optimizer


@dataclass
class LrFindResult:
    """The rates tried, their smoothed losses, the suggestion and the plot's path."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    minimum: float
    plot: Path | None = None


def lr_find(backbone: str | Backbone, strategy: str | FreezeStrategy, data: Any, *,
            model: nn.Module | None = None, weights: str | None = "default",
            strategy_options: Mapping[str, Any] | None = None, batch_size: int = 32,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100,
            beta: float = 0.98, diverge: float = 4.0, weight_decay: float = 0.01,
            optimizer: str = "adamw", device: str | torch.device | None = None, seed: int = 0,
            out: str | os.PathLike[str] | None = None, overwrite: bool = False,
            limit_per_class: int | None = None, image_size: int | None = None) -> LrFindResult:
    """Run the range test for ``backbone`` trained with ``strategy`` on ``data`` (anything
    ``finetune`` accepts); with ``out``, write a PNG of loss against rate. ``model`` (built
    for this backbone) is copied, never changed; by default one is built as finetune would."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)) or num_iter < 5 or diverge <= 1:
        raise ZooError("lr_find needs 0 < start_lr < end_lr, num_iter >= 5 and diverge > 1; "
                       f"got {start_lr}, {end_lr}, {num_iter}, {diverge}")
    target = Path(out) if out is not None else None
    if target is not None and target.exists() and not overwrite:
        raise ZooError(f"{target} already exists; choose another --out or pass --overwrite")
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    strat = make_strategy(strategy, strategy_options) if isinstance(strategy, str) else strategy
    torch.manual_seed(seed)
    dev = resolve_device(device)
    train = load_data(data, "train", limit_per_class=limit_per_class, seed=seed)
    net, transform = _model(spec, strat, len(train.classes), model, weights, image_size)
    transform, (train,) = prepare_inputs(transform, train)
    net, groups = _trainable_groups(net, spec, strat)
    net.to(dev).train()
    opt = build_optimizer(groups, optimizer, lr=start_lr, weight_decay=weight_decay)
    lrs, losses = _sweep(net, opt, transform, train, batch_size, dev, seed,
                         (start_lr, end_lr, num_iter, beta, diverge))
    suggestion, minimum = suggest(lrs, losses)
    result = LrFindResult(lrs, losses, suggestion, minimum)
    if target is not None:
        result.plot = plot(lrs, losses, suggestion, target)
    return result


def _model(spec: Backbone, strat: FreezeStrategy, classes: int, model: nn.Module | None,
           weights: str | None, image_size: int | None) -> tuple[nn.Module, BatchTransform]:
    """A private model (a copy of ``model``, or built as finetune builds one) and its
    eval-geometry transform (no augmentation: the test measures the loss surface)."""
    base = weights if strat.pretrained else None
    net = copy.deepcopy(model) if model is not None else model_for_task(spec, classes, base)
    if base is None or getattr(net, "zoo_weights", None) is None:
        transform = BatchTransform(spec.input_size, spec.mean, spec.std)
    else:
        transform = transforms_for(spec, base)
    if image_size is not None:
        transform = replace(transform, input_size=(transform.input_size[0], image_size,
                                                   image_size))
    return net, transform


def _trainable_groups(net: nn.Module, spec: Backbone, strat: FreezeStrategy
                      ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model as the strategy prepares it, and one param group per layer group that
    trains in the strategy's first epoch, each remembering its lr scale."""
    layer_groups = spec.layer_groups(net)
    names = [g.name for g in layer_groups]
    strat.check(names, net, layer_groups)
    net = strat.prepare(net, layer_groups)
    plan = strat.plan(0, names, 1)
    state = FreezeState(net, layer_groups)
    state.apply(plan)
    groups = []
    for name in names:
        params = [p for n, p in net.named_parameters()
                  if state.owner[n] == name and p.requires_grad]
        if params:
            groups.append({"params": params, "lr": 1.0, "name": name,
                           "scale": plan[name].lr_scale})
    if not groups:
        raise ZooError(f"strategy {strat.name!r} trains nothing in its first epoch; "
                       "lr_find needs trainable parameters")
    return net, groups


def _sweep(net: nn.Module, opt: torch.optim.Optimizer, transform: BatchTransform,
           train: ImageData, batch_size: int, dev: torch.device, seed: int,
           schedule: tuple[float, float, int, float, float]) -> tuple[list[float], list[float]]:
    """Train with an exponentially growing rate; the smoothed loss per step, until it
    diverges."""
    start, end, steps, beta, diverge = schedule
    batches = Batches(train, batch_size)
    generator = torch.Generator().manual_seed(seed)
    lrs: list[float] = []
    losses: list[float] = []
    average, best = 0.0, math.inf
    stream = iter(())
    for i in range(steps):
        try:
            _, images, labels = next(stream)
        except StopIteration:
            stream = iter(batches(torch.randperm(len(train), generator=generator)))
            _, images, labels = next(stream)
        lr = start * (end / start) ** (i / (steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        loss = nn.functional.cross_entropy(net(transform(images.to(dev))).float(),
                                           labels.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        average = beta * average + (1 - beta) * value
        smoothed = average / (1 - beta ** (i + 1))
        if not math.isfinite(smoothed) or (i > 0 and smoothed > diverge * best):
            break
        best = min(best, smoothed)
        lrs.append(lr)
        losses.append(smoothed)
    if len(lrs) < 3:
        raise ZooError("the loss diverged at once; lower start_lr (--start-lr)")
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """``(steepest, minimum / 10)``: the rate where the smoothed loss falls fastest against
    log lr (ignoring the noisy first and last points), and a tenth of the loss minimum's."""
    log_lr = np.log10(np.asarray(lrs))
    gradient = np.gradient(np.asarray(losses), log_lr)
    n = len(lrs)
    lo, hi = (min(10, n // 10), n - min(5, n // 10)) if n >= 20 else (0, n)
    steepest = lrs[lo + int(np.argmin(gradient[lo:hi]))]
    minimum = lrs[int(np.argmin(losses))] / 10
    return float(steepest), float(minimum)


def plot(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> Path:
    """Write loss against rate (log axis), the suggestion marked, as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # lazy: matplotlib takes ~0.4 s, only for the plot

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(lrs, losses)
    axes.axvline(suggestion, color="tab:red", linestyle="--",
                 label=f"suggested {suggestion:.1e}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)",
             title="learning-rate range test")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path
