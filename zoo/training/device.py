"""Where a run computes: the device, mixed precision, channels-last, ``torch.compile`` and DDP
behind one object, and the batches that feed it (pinned, non-blocking on a GPU).

Under ``torchrun`` every rank trains on its share of the data (padded as
``DistributedSampler`` pads), sums its numbers with the others and takes rank 0's BatchNorm
statistics after each epoch, so every rank ends with the same model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from zoo.core.errors import ZooError

if TYPE_CHECKING:
    from zoo.data.imagedata import ImageData


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ZooError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    backends = {"cpu": None, "cuda": torch.cuda, "mps": torch.mps}
    if dev.type not in backends:
        raise ZooError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    backend = backends[dev.type]
    count = 1 if backend is None else backend.device_count()
    if (dev.index or 0) >= count:
        found = f"{count} {dev.type} device(s)" if count else f"no {dev.type} device"
        raise ZooError(f"device {str(dev)!r} does not exist here ({found} found); "
                       "use cpu or an existing device")
    return dev


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (WORLD_SIZE > 1) the process group is
    started first (NCCL on GPUs, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_share(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an epoch's sample order. As ``DistributedSampler`` does, the order
    is padded by repeating its start until every rank gets as many samples (so as many
    batches), then rank r takes every world-th sample from r: each sample is seen each epoch."""
    if world <= 1:
        return order
    pad = (-len(order)) % world
    if pad:
        order = torch.cat([order, order.repeat(math.ceil(pad / len(order)))[:pad]])
    return order[rank::world]


def all_reduce_sums(values: Sequence[float], world: int, dev: torch.device) -> list[float]:
    """The sums of ``values`` over all ranks (float64, one collective); as-is without DDP."""
    if world <= 1:
        return [float(v) for v in values]
    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(totals)
    return totals.tolist()


def sync_buffers(model: nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each
    forward: after an epoch each rank's last batch moved its own copy."""
    if world <= 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


class DeviceContext:
    """The device a run trains on and how: AMP (bf16 autocast, fp16 with a GradScaler where
    a GPU lacks bf16), channels-last memory, ``torch.compile`` and DDP (rank, world size,
    wrapping, the collectives). ``amp`` and ``channels_last`` default to on for CUDA (the
    latter only for models with convolutions)."""

    def __init__(self, device: str | torch.device | None = None, *, amp: bool | None = None,
                 channels_last: bool | None = None, compile: bool = False) -> None:
        self.rank, self.world = distributed()
        dev = resolve_device(device)
        if dev.type == "cuda" and self.world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(dev)
        self.device = dev
        self.amp = dev.type == "cuda" if amp is None else amp
        self.channels_last = channels_last
        self.compile = compile
        self.scaler: Any = None

    @property
    def main(self) -> bool:
        """True on the process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def pin(self) -> bool:
        """Whether batches go through page-locked memory (CUDA runs)."""
        return self.device.type == "cuda"

    def place(self, model: nn.Module) -> None:
        """Move ``model`` to the device, channels-last where chosen, and make the GradScaler
        (enabled only for fp16 autocast on a GPU without bf16)."""
        dev = self.device
        if self.channels_last is None:
            self.channels_last = dev.type == "cuda" and any(isinstance(m, nn.Conv2d)
                                                            for m in model.modules())
        model.to(dev)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(enabled=self.amp and dev.type == "cuda"
                                           and not torch.cuda.is_bf16_supported())

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the block when AMP is on (bf16, or fp16 where a GPU lacks it)."""
        if not self.amp:
            return contextlib.nullcontext()
        dev = self.device
        dtype = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() \
            else torch.float16
        return torch.autocast(dev.type, dtype=dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory format the model runs in."""
        return x.contiguous(memory_format=torch.channels_last) \
            if self.channels_last and x.ndim == 4 else x

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the device (CUDA) or the CPU, seeded: augmentation draws from it."""
        dev = self.device
        generator = torch.Generator(device=dev if dev.type == "cuda" else "cpu")
        generator.manual_seed(seed)
        return generator

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` as it trains: in DDP under torchrun, compiled when asked."""
        if self.world > 1:
            dev = self.device
            ids = [dev.index] if dev.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        if self.compile:
            module = torch.compile(module)
        return module

    def share(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of an epoch's sample order (``rank_share``)."""
        return rank_share(order, self.rank, self.world)

    def sums(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (``all_reduce_sums``)."""
        return all_reduce_sums(values, self.world, self.device)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers on every rank (``sync_buffers``)."""
        sync_buffers(model, self.world)

    def barrier(self) -> None:
        """Wait for every rank (under DDP)."""
        if self.world > 1:
            dist.barrier()


# --------------------------------------------------------------------------- batches


def input_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader worker processes for images decoded as they are read: ``num_workers`` if
    given, else min(8, CPUs) on a GPU (decoding must keep up with the card) and 0 on CPU
    (training uses the cores itself, and results stay bitwise those of earlier versions)."""
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, cpus or 1)


def gather(source: torch.Tensor, idx: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """``source[idx]``, written straight into page-locked memory when ``pin`` (CUDA runs), so
    that the ``non_blocking`` copy to the GPU is asynchronous and overlaps the training step."""
    if not pin or source.device.type != "cpu":
        return source[idx]
    out = torch.empty((len(idx), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    return torch.index_select(source, 0, idx, out=out)


class Batches:
    """Raw (image, label) batches from in-memory tensors or a DataLoader, in a given order.

    With ``pin_memory`` (CUDA) in-memory batches are gathered into page-locked memory and a
    DataLoader pins its batches; its workers then prefetch 4 batches each."""

    def __init__(self, data: ImageData, batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.data = data
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def __call__(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]]:
        """Yield ``(indices, images, labels)`` for consecutive chunks of ``order``."""
        if self.data.tensors is not None:
            images, labels = self.data.tensors
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                yield idx, gather(images, idx, self.pin_memory), labels[idx]
            return
        loader = torch.utils.data.DataLoader(
            self.data, batch_size=self.batch_size, sampler=order.tolist(),
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None,
        )
        start = 0
        for images, labels in loader:
            idx = order[start:start + len(labels)]
            start += len(labels)
            yield idx, images, labels
