"""zoo: a plugin-based model zoo for transfer learning.

Backbones, freeze strategies and datasets are plugins; the runner combines any backbone with any
strategy. Heavy modules (torch, timm, huggingface_hub) load only when a function needing
them is first called, so ``import zoo`` and ``zoo list`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from zoo.core import __version__ as __version__
from zoo.core.errors import (
    CheckpointError,
    DuplicateNameError,
    HubError,
    IncompatibleError,
    PluginError,
    UnknownNameError,
    WeightsError,
    ZooError,
)
from zoo.core.spec import (
    Backbone,
    BackboneFamily,
    DatasetSpec,
    LayerGroup,
    Stage,
    Strategy,
    Weights,
)
from zoo.plugins.hookspecs import hookimpl
from zoo.plugins.registry import (
    get_backbone,
    get_dataset,
    get_strategy,
    list_backbones,
    list_datasets,
    list_strategies,
)

# Public functions living in modules that import torch: loaded on first attribute access.
_LAZY = {
    "create_model": "zoo.models.build",
    "layer_groups": "zoo.models.build",
    "transforms_for": "zoo.models.build",
    "load_weights": "zoo.weights.load",
    "import_weights": "zoo.weights.importing",
    "finetune": "zoo.training.runner",
    "evaluate": "zoo.training.evaluate",
    "FinetuneResult": "zoo.training.trainer",
    "Callback": "zoo.training.callbacks",
    "plan": "zoo.models.strategy",
    "FreezeStrategy": "zoo.models.strategy",
    "GroupPlan": "zoo.models.strategy",
    "save_checkpoint": "zoo.persist.checkpoint",
    "load_checkpoint": "zoo.persist.checkpoint",
    "export": "zoo.deploy.export",
    "load_peft_adapter": "zoo.deploy.peft_load",
    "push_to_hub": "zoo.persist.hub",
    "pull_from_hub": "zoo.persist.hub",
    "from_pretrained": "zoo.persist.hub",
    "compare": "zoo.experiments.sweep",
    "ComparisonResult": "zoo.experiments.report",
    "load_data": "zoo.data.dataset",
    "load_run": "zoo.training.runfile",
    "write_run": "zoo.training.runfile",
    "lr_find": "zoo.training.lr_find",
    "predict": "zoo.deploy.inference",
    "embed": "zoo.deploy.inference",
    "save_embeddings": "zoo.deploy.inference",
}

__all__ = [
    "Backbone", "BackboneFamily", "CheckpointError", "DatasetSpec", "DuplicateNameError",
    "HubError", "IncompatibleError", "LayerGroup", "PluginError", "Stage", "Strategy",
    "UnknownNameError", "Weights", "WeightsError", "ZooError", "get_backbone", "get_dataset",
    "get_strategy", "hookimpl", "list_backbones", "list_datasets", "list_strategies", *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
