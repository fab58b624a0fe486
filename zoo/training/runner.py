"""``finetune``: fine-tune any backbone with any strategy in one call.

It checks every setting (``zoo.training.config.FinetuneConfig``), builds the task (the
data, the model as the strategy prepares it, the transform: ``build_task``) and hands it to
a ``zoo.training.trainer.Trainer``, which trains, keeps the chosen epoch, saves the
checkpoint and returns the result.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.core.spec import Backbone, LayerGroup
from zoo.data.augment import AugmentTransform
from zoo.data.dataset import load_data
from zoo.data.hf import is_dataset_dict
from zoo.data.imagedata import ImageData
from zoo.data.transforms import BatchTransform, prepare_inputs
from zoo.models.build import model_for_task, transforms_for
from zoo.models.strategy import FreezeStrategy, make_strategy
from zoo.persist.config import check_checkpoint_kwargs
from zoo.persist.folder import check_output_dir
from zoo.plugins.registry import get_backbone
from zoo.training.config import FinetuneConfig
from zoo.training.device import DeviceContext
from zoo.training.trainer import FinetuneResult, Task, Trainer

if TYPE_CHECKING:
    from zoo.data.feature_cache import FeatureStore
    from zoo.training.callbacks import Callback


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
    random). With ``output_dir`` a resumable state is saved after every epoch, the final
    model as a checkpoint and the settings as ``run.yaml``; ``resume`` continues a run from
    its folder. ``keep="best"`` returns and saves the epoch with the best validation
    accuracy (``keep="last"``: the last); ``patience=N`` stops after N epochs without
    improvement; metrics["kept_epoch"] says which epoch it is. Every argument is a field of
    ``zoo.training.config.FinetuneConfig``, which documents them all (augmentation, optimizer
    and schedules, accumulation, clipping, EMA, loggers, the feature cache, the device) and
    checks them before anything is built or loaded.
    Under ``torchrun`` every rank trains on its share of every sample (padded as
    ``DistributedSampler`` pads), validates its share of the validation data, and reports
    the metrics summed over all ranks; rank 0's BatchNorm statistics go to every rank.
    Returns the model, its per-epoch history and metrics, and the checkpoint.
    """
    config = FinetuneConfig(**locals())  # every argument, before anything is built or loaded
    spec, strat = check_destination(config)
    device = DeviceContext(config.device, amp=config.amp, channels_last=config.channels_last,
                           compile=config.compile)
    torch.manual_seed(config.seed)
    task = build_task(config, spec, strat)
    return Trainer(config, task, device).fit()


def check_destination(config: FinetuneConfig) -> tuple[Backbone, FreezeStrategy]:
    """The backbone and strategy ``config`` names; with an output folder, checked before any
    training: where the checkpoint goes and that it can record the model."""
    spec = get_backbone(config.backbone) if isinstance(config.backbone, str) \
        else config.backbone
    if config.output_dir is not None:
        check_output_dir(config.output_dir, overwrite=config.overwrite, resume=config.resume)
        check_checkpoint_kwargs(spec, config.builder_kwargs or {},
                                f"cannot save to {config.output_dir}")
    strat = make_strategy(config.strategy, config.strategy_options) \
        if isinstance(config.strategy, str) else config.strategy
    return spec, strat


def build_task(config: FinetuneConfig, spec: Backbone, strat: FreezeStrategy) -> Task:
    """The data (checked: two classes at least, labels in range, channels), the model as
    ``strat`` prepares it with a fresh head, the training transform and batch mixer."""
    train_data = load_data(config.train, "train", limit_per_class=config.limit_per_class,
                           seed=config.seed, strict=config.strict)
    _check_two_classes(train_data)
    val_data = _validation_data(config.train, config.val, config.seed, config.strict)
    num_classes = config.num_classes
    classes = num_classes or len(train_data.classes)
    if num_classes is not None and num_classes < len(train_data.classes):
        raise ZooError(f"num_classes={num_classes} but the training data has "
                       f"{len(train_data.classes)} classes")
    _check_labels_fit_head(train_data, classes, "training")
    if val_data is not None:
        _check_labels_fit_head(val_data, classes, "validation")
    elif config.patience is not None:
        raise ZooError("patience stops a run when its validation accuracy stops improving, "
                       "so it needs validation data: pass val (--val)")
    base_weights = config.weights if strat.pretrained else None
    model, groups, base_info = _build_model(config, spec, strat, classes, base_weights)
    transform = _transform(spec, base_weights, config.augment, model)
    if config.image_size is not None:
        size = config.image_size
        transform = replace(transform, input_size=(transform.input_size[0], size, size))
    _check_channels(train_data, transform)
    # one geometry for every image: files and Datasets are fitted one by one, as predict does
    transform, (train_data, val_data) = prepare_inputs(transform, train_data, val_data)
    mixer = _batch_mixer(transform, classes, config.label_smoothing, config.cache_views)
    return Task(spec, strat, model, groups, train_data, val_data, transform, classes,
                base_info, mixer)


def _build_model(config: FinetuneConfig, spec: Backbone, strat: FreezeStrategy, classes: int,
                 base_weights: Any) -> tuple[nn.Module, Sequence[LayerGroup], Any]:
    """The model with ``classes`` outputs from ``base_weights``, a new head for the new task
    (unless ``keep_head``), checked and prepared by the strategy; its layer groups and the
    weights' record."""
    # The optimizer imports torch._dynamo (~1 s) anyway; importing it first lets
    # create_model skip the random initialisation of tensors that the weights overwrite.
    importlib.import_module("torch._dynamo")
    model = model_for_task(spec, classes, base_weights, keep_head=config.keep_head,
                           **dict(config.builder_kwargs or {}))
    base_info = model.zoo_weights
    layer_groups = spec.layer_groups(model)
    names = [g.name for g in layer_groups]
    strat.check(names, model, layer_groups)
    return strat.prepare(model, layer_groups), layer_groups, base_info


def _validation_data(train: Any, val: Any, seed: int, strict: bool) -> ImageData | None:
    if val is not None:
        return load_data(val, "val", seed=seed, strict=strict)
    if isinstance(train, str | os.PathLike) or is_dataset_dict(train):
        return load_data(train, "val", seed=seed, strict=strict)
    return None


def _check_labels_fit_head(data: ImageData, classes: int, what: str) -> None:
    """Refuse data whose labels the model's head cannot output (load_data checks labels against
    the dataset's own classes; this checks them against the head being trained)."""
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
    return AugmentTransform.wrap(base, augment)


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

