"""Built-in strategies that only choose which groups learn, and how fast."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

import zoo
from zoo.models.strategy import FreezeStrategy, GroupPlan, Plan


def _frozen_below(groups: Sequence[str], n_frozen: int) -> Plan:
    return {g: GroupPlan(trainable=i >= n_frozen) for i, g in enumerate(groups)}


class LinearProbe(FreezeStrategy):
    """Everything frozen but the head."""

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return _frozen_below(groups, len(groups) - 1)


class FeatureExtract(LinearProbe):
    """The feature-vector method: frozen features computed once, then only the head trains."""

    extract_features = True


class Partial(FreezeStrategy):
    """Freeze the first ``frozen_groups`` groups (or up to and including ``freeze_to``)."""

    def __init__(self, frozen_groups: int | None = None, freeze_to: str | None = None) -> None:
        if frozen_groups is not None and freeze_to is not None:
            raise ValueError("give frozen_groups or freeze_to, not both")
        if frozen_groups is not None and (not isinstance(frozen_groups, int)
                                          or isinstance(frozen_groups, bool)
                                          or frozen_groups < 0):
            raise ValueError(f"frozen_groups must be a whole number >= 0, got {frozen_groups!r}")
        self.frozen_groups = frozen_groups
        self.freeze_to = freeze_to

    def count(self, groups: Sequence[str]) -> int:
        """How many leading groups are frozen on this backbone."""
        if self.freeze_to is not None:
            return list(groups).index(self.freeze_to) + 1
        if self.frozen_groups is None:
            return (len(groups) - 1) // 2
        return self.frozen_groups

    def check(self, groups, model, layer_groups) -> None:
        if self.freeze_to is not None and self.freeze_to not in groups:
            raise zoo.UnknownNameError.for_name(
                "group", self.freeze_to, groups, context=f" for freeze_to (groups: {list(groups)})"
            )
        if self.count(groups) > len(groups) - 1:
            raise zoo.IncompatibleError(
                f"partial: cannot freeze {self.count(groups)} groups of a backbone with "
                f"{len(groups)} ({', '.join(groups)}); the head must train, so use "
                f"frozen_groups <= {len(groups) - 1}"
            )

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return _frozen_below(groups, self.count(groups))


class Full(FreezeStrategy):
    """Every group trains at the base learning rate."""

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return _frozen_below(groups, 0)


class Scratch(Full):
    """Random initialisation, everything trains: the baseline transfer learning must beat."""

    pretrained = False


class Gradual(FreezeStrategy):
    """Head first; one more group (from the output side) unfreezes every ``every`` epochs."""

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a whole number >= 1, got {every!r}")
        self.every = every

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        unfrozen = 1 + epoch // self.every
        return _frozen_below(groups, max(0, len(groups) - unfrozen))


class LayerwiseDecay(FreezeStrategy):
    """Every group trains; group i's learning rate is lr * decay**(distance from the head)."""

    def __init__(self, decay: float = 0.7) -> None:
        if not isinstance(decay, int | float) or not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        last = len(groups) - 1
        return {g: GroupPlan(True, lr_scale=self.decay ** (last - i)) for i, g in enumerate(groups)}


class BitFit(FreezeStrategy):
    """Only bias terms learn (plus the whole head); BatchNorm statistics stay frozen."""

    def check(self, groups, model: nn.Module, layer_groups) -> None:
        body = [g for g in layer_groups if g.name != "head"]
        has_bias = any(name.rsplit(".", 1)[-1] == "bias" and any(g.owns(name) for g in body)
                       for name, _ in model.named_parameters())
        if not has_bias:
            raise zoo.IncompatibleError(
                "bitfit needs bias parameters outside the head, and this backbone has none; "
                "try lora or linear_probe"
            )

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return {g: GroupPlan(True) if g == "head" else GroupPlan(True, only="bias")
                for g in groups}
