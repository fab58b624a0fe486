"""The hand-written PyTorch loops zoo is measured against.

This is the loop a user would write without zoo, kept honest and lean: frozen parameters
get ``requires_grad=False`` (so autograd records nothing for them), the model is put in
train mode each epoch with the frozen modules (their BatchNorm) switched back to eval,
AdamW over the trainable parameters, cross-entropy, cosine schedule stepped per epoch,
the same batch size, learning rate, weight decay and data order as zoo (the same
``torch.randperm`` seed per epoch), data sliced from in-memory tensors, no host syncs
inside the epoch. It runs the whole network on every batch of every epoch ("naive"):
that is what zoo's frozen-prefix cache is meant to beat.
"""

from __future__ import annotations

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
) -> dict[str, Any]:
    """Train ``model`` on uint8 images ``x`` with the first ``n_frozen`` groups frozen.

    Returns the final train loss and accuracy of the last epoch (read once per epoch).
    """
    frozen = freeze_prefix(model, groups, n_frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    normalize = normalizer(mean, std)
    n = len(x)
    stats: dict[str, Any] = {}
    for epoch in range(epochs):
        model.train()
        for module in frozen:
            module.eval()
        order = epoch_order(n, seed, epoch)
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            images = normalize(x[idx])
            labels = y[idx]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
        scheduler.step()
        stats = {"train_loss": float(loss_sum) / n, "train_accuracy": float(correct) / n}
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    return stats


@torch.no_grad()
def forward_pass(model: nn.Module, x: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], batch_size: int = 64) -> float:
    """Seconds for ONE frozen forward pass over ``x`` (eval mode, no autograd), the floor
    for any method that must look at every image once."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    normalize = normalizer(mean, std)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        model(normalize(x[i:i + batch_size]))
    elapsed = time.perf_counter() - start
    for m, flag in flags:
        m.training = flag
    return elapsed


def warm_up(model: nn.Module, x: torch.Tensor, mean: Sequence[float],
            std: Sequence[float]) -> None:
    """One forward+backward and optimizer step on a batch, so that one-time process costs
    (the first ``torch.optim`` optimizer imports ``torch._dynamo``: about 1 s; first-call
    allocations) are not charged to whichever loop happens to run first."""
    normalize = normalizer(mean, std)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1)
    out = model(normalize(x[:64]))
    out.float().sum().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    forward_pass(model, x[:64], mean, std)
