"""The hand-written PyTorch loops zoo is measured against.

This is the loop a user would write without zoo, kept honest and lean: frozen parameters
get ``requires_grad=False`` (so autograd records nothing for them), the model is put in
train mode each epoch with the frozen modules (their BatchNorm) switched back to eval,
AdamW over the trainable parameters with no weight decay on biases and norms (1-D
tensors), as timm's trainer and zoo do, cross-entropy, cosine schedule stepped after every
batch, the same batch size, learning rate, weight decay and data order as zoo (the same
``torch.randperm`` seed per epoch), data sliced from in-memory tensors, no host syncs
inside the epoch. It runs the whole network on every batch of every epoch ("naive"):
that is what zoo's frozen-prefix cache is meant to beat.

On a GPU it is written the way a competent user writes it: the model on the device, bf16
autocast, ``channels_last`` for convnets, each batch gathered straight into page-locked
(pinned) host memory and copied with ``non_blocking=True``, loss and accuracy summed on the
device (read once per epoch). On CPU the loop is exactly the original one (float32).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import normalizer


def _owned(name: str, members: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in members)


def freeze_prefix(model: nn.Module, groups: Sequence[tuple[str, Sequence[str]]],
                  n_frozen: int) -> list[nn.Module]:
    """``requires_grad=False`` on the first ``n_frozen`` groups' parameters; returns their
    modules (to be put in eval mode after every ``model.train()``)."""
    members = [m for _, ms in groups[:n_frozen] for m in ms]
    for name, p in model.named_parameters():
        p.requires_grad_(not _owned(name, members))
    # Groups list module paths (in-tree backbones) or parameter names (timm's matcher):
    # a module is frozen when its path is, or when its own parameters are (a BatchNorm
    # whose weight and bias are frozen is put in eval mode).
    frozen = []
    for path, module in model.named_modules():
        own = [f"{path}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if path and (_owned(path, members) or any(_owned(t, members) for t in own)):
            frozen.append(module)
    return frozen


class Feeder:
    """Batches of ``x``/``y`` (host tensors) on ``device``: plain slicing on CPU; on a GPU
    gathered into pinned memory, copied asynchronously, normalised and laid out there."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], device: torch.device, channels_last: bool) -> None:
        self.x, self.y, self.device = x, y, device
        self.normalize = normalizer(mean, std)
        self.cuda = device.type == "cuda"
        self.channels_last = channels_last

    def _pinned(self, source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(idx), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        torch.index_select(source, 0, idx, out=out)
        return out.to(self.device, non_blocking=True)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            return self.normalize(self.x[idx]), self.y[idx]
        images = self.normalize(self._pinned(self.x, idx))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, self._pinned(self.y, idx)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU, nothing on CPU (the CPU loop stays float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: the same generator seed zoo's runner uses."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator)


def naive_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    groups: Sequence[tuple[str, Sequence[str]]],
    n_frozen: int,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    on_epoch_end: Callable[[int, nn.Module], Any] | None = None,
    channels_last: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on uint8 images ``x`` (host memory) with the first ``n_frozen`` groups
    frozen, on the model's device (on a GPU: bf16 autocast, ``channels_last`` if asked,
    pinned non-blocking copies; ``compile`` wraps the model in ``torch.compile``).

    Returns the final train loss and accuracy of the last epoch (read once per epoch).
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda and channels_last:
        model.to(memory_format=torch.channels_last)
    frozen = freeze_prefix(model, groups, n_frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)
    total_steps = epochs * math.ceil(len(x) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))
    feed = Feeder(x, y, mean, std, device, cuda and channels_last)
    forward = torch.compile(model) if compile else model
    n = len(x)
    stats: dict[str, Any] = {}
    for epoch in range(epochs):
        model.train()
        for module in frozen:
            module.eval()
        order = epoch_order(n, seed, epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, n, batch_size):
            images, labels = feed(order[start:start + batch_size])
            with autocast_for(device):
                logits = forward(images)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
        stats = {"train_loss": float(loss_sum) / n, "train_accuracy": float(correct) / n}
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    return stats


@torch.no_grad()
def _unlabelled_feeder(model: nn.Module, x: torch.Tensor, mean: Sequence[float],
                       std: Sequence[float], channels_last: bool) -> tuple[torch.device, Feeder]:
    """The model's device and a Feeder of ``x`` (dummy labels), with the model put in
    channels_last memory where a CUDA run asks for it."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda and channels_last:
        model.to(memory_format=torch.channels_last)
    return device, Feeder(x, torch.zeros(len(x), dtype=torch.long), mean, std, device,
                          cuda and channels_last)


def forward_pass(model: nn.Module, x: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], batch_size: int = 64, channels_last: bool = True
                 ) -> float:
    """Seconds for ONE frozen forward pass over ``x`` (eval mode, no autograd), the floor
    for any method that must look at every image once (on the model's device)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    device, feed = _unlabelled_feeder(model, x, mean, std, channels_last)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        with autocast_for(device):
            model(feed(torch.arange(i, min(i + batch_size, len(x))))[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    for m, flag in flags:
        m.training = flag
    return elapsed


def warm_up(model: nn.Module, x: torch.Tensor, mean: Sequence[float],
            std: Sequence[float], channels_last: bool = True) -> None:
    """One forward+backward and optimizer step on a batch, so that one-time process costs
    (the first ``torch.optim`` optimizer imports ``torch._dynamo``: about 1 s; first-call
    allocations; on a GPU the CUDA context, cuDNN's algorithm choice) are not charged to
    whichever loop happens to run first."""
    device, feed = _unlabelled_feeder(model, x, mean, std, channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1)
    with autocast_for(device):
        out = model(feed(torch.arange(min(64, len(x))))[0])
    out.float().sum().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    forward_pass(model, x[:64], mean, std, channels_last=channels_last)
