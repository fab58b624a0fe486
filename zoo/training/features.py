"""What goes into the trainable part of the model: images turned into model input on the
device, and the frozen prefix's output, computed once into the feature cache
(``zoo.data.feature_cache``) and reused every epoch while the plan keeps the prefix frozen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from zoo.core.spec import Stage
from zoo.data.feature_cache import (
    CacheKey,
    FeatureStore,
    decide_cache,
    default_cache_memory,
    shared_store,
)
from zoo.data.transforms import BatchTransform
from zoo.models.groups import SplitModel, eval_mode
from zoo.training.device import DeviceContext

if TYPE_CHECKING:
    from zoo.data.imagedata import ImageData


class ModelInput:
    """Images to model input on the device: augmented when a generator is given, else the
    evaluation view, in the memory format the model runs in."""

    def __init__(self, transform: BatchTransform, device: DeviceContext) -> None:
        self.transform = transform
        self.eval_transform = replace(transform, augment=False)
        self.device = device

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        chosen = self.transform if generator is not None else self.eval_transform
        x = chosen(images.to(self.device.device, non_blocking=True), generator)
        return self.device.layout(x)


def choose_store(wanted: bool, memory: int | None, given: FeatureStore | None,
                 deterministic: bool, *datasets: ImageData | None
                 ) -> tuple[FeatureStore | None, bool, str | None]:
    """``(store, cacheable, reason)``: the store a run uses (``given``, else the process-wide
    one with a ``memory`` budget when ``wanted``), whether it may cache at all (``wanted``,
    fixed inputs, ``deterministic`` views: see ``decide_cache``) and why not if the data
    forbid it."""
    store = given if given is not None else (
        shared_store(memory or default_cache_memory()) if wanted else None)
    cacheable, reason = decide_cache(wanted and deterministic, *datasets)
    return store, cacheable, reason


class PrefixFeatures:
    """The frozen prefix's output for a dataset, from the cache: keyed by backbone, base
    weights, group boundary, data, transform, device and AMP, and the augmented view.

    ``store=None`` turns caching off (every batch then runs the prefix). With
    ``cache_views=K`` an augmented run caches K views of the training data, epoch e using
    view e % K, each drawn from its own seeded generator.
    """

    def __init__(self, store: FeatureStore | None, backbone: str, weights_key: str,
                 stages: Sequence[Stage] | None, inputs: ModelInput, seed: int,
                 cache_views: int = 0) -> None:
        self.store = store
        self.backbone = backbone
        self.weights_key = weights_key
        self.stages = stages
        self.inputs = inputs
        self.seed = seed
        self.cache_views = cache_views

    def get(self, split: SplitModel, data: ImageData, batches: Callable[..., Iterator[Any]],
            view: int | None = None) -> torch.Tensor | None:
        """The frozen prefix's output for ``data`` (augmented view ``view``), from the cache;
        None without a store or a frozen prefix."""
        if self.store is None or split.prefix is None:
            return None
        assert self.stages is not None
        boundary = ",".join(g for s in self.stages[:split.cut] for g in s.groups)
        chosen = self.inputs.eval_transform if view is None else self.inputs.transform
        dev = self.inputs.device
        key = CacheKey(self.backbone, self.weights_key, boundary, data.fingerprint(),
                       chosen.cache_key() + f"|{dev.device.type}|amp={dev.amp}",
                       view=0 if view is None else view + 1)
        compute = functools.partial(self._batches, split, data, batches, view)
        return self.store.get_or_compute(key, compute, len(data))

    def for_training(self, split: SplitModel, data: ImageData,
                     batches: Callable[..., Iterator[Any]], epoch: int) -> torch.Tensor | None:
        """The training features of ``epoch``: the one eval view for a deterministic
        transform, view ``epoch % cache_views`` for cached augmented views, else None."""
        if self.inputs.transform.deterministic:
            return self.get(split, data, batches)
        if self.cache_views > 0:
            return self.get(split, data, batches, view=epoch % self.cache_views)
        return None

    def _batches(self, split: SplitModel, data: ImageData,
                 batches: Callable[..., Iterator[Any]], view: int | None
                 ) -> Iterator[torch.Tensor]:
        """The prefix's output batch by batch, as the trainer computes it (autocast, then
        float32); augmented views draw from a generator seeded by the view."""
        dev = self.inputs.device
        generator = None
        if view is not None:
            generator = dev.generator(self.seed * 7_919 + 1_000_003 * (view + 1))
        assert split.prefix is not None
        # Every module in eval mode once for the whole pass, not once per batch.
        with eval_mode(split.model):
            for _, images, _ in batches(torch.arange(len(data))):
                with torch.no_grad(), dev.autocast():
                    features = split.prefix(self.inputs(images, generator)).float()
                yield features
