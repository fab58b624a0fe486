"""The runner: fine-tune any backbone with any strategy, evaluate, checkpoint, resume.

What it guarantees, for every backbone and strategy:
- each layer group is one optimizer param group with its own learning rate, registered
  from the start (groups that unfreeze later included), so any torch scheduler works;
- frozen groups get no gradients and run without autograd; their BatchNorm layers stay in
  eval mode (running statistics never move), however often ``.train()`` is called;
- when a prefix of groups is frozen for a whole phase and inputs are deterministic, its
  output is computed once and reused (``zoo.data.feature_cache``);
- a resumable state is written after every epoch, and a resumed run ends with the same
  weights as an uninterrupted one (same seed, CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.core.arguments import check_arguments
from zoo.core.errors import IncompatibleError, ZooError
from zoo.core.spec import Backbone, LayerGroup, Stage, resolve_callable
from zoo.data.dataset import ImageData, load_data
from zoo.data.feature_cache import (
    CacheKey,
    FeatureStore,
    decide_cache,
    default_cache_memory,
    shared_store,
)
from zoo.data.hf import is_dataset_dict
from zoo.data.transforms import BatchTransform, prepare_inputs, transform_from_config
from zoo.models.build import (
    assign_groups,
    count_parameters,
    create_model,
    replace_head,
    transforms_for,
)
from zoo.models.strategy import FreezeStrategy, Plan, make_strategy, plans_for, selects
from zoo.plugins.registry import get_backbone

RESUME_FILE = "resume.pt"


class Callback:
    """Hooks into a run; override what you need. ``run`` is the live ``Run``."""

    def on_train_start(self, run: Run) -> None:
        """Called once, after set-up and before the first epoch."""

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        """Called before each epoch (after its freeze plan is applied)."""

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        """Called after each epoch with its history record."""

    def on_train_end(self, run: Run, result: FinetuneResult) -> None:
        """Called once the run finished and its checkpoint is written."""


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the trained model, its history and metrics, its checkpoint."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    checkpoint: Path | None
    config: dict[str, Any] = field(default_factory=dict)


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


# --------------------------------------------------------------------------- helpers


def module_groups(model: nn.Module, groups: Sequence[LayerGroup]) -> dict[str, str]:
    """Map module paths to the group that owns them (by path, or by their own tensors)."""
    result: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        owner = next((g.name for g in groups if g.owns(path)), None)
        if owner is None:
            own = [f"{path}.{n}" for n, _ in module.named_parameters(recurse=False)]
            own += [f"{path}.{n}" for n, _ in module.named_buffers(recurse=False)]
            owner = next((g.name for g in groups for t in own if g.owns(t)), None)
        if owner is not None:
            result[path] = owner
    return result


def _force_eval(module: nn.Module, _args: Any) -> None:
    module.training = False


class FreezeState:
    """Applies a plan to a model: requires_grad flags and eval-mode pins on frozen layers.

    Pinned modules get a forward pre-hook that puts them back in eval mode, so a frozen
    group's BatchNorm statistics cannot move even if someone calls ``model.train()``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[LayerGroup]) -> None:
        self.model = model
        self.owner = assign_groups(model, groups)
        self.module_owner = module_groups(model, groups)
        self._hooks: list[Any] = []

    def apply(self, plan: Plan) -> None:
        """Set which parameters learn and which modules stay in eval mode."""
        for name, p in self.model.named_parameters():
            gp = plan[self.owner[name]]
            p.requires_grad_(gp.trainable and selects(gp.only, name))
            if not p.requires_grad:
                p.grad = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for path, module in self.model.named_modules():
            group = self.module_owner.get(path)
            if group is None:
                continue
            gp = plan[group]
            if gp.fully_frozen or (isinstance(module, _BatchNorm) and gp.bn_mode == "eval"):
                module.training = False
                self._hooks.append(module.register_forward_pre_hook(_force_eval))

    def remove(self) -> None:
        """Remove the eval-mode pins (e.g. after training)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def ungrouped(self) -> list[nn.Module]:
        """The model and its modules that belong to no layer group (containers, a stray
        dropout): the only ones a frozen prefix may run that no eval-mode pin covers."""
        return [module for path, module in self.model.named_modules()
                if path not in self.module_owner]


@contextlib.contextmanager
def eval_mode(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Run the block with every module (or only ``modules``) in eval mode, restoring each
    module's flag after."""
    if modules is None:
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
    else:
        flags = [(m, m.training) for m in modules]
        for module in modules:
            module.training = False
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _compose(stages: Sequence[Stage]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage.forward(x)
        return x

    return forward


class SplitModel(nn.Module):
    """The model as (frozen prefix, trainable rest); DDP wraps this so only the rest syncs."""

    def __init__(self, model: nn.Module, stages: Sequence[Stage] | None, cut: int,
                 eval_modules: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cut = cut
        # The modules ``features`` switches to eval mode (None: all of them). The runner
        # passes FreezeState.ungrouped(): the prefix's frozen groups are pinned already.
        self._eval_modules = None if eval_modules is None else list(eval_modules)
        if stages is None:
            self.prefix = None
            self.rest = model
        else:
            self.prefix = _compose(stages[:cut]) if cut else None
            self.rest = _compose(stages[cut:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output: no autograd, every module it runs in eval mode."""
        if self.prefix is None:
            return x
        with torch.no_grad(), eval_mode(self.model, self._eval_modules):
            return self.prefix(x)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.rest(features)


def frozen_prefix(stages: Sequence[Stage] | None, plan: Plan) -> int:
    """How many leading stages are fully frozen under ``plan`` (never the last one)."""
    if not stages:
        return 0
    cut = 0
    for stage in stages[:-1]:
        if all(plan[g].fully_frozen for g in stage.groups):
            cut += 1
        else:
            break
    return cut


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


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    from zoo.core._io import atomic_write

    with atomic_write(path) as handle:
        torch.save(obj, handle)


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


# --------------------------------------------------------------------------- the kept epoch

KEEP_CHOICES = ("best", "last")


def changing_tensors(model: nn.Module, state: FreezeState, plans: Sequence[Plan]) -> list[str]:
    """The state-dict names a run can change: parameters that train in some epoch's plan,
    and buffers of modules that run in train mode in some epoch (BatchNorm statistics)."""
    names = [n for n, _ in model.named_parameters()
             if any(p[state.owner[n]].trainable and selects(p[state.owner[n]].only, n)
                    for p in plans)]
    modules = dict(model.named_modules())
    for name, _ in model.named_buffers():
        path = name.rpartition(".")[0]
        group = state.module_owner.get(path)
        if group is None or any(
                not (p[group].fully_frozen or (isinstance(modules[path], _BatchNorm)
                                               and p[group].bn_mode == "eval"))
                for p in plans):
            names.append(name)
    return names


class BestEpoch:
    """Which epoch's weights a run keeps, and when ``patience`` stops it.

    Epochs rank by validation accuracy, ties broken by the lower validation loss; on a full
    tie the earlier epoch stays. With ``keep="best"`` each improvement stores a CPU copy of
    the tensors the run can change (``changing_tensors``; frozen ones never move), and
    ``restore`` puts them back at the end. ``patience=N`` stops the run after N epochs in a
    row without improvement. Without validation data the last epoch is kept. With an EMA
    (``ema_val_accuracy`` in the records) each epoch scores as the better of its raw and
    averaged weights, and ``kept_weights`` says which the kept copy holds.
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
    import torch.distributed as dist

    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(totals)
    return totals.tolist()


def sync_buffers(model: nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each
    forward: after an epoch each rank's last batch moved its own copy."""
    if world <= 1:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------- finetune


def finetune(
    backbone: str | Backbone,
    strategy: str | FreezeStrategy,
    train: Any,
    val: Any = None,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    weights: str | os.PathLike[str] | None = "default",
    num_classes: int | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    scheduler: str | Callable[[torch.optim.Optimizer], Any] | None = "cosine",
    augment: Any = False,
    limit_per_class: int | None = None,
    strict: bool = False,
    cache: bool = True,
    cache_memory: int | None = None,
    cache_views: int = 0,
    feature_store: FeatureStore | None = None,
    checkpoint_kind: str = "auto",
    resume: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    amp: bool | None = None,
    channels_last: bool | None = None,
    compile: bool = False,
    num_workers: int | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    keep_head: bool = False,
    overwrite: bool = False,
    keep: str = "best",
    patience: int | None = None,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 0.0,
    accumulate: int = 1,
    clip_grad: float | None = None,
    ema: float | None = None,
    loggers: Sequence[str] | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` with ``strategy`` on ``train``; evaluate on ``val`` each epoch.

    ``train``/``val`` are a built-in dataset name, an ImageFolder path, a ``(x, y)`` tensor
    pair or a torch Dataset (``val=None`` with a named dataset uses its validation split).
    ``weights="default"`` starts from the backbone's default pretrained weights (``None``:
    random). With ``output_dir`` a resumable state is saved after every epoch and the final
    model is saved as a checkpoint (``checkpoint_kind`` "auto", "delta" or "full": see
    ``save_checkpoint``). ``augment`` is False, True (zoo's original pad-crop-flip, kept so
    earlier runs repeat), a preset "none", "light", "standard" or "strong" (mixup/cutmix with
    soft targets), a ``zoo.data.augment.Augmentation`` or any torchvision v2 pipeline; evaluation
    never augments. Augmented runs keep the frozen-prefix cache only with ``cache_views=K``:
    K augmented views of every training image are computed once and epoch e uses view e % K
    (not with mixing). ``optimizer`` is "adamw" or "sgd" (``momentum``, Nesterov); norms and
    biases get no ``weight_decay``. ``scheduler`` is "cosine", "linear", "step", "onecycle",
    "constant" (stepped after every optimizer step, after ``warmup_epochs``, fractions
    allowed), None, or a callable ``optimizer -> scheduler`` stepped once per epoch.
    ``label_smoothing`` smooths the cross-entropy targets; ``accumulate=N`` steps every N
    batches (the update of an N times larger batch); ``clip_grad`` clips the gradient norm.
    ``ema=DECAY`` keeps an exponential moving average of the weights, evaluated each epoch
    beside the raw ones (``ema_val_accuracy``); the best epoch keeps the better of the two
    (metrics["kept_weights"]). ``loggers`` names logger callbacks (default: "csv" with an
    ``output_dir``, and "console", a line per epoch, unless ``quiet``; "tensorboard" or a
    plugin's); with ``output_dir`` the settings are written to ``run.yaml``.
    The pretrained head is replaced by a fresh one for the new task unless
    ``keep_head=True`` (same classes as the weights). ``strict=True`` refuses image files
    that do not decode (by default they are skipped and counted). ``image_size`` overrides
    the input resolution (e.g. 64 for a quick run; a ViT also needs
    ``builder_kwargs={"image_size": 64}``). ``output_dir`` must be new, empty, the run being
    resumed, or (with ``overwrite=True``) an earlier zoo checkpoint: checked before training.
    ``keep="best"`` returns and saves the epoch with the best validation accuracy (ties: the
    lower validation loss, then the earlier epoch; without validation data, the last), and
    ``keep="last"`` the last; ``patience=N`` stops after N epochs without improvement.
    metrics["kept_epoch"] says which epoch it is; the other metrics are that epoch's.
    Under ``torchrun`` every rank trains on its share of every sample (padded as
    ``DistributedSampler`` pads), validates its share of the validation data, and reports
    the metrics summed over all ranks; rank 0's BatchNorm statistics go to every rank.
    Returns the model, its per-epoch history and metrics, and the checkpoint.
    """
    check_arguments(locals())  # every argument, before anything is built or loaded
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    if output_dir is not None:  # before any training: where the checkpoint goes, what it holds
        from zoo.persist.checkpoint import check_checkpoint_kwargs, check_output_dir

        check_output_dir(output_dir, overwrite=overwrite, resume=resume)
        check_checkpoint_kwargs(spec, builder_kwargs or {}, f"cannot save to {output_dir}")
    strat = (make_strategy(strategy, strategy_options) if isinstance(strategy, str)
             else strategy)
    rank, world = _distributed()
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    torch.manual_seed(seed)

    train_data = load_data(train, "train", limit_per_class=limit_per_class, seed=seed,
                           strict=strict)
    _check_two_classes(train_data)
    val_data = _validation_data(train, val, seed, strict)
    classes = num_classes or len(train_data.classes)
    if num_classes is not None and num_classes < len(train_data.classes):
        raise ZooError(f"num_classes={num_classes} but the training data has "
                       f"{len(train_data.classes)} classes")
    _check_labels(train_data, classes, "training")
    if val_data is not None:
        _check_labels(val_data, classes, "validation")
    elif patience is not None:
        raise ZooError("patience stops a run when its validation accuracy stops improving, "
                       "so it needs validation data: pass val (--val)")

    base_weights = weights if strat.pretrained else None
    # The optimizer below imports torch._dynamo (~1 s) anyway; importing it first lets
    # create_model skip the random initialisation of tensors that the weights overwrite.
    importlib.import_module("torch._dynamo")

    model = create_model(spec, num_classes=classes, weights=base_weights,
                         **dict(builder_kwargs or {}))
    base_info = model.zoo_weights
    if base_info is not None and not keep_head:
        # A new task gets a new head, even with the same number of classes: the source
        # task's classifier would start confidently wrong (CIFAR-10 -> MNIST, digits 0-4 -> 5-9).
        replace_head(model, spec.head, classes, force=True)
    layer_groups = spec.layer_groups(model)
    names = [g.name for g in layer_groups]
    strat.check(names, model, layer_groups)
    model = strat.prepare(model, layer_groups)
    transform = _transform(spec, base_weights, augment, model)
    if image_size is not None:
        transform = replace(transform, input_size=(transform.input_size[0], image_size,
                                                   image_size))
    _check_channels(train_data, transform)
    # one geometry for every image: files and Datasets are fitted one by one, as predict does
    transform, (train_data, val_data) = prepare_inputs(transform, train_data, val_data)

    use_amp = dev.type == "cuda" if amp is None else amp
    if channels_last is None:
        channels_last = dev.type == "cuda" and any(isinstance(m, nn.Conv2d)
                                                   for m in model.modules())
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    state = FreezeState(model, layer_groups)
    plans = plans_for(strat, names, epochs)  # checked: a bad plan names its plugin
    opt = _optimizer(model, state.owner, plans, names, lr, weight_decay, optimizer, momentum)
    steps = math.ceil(math.ceil(math.ceil(len(train_data) / world) / batch_size) / accumulate)
    batch_sched, epoch_sched = _scheduler(scheduler, opt, epochs, steps, warmup_epochs)
    stages = list(resolve_callable(spec.stages)(model)) if spec.stages else None

    run = Run(spec, strat, model, opt, batch_sched or epoch_sched, names, epochs, dev)
    keeper = BestEpoch(keep, patience, changing_tensors(model, state, plans), val_data is not None)
    out = Path(output_dir) if output_dir is not None else None
    config = _run_config(spec, strat, base_info, classes, train_data, transform, builder_kwargs,
                         dict(epochs=epochs, batch_size=batch_size, lr=lr,
                              weight_decay=weight_decay, seed=seed, augment=_describe(augment),
                              scheduler=scheduler if isinstance(scheduler, str | None)
                              else "custom", limit_per_class=limit_per_class,
                              keep=keeper.keep, patience=patience, optimizer=optimizer,
                              momentum=momentum, label_smoothing=label_smoothing,
                              warmup_epochs=warmup_epochs, accumulate=accumulate,
                              clip_grad=clip_grad, ema=ema))
    model.zoo_config = config  # type: ignore[assignment]
    start_epoch = 0
    if resume is not None:
        start_epoch = _restore(Path(resume), run, config, keeper)
        out = out or Path(resume)

    mixer = _batch_mixer(transform, classes, label_smoothing, cache_views)
    store = feature_store if feature_store is not None else (
        shared_store(cache_memory or default_cache_memory()) if cache else None)
    cacheable, cache_off = decide_cache(
        cache and mixer is None and (transform.deterministic or cache_views > 0),
        train_data, val_data)
    if cache_off is not None and not quiet and rank == 0:
        print(f"zoo: {cache_off}", file=sys.stderr)
    hits_before, misses_before = (store.hits, store.misses) if store is not None else (0, 0)
    eval_transform = replace(transform, augment=False)
    if strat.extract_features and not cacheable:
        raise IncompatibleError("feature_extract computes the frozen features once, so it "
                                "needs the feature cache (cache=True) and a deterministic "
                                "input pipeline (augment=False, or cache_views=K); "
                                "otherwise use linear_probe"
                                + (f" ({cache_off})" if cache_off else ""))
    weights_key = (base_info or {}).get("sha256") or f"random-seed{seed}"
    workers, pin = input_workers(num_workers, dev), dev.type == "cuda"
    if any(d is not None and d.tensors is None for d in (train_data, val_data)) \
            and not quiet and rank == 0:  # images read as they go: say how
        print(f"zoo: reading images with {workers} DataLoader worker(s)"
              f"{' into pinned memory' if pin else ''} for {dev}", file=sys.stderr)
    train_batches = Batches(train_data, batch_size, workers, pin)
    val_batches = Batches(val_data, batch_size * 2, workers, pin) \
        if val_data is not None else None

    def to_input(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images to model input: augmented when a generator is given, else the eval view."""
        chosen = transform if generator is not None else eval_transform
        x = chosen(images.to(dev, non_blocking=True), generator)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 \
            else x

    def autocast() -> Any:
        if not use_amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() \
            else torch.float16
        return torch.autocast(dev.type, dtype=dtype)

    scaler = torch.amp.GradScaler(enabled=use_amp and dev.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    parts = _step_parts(opt, model, label_smoothing, accumulate, clip_grad, scaler, batch_sched,
                        mixer, ema)
    callbacks = [*callbacks, *(_loggers(loggers, out, quiet) if rank == 0 else [])]

    def cached_features(split: SplitModel, data: ImageData, batches: Batches,
                        view: int | None = None) -> torch.Tensor | None:
        """The frozen prefix's output for ``data`` (augmented view ``view``), from the cache."""
        if store is None or not cacheable or split.prefix is None:
            return None
        boundary = ",".join(g for s in stages[:split.cut] for g in s.groups)
        chosen = eval_transform if view is None else transform
        key = CacheKey(spec.name, weights_key, boundary, data.fingerprint(),
                       chosen.cache_key() + f"|{dev.type}|amp={use_amp}",
                       view=0 if view is None else view + 1)

        def compute() -> Iterator[torch.Tensor]:
            generator = None
            if view is not None:
                generator = torch.Generator(device=dev if dev.type == "cuda" else "cpu")
                generator.manual_seed(seed * 7_919 + 1_000_003 * (view + 1))
            # Every module in eval mode once for the whole pass, not once per batch.
            with eval_mode(split.model):
                for _, images, _ in batches(torch.arange(len(data))):
                    with torch.no_grad(), autocast():
                        features = split.prefix(to_input(images, generator)).float()
                    yield features

        return store.get_or_compute(key, compute, len(data))

    def train_features(split: SplitModel, epoch: int) -> torch.Tensor | None:
        if transform.deterministic:
            return cached_features(split, train_data, train_batches)
        if cache_views > 0:
            return cached_features(split, train_data, train_batches, view=epoch % cache_views)
        return None

    wrapped: nn.Module | None = None
    split: SplitModel | None = None
    train_feats = val_feats = None
    current_plan: Plan | None = None
    started = time.perf_counter()
    elapsed_before = run.history[-1]["time_s"] if run.history else 0.0
    for cb in callbacks:
        cb.on_train_start(run)
    try:
        for epoch in range(start_epoch, epochs):
            epoch_start = time.perf_counter()
            plan = plans[epoch]
            if plan != current_plan:
                state.apply(plan)
                current_plan = run.plan = plan
                cut = frozen_prefix(stages, plan) if stages else 0
                split = SplitModel(model, stages, cut, eval_modules=state.ungrouped())
                wrapped = _wrap(split, world, dev, compile)
                val_feats = cached_features(split, val_data, val_batches) \
                    if val_batches is not None else None
            train_feats = train_features(split, epoch)
            for cb in callbacks:
                cb.on_epoch_start(run, epoch)
            model.train()
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = rank_share(torch.randperm(len(train_data), generator=generator), rank, world)
            aug_gen = torch.Generator(device=dev if dev.type == "cuda" else "cpu")
            aug_gen.manual_seed(seed * 7_919 + epoch)
            progress = _progress(len(order), batch_size, f"epoch {epoch + 1}/{epochs}",
                                 quiet or rank != 0)
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}  # as this epoch starts
            sums = _train_epoch(wrapped, split, train_batches(order), train_feats,
                                functools.partial(to_input, generator=aug_gen), autocast, parts,
                                aug_gen, dev, progress)
            loss_sum, correct, seen = all_reduce_sums(sums, world, dev)
            sync_buffers(model, world)  # one model on every rank, to validate and to save
            train_loss = loss_sum / max(seen, 1)
            _check_finite(model, epoch, {"training loss": train_loss}, out, lr, weights=False)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": correct / max(seen, 1),
                # the rates as this epoch started (a per-batch schedule moves them within it)
                "lrs": lrs, "lr": max(lrs.values()),
            }
            if epoch_sched is not None:
                epoch_sched.step()
            if val_data is not None:
                evaluate_val = functools.partial(_evaluate_split, split, val_data, val_batches,
                                                 val_feats, to_input, autocast, dev, rank, world)
                record.update(_evaluate_with_ema(evaluate_val, parts.ema, model))
            record["trainable_params"] = count_parameters(model, trainable_only=True)
            record["epoch_time_s"] = time.perf_counter() - epoch_start
            record["time_s"] = elapsed_before + time.perf_counter() - started
            _check_finite(model, epoch, {"validation loss": record.get("val_loss", 0.0)}, out, lr)
            run.history.append(record)
            run.stop = keeper.update(model, epoch, record, parts.ema) or run.stop  # patience
            if out is not None and rank == 0:
                _save_resume(out, run, epoch, config, keeper.state())
            for cb in callbacks:
                cb.on_epoch_end(run, epoch, record)
            if run.stop:
                break
    except KeyboardInterrupt:
        if out is not None and run.history:
            raise ZooError(f"interrupted; the state after epoch {run.history[-1]['epoch']} is "
                           f"saved: resume with --resume {out}") from None
        raise
    finally:
        state.remove()
    train_time = elapsed_before + time.perf_counter() - started
    keeper.restore(model)  # the kept epoch's weights: what is returned and saved
    model.eval()
    metrics = _metrics(run.history, train_time, model, plans, keeper)
    metrics["input_pipeline"] = {"num_workers": workers, "pin_memory": pin}
    if keeper.note and not quiet and rank == 0:
        print(f"zoo: {keeper.note}", file=sys.stderr)
    if val_data is not None:  # the majority-class rate: what always guessing one class scores
        metrics["chance_accuracy"] = float(torch.bincount(val_data.targets).max()) / len(val_data)
    if store is not None and cacheable:
        metrics["feature_cache"] = {"hits": store.hits - hits_before,
                                    "misses": store.misses - misses_before}
    elif cache_off is not None:  # the data forbade it: say so
        metrics["feature_cache"] = {"used": False, "reason": cache_off}
    checkpoint = None
    if out is not None and rank == 0:
        from zoo.persist.checkpoint import save_checkpoint

        _check_finite(model, len(run.history) - 1, {}, out, lr)  # never save nan weights
        _write_run_file(out, locals())

        checkpoint = save_checkpoint(model, out, kind=checkpoint_kind, metrics=metrics,
                                     strategy=strat, history=run.history)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    result = FinetuneResult(model, run.history, metrics, checkpoint, config)
    for cb in callbacks:
        cb.on_train_end(run, result)
    return result


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (one device sync)."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    return [name for (name, _), ok in zip(floats, flags, strict=True) if not ok]


def _check_finite(model: nn.Module, epoch: int, losses: Mapping[str, float], out: Path | None,
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


def _validation_data(train: Any, val: Any, seed: int, strict: bool) -> ImageData | None:
    if val is not None:
        return load_data(val, "val", seed=seed, strict=strict)
    if isinstance(train, str | os.PathLike) or is_dataset_dict(train):
        return load_data(train, "val", seed=seed, strict=strict)
    return None


def _check_labels(data: ImageData, classes: int, what: str) -> None:
    if len(data) == 0:
        raise ZooError(f"the {what} data is empty")
    low, high = int(data.targets.min()), int(data.targets.max())
    if low < 0 or high >= classes:
        raise ZooError(f"{what} labels must be in 0..{classes - 1}, found {low}..{high}; "
                       "pass num_classes or relabel the data")


def _check_two_classes(data: ImageData) -> None:
    """Refuse training data with fewer than two classes present: the model would learn to
    answer that one class and report 100 % accuracy."""
    present = data.targets.unique().tolist()
    if len(present) == 1:
        label = present[0]
        name = data.classes[label] if label < len(data.classes) else str(label)
        raise ZooError(f"the training data holds only one class ({name!r}); a classifier "
                       "needs at least two: add another class folder or labels")


def _check_channels(data: ImageData, transform: BatchTransform) -> None:
    image, _ = data[0]
    channels, wanted = image.shape[0], transform.input_size[0]
    if channels != wanted and channels != 1:
        raise ZooError(f"images have {channels} channels but the backbone expects {wanted}; "
                       "convert the images (grey images are expanded automatically)")


def _transform(spec: Backbone, weights: Any, augment: Any, model: nn.Module) -> BatchTransform:
    """The training transform. ``augment=True`` keeps zoo's original pad-crop-flip (so runs
    made before the presets repeat bitwise); a preset name, an ``Augmentation`` or a v2
    pipeline gives an ``AugmentTransform`` (``zoo.data.augment``)."""
    plain = isinstance(augment, bool)
    flag = augment if plain else False
    if weights is None or model.zoo_weights is None:
        base = BatchTransform(spec.input_size, spec.mean, spec.std, augment=flag)
    else:
        base = transforms_for(spec, weights, augment=flag)
    if plain:
        return base
    from zoo.data.augment import AugmentTransform

    return AugmentTransform.wrap(base, augment)


def _describe(augment: Any) -> Any:
    """``augment`` as a plain value for the run's config."""
    if augment is None or isinstance(augment, bool | str):
        return augment
    return getattr(augment, "preset", None) if getattr(augment, "pipeline", 1) is None \
        else "custom"


def _batch_mixer(transform: BatchTransform, classes: int, label_smoothing: float,
                 cache_views: int) -> Any:
    """The mixup/cutmix mixer the augmentation asks for (``strong``), else None. Mixing
    happens on images before the frozen prefix, so cached views cannot hold it."""
    augmentation = getattr(transform, "augmentation", None)
    mixer = augmentation.batch_mix(classes, label_smoothing) \
        if augmentation is not None and transform.augment else None
    if mixer is not None and cache_views > 0:
        raise ZooError("cache_views cannot hold mixup/cutmix (augment='strong' mixes images "
                       "before the frozen prefix); drop cache_views or use augment='standard'")
    return mixer


def _optimizer(model: nn.Module, owner: Mapping[str, str], plans: Sequence[Plan],
               names: Sequence[str], lr: float, weight_decay: float, name: str = "adamw",
               momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD with each layer group at the lr it will train with, split into a decayed
    and an undecayed half (no decay on norms and biases, ``zoo.training.optim.build_optimizer``)."""
    from zoo.training.optim import build_optimizer

    params: dict[str, list[nn.Parameter]] = {n: [] for n in names}
    for pname, p in model.named_parameters():
        params[owner[pname]].append(p)
    groups = []
    for group in names:
        active = next((p[group] for p in plans if p[group].trainable), plans[0][group])
        groups.append({"params": params[group], "lr": lr * active.lr_scale, "name": group})
    return build_optimizer(groups, name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           model=model)


def _scheduler(choice: Any, optimizer: torch.optim.Optimizer, epochs: int, steps: int,
               warmup_epochs: float) -> tuple[Any, Any]:
    """``(per-batch schedule, per-epoch schedule)``: a name gives the first (stepped after
    each optimizer step, ``zoo.training.optim.build_scheduler``), a callable the second."""
    from zoo.training.optim import SCHEDULES, build_scheduler

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


@dataclass
class StepParts:
    """What a training batch needs besides the model: the loss, the stepper (accumulation,
    clipping, AMP scaler, per-batch schedule), the mixup/cutmix mixer and the EMA."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stepper: Any
    mixer: Any = None
    ema: Any = None


def _step_parts(optimizer: torch.optim.Optimizer, model: nn.Module, label_smoothing: float,
                accumulate: int, clip_grad: float | None, scaler: Any, batch_sched: Any,
                mixer: Any, ema: float | None) -> StepParts:
    from zoo.training.optim import GradientStep, classification_loss

    stepper = GradientStep(optimizer, accumulate=accumulate, clip_grad=clip_grad, scaler=scaler,
                           scheduler=batch_sched)
    average = None
    if ema is not None:
        from zoo.training.ema import ModelEma

        average = ModelEma(model, ema)
    return StepParts(classification_loss(label_smoothing), stepper, mixer, average)


def _loggers(names: Sequence[str] | None, out: Path | None, quiet: bool) -> list[Callback]:
    """The run's logger callbacks: by default ``metrics.csv`` when there is a run folder,
    and the live line per epoch unless ``quiet``."""
    from zoo.training.loggers import make_loggers

    if names is None:
        names = ["csv"] if out is not None else []
        names = names if quiet else [*names, "console"]
    elif quiet:
        names = [n for n in names if n != "console"]
    return make_loggers(list(names), out)


RUN_FILE = "run.yaml"
# Settings that say where a run goes, not how it trains: never in run.yaml.
_NOT_IN_RUN_FILE = ("output_dir", "resume", "overwrite", "callbacks", "feature_store", "quiet")


def _write_run_file(out: Path, values: Mapping[str, Any]) -> None:
    """``run.yaml``: every ``finetune`` setting a file can hold (names, numbers, paths);
    Python objects (tensors, callables, Datasets) are left out."""
    from zoo.persist.checkpoint import claim_output_dir
    from zoo.training.runfile import _plain, run_keys, write_run

    settings = {}
    for key in run_keys():
        if key in _NOT_IN_RUN_FILE or key not in values:
            continue
        try:
            settings[key] = _plain(values[key], key)
        except ZooError:
            continue
    claim_output_dir(out)
    write_run(out / RUN_FILE, settings)


def _evaluate_with_ema(evaluate_val: Callable[[], dict[str, float]], ema: Any,
                       model: nn.Module) -> dict[str, float]:
    """Validation numbers of the raw weights, and of the EMA weights (``ema_val_*``)."""
    record = evaluate_val()
    if ema is not None:
        with ema.applied(model):
            averaged = evaluate_val()
        record.update({f"ema_{k}": v for k, v in averaged.items()})
    return record


def _wrap(split: SplitModel, world: int, dev: torch.device, compile: bool) -> nn.Module:
    module: nn.Module = split
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dev.index] if dev.type == "cuda" else None
        module = DistributedDataParallel(split, device_ids=ids)
    if compile:
        module = torch.compile(module)
    return module


def _progress(total_items: int, batch_size: int, desc: str, disable: bool) -> Any:
    """A progress bar over the epoch's batches, drawn only on a terminal."""
    from zoo.training.loggers import progress_bar

    return progress_bar(math.ceil(total_items / batch_size), desc, quiet=disable)


def _train_epoch(wrapped: nn.Module, split: SplitModel, batches: Iterator[Any],
                 feats: torch.Tensor | None, to_input: Callable, autocast: Callable,
                 parts: StepParts, generator: torch.Generator | None, dev: torch.device,
                 progress: Any) -> tuple[float, float, float]:
    """One backward per batch, an optimizer step every ``accumulate`` batches (and one for a
    partial accumulation at the end), the EMA after each step; returns this rank's loss sum,
    correct count (against the unmixed labels) and samples."""
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    seen = 0
    for idx, images, labels in batches:
        labels = labels.to(dev, non_blocking=True)
        targets = labels
        if feats is not None:
            x = gather(feats, idx, dev.type == "cuda").to(dev, non_blocking=True)
        else:  # computed as the cache computes it (autocast, then float32)
            with autocast():
                inputs = to_input(images)
                if parts.mixer is not None:  # mixup/cutmix: soft targets
                    inputs, targets = parts.mixer(inputs, labels, generator)
                x = split.features(inputs).float()
        with autocast():
            logits = wrapped(x)
            loss = parts.loss(logits, targets)
        if parts.stepper.backward(loss) and parts.ema is not None:
            parts.ema.update(split.model)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        progress.update(1)
    progress.close()
    if parts.stepper.flush() and parts.ema is not None:
        parts.ema.update(split.model)
    return float(loss_sum), float(correct), float(seen)


@torch.no_grad()
def _evaluate_split(split: SplitModel, data: ImageData, batches: Batches,
                    feats: torch.Tensor | None, to_input: Callable, autocast: Callable,
                    dev: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Validation loss and accuracy; under DDP each rank scores every world-th sample and
    the sums are added up over the ranks, so every rank reports the same numbers."""
    with eval_mode(split.model):
        loss_sum, correct = 0.0, 0
        for idx, images, labels in batches(torch.arange(rank, len(data), world)):
            labels = labels.to(dev)
            if feats is not None:
                x = feats[idx].to(dev)
            else:  # computed as the cache computes it (autocast, then float32)
                with autocast():
                    x = split.features(to_input(images, None)).float()
            with autocast():
                logits = split(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
    loss_sum, correct = all_reduce_sums([loss_sum, correct], world, dev)
    return {"val_loss": loss_sum / len(data), "val_accuracy": correct / len(data)}


def _metrics(history: list[dict[str, Any]], train_time: float, model: nn.Module,
             plans: Sequence[Plan], keeper: BestEpoch) -> dict[str, Any]:
    """The kept epoch's numbers (``val_accuracy`` is the returned model's), the run's totals
    and the choice of epoch (``kept_epoch``, ``last_val_accuracy``...)."""
    kept = history[keeper.kept(history)] if history else {}
    if keeper.source == "ema" and keeper.keep == "best":  # the averaged weights' numbers
        kept = {**kept, "val_accuracy": kept["ema_val_accuracy"],
                "val_loss": kept["ema_val_loss"]}
    vals = [h["val_accuracy"] for h in history if "val_accuracy" in h]
    return {
        "val_accuracy": kept.get("val_accuracy"),
        "best_val_accuracy": max(vals) if vals else None,
        "val_loss": kept.get("val_loss"),
        "train_accuracy": kept.get("train_accuracy"),
        "train_loss": kept.get("train_loss"),
        "epochs": len(history),
        "train_time_s": train_time,
        "trainable_params": max((h["trainable_params"] for h in history), default=0),
        "total_params": count_parameters(model),
        **(keeper.summary(history) if history else {}),
    }


def _run_config(spec: Backbone, strat: FreezeStrategy, base_info: Any, classes: int,
                data: ImageData, transform: BatchTransform, builder_kwargs: Any,
                training: dict[str, Any]) -> dict[str, Any]:
    from zoo.core import __version__

    return {
        "zoo_version": __version__,
        "backbone": spec.name,
        "weights": base_info,
        "num_classes": classes,
        "class_names": list(data.classes) if len(data.classes) == classes else None,
        "strategy": {"name": strat.name, "options": strat.options()},
        "preprocessing": {"input_size": list(transform.input_size),
                          "mean": list(transform.mean), "std": list(transform.std),
                          "crop_pct": transform.crop_pct,
                          "interpolation": transform.interpolation},
        "builder_kwargs": dict(builder_kwargs or {}),
        "dataset": data.name,
        "training": training,
    }


def _save_resume(out: Path, run: Run, epoch: int, config: dict[str, Any],
                 best: dict[str, Any] | None = None) -> None:
    from zoo.persist.checkpoint import claim_output_dir

    claim_output_dir(out)  # marks the folder as a zoo run, for check_output_dir
    state = {
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "rng": torch.get_rng_state(),
        "history": run.history,
        "config": {k: config[k] for k in ("backbone", "num_classes", "strategy")},
        "best": best,  # the best epoch so far and a copy of its weights (keep="best")
    }
    _atomic_torch_save(state, out / RESUME_FILE)


# What a resume state holds, and the keys the runner reads from each history record.
_RESUME_FIELDS = {"epoch": int, "model": dict, "optimizer": dict, "rng": torch.Tensor,
                  "history": list, "config": dict}
_RECORD_KEYS = ("epoch", "train_loss", "train_accuracy", "trainable_params", "epoch_time_s",
                "time_s")


def _read_resume(path: Path) -> dict[str, Any]:
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


def _restore(directory: Path, run: Run, config: dict[str, Any], keeper: BestEpoch) -> int:
    path = directory / RESUME_FILE
    if not path.is_file():
        raise ZooError(f"nothing to resume in {directory}: no {RESUME_FILE} (a run with "
                       "output_dir writes one after every epoch)")
    state = _read_resume(path)
    saved = state["config"]
    mine = {k: config[k] for k in ("backbone", "num_classes", "strategy")}
    if saved != mine:
        raise ZooError(f"{path} belongs to a different run ({saved}); resume it with the "
                       "same backbone, strategy and options")
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
    run.history[:] = state["history"]
    keeper.load(state.get("best"), run.model, run.history, path)
    return state["epoch"] + 1


# --------------------------------------------------------------------------- evaluate


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 128, split: str = "val",
             device: str | torch.device | None = None,
             transform: BatchTransform | None = None) -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy and confusion matrix of ``model`` on ``data`` (any
    form ``finetune`` accepts), its classes matched to the model's by name.

    The data may hold any subset of the model's classes (predictions stay over all of them);
    a class the model does not know is an error. Where either side has no class names
    (tensors, a model without ``class_names``) labels are matched by index if the counts
    fit, and the result's ``note`` says so (see ``zoo.training.evaluate.map_classes``). Top-5
    accuracy is reported only for models with more than 5 classes. The input transform
    comes from the model's zoo config (set by ``finetune`` and ``load_checkpoint``) unless
    ``transform`` is given.
    """
    from zoo.training.evaluate import Tally, map_classes

    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    dataset = load_data(data, split)
    if len(dataset) == 0:
        raise ZooError("the evaluation data holds no images")
    config = getattr(model, "zoo_config", None) or {}
    if transform is None:
        pre = config.get("preprocessing")
        if pre is None:
            raise ZooError("the model carries no preprocessing; pass transform=")
        transform = transform_from_config(pre)
    names, num_classes = config.get("class_names"), config.get("num_classes")
    # a checkpoint's classes are known up front, so a mismatch is refused before any work
    tally = Tally(map_classes(names, num_classes, dataset)) if num_classes else None
    transform, (dataset,) = prepare_inputs(transform, dataset)  # as finetune and predict fit
    was_training = model.training
    model.eval().to(dev)
    try:
        for _, images, labels in Batches(dataset, batch_size)(torch.arange(len(dataset))):
            logits = model(transform(images.to(dev))).float()
            if tally is None:  # a bare model: its output size tells its classes
                tally = Tally(map_classes(names, logits.shape[-1], dataset))
            tally.add(logits, labels.to(dev))
    finally:
        model.train(was_training)
    assert tally is not None
    return tally.result()
