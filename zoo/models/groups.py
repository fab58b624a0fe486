"""Layer-group machinery on the model side: which module belongs to which group, freezing a
plan into ``requires_grad`` flags and eval-mode pins, and the model cut into a frozen prefix
and the rest that trains.

Frozen groups get no gradients and run without autograd; their BatchNorm layers stay in eval
mode (running statistics never move), however often ``.train()`` is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from zoo.core.spec import LayerGroup, Stage
from zoo.models.build import assign_groups
from zoo.models.strategy import Plan, selects


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


def compose(stages: Sequence[Stage]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One forward function running ``stages`` in order (a model's prefix or rest)."""
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
            self.prefix = compose(stages[:cut]) if cut else None
            self.rest = compose(stages[cut:])

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
