"""The Trainer: fits a built task (model, data, transform) under a validated
``FinetuneConfig``. ``fit`` reads like Lightning Fabric's "build your own trainer": epochs
of ``train_epoch`` and ``validate``, with the freeze plan applied by ``on_plan_change``;
the device, AMP and DDP sit behind a ``DeviceContext``; the history, best-epoch keeping,
resume state, NaN guard, progress bar and loggers are callbacks.

What it guarantees, for every backbone and strategy:
- each layer group is one optimizer param group with its own learning rate, registered
  from the start (groups that unfreeze later included), so any torch scheduler works;
- frozen groups get no gradients and run without autograd; their BatchNorm layers stay in
  eval mode (running statistics never move), however often ``.train()`` is called;
- when a prefix of groups is frozen for a whole phase and inputs are deterministic, its
  output is computed once and reused (``zoo.training.features``);
- a resumable state is written after every epoch, and a resumed run ends with the same
  weights as an uninterrupted one (same seed, CPU).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.core import __version__
from zoo.core.errors import IncompatibleError, ZooError
from zoo.core.spec import Backbone, LayerGroup, resolve_callable
from zoo.data.imagedata import ImageData
from zoo.data.transforms import BatchTransform
from zoo.models.build import count_parameters
from zoo.models.groups import FreezeState, SplitModel, changing_tensors, eval_mode, frozen_prefix
from zoo.models.strategy import FreezeStrategy, Plan, plans_for
from zoo.persist.checkpoint import save_checkpoint
from zoo.training.best import BestEpoch
from zoo.training.callbacks import (
    Callback,
    History,
    NanGuard,
    ProgressBar,
    ResumeState,
    Run,
    check_finite,
)
from zoo.training.config import FinetuneConfig
from zoo.training.device import Batches, DeviceContext, gather, input_workers
from zoo.training.evaluate import Tally, evaluation_loop, same_classes
from zoo.training.features import ModelInput, PrefixFeatures, choose_store
from zoo.training.loggers import default_loggers
from zoo.training.optim import make_optimizer, make_schedulers, step_parts
from zoo.training.runfile import write_run_file


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the trained model, its history and metrics, its checkpoint."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    checkpoint: Path | None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """What a run trains, as ``finetune`` builds it: the backbone and strategy, the prepared
    model and its layer groups, the data, the training transform, the pretrained weights'
    record and the batch mixer."""

    spec: Backbone
    strategy: FreezeStrategy
    model: nn.Module
    groups: Sequence[LayerGroup]
    train_data: ImageData
    val_data: ImageData | None
    transform: BatchTransform
    classes: int
    base_info: Any = None  # the pretrained weights' record (model.zoo_weights), or None
    mixer: Any = None  # mixup/cutmix (augment="strong"), else None

    @property
    def names(self) -> list[str]:
        """The layer groups' names, input to output."""
        return [g.name for g in self.groups]


class Trainer:
    """Trains ``task`` as ``config`` says on ``device``; ``fit()`` returns the result.

    Set-up (the model on the device, freeze state, optimizer and schedules, the keeper, the
    resume state, the feature cache, the callbacks) happens here, in this order, so that a
    resumed run continues with exactly the state an uninterrupted one had.
    """

    def __init__(self, config: FinetuneConfig, task: Task, device: DeviceContext) -> None:
        self.config, self.task, self.device = config, task, device
        model, names = task.model, task.names
        device.place(model)
        self.freeze = FreezeState(model, task.groups)
        self.plans = plans_for(task.strategy, names, config.epochs)  # a bad plan names its plugin
        self.optimizer = make_optimizer(model, self.freeze.owner, self.plans, names, config.lr,
                                        config.weight_decay, config.optimizer, config.momentum)
        batches = math.ceil(math.ceil(len(task.train_data) / device.world) / config.batch_size)
        self.batch_schedule, self.epoch_schedule = make_schedulers(
            config.scheduler, self.optimizer, config.epochs,
            math.ceil(batches / config.accumulate), config.warmup_epochs)
        self.stages = list(resolve_callable(task.spec.stages)(model)) \
            if task.spec.stages else None
        self.run = Run(task.spec, task.strategy, model, self.optimizer,
                       self.batch_schedule or self.epoch_schedule, names, config.epochs,
                       device.device, batches=batches)
        self.keeper = BestEpoch(config.keep, config.patience,
                                changing_tensors(model, self.freeze, self.plans),
                                task.val_data is not None)
        self.out = Path(config.output_dir) if config.output_dir is not None else None
        self.zoo_config = run_config(task, config, self.keeper.keep)
        model.zoo_config = self.zoo_config  # type: ignore[assignment]
        self.resume = ResumeState(self.out, self.zoo_config, self.keeper, device.main)
        self.start_epoch = 0
        if config.resume is not None:
            self.start_epoch = self.resume.restore(Path(config.resume), self.run)
            self.out = self.resume.out = self.out or Path(config.resume)
        self._setup_inputs()
        self.parts = step_parts(self.optimizer, model, config.label_smoothing, config.accumulate,
                                config.clip_grad, device.scaler, self.batch_schedule,
                                task.mixer, config.ema)  # the EMA starts from resumed weights
        self.run.ema = self.parts.ema
        self.callbacks = self._callbacks()
        self.plan: Plan | None = None  # the plan applied now, and what it made:
        self.split: SplitModel | None = None
        self.wrapped: nn.Module | None = None
        self.train_feats: torch.Tensor | None = None
        self.val_feats: torch.Tensor | None = None

    def _setup_inputs(self) -> None:
        """The feature cache (and why it is off), the model input and the batches."""
        config, task, dev = self.config, self.task, self.device
        fixed = task.mixer is None and (task.transform.deterministic or config.cache_views > 0)
        store, cacheable, self.cache_off = choose_store(
            config.cache, config.cache_memory, config.feature_store, fixed, task.train_data,
            task.val_data)
        if self.cache_off is not None and not config.quiet and dev.main:
            print(f"zoo: {self.cache_off}", file=sys.stderr)
        self.store = store if cacheable else None
        self.counts_before = (store.hits, store.misses) if store is not None else (0, 0)
        if task.strategy.extract_features and not cacheable:
            raise IncompatibleError("feature_extract computes the frozen features once, so it "
                                    "needs the feature cache (cache=True) and a deterministic "
                                    "input pipeline (augment=False, or cache_views=K); "
                                    "otherwise use linear_probe"
                                    + (f" ({self.cache_off})" if self.cache_off else ""))
        weights_key = (task.base_info or {}).get("sha256") or f"random-seed{config.seed}"
        self.inputs = ModelInput(task.transform, dev)
        self.features = PrefixFeatures(self.store, task.spec.name, weights_key, self.stages,
                                       self.inputs, config.seed, config.cache_views)
        workers, pin = input_workers(config.num_workers, dev.device), dev.pin
        if any(d is not None and d.tensors is None for d in (task.train_data, task.val_data)) \
                and not config.quiet and dev.main:  # images read as they go: say how
            print(f"zoo: reading images with {workers} DataLoader worker(s)"
                  f"{' into pinned memory' if pin else ''} for {dev.device}", file=sys.stderr)
        self.pipeline = {"num_workers": workers, "pin_memory": pin}
        self.train_batches = Batches(task.train_data, config.batch_size, workers, pin)
        self.val_batches = Batches(task.val_data, config.batch_size * 2, workers, pin) \
            if task.val_data is not None else None

    def _callbacks(self) -> list[Callback]:
        """The trainer's own callbacks, in the order they must run, then the user's and the
        loggers (rank 0 only)."""
        config, main = self.config, self.device.main
        own: list[Callback] = [NanGuard(self.out, config.lr), History(), self.keeper,
                               self.resume]
        if not config.quiet and main:
            own.append(ProgressBar())
        loggers = default_loggers(config.loggers, self.out, config.quiet) if main else []
        return [*own, *config.callbacks, *loggers]

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback, in order (a callback that is not a
        ``zoo.Callback`` may lack the newer hooks: it is skipped for those)."""
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self.run, *args)

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> FinetuneResult:
        """Train from the first (or resumed) epoch to the last or until a callback stops the
        run; then keep the chosen epoch's weights, save them and return the result."""
        run = self.run
        started = time.perf_counter()
        elapsed_before = run.history[-1]["time_s"] if run.history else 0.0
        self.call("on_train_start")
        try:
            for epoch in range(self.start_epoch, run.epochs):
                epoch_start = time.perf_counter()
                if self.plans[epoch] != self.plan:
                    self.on_plan_change(self.plans[epoch])
                self.train_feats = self.features.for_training(
                    self.split, self.task.train_data, self.train_batches, epoch)
                self.call("on_epoch_start", epoch)
                record = self.train_epoch(epoch)
                self.call("on_train_epoch_end", epoch, record)
                if self.epoch_schedule is not None:
                    self.epoch_schedule.step()
                if self.val_batches is not None:
                    record.update(self.validate())
                record["trainable_params"] = count_parameters(run.model, trainable_only=True)
                record["epoch_time_s"] = time.perf_counter() - epoch_start
                record["time_s"] = elapsed_before + time.perf_counter() - started
                self.call("on_epoch_end", epoch, record)
                if run.stop:
                    break
        except KeyboardInterrupt:
            if self.out is not None and run.history:
                raise ZooError(f"interrupted; the state after epoch {run.history[-1]['epoch']} "
                               f"is saved: resume with --resume {self.out}") from None
            raise
        finally:
            self.freeze.remove()
        return self.finish(elapsed_before + time.perf_counter() - started)

    def on_plan_change(self, plan: Plan) -> None:
        """Apply a new freeze plan (gradual unfreezing changes it between epochs): the flags
        and eval-mode pins, the model cut at its new frozen prefix and wrapped (DDP,
        compile), and the validation features for that prefix."""
        self.freeze.apply(plan)
        self.plan = self.run.plan = plan
        cut = frozen_prefix(self.stages, plan) if self.stages else 0
        self.split = SplitModel(self.task.model, self.stages, cut,
                                eval_modules=self.freeze.ungrouped())
        self.wrapped = self.device.wrap(self.split)
        self.val_feats = self.features.get(self.split, self.task.val_data, self.val_batches) \
            if self.val_batches is not None else None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's share of the training data in the epoch's seeded order:
        a ``training_step`` per batch, a step for a partial accumulation at the end. Returns
        the epoch's record so far: loss and accuracy (over all ranks), the rates it began at."""
        dev, seed, model, parts = self.device, self.config.seed, self.task.model, self.parts
        model.train()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = dev.share(torch.randperm(len(self.task.train_data), generator=generator))
        augment = dev.generator(seed * 7_919 + epoch)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}  # as this epoch starts
        loss_sum = torch.zeros((), device=dev.device)
        correct = torch.zeros((), device=dev.device, dtype=torch.long)
        seen = 0
        for batch, (idx, images, labels) in enumerate(self.train_batches(order)):
            loss, logits, labels = self.training_step(idx, images, labels, augment)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()  # against the unmixed labels
            seen += len(labels)
            self.call("on_batch_end", epoch, batch, loss)
        if parts.stepper.flush() and parts.ema is not None:
            parts.ema.update(model)
        total_loss, total_correct, total = dev.sums([float(loss_sum), float(correct),
                                                     float(seen)])
        dev.sync_buffers(model)  # one model on every rank, to validate and to save
        # the rates as this epoch started (a per-batch schedule moves them within it)
        return {"epoch": epoch + 1, "train_loss": total_loss / max(total, 1),
                "train_accuracy": total_correct / max(total, 1), "lrs": lrs,
                "lr": max(lrs.values())}

    def training_step(self, idx: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        """Forward and backward of one batch (the frozen prefix's cached output, or the
        augmented, possibly mixed images through it); the optimizer steps every
        ``accumulate`` batches, the EMA after each step. Returns the loss, the logits and
        the labels on the device."""
        dev, parts = self.device, self.parts
        assert self.split is not None and self.wrapped is not None
        labels = labels.to(dev.device, non_blocking=True)
        targets = labels
        if self.train_feats is not None:
            x = gather(self.train_feats, idx, dev.pin).to(dev.device, non_blocking=True)
        else:  # computed as the cache computes it (autocast, then float32)
            with dev.autocast():
                inputs = self.inputs(images, generator)
                if parts.mixer is not None:  # mixup/cutmix: soft targets
                    inputs, targets = parts.mixer(inputs, labels, generator)
                x = self.split.features(inputs).float()
        with dev.autocast():
            logits = self.wrapped(x)
            loss = parts.loss(logits, targets)
        if parts.stepper.backward(loss) and parts.ema is not None:
            parts.ema.update(self.task.model)
        return loss, logits, labels

    def validate(self) -> dict[str, float]:
        """Validation loss and accuracy, and with an EMA those of the averaged weights
        (``ema_val_*``); under DDP each rank scores every world-th sample and the sums are
        added up over the ranks, so every rank reports the same numbers."""
        record = self._score()
        ema = self.parts.ema
        if ema is not None:
            with ema.applied(self.task.model):
                averaged = self._score()
            record.update({f"ema_{k}": v for k, v in averaged.items()})
        return record

    def _score(self) -> dict[str, float]:
        data, dev = self.task.val_data, self.device
        assert data is not None and self.val_batches is not None and self.split is not None
        with eval_mode(self.split.model):
            order = torch.arange(dev.rank, len(data), dev.world)
            tally = evaluation_loop(self.val_batches(order), self._val_logits,
                                    Tally(same_classes(self.task.classes)), dev.device)
        assert tally is not None
        loss_sum, correct = dev.sums([tally.loss_sum, tally.correct])
        return {"val_loss": loss_sum / len(data), "val_accuracy": correct / len(data)}

    def _val_logits(self, idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        dev, split = self.device, self.split
        assert split is not None
        if self.val_feats is not None:
            x = self.val_feats[idx].to(dev.device)
        else:  # computed as the cache computes it (autocast, then float32)
            with dev.autocast():
                x = split.features(self.inputs(images)).float()
        with dev.autocast():
            return split(x).float()

    # ----------------------------------------------------------------------- the end

    def finish(self, train_time: float) -> FinetuneResult:
        """Put the kept epoch's weights back, gather the metrics, save (rank 0, with an
        output folder), wait for every rank and tell the callbacks."""
        model, config = self.task.model, self.config
        self.keeper.restore(model)  # the kept epoch's weights: what is returned and saved
        model.eval()
        metrics = self.metrics(train_time)
        if self.keeper.note and not config.quiet and self.device.main:
            print(f"zoo: {self.keeper.note}", file=sys.stderr)
        checkpoint = self.save(metrics) if self.out is not None and self.device.main else None
        self.device.barrier()
        result = FinetuneResult(model, self.run.history, metrics, checkpoint, self.zoo_config)
        self.call("on_train_end", result)
        return result

    def metrics(self, train_time: float) -> dict[str, Any]:
        """The kept epoch's numbers (``val_accuracy`` is the returned model's), the run's
        totals, the choice of epoch (``kept_epoch``...), the input pipeline, the chance
        level and what the feature cache did."""
        history, keeper, task = self.run.history, self.keeper, self.task
        kept = history[keeper.kept(history)] if history else {}
        if keeper.source == "ema" and keeper.keep == "best":  # the averaged weights' numbers
            kept = {**kept, "val_accuracy": kept["ema_val_accuracy"],
                    "val_loss": kept["ema_val_loss"]}
        vals = [h["val_accuracy"] for h in history if "val_accuracy" in h]
        metrics = {
            "val_accuracy": kept.get("val_accuracy"),
            "best_val_accuracy": max(vals) if vals else None,
            "val_loss": kept.get("val_loss"),
            "train_accuracy": kept.get("train_accuracy"),
            "train_loss": kept.get("train_loss"),
            "epochs": len(history),
            "train_time_s": train_time,
            "trainable_params": max((h["trainable_params"] for h in history), default=0),
            "total_params": count_parameters(task.model),
            **(keeper.summary(history) if history else {}),
            "input_pipeline": self.pipeline,
        }
        if task.val_data is not None:  # the majority-class rate: always guessing one class
            counts = torch.bincount(task.val_data.targets)
            metrics["chance_accuracy"] = float(counts.max()) / len(task.val_data)
        if self.store is not None:
            hits, misses = self.counts_before
            metrics["feature_cache"] = {"hits": self.store.hits - hits,
                                        "misses": self.store.misses - misses}
        elif self.cache_off is not None:  # the data forbade it: say so
            metrics["feature_cache"] = {"used": False, "reason": self.cache_off}
        return metrics

    def save(self, metrics: dict[str, Any]) -> Path:
        """The checkpoint and ``run.yaml`` in the output folder; never nan weights."""
        assert self.out is not None
        model, run = self.task.model, self.run
        check_finite(model, len(run.history) - 1, {}, self.out, self.config.lr)
        # the settings as run, channels_last as the device context resolved it
        write_run_file(self.out, {**self.config.to_dict(),
                                  "channels_last": self.device.channels_last})
        return save_checkpoint(model, self.out, kind=self.config.checkpoint_kind,
                               metrics=metrics, strategy=self.task.strategy,
                               history=run.history)


def run_config(task: Task, config: FinetuneConfig, keep: str) -> dict[str, Any]:
    """The model's ``zoo_config``: what a checkpoint records about the run (backbone,
    weights, classes, strategy, preprocessing, data, training settings)."""
    transform, data = task.transform, task.train_data
    scheduler = config.scheduler if isinstance(config.scheduler, str | None) else "custom"
    training = dict(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                    weight_decay=config.weight_decay, seed=config.seed,
                    augment=_describe(config.augment), scheduler=scheduler,
                    limit_per_class=config.limit_per_class, keep=keep,
                    patience=config.patience, optimizer=config.optimizer,
                    momentum=config.momentum, label_smoothing=config.label_smoothing,
                    warmup_epochs=config.warmup_epochs, accumulate=config.accumulate,
                    clip_grad=config.clip_grad, ema=config.ema)
    return {
        "zoo_version": __version__,
        "backbone": task.spec.name,
        "weights": task.base_info,
        "num_classes": task.classes,
        "class_names": list(data.classes) if len(data.classes) == task.classes else None,
        "strategy": {"name": task.strategy.name, "options": task.strategy.options()},
        "preprocessing": {"input_size": list(transform.input_size),
                          "mean": list(transform.mean), "std": list(transform.std),
                          "crop_pct": transform.crop_pct,
                          "interpolation": transform.interpolation},
        "builder_kwargs": dict(config.builder_kwargs or {}),
        "dataset": data.name,
        "training": training,
    }


def _describe(augment: Any) -> Any:
    """``augment`` as a plain value for the run's config."""
    if augment is None or isinstance(augment, bool | str):
        return augment
    return getattr(augment, "preset", None) if getattr(augment, "pipeline", 1) is None \
        else "custom"
