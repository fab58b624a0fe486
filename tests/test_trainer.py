"""Issue 14 (trainer): the pieces ``finetune`` is built from, each on its own.

Freeze state and the split model (``zoo.models.groups``), optimizer parameter groups
(``zoo.training.optim``), ``FinetuneConfig`` (validation, files), the callbacks (progress,
resume state, NaN guard, history, best epoch, ``on_batch_end``) and the one evaluation loop.
Everything runs on the tiny three-group network (conftest.py) and real digits.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, TinyNet, quick_finetune, tiny_stages

import zoo
from zoo.core.errors import ZooError
from zoo.data.feature_cache import FeatureStore
from zoo.models.groups import FreezeState, SplitModel, frozen_prefix
from zoo.models.strategy import GroupPlan, make_strategy
from zoo.training.best import BestEpoch
from zoo.training.callbacks import (
    RESUME_FILE,
    Callback,
    History,
    NanGuard,
    ProgressBar,
    ResumeState,
    Run,
    read_resume,
)
from zoo.training.config import FinetuneConfig
from zoo.training.evaluate import Tally, evaluation_loop, same_classes
from zoo.training.optim import make_optimizer, make_schedulers, param_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINS, FROZEN = GroupPlan(True), GroupPlan(False)
NAMES = [g.name for g in TINY.groups]


def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(num_classes=3)


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def train_tiny(train: Any, val: Any = None, **options: Any) -> zoo.FinetuneResult:
    """The tiny network trained from random weights (``quick_finetune``'s settings)."""
    return quick_finetune("tiny_cnn", "full", train, val, weights=None, **options)


def params_of(model: torch.nn.Module, group: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(f"{group}.")]


# --------------------------------------------------------------------------- FreezeState


def test_freeze_state_stops_gradients_and_pins_frozen_batchnorm() -> None:
    """A frozen group's parameters get no gradient (an old one is dropped) and its BatchNorm
    statistics stay put even in train mode; a trainable group's move."""
    model = tiny_model()
    model.stem[0].weight.grad = torch.ones_like(model.stem[0].weight)
    state = FreezeState(model, TINY.groups)
    state.apply({"stem": FROZEN, "block": TRAINS, "head": TRAINS})
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == \
        params_of(model, "stem")
    assert model.stem[0].weight.grad is None
    stem_stats, block_stats = (model.stem[1].running_mean.clone(),
                               model.block[1].running_mean.clone())
    model.train()
    model(images())
    assert torch.equal(model.stem[1].running_mean, stem_stats)
    assert not torch.equal(model.block[1].running_mean, block_stats)
    assert not model.stem[1].training and model.block[1].training


def test_freeze_state_bias_only_and_remove() -> None:
    """BitFit-style plans train only the selected tensors and keep BatchNorm in eval mode;
    ``remove`` takes the eval-mode pins away again."""
    model = tiny_model()
    state = FreezeState(model, TINY.groups)
    state.apply({"stem": GroupPlan(True, only="bias"), "block": FROZEN, "head": TRAINS})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["stem.0.bias", "stem.1.bias", "head.weight", "head.bias"]
    before = model.stem[1].running_mean.clone()
    model.train()
    model(images())
    assert torch.equal(model.stem[1].running_mean, before)
    state.remove()
    model.train()
    model(images())
    assert not torch.equal(model.stem[1].running_mean, before)


def test_ungrouped_modules_are_only_the_containers() -> None:
    """Every module of the tiny net belongs to a group except the model itself: the only one
    a frozen prefix runs that no eval-mode pin covers."""
    model = tiny_model()
    assert FreezeState(model, TINY.groups).ungrouped() == [model]


# --------------------------------------------------------------------------- SplitModel


def test_frozen_prefix_counts_leading_frozen_stages_never_the_last() -> None:
    stages = tiny_stages(tiny_model())
    assert frozen_prefix(stages, {"stem": TRAINS, "block": TRAINS, "head": TRAINS}) == 0
    assert frozen_prefix(stages, {"stem": FROZEN, "block": TRAINS, "head": TRAINS}) == 1
    assert frozen_prefix(stages, {"stem": TRAINS, "block": FROZEN, "head": TRAINS}) == 0
    assert frozen_prefix(stages, {"stem": FROZEN, "block": FROZEN, "head": FROZEN}) == 2
    assert frozen_prefix(None, {"stem": FROZEN}) == 0


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_split_model_features_then_rest_is_the_model(cut: int) -> None:
    """features (the frozen prefix, without autograd, in eval mode) followed by the rest
    gives exactly the model's output; every module's mode is restored after."""
    model = tiny_model()
    split = SplitModel(model, tiny_stages(model), cut)
    x = images()
    model.train()
    features = split.features(x)
    assert all(m.training for m in model.modules())
    assert not features.requires_grad or cut == 0
    assert (split.prefix is None) == (cut == 0)
    model.eval()
    assert torch.equal(split(split.features(x)), model(x))


# --------------------------------------------------------------------------- optimizer


def test_param_groups_register_every_group_at_the_rate_it_will_train_with() -> None:
    """One entry per layer group, in order, holding exactly its parameters; the rate is the
    base rate times the lr_scale of the group's first trainable epoch (frozen all along:
    the first plan's)."""
    model = tiny_model()
    owner = FreezeState(model, TINY.groups).owner
    plans = [{"stem": GroupPlan(False, lr_scale=0.5), "block": GroupPlan(False, lr_scale=0.3),
              "head": GroupPlan(True, lr_scale=2.0)},
             {"stem": GroupPlan(True, lr_scale=0.1), "block": GroupPlan(False, lr_scale=0.3),
              "head": GroupPlan(True, lr_scale=2.0)}]
    groups = param_groups(model, owner, plans, NAMES, lr=0.01)
    assert [g["name"] for g in groups] == NAMES
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.003, 0.02])
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert [by_id[id(p)] for p in group["params"]] == params_of(model, group["name"])


def test_optimizer_halves_exempt_norms_and_biases_from_weight_decay() -> None:
    """Each layer group is split into a decayed half (conv and linear weights) and an
    undecayed one (biases, norm weights), names and rates kept; frozen groups are there too."""
    model = tiny_model()
    owner = FreezeState(model, TINY.groups).owner
    plans = [{"stem": FROZEN, "block": GroupPlan(True, lr_scale=0.5), "head": TRAINS}]
    opt = make_optimizer(model, owner, plans, NAMES, lr=0.01, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen = {(g["name"], g["weight_decay"], g["lr"]): [by_id[id(p)] for p in g["params"]]
            for g in opt.param_groups}
    assert seen == {
        ("stem", 0.05, 0.01): ["stem.0.weight"],
        ("stem", 0.0, 0.01): ["stem.0.bias", "stem.1.weight", "stem.1.bias"],
        ("block", 0.05, 0.005): ["block.0.weight"],
        ("block", 0.0, 0.005): ["block.0.bias", "block.1.weight", "block.1.bias"],
        ("head", 0.05, 0.01): ["head.weight"],
        ("head", 0.0, 0.01): ["head.bias"],
    }
    sgd = make_optimizer(model, owner, plans, NAMES, 0.01, 0.05, name="sgd", momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in sgd.param_groups)


def test_schedules_by_name_per_batch_a_callable_per_epoch() -> None:
    opt = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    per_batch, per_epoch = make_schedulers("cosine", opt, epochs=2, steps=3, warmup_epochs=0)
    assert per_batch is not None and per_epoch is None
    step = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert make_schedulers(lambda o: step, opt, 2, 3, 0) == (None, step)
    assert make_schedulers(None, opt, 2, 3, 0) == (None, None)
    assert make_schedulers(None, opt, 2, 3, 1)[0] is not None  # warmup, then constant
    with pytest.raises(ZooError, match="unknown scheduler 'warp'"):
        make_schedulers("warp", opt, 2, 3, 0)


# --------------------------------------------------------------------------- FinetuneConfig


def test_config_fields_are_finetunes_arguments_with_the_same_defaults() -> None:
    def default(value: Any) -> Any:
        return None if value in (dataclasses.MISSING, inspect.Parameter.empty) else value

    fields = [(f.name, default(f.default)) for f in dataclasses.fields(FinetuneConfig)]
    params = [(name, default(p.default))
              for name, p in inspect.signature(zoo.finetune).parameters.items()]
    assert fields == params


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("epochs", 0, "epochs must be a whole number from 1"),
    ("lr", -1.0, "lr must be a finite number > 0"),
    ("keep", "worst", "keep must be 'best' or 'last'"),
    ("device", 3.5, "device must be None, 'cpu'"),
    ("feature_store", "cache", "feature_store must be None or a zoo.data.feature_cache"),
    ("val", True, "val must be None, a dataset name"),
    ("loggers", ["csv", ""], "loggers must be None or a list of logger names"),
])
def test_config_refuses_a_bad_value_naming_it(setting: str, value: Any, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        FinetuneConfig("tiny_cnn", "full", "digits", **{setting: value})


def test_config_is_frozen() -> None:
    config = FinetuneConfig("tiny_cnn", "full", "digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_config_round_trips_through_a_file(tmp_path: Path, suffix: str) -> None:
    config = FinetuneConfig("cifar_resnet20", "partial", "digits", epochs=2, lr=3e-5,
                            strategy_options={"freeze_to": "layer2", "scales": [0.5, 1]},
                            output_dir="runs/a", loggers=["csv"], clip_grad=1.0, seed=7,
                            augment="standard", cache_views=2)
    path = tmp_path / f"run{suffix}"
    config.save(path)
    assert FinetuneConfig.load(path) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_toml_cannot_hold_a_none_that_is_not_the_default(tmp_path: Path) -> None:
    """TOML has no null: ``weights=None`` (random start) would load back as "default", so
    it is refused; JSON holds it."""
    config = FinetuneConfig("tiny_cnn", "full", "digits", weights=None)
    with pytest.raises(ZooError, match="run setting weights is None, which TOML cannot hold"):
        config.save(tmp_path / "run.toml")
    assert not (tmp_path / "run.toml").exists()
    config.save(tmp_path / "run.json")
    assert FinetuneConfig.load(tmp_path / "run.json").weights is None


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("scheduler", lambda opt: None, "run setting scheduler is a function"),
    ("train", (torch.zeros(2, 3, 8, 8), torch.zeros(2)), r"run setting train\[0\] is a Tensor"),
    ("backbone", TINY, "run setting backbone is a Backbone"),
    ("callbacks", [Callback()], r"run setting callbacks\[0\] is a Callback"),
    ("feature_store", FeatureStore(0), "run setting feature_store is a FeatureStore"),
])
def test_saving_refuses_what_a_file_cannot_hold(tmp_path: Path, setting: str, value: Any,
                                                message: str) -> None:
    """Callables, tensors, Backbone objects and other Python objects are refused on save,
    naming the setting, and nothing is written (never silently dropped)."""
    config = FinetuneConfig(**{"backbone": "tiny_cnn", "strategy": "full", "train": "digits",
                               setting: value})
    with pytest.raises(ZooError, match=message):
        config.save(tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_from_dict_names_unknown_and_missing_settings() -> None:
    with pytest.raises(ZooError, match="unknown setting 'epoch'"):
        FinetuneConfig.from_dict({"backbone": "tiny_cnn", "strategy": "full",
                                  "train": "digits", "epoch": 3})
    with pytest.raises(ZooError, match="missing setting 'train'"):
        FinetuneConfig.from_dict({"backbone": "tiny_cnn", "strategy": "full"})


# --------------------------------------------------------------------------- callbacks


class Events(Callback):
    """Records every hook call in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.histories: list[int] = []

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        self.events.append(("start", epoch))

    def on_batch_end(self, run: Run, epoch: int, batch: int, loss: torch.Tensor) -> None:
        assert loss.ndim == 0 and torch.isfinite(loss)
        self.events.append(("batch", epoch, batch))

    def on_train_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        assert "val_accuracy" not in record  # before validation
        self.events.append(("trained", epoch))

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        self.histories.append(len(run.history))
        assert run.history[-1] is record  # the history callback ran first
        self.events.append(("end", epoch))


def test_on_batch_end_is_called_once_per_batch(tiny: zoo.Backbone, digits: Callable) -> None:
    """50 images in batches of 10: five on_batch_end calls per epoch, numbered 0-4, between
    the epoch's start and the end of its training part; the history holds each epoch's
    record before the user's callbacks see it."""
    events = Events()
    result = train_tiny(digits(5), digits(2, "val"), epochs=2, callbacks=[events])
    expected = []
    for epoch in range(2):
        expected += [("start", epoch), *(("batch", epoch, b) for b in range(5)),
                     ("trained", epoch), ("end", epoch)]
    assert events.events == expected
    assert events.histories == [1, 2] and len(result.history) == 2


class FourHooks:
    """A callback written before on_batch_end existed, not a zoo.Callback subclass."""

    def __init__(self) -> None:
        self.ends: list[int] = []

    def on_train_start(self, run: Run) -> None: ...
    def on_epoch_start(self, run: Run, epoch: int) -> None: ...
    def on_train_end(self, run: Run, result: Any) -> None: ...

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        self.ends.append(epoch)


def test_a_callback_with_only_the_original_hooks_still_works(tiny: zoo.Backbone,
                                                            digits: Callable) -> None:
    old = FourHooks()
    train_tiny(digits(2), epochs=2, callbacks=[old])
    assert old.ends == [0, 1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_the_batches_on_a_terminal_only(tiny: zoo.Backbone,
                                                            digits: Callable) -> None:
    """A bar per epoch over its 5 batches, ticked once per batch, drawn on a terminal; a
    log file gets nothing."""
    tty, log = Tty(), io.StringIO()
    bar = ProgressBar(tty)
    ticks = Ticks(bar)
    train_tiny(digits(5), epochs=2, callbacks=[bar, ticks, ProgressBar(log)])
    assert ticks.counts == [(5, 5), (5, 5)]
    text = tty.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "/5 [" in text
    assert log.getvalue() == ""


class Ticks(Callback):
    """Reads a progress bar's count and total at the end of each epoch."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar
        self.counts: list[tuple[int, int]] = []

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        self.counts.append((self.bar.bar.n, self.bar.bar.total))


def tiny_run() -> Run:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return Run(TINY, make_strategy("full"), model, optimizer, None, NAMES, 3,
               torch.device("cpu"))


def take_a_step(run: Run) -> None:
    loss = run.model(images()).sum()
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad()


CONFIG = {"backbone": "tiny_cnn", "num_classes": 3, "strategy": {"name": "full"}}
RECORD = {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "trainable_params": 10,
          "epoch_time_s": 0.1, "time_s": 0.1}


def test_resume_state_saves_and_restores_weights_optimizer_rng_and_history(
        tmp_path: Path) -> None:
    run = tiny_run()
    take_a_step(run)
    History().on_epoch_end(run, 0, dict(RECORD))
    saver = ResumeState(tmp_path, CONFIG, BestEpoch("last", None, [], has_val=False))
    saver.on_epoch_end(run, 0, run.history[-1])
    after_save = torch.rand(3)
    assert read_resume(tmp_path / RESUME_FILE)["epoch"] == 0

    fresh = tiny_run()
    loader = ResumeState(None, CONFIG, BestEpoch("last", None, [], has_val=False))
    assert loader.restore(tmp_path, fresh) == 1  # the next epoch
    assert torch.equal(torch.rand(3), after_save)
    assert fresh.history == run.history
    for (name, mine), theirs in zip(fresh.model.state_dict().items(),
                                    run.model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"],
                       run.optimizer.state_dict()["state"][0]["exp_avg"])


def test_resume_state_refuses_another_run_and_a_damaged_file(tmp_path: Path) -> None:
    run = tiny_run()
    History().on_epoch_end(run, 0, dict(RECORD))
    ResumeState(tmp_path, CONFIG, BestEpoch("last", None, [], False)).save(run, 0)
    other = ResumeState(None, {**CONFIG, "num_classes": 4}, BestEpoch("last", None, [], False))
    with pytest.raises(ZooError, match="belongs to a different run"):
        other.restore(tmp_path, tiny_run())
    (tmp_path / RESUME_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ZooError, match="corrupt or not a zoo resume state"):
        other.restore(tmp_path, tiny_run())
    with pytest.raises(ZooError, match="nothing to resume"):
        other.restore(tmp_path / "elsewhere", tiny_run())


def test_resume_state_writes_only_with_a_folder_on_rank_0(tmp_path: Path) -> None:
    run = tiny_run()
    History().on_epoch_end(run, 0, dict(RECORD))
    ResumeState(None, CONFIG, BestEpoch("last", None, [], False)).on_epoch_end(run, 0, RECORD)
    ResumeState(tmp_path, CONFIG, BestEpoch("last", None, [], False), main=False
                ).on_epoch_end(run, 0, RECORD)
    assert list(tmp_path.iterdir()) == []


def test_nan_guard_names_the_epoch_and_the_last_good_state(tmp_path: Path) -> None:
    run, guard = tiny_run(), NanGuard(tmp_path, lr=0.5)
    guard.on_train_epoch_end(run, 2, {"train_loss": 0.7})  # finite: nothing happens
    guard.on_epoch_end(run, 2, {"val_loss": 0.7})
    with pytest.raises(ZooError, match=r"training loss became nan in epoch 3; the last good "
                                       r"state is in .*resume.pt \(after epoch 2\); lower the "
                                       r"learning rate \(--lr, now 0.5\)"):
        guard.on_train_epoch_end(run, 2, {"train_loss": float("nan")})
    with torch.no_grad():
        run.model.head.bias[0] = float("inf")
    guard.on_train_epoch_end(run, 0, {"train_loss": 0.7})  # weights: checked after validation
    with pytest.raises(ZooError, match=r"the weights became nan/inf \(1 tensors, e\.g\. "
                                       r"'head.bias'\) in epoch 1; lower"):
        guard.on_epoch_end(run, 0, {"val_loss": 0.7})


def test_best_epoch_stops_the_run_after_patience_epochs_without_improvement() -> None:
    run = tiny_run()
    keeper = BestEpoch("best", patience=2, names=["head.bias"], has_val=True)
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.55]):
        assert not run.stop
        with torch.no_grad():
            run.model.head.bias.fill_(epoch)
        keeper.on_epoch_end(run, epoch, {"val_accuracy": accuracy, "val_loss": 1.0})
    assert run.stop and keeper.epoch == 1
    keeper.restore(run.model)
    assert torch.equal(run.model.head.bias, torch.ones(3))  # epoch 1's copy


# --------------------------------------------------------------------------- evaluation


def test_validation_and_evaluate_count_with_the_same_loop(tiny: zoo.Backbone,
                                                          digits: Callable) -> None:
    """The last epoch's validation numbers are what zoo.evaluate reports for the returned
    model on the same data."""
    val = digits(3, "val")
    result = train_tiny(digits(5), val, keep="last")
    report = zoo.evaluate(result.model, val)
    assert report["accuracy"] == result.metrics["val_accuracy"]
    assert report["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-6)


def test_evaluation_loop_makes_its_tally_from_the_first_batch() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    batches = [(torch.arange(2), logits[:2], torch.tensor([0, 2])),
               (torch.arange(2, 3), logits[2:], torch.tensor([2]))]
    made: list[int] = []

    def tally_for(num_classes: int) -> Tally:
        made.append(num_classes)
        return Tally(same_classes(num_classes))

    tally = evaluation_loop(batches, lambda idx, x: x, tally_for, torch.device("cpu"))
    assert made == [3] and tally is not None
    assert tally.samples == 3 and tally.correct == 2
    assert evaluation_loop([], lambda idx, x: x, tally_for, torch.device("cpu")) is None
