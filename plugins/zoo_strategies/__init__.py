"""The built-in freeze strategies, registered through the public hook like any plugin.

Each strategy speaks only in layer-group names (input to output, ``head`` last), so any of
them drives any backbone.
"""

from __future__ import annotations

from typing import Any

import zoo

STRATEGIES = (
    zoo.Strategy("linear_probe", "zoo_strategies.builtin:LinearProbe",
                 "train only the head; every other group frozen (BN in eval mode)"),
    zoo.Strategy("feature_extract", "zoo_strategies.builtin:FeatureExtract",
                 "compute the frozen features once, then train only the head on them"),
    zoo.Strategy("partial", "zoo_strategies.builtin:Partial",
                 "freeze the first N groups (those nearest the input), train the rest",
                 options={"frozen_groups": "number of leading groups to freeze (default: half)",
                          "freeze_to": "name of the last frozen group (instead of N)"}),
    zoo.Strategy("full", "zoo_strategies.builtin:Full", "every group trains"),
    zoo.Strategy("gradual", "zoo_strategies.builtin:Gradual",
                 "start with the head, unfreeze one more group every K epochs (fastai style)",
                 options={"every": "epochs between unfreezing steps (default 1)"}),
    zoo.Strategy("llrd", "zoo_strategies.builtin:LayerwiseDecay",
                 "every group trains; group i gets lr * decay**(distance from head)",
                 options={"decay": "per-group learning-rate factor, 0 < decay <= 1 "
                                   "(default 0.7)"}),
    zoo.Strategy("bitfit", "zoo_strategies.builtin:BitFit",
                 "only biases (and the head) train; BN statistics frozen"),
    zoo.Strategy("lora", "zoo_strategies.lora:LoRA",
                 "low-rank adapters on Linear/Conv layers; base weights frozen",
                 options={"rank": "adapter rank, 1 to 1024 (default 4)",
                          "alpha": "scaling numerator, delta = B@A * alpha/rank (default rank)",
                          "targets": "module types to adapt: linear, conv (default both)",
                          "groups": "groups to adapt (default all but head)",
                          "modules": "only these module paths (fnmatch patterns, e.g. "
                                     "*.mlp.*; default every Linear/Conv in the groups)",
                          "merge": "merge adapters into the weights when saving "
                                   "(default false: keep them separate)"}),
    zoo.Strategy("scratch", "zoo_strategies.builtin:Scratch",
                 "random initialisation, every group trains (the baseline)"),
)


@zoo.hookimpl
def register_strategies(register: Any) -> None:
    """Register the built-in strategies."""
    for strategy in STRATEGIES:
        register(strategy)
