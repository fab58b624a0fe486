"""Freeze strategies, as the runner applies them: which tensors learn, how fast, BN modes.

Every registered strategy gets one short epoch on a small "pretrained" CIFAR ResNet-20 and
tiny real data (sklearn's digits); then, group by group, frozen parameters and frozen BatchNorm
statistics must be bit-identical to before training, trainable ones must have changed,
and the optimizer's learning rate for each group must be the declared one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import TINY
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import zoo
from zoo.models.strategy import GroupPlan, make_strategy, selects
from zoo.training.callbacks import Callback, Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPS = ["stem", "layer1", "layer2", "layer3", "head"]  # cifar_resnet20
RESNET18_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
LR = 1e-2

# The groups whose tensors learn in the first epoch, for the built-in strategies on ResNet-20.
FIRST_EPOCH_LEARNS = {
    "linear_probe": {"head"},
    "feature_extract": {"head"},
    "partial": {"layer2", "layer3", "head"},  # default: freeze (5 - 1) // 2 groups
    "full": set(GROUPS),
    "scratch": set(GROUPS),
    "gradual": {"head"},
    "llrd": set(GROUPS),
    "bitfit": set(GROUPS),  # biases only, outside the head
    "lora": set(GROUPS),  # adapters only, outside the head
}


class Recorder(Callback):
    """Snapshots the model's tensors and the optimizer's learning rates around each epoch."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.epoch_start: list[dict[str, torch.Tensor]] = []
        self.epoch_end: list[dict[str, torch.Tensor]] = []
        self.lrs: list[dict[str, float]] = []
        self.requires_grad: list[dict[str, bool]] = []

    @staticmethod
    def snapshot(run: Run) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in run.model.state_dict().items()}

    def on_train_start(self, run: Run) -> None:
        self.before = self.snapshot(run)

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        self.epoch_start.append(self.snapshot(run))
        self.lrs.append({g["name"]: g["lr"] for g in run.optimizer.param_groups})
        self.requires_grad.append({n: p.requires_grad for n, p in run.model.named_parameters()})

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        self.epoch_end.append(self.snapshot(run))


def group_of(name: str, groups: list[zoo.LayerGroup]) -> str:
    return next(g.name for g in groups if g.owns(name))


def changed_groups(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                   groups: list[zoo.LayerGroup]) -> set[str]:
    return {group_of(k, groups) for k in after if not torch.equal(before[k], after[k])}


@pytest.fixture
def resnet(pretrained: Callable[..., str]) -> str:
    """``test_cifar_resnet20``: the CIFAR ResNet-20 with local "pretrained" weights."""
    return pretrained("cifar_resnet20")


@pytest.fixture(scope="module")
def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    """20 real digits, two of each class (two batches of 10)."""
    data = zoo.load_data("digits", limit_per_class=2)
    assert data.tensors is not None
    return data.tensors


def run_strategy(backbone: str, strategy: str, data: Any, *, epochs: int = 1,
                 options: dict[str, Any] | None = None, **kwargs: Any
                 ) -> tuple[zoo.FinetuneResult, Recorder]:
    recorder = Recorder()
    kwargs.setdefault("scheduler", None)
    result = zoo.finetune(backbone, strategy, data, epochs=epochs, lr=LR, batch_size=10,
                          image_size=16, strategy_options=options, quiet=True,
                          callbacks=[recorder, *kwargs.pop("callbacks", [])], **kwargs)
    return result, recorder


# --------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("strategy", zoo.list_strategies())
def test_one_epoch_changes_exactly_what_the_plan_says(strategy: str, resnet: str,
                                                       train_data: Any) -> None:
    result, rec = run_strategy(resnet, strategy, train_data)
    spec = zoo.get_backbone(resnet)
    groups = list(spec.layer_groups())
    plan = make_strategy(strategy).plan(0, [g.name for g in groups], 1)
    after = result.model.state_dict()
    params = dict(result.model.named_parameters())
    assert set(after) == set(rec.before)

    learned: set[str] = set()
    for key, value in after.items():
        gp: GroupPlan = plan[group_of(key, groups)]
        if key in params:
            should_learn = gp.trainable and selects(gp.only, key)
        elif key.rsplit(".", 1)[-1] in BN_BUFFERS:
            should_learn = gp.bn_mode == "train"
        else:
            should_learn = False
        same = torch.equal(rec.before[key], value)
        if should_learn:
            assert not same, f"{strategy}: {key} should have changed but did not"
            learned.add(group_of(key, groups))
        else:
            assert same, f"{strategy}: {key} is frozen but changed"

    if strategy in FIRST_EPOCH_LEARNS:
        assert learned == FIRST_EPOCH_LEARNS[strategy]
    # Real per-group learning rates: one optimizer param group per layer group, as declared.
    assert list(rec.lrs[0]) == [g.name for g in groups]
    for name, gp in plan.items():
        if gp.trainable:
            assert rec.lrs[0][name] == pytest.approx(LR * gp.lr_scale, rel=1e-12)
    assert result.metrics["trainable_params"] == sum(
        p.numel() for n, p in params.items()
        if plan[group_of(n, groups)].trainable and selects(plan[group_of(n, groups)].only, n))


def test_bitfit_trains_biases_and_the_head_only(resnet: str, train_data: Any) -> None:
    result, rec = run_strategy(resnet, "bitfit", train_data)
    for name, p in result.model.named_parameters():
        moved = not torch.equal(rec.before[name], p)
        assert moved == (name.endswith(".bias") or name.startswith("linear.")), name


def test_lora_trains_adapters_and_the_head_and_keeps_base_weights(resnet: str,
                                                                  train_data: Any) -> None:
    result, rec = run_strategy(resnet, "lora", train_data, options={"rank": 2})
    adapters = [n for n, _ in result.model.named_parameters() if ".lora_" in n]
    assert adapters and all(".parametrizations.weight." in n for n in adapters)
    for name, p in result.model.named_parameters():
        moved = not torch.equal(rec.before[name], p)
        assert moved == (".lora_" in name or name.startswith("linear.")), name


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("every", [1, 2])
def test_gradual_unfreezes_one_more_group_every_k_epochs(every: int, resnet: str,
                                                         train_data: Any) -> None:
    epochs = 5 if every == 1 else 4
    result, rec = run_strategy(resnet, "gradual", train_data, epochs=epochs,
                               options={"every": every})
    groups = list(zoo.get_backbone(resnet).layer_groups())
    for epoch in range(epochs):
        unfrozen = set(GROUPS[len(GROUPS) - 1 - epoch // every:])
        learning = {group_of(n, groups) for n, flag in rec.requires_grad[epoch].items() if flag}
        assert learning == unfrozen, f"epoch {epoch}"
        assert changed_groups(rec.epoch_start[epoch], rec.epoch_end[epoch], groups) == unfrozen
    history_trainable = [h["trainable_params"] for h in result.history]
    assert history_trainable == sorted(history_trainable)
    assert len(set(history_trainable)) == epochs // every


def test_gradual_groups_are_in_the_optimizer_from_the_start(resnet: str,
                                                            train_data: Any) -> None:
    """Frozen groups are pre-registered, so optimizer state (and DDP) never meet new tensors."""
    seen: list[int] = []

    class CountParams(Callback):
        def on_epoch_start(self, run: Run, epoch: int) -> None:
            seen.append(sum(len(g["params"]) for g in run.optimizer.param_groups))

    result, _ = run_strategy(resnet, "gradual", train_data, epochs=2,
                             callbacks=[CountParams()])
    assert seen == [len(list(result.model.parameters()))] * 2


def test_llrd_learning_rates_decay_with_distance_from_the_head(resnet: str,
                                                               train_data: Any) -> None:
    decay = 0.5
    _, rec = run_strategy(resnet, "llrd", train_data, epochs=2, options={"decay": decay})
    groups = list(zoo.get_backbone(resnet).layer_groups())
    for epoch in range(2):
        expected = {g: LR * decay ** (len(GROUPS) - 1 - i)
                    for i, g in enumerate(GROUPS)}
        assert rec.lrs[epoch] == pytest.approx(expected, rel=1e-12)
        assert changed_groups(rec.epoch_start[epoch], rec.epoch_end[epoch], groups) \
            == set(GROUPS)


def test_llrd_ratios_survive_a_torch_scheduler(resnet: str, train_data: Any) -> None:
    """Per-group rates live in the optimizer, so any torch scheduler scales all of them."""
    decay = 0.5
    _, rec = run_strategy(resnet, "llrd", train_data, epochs=3, options={"decay": decay},
                          scheduler="cosine")
    for epoch, lrs in enumerate(rec.lrs):
        factor = lrs["head"] / LR
        if epoch == 0:
            assert factor == pytest.approx(1.0)
        else:
            assert factor < 1.0
        for i, g in enumerate(GROUPS):
            assert lrs[g] == pytest.approx(LR * factor * decay ** (4 - i), rel=1e-9)


@pytest.mark.parametrize(("options", "frozen"), [
    ({"frozen_groups": 2}, {"stem", "layer1"}),
    ({"frozen_groups": 0}, set()),
    ({"freeze_to": "layer2"}, {"stem", "layer1", "layer2"}),
])
def test_partial_freezes_the_leading_groups(options: dict[str, Any], frozen: set[str],
                                            resnet: str, train_data: Any) -> None:
    result, rec = run_strategy(resnet, "partial", train_data, options=options)
    groups = list(zoo.get_backbone(resnet).layer_groups())
    assert changed_groups(rec.before, result.model.state_dict(), groups) \
        == set(GROUPS) - frozen


# --------------------------------------------------------------------------- BatchNorm policy


def test_frozen_bn_stays_in_eval_mode_even_after_model_train(tiny: zoo.Backbone,
                                                            register_backbones: Any,
                                                            train_data: Any) -> None:
    """A callback calling ``model.train()`` cannot unpin BN in a frozen group.

    The backbone has no ``stages``, so the frozen stem runs inside the trained model
    (no cached prefix) and only the eval pin keeps its statistics still.
    """
    no_stages = dataclasses.replace(TINY, name="tiny_no_stages", stages=None)
    register_backbones(no_stages)
    bn_modes: list[tuple[str, bool]] = []

    class TrainEverything(Callback):
        def on_epoch_start(self, run: Run, epoch: int) -> None:
            run.model.train()
            for path, module in run.model.named_modules():
                if isinstance(module, _BatchNorm):
                    module.register_forward_hook(
                        lambda m, i, o, path=path: bn_modes.append((path, m.training)))

    result, rec = run_strategy("tiny_no_stages", "partial", train_data, weights=None, epochs=2,
                               options={"frozen_groups": 1}, callbacks=[TrainEverything()])
    after = result.model.state_dict()
    for key in ("stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"):
        assert torch.equal(rec.before[key], after[key]), key
    for key in ("block.1.running_mean", "block.1.num_batches_tracked"):
        assert not torch.equal(rec.before[key], after[key]), key
    assert ("stem.1", False) in bn_modes and ("stem.1", True) not in bn_modes
    assert ("block.1", True) in bn_modes


def test_bitfit_keeps_bn_statistics_of_training_groups(resnet: str, train_data: Any) -> None:
    result, rec = run_strategy(resnet, "bitfit", train_data)
    after = result.model.state_dict()
    buffers = [k for k in after if k.rsplit(".", 1)[-1] in BN_BUFFERS]
    assert buffers and all(torch.equal(rec.before[k], after[k]) for k in buffers)


# --------------------------------------------------------------------------- refused pairs


class MustNotTrain(Callback):
    def on_train_start(self, run: Run) -> None:
        raise AssertionError("training started for an incompatible pair")


def no_bias_backbone() -> zoo.Backbone:
    return dataclasses.replace(TINY, name="tiny_no_bias", builder_kwargs={"bias": False,
                                                                          "bn": False})


@pytest.mark.parametrize(("backbone", "strategy", "options", "message"), [
    ("cifar_resnet20", "partial", {"frozen_groups": 5}, "cannot freeze 5 groups"),
    ("cifar_resnet20", "partial", {"frozen_groups": 9}, "frozen_groups <= 4"),
    ("cifar_resnet20", "partial", {"freeze_to": "head"}, "the head must train"),
    ("tiny_no_bias", "bitfit", None, "bitfit needs bias parameters"),
    ("cifar_resnet20", "lora", {"targets": "linear"}, "lora needs Linear layers"),
    ("cifar_resnet20", "lora", {"groups": ["layer9"]}, "cannot adapt group(s) ['layer9']"),
    ("cifar_resnet20", "partial", {"frozen_grups": 2}, "has no option 'frozen_grups'"),
    ("cifar_resnet20", "partial", {"frozen_groups": True}, "frozen_groups must be a whole"),
    ("cifar_resnet20", "gradual", {"every": 0}, "every must be a whole number"),
    ("cifar_resnet20", "llrd", {"decay": 1.5}, "decay must be in (0, 1]"),
])
def test_incompatible_pairs_are_refused_before_training(
        backbone: str, strategy: str, options: dict[str, Any] | None, message: str,
        register_backbones: Any, train_data: Any, tmp_path: Any) -> None:
    register_backbones(no_bias_backbone())
    out = tmp_path / "out"
    with pytest.raises(zoo.IncompatibleError) as info:
        zoo.finetune(backbone, strategy, train_data, epochs=1, weights=None, image_size=16,
                     strategy_options=options, output_dir=out, callbacks=[MustNotTrain()],
                     quiet=True)
    assert message in str(info.value)
    assert not out.exists()
    # The dry run refuses the same pairs.
    with pytest.raises(zoo.IncompatibleError):
        zoo.plan(backbone, strategy, options)


def test_unknown_freeze_to_group_suggests_the_right_name() -> None:
    with pytest.raises(zoo.ZooError, match="did you mean 'layer2'"):
        zoo.plan("cifar_resnet20", "partial", {"freeze_to": "layr2"})


# --------------------------------------------------------------------------- dry run


def test_plan_reports_trainable_params_lr_and_bn_mode_per_group() -> None:
    report = zoo.plan("resnet18", "partial", {"frozen_groups": 2}, lr=0.1, num_classes=10)
    rows = {g.name: g for g in report.groups}
    assert list(rows) == RESNET18_GROUPS
    model = zoo.create_model("resnet18", num_classes=10)
    for name in RESNET18_GROUPS:
        size = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith({"stem": ("conv1.", "bn1."), "head": ("fc.",)}.get(
                       name, (name + ".",))))
        assert rows[name].params == size
        frozen = name in ("stem", "layer1")
        assert rows[name].trainable_params == (0 if frozen else size)
        assert rows[name].trainable_from_epoch == (None if frozen else 0)
        assert rows[name].bn_mode == ("eval" if frozen else "train")
        assert rows[name].lr == pytest.approx(0.1)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.trainable_params == report.total_params - rows["stem"].params \
        - rows["layer1"].params
    table = report.table()
    assert table.splitlines()[0].split() == ["group", "params", "trainable", "lr", "bn",
                                             "learns", "from", "epoch"]
    assert "frozen" in table.splitlines()[1] and "1.00e-01" in table.splitlines()[3]
    assert table.splitlines()[-1].startswith("total")


def test_plan_shows_when_gradual_unfreezes_each_group() -> None:
    report = zoo.plan("resnet18", "gradual", {"every": 2}, epochs=5)
    starts = {g.name: g.trainable_from_epoch for g in report.groups}
    assert starts == {"stem": None, "layer1": None, "layer2": None, "layer3": 4,
                      "layer4": 2, "head": 0}


def test_plan_shows_llrd_learning_rates() -> None:
    report = zoo.plan("resnet18", "llrd", {"decay": 0.5}, lr=1.0)
    assert [g.lr for g in report.groups] == [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]


def test_plan_counts_only_adapters_for_lora_and_biases_for_bitfit() -> None:
    lora = zoo.plan("resnet18", "lora", {"rank": 2})
    conv = {n: m for n, m in zoo.create_model("resnet18").named_modules()
            if isinstance(m, nn.Conv2d) and n.startswith("layer1")}
    expected = sum(2 * (m.in_channels * 9) + m.out_channels * 2 for m in conv.values()
                   if m.kernel_size == (3, 3))
    layer1 = next(g for g in lora.groups if g.name == "layer1")
    assert layer1.trainable_params == expected
    assert layer1.bn_mode == "eval"
    bitfit = {g.name: g for g in zoo.plan("resnet18", "bitfit").groups}
    assert bitfit["layer1"].trainable_params == sum(
        p.numel() for n, p in zoo.create_model("resnet18").named_parameters()
        if n.startswith("layer1.") and n.endswith(".bias"))
    assert bitfit["head"].trainable_params == bitfit["head"].params
