"""LoRA: low-rank adapters added to the weights of Linear and Conv layers.

Each adapted weight W becomes ``W + (B @ A) * alpha / rank`` through a torch
parametrization, so the base tensors keep their values (and frozen) while only A and B
learn. B starts at zero: before training, the adapted model equals the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import zoo
from zoo.models.strategy import FreezeStrategy, GroupPlan, Plan

_TARGETS = {"linear": (nn.Linear,), "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
# Adapters cost rank * (fan_in + fan_out) numbers per layer; a rank from an untrusted
# checkpoint must not be able to allocate gigabytes (typical ranks are 4 to 64).
MAX_RANK = 1024


class LowRankDelta(nn.Module):
    """The parametrization ``W -> W + (B @ A).view_as(W) * scale``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        fan_in = math.prod(weight.shape[1:])
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).view_as(weight) * self.scale


class LoRA(FreezeStrategy):
    """Low-rank adapters on the Linear/Conv layers of the chosen groups; the head trains fully."""

    def __init__(self, rank: int = 4, alpha: float | None = None,
                 targets: Sequence[str] | str = ("linear", "conv"),
                 groups: Sequence[str] | str | None = None, merge: bool = False,
                 modules: Sequence[str] | str | None = None) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
            raise ValueError(f"rank must be a whole number from 1 to {MAX_RANK}, got {rank!r}")
        targets = [targets] if isinstance(targets, str) else list(targets)
        unknown = [t for t in targets if t not in _TARGETS]
        if unknown or not targets:
            raise ValueError(f"targets must be among {sorted(_TARGETS)}, got {targets!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.types = tuple(cls for t in targets for cls in _TARGETS[t])
        self.groups = [groups] if isinstance(groups, str) else groups
        self.merge = bool(merge)
        modules = [modules] if isinstance(modules, str) else modules
        if modules is not None and (not modules or not all(isinstance(m, str) and m
                                                            for m in modules)):
            raise ValueError(f"modules must be module paths or fnmatch patterns such as "
                             f"'*.mlp.*', got {modules!r}")
        self.modules = None if modules is None else list(modules)
        self._settings = {"rank": rank, "alpha": self.alpha, "targets": targets,
                          "groups": self.groups, "merge": self.merge, "modules": self.modules}

    def options(self) -> dict[str, Any]:
        """The options given to ``make_strategy``; for an instance made directly, its settings."""
        if hasattr(self, "_options"):
            return dict(self._options)
        return {k: v for k, v in self._settings.items() if v is not None}

    def _adapted_groups(self, names: Sequence[str]) -> list[str]:
        return [g for g in names if g != "head"] if self.groups is None else list(self.groups)

    def _targets(self, model: nn.Module, layer_groups) -> list[tuple[str, nn.Module]]:
        chosen = [g for g in layer_groups if g.name in self._adapted_groups(
            [lg.name for lg in layer_groups])]
        return [(path, m) for path, m in model.named_modules()
                if isinstance(m, self.types) and getattr(m, "groups", 1) == 1
                and any(g.owns(path + ".weight") for g in chosen)
                and (self.modules is None or any(fnmatchcase(path, p) for p in self.modules))]

    def check(self, groups, model: nn.Module, layer_groups) -> None:
        bad = [g for g in self._adapted_groups(groups) if g not in groups or g == "head"]
        if bad:
            raise zoo.IncompatibleError(
                f"lora: cannot adapt group(s) {bad}; choose among {list(groups)[:-1]}"
            )
        if not self._targets(model, layer_groups):
            kinds = ", ".join(cls.__name__ for cls in self.types)
            if self.modules is not None:
                raise zoo.IncompatibleError(
                    f"lora: no {kinds} layer in the adapted groups matches modules="
                    f"{self.modules!r}; give module paths as in model.named_modules()")
            raise zoo.IncompatibleError(
                f"lora needs {kinds} layers in the adapted groups, and this backbone has none "
                "there; try targets=linear,conv or another strategy"
            )

    def prepare(self, model: nn.Module, layer_groups) -> nn.Module:
        for _, module in self._targets(model, layer_groups):
            if not parametrize.is_parametrized(module, "weight"):
                delta = LowRankDelta(module.weight, self.rank, self.alpha)
                parametrize.register_parametrization(module, "weight", delta)
        return model

    def export(self, model: nn.Module) -> nn.Module:
        if self.merge:
            for module in model.modules():
                if parametrize.is_parametrized(module, "weight"):
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return model

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        adapted = set(self._adapted_groups(groups))
        return {g: GroupPlan(True) if g == "head"
                else GroupPlan(g in adapted, only="adapter") for g in groups}
