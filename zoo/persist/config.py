"""What a checkpoint's config.json says about its model, and reading that back.

Saving records the backbone (and the plugin and distribution that register it), the base
weights and their sha256, the strategy that prepared the model, the preprocessing and keys
other tools' loaders need; loading turns the record back into a backbone and a strategy,
refusing builder arguments the backbone does not declare safe to take from a file.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.core import __version__
from zoo.core.errors import CheckpointError, UnknownNameError, ZooError
from zoo.core.spec import resolve_callable
from zoo.plugins.manager import plugin_distribution
from zoo.plugins.registry import current, get_backbone

if TYPE_CHECKING:
    from torch import nn

    from zoo.core.spec import Backbone

FORMAT_VERSION = 1  # config.json's format_version: the newest this zoo writes and reads
_DIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a PyPI distribution name


def config_from_model(model: nn.Module) -> dict[str, Any]:
    """A config.json for a model built by zoo that carries none yet (not from ``finetune`` or
    a checkpoint): its backbone, base weights, head size and the weights' preprocessing."""
    name = getattr(model, "zoo_backbone", None)
    if name is None:
        raise ZooError("this model was not built by zoo: pass config= naming its backbone "
                       "(or build it with zoo.create_model)")
    # lazy: keeps zoo push/pull free of torch
    from zoo.models.build import num_outputs, preprocessing_for

    spec = get_backbone(name)
    weights = getattr(model, "zoo_weights", None)
    registered = spec.get_weights(weights["tag"]) \
        if weights and weights["tag"] in {x.tag for x in spec.weights} else None
    # The weights' whole preprocessing (crop and interpolation too), as finetune records it,
    # so predict on the saved model prepares images as zoo.transforms_for does.
    pre = {key: list(value) if isinstance(value, tuple | list) else value
           for key, value in preprocessing_for(spec, registered).items()}
    return {"zoo_version": __version__, "backbone": name, "weights": weights,
            "num_classes": num_outputs(model, spec), "class_names": None, "strategy": None,
            "preprocessing": pre, "builder_kwargs": {}}


def strategy_record(strategy: Any) -> dict[str, Any]:
    """``{"name", "options"}`` for config.json: the registered name of ``strategy`` (also for
    an instance made directly from a registered class) and its options."""
    name = getattr(strategy, "name", "")
    for spec in current().strategies.values() if not name else ():
        with contextlib.suppress(Exception):  # a plugin whose factory does not import
            if resolve_callable(spec.factory) is type(strategy):
                name = spec.name
                break
    if not name:
        raise ZooError(f"strategy {type(strategy).__name__} is not a registered strategy, so a "
                       "checkpoint could not name it: register it in a plugin, or make it with "
                       "zoo.models.strategy.make_strategy(NAME, options)")
    return {"name": name, "options": strategy.options()}


def check_rebuilds(model: nn.Module, config: Mapping[str, Any], strategy: Any) -> None:
    """Refuse to save a prepared model (adapters added) that loading could not rebuild: no
    strategy recorded, or one whose ``prepare`` makes other tensors than the model has."""
    if strategy is None:
        raise ZooError("the model has tensors its backbone lacks (adapters?) but no strategy "
                       "is recorded: pass strategy= (e.g. make_strategy('lora', {'rank': 4})), "
                       "the one that prepared it")
    from zoo.models.build import model_from_config  # lazy: keeps zoo push/pull free of torch

    try:
        rebuilt = model_from_config(config, strategy, meta=True)
    except Exception:  # a strategy whose prepare needs real tensors: checked at load time
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    again = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if own != again:
        odd = sorted(set(own) ^ set(again)) or [k for k in own if own[k] != again[k]]
        record = config.get("strategy") or {}
        raise ZooError(f"strategy {record.get('name')!r} with options {record.get('options')} "
                       f"does not rebuild this model's tensors (e.g. {odd[0]}): pass the strategy, "
                       "with the options, that prepared the model")


def base_is_registered(config: Mapping[str, Any]) -> bool:
    """Whether the config's base weights are a registered tag of its backbone: only then
    can a delta checkpoint be rebuilt on another machine."""
    weights = config.get("weights")
    if not weights:
        return False
    return weights.get("tag") in {w.tag for w in get_backbone(config["backbone"]).weights}


def add_export_config(config: dict[str, Any]) -> None:
    """Let the backbone add keys other tools' loaders need (full checkpoints only)."""
    spec = get_backbone(config["backbone"])
    if config["kind"] == "full" and spec.export_config is not None:
        extra = resolve_callable(spec.export_config)(dict(config))
        clash = set(extra) & {"backbone", "weights", "num_classes", "kind", "strategy"}
        config.update({k: v for k, v in extra.items() if k not in clash or k == "num_classes"})


def plugin_record(backbone: str) -> dict[str, str | None]:
    """The plugin that registers ``backbone`` and the distribution that ships it, so that
    loading the checkpoint where it is missing can say what to ``pip install``."""
    plugin = get_backbone(backbone).plugin
    return {"name": plugin, "distribution": plugin_distribution(plugin) if plugin else None}


def not_for_timm(config: Mapping[str, Any]) -> str:
    """config.json's ``architecture`` for a checkpoint timm cannot load: timm's Hub loader
    reads it as a model name, so ``timm.create_model("hf-hub:...")`` fails saying this
    (``Unknown model (...)``) instead of raising ``KeyError: 'architecture'``."""
    what = "a delta (only the changed tensors)" if config["kind"] == "delta" else \
        "a model timm cannot load as it is"
    return (f"zoo checkpoint of {config['backbone']}, {what}: it needs zoo, not timm; "
            "pip install zoo, then zoo.from_pretrained('hf-hub:REPO')")


def strategy_from_config(config: Mapping[str, Any]) -> Any:
    """The strategy config.json records (its registered name and options), or None."""
    from zoo.models.strategy import make_strategy  # lazy: keeps zoo push/pull free of torch

    strategy = config.get("strategy") or {}
    if not strategy.get("name"):
        return None
    return make_strategy(strategy["name"], strategy.get("options") or {})


def check_checkpoint_kwargs(spec: Backbone, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse builder arguments the backbone does not declare safe to take from a checkpoint
    (``Backbone.checkpoint_kwargs``): timm's ``checkpoint_path`` would load any local file."""
    refused = sorted(set(kwargs) - set(spec.checkpoint_kwargs))
    if refused:
        accepted = ", ".join(spec.checkpoint_kwargs) or "none"
        raise CheckpointError(f"{where}: builder_kwargs {', '.join(map(repr, refused))} are not "
                              f"arguments backbone {spec.name!r} takes from a checkpoint "
                              f"(accepted: {accepted})")


def checkpoint_backbone(config: Mapping[str, Any], directory: Path) -> Backbone:
    """The checkpoint's backbone; if no loaded plugin registers it, an error naming the
    plugin config.json records and the distribution to ``pip install``."""
    try:
        return get_backbone(config["backbone"])
    except UnknownNameError:
        plugin = config.get("backbone_plugin")
        if not isinstance(plugin, dict) or not isinstance(plugin.get("name"), str):
            raise
        dist = plugin.get("distribution")
        fix = f"pip install {dist}" if isinstance(dist, str) and _DIST_NAME.fullmatch(dist) \
            else "install the plugin that registers it"
        raise CheckpointError(
            f"checkpoint {directory} needs backbone {config['backbone']!r} from plugin "
            f"{plugin['name']!r}, which is not loaded: {fix} (or allow it in "
            "ZOO_LOAD_PLUGINS)") from None

