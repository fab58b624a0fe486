"""The freeze-strategy protocol: which layer groups learn, how fast, and with what BN mode.

A strategy speaks only in layer-group names. For every epoch it returns a ``GroupPlan``
per group; the runner turns plans into ``requires_grad`` flags, optimizer learning rates,
BatchNorm modes and the frozen prefix it may cache. ``zoo.plan`` is the dry run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.core.arguments import check_arguments, is_plain
from zoo.core.errors import IncompatibleError, PluginError, ZooError
from zoo.core.spec import Backbone, LayerGroup, Strategy, resolve_callable
from zoo.core.table import table as text_table
from zoo.models.build import assign_groups
from zoo.plugins.registry import get_backbone, get_strategy


@dataclass(frozen=True)
class GroupPlan:
    """What one layer group does during an epoch.

    ``trainable``: its parameters learn (all of them, or those selected by ``only``).
    ``lr_scale``: its learning rate as a multiple of the base rate (used once it trains).
    ``bn_train``: BatchNorm layers update running statistics (default: ``trainable and
    only is None``). ``only``: which of the group's parameters learn: ``"bias"``,
    ``"adapter"`` (LoRA's), or a callable taking a parameter name (as in
    ``model.named_parameters()``) and returning True for those that learn.
    """

    trainable: bool
    lr_scale: float = 1.0
    bn_train: bool | None = None
    only: str | Callable[[str], bool] | None = None

    @property
    def bn_mode(self) -> str:
        """``"train"`` when BatchNorm statistics move, else ``"eval"``."""
        if self.bn_train is not None:
            return "train" if self.bn_train else "eval"
        return "train" if self.trainable and self.only is None else "eval"

    @property
    def fully_frozen(self) -> bool:
        """Nothing in the group changes: no parameter learns and BN statistics stay put."""
        return not self.trainable and self.bn_mode == "eval"


Plan = dict[str, GroupPlan]


SELECTORS = ("bias", "adapter")


def selects(only: str | Callable[[str], bool] | None, param_name: str) -> bool:
    """Whether a parameter called ``param_name`` trains under selector ``only``."""
    if only is None:
        return True
    if callable(only):
        return bool(only(param_name))
    if only == "bias":
        return param_name.rsplit(".", 1)[-1] == "bias"
    if only == "adapter":
        return ".lora_" in param_name
    raise ValueError(f"unknown parameter selector {only!r}")


class FreezeStrategy:
    """Base class for strategies; subclasses override ``plan`` and, if needed, the rest.

    ``pretrained`` is False for strategies that start from random weights (scratch).
    ``extract_features`` asks the runner to always precompute the frozen features.
    """

    name: str = ""
    pretrained: bool = True
    extract_features: bool = False

    def check(self, groups: Sequence[str], model: nn.Module, layer_groups: Sequence[LayerGroup]
              ) -> None:
        """Refuse an incompatible backbone before training (raise ``IncompatibleError``)."""

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        """The plan for ``epoch`` (0-based) of ``epochs``: one ``GroupPlan`` per group."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, layer_groups: Sequence[LayerGroup]) -> nn.Module:
        """Change the model before training (e.g. add adapters); default: unchanged."""
        return model

    def export(self, model: nn.Module) -> nn.Module:
        """The model to save (e.g. adapters merged); default: unchanged."""
        return model

    def options(self) -> dict[str, Any]:
        """The options this instance was created with (saved in checkpoints)."""
        return dict(getattr(self, "_options", {}))


def make_strategy(name: str | Strategy, options: Mapping[str, Any] | None = None
                  ) -> FreezeStrategy:
    """Instantiate a registered strategy with ``options``; unknown or bad options are refused."""
    spec = get_strategy(name) if isinstance(name, str) else name
    factory = resolve_callable(spec.factory)
    options = dict(options or {})
    bad = [k for k, v in options.items() if not is_plain(v)]
    if bad:
        raise IncompatibleError(f"strategy {spec.name!r}: option {bad[0]}={options[bad[0]]!r:.60} "
                                "must be a string, a finite number, or a list of them")
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params and not accepts_any]
    if unknown:
        valid = ", ".join(f"{k} ({v})" for k, v in spec.options.items()) or "none"
        raise IncompatibleError(
            f"strategy {spec.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {valid}"
        )
    try:
        strategy = factory(**options)
    except (TypeError, ValueError) as exc:
        raise IncompatibleError(f"strategy {spec.name!r}: {exc}") from None
    strategy.name = spec.name
    strategy._options = options
    strategy._plugin = spec.plugin
    return strategy


def _plan_problem(plan: Any, names: Sequence[str]) -> str | None:
    """What is wrong with one epoch's plan for groups ``names``, or None."""
    if not isinstance(plan, Mapping):
        return f"returned {type(plan).__name__}, not a dict of group name -> GroupPlan"
    if set(plan) != set(names):
        return f"planned groups {sorted(map(str, plan))}, but the backbone has {list(names)}"
    for group, gp in plan.items():
        if not isinstance(gp, GroupPlan):
            return f"planned {type(gp).__name__} for group {group!r}, not a zoo.GroupPlan"
        if not isinstance(gp.lr_scale, int | float) or not math.isfinite(gp.lr_scale) \
                or gp.lr_scale < 0:
            return f"gave group {group!r} lr_scale {gp.lr_scale!r}; it must be a number >= 0"
        if not (gp.only is None or callable(gp.only) or gp.only in SELECTORS):
            return (f"gave group {group!r} the parameter selector only={gp.only!r}; use "
                    f"{' or '.join(map(repr, SELECTORS))}, or a callable taking a parameter "
                    "name")
    return None


def plans_for(strategy: FreezeStrategy, names: Sequence[str], epochs: int) -> list[Plan]:
    """Every epoch's plan, checked: a strategy that fails or plans nonsense is an error
    naming it and its plugin (a plugin bug, not an internal error of zoo)."""
    who = f"strategy {strategy.name!r} (plugin {getattr(strategy, '_plugin', '') or '?'})"
    plans = []
    for epoch in range(max(1, epochs)):
        try:
            plan = strategy.plan(epoch, list(names), epochs)
        except ZooError:
            raise
        except Exception as exc:
            raise PluginError(f"{who} failed in plan(epoch={epoch}): "
                              f"{type(exc).__name__}: {exc}") from exc
        problem = _plan_problem(plan, names)
        if problem is not None:
            raise PluginError(f"{who} {problem} (epoch {epoch}); fix its plan()")
        plans.append(dict(plan))
    return plans


def parse_option_value(text: str) -> Any:
    """Turn ``--option KEY=VALUE`` text into a Python value (int, float, bool, list, str)."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return [parse_option_value(part) for part in text.split(",") if part]
    return text


@dataclass(frozen=True)
class GroupReport:
    """One row of the dry run: a group's size, what trains, its learning rate and BN mode."""

    name: str
    params: int
    trainable_params: int
    lr: float
    bn_mode: str
    trainable_from_epoch: int | None


@dataclass(frozen=True)
class PlanReport:
    """The dry run of a backbone x strategy pair: per group, and in total."""

    backbone: str
    strategy: str
    options: dict[str, Any]
    groups: tuple[GroupReport, ...]
    total_params: int
    trainable_params: int

    def table(self) -> str:
        """The report as an aligned text table."""
        rows = [("group", "params", "trainable", "lr", "bn", "learns from epoch")]
        for g in self.groups:
            start = "-" if g.trainable_from_epoch is None else str(g.trainable_from_epoch)
            rows.append((g.name, f"{g.params:,}", f"{g.trainable_params:,}",
                         f"{g.lr:.2e}" if g.trainable_from_epoch is not None else "frozen",
                         g.bn_mode, start))
        rows.append(("total", f"{self.total_params:,}", f"{self.trainable_params:,}", "", "", ""))
        return text_table(rows)


def trainable_params_by_group(model: nn.Module, owner: Mapping[str, str], plan: Plan
                              ) -> dict[str, int]:
    """Number of parameter elements that learn under ``plan``, per group."""
    counts = dict.fromkeys(plan, 0)
    for pname, p in model.named_parameters():
        gp = plan[owner[pname]]
        if gp.trainable and selects(gp.only, pname):
            counts[owner[pname]] += p.numel()
    return counts


def plan(backbone: str | Backbone, strategy: str, options: Mapping[str, Any] | None = None, *,
         epochs: int = 1, lr: float = 1e-3, num_classes: int | None = None) -> PlanReport:
    """Dry run: what ``strategy`` would train on ``backbone``, checked, without training.

    The model is built on the meta device, so this is cheap even for large backbones.
    """
    check_arguments({"num_classes": num_classes, "lr": lr})
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    strat = make_strategy(strategy, options)
    with torch.device("meta"):
        model = spec.build(num_classes)
    layer_groups = spec.layer_groups(model)
    names = [g.name for g in layer_groups]
    strat.check(names, model, layer_groups)
    model = strat.prepare(model, layer_groups)
    owner = assign_groups(model, layer_groups, spec.name)
    plans = plans_for(strat, names, epochs)
    sizes = dict.fromkeys(names, 0)
    for pname, p in model.named_parameters():
        sizes[owner[pname]] += p.numel()
    learning = [trainable_params_by_group(model, owner, p) for p in plans]
    rows = []
    for name in names:
        start = next((e for e, counts in enumerate(learning) if counts[name] > 0), None)
        gp = plans[start if start is not None else 0][name]
        rows.append(GroupReport(name, sizes[name], max(c[name] for c in learning),
                                lr * gp.lr_scale, gp.bn_mode, start))
    return PlanReport(spec.name, strat.name, strat.options(), tuple(rows),
                      sum(sizes.values()), sum(r.trainable_params for r in rows))
