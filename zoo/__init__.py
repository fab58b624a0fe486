"""zoo: a plugin-based model zoo for transfer learning.

Backbones and freeze strategies are plugins; the runner combines any backbone with any
strategy. Heavy modules (torch, timm, huggingface_hub) load only when a function needing
them is first called, so ``import zoo`` and ``zoo list`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from zoo.errors import (
    CheckpointError,
    DuplicateNameError,
    HubError,
    IncompatibleError,
    PluginError,
    UnknownNameError,
    WeightsError,
    ZooError,
)
from zoo.hookspecs import hookimpl
from zoo.registry import get_backbone, get_strategy, list_backbones, list_strategies
from zoo.spec import Backbone, BackboneFamily, LayerGroup, Stage, Strategy, Weights

__version__ = "0.1.0"

# Public functions living in modules that import torch: loaded on first attribute access.
_LAZY = {
    "create_model": "zoo.models",
    "layer_groups": "zoo.models",
    "transforms_for": "zoo.models",
    "load_weights": "zoo.weights",
    "import_weights": "zoo.weights",
    "finetune": "zoo.runner",
    "evaluate": "zoo.runner",
    "FinetuneResult": "zoo.runner",
    "Callback": "zoo.runner",
    "plan": "zoo.strategies",
    "FreezeStrategy": "zoo.strategies",
    "GroupPlan": "zoo.strategies",
    "save_checkpoint": "zoo.checkpoint",
    "load_checkpoint": "zoo.checkpoint",
    "export": "zoo.exporting",
    "load_peft_adapter": "zoo.peft_interop",
    "push_to_hub": "zoo.hub",
    "pull_from_hub": "zoo.hub",
    "from_pretrained": "zoo.hub",
    "compare": "zoo.compare",
    "ComparisonResult": "zoo.compare",
    "list_datasets": "zoo.data",
    "load_data": "zoo.data",
    "load_run": "zoo.runfile",
    "write_run": "zoo.runfile",
    "lr_find": "zoo.lr_find",
    "predict": "zoo.inference",
    "embed": "zoo.inference",
    "save_embeddings": "zoo.inference",
}

__all__ = [
    "Backbone", "BackboneFamily", "CheckpointError", "DuplicateNameError", "HubError",
    "IncompatibleError",
    "LayerGroup", "PluginError", "Stage", "Strategy", "UnknownNameError", "Weights",
    "WeightsError", "ZooError", "get_backbone", "get_strategy", "hookimpl", "list_backbones",
    "list_strategies", *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
