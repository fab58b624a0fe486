"""The runner: data in every accepted form, metrics and history, resume, the feature cache,
errors, and ``zoo.evaluate``.

Most tests use ``tiny_cnn`` (conftest.py): three layer groups (stem, block, head) and a
few thousand parameters, so a run over tiny real data (sklearn's digits) takes well under
a second; what is checked here is the runner's behaviour, which is the same for any
backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, InterruptAfter, quick_finetune
from safetensors.torch import load_file
from torch.utils.data import Dataset

import zoo
from zoo.core.errors import ZooError
from zoo.data.feature_cache import FeatureStore
from zoo.training.callbacks import RESUME_FILE, Callback, Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORD_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
               "trainable_params", "lrs", "epoch_time_s", "time_s"}


@pytest.fixture
def base(pretrained: Callable[..., str]) -> str:
    """``test_tiny_cnn``: the tiny backbone with local "pretrained" weights."""
    return pretrained(TINY)


@pytest.fixture(scope="module")
def train_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """20 real 8x8 digits, two of each class, as a uint8 (x, y) pair."""
    return digits(2)


@pytest.fixture(scope="module")
def val_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """30 held-out digits (the validation split), three of each class."""
    return digits(3, "val")


finetune = quick_finetune


# --------------------------------------------------------------------------- data forms


class DigitsDataset(Dataset):
    """A plain map-style torch Dataset: float CHW images in [0, 1] and int labels."""

    classes = [str(i) for i in range(10)]

    def __init__(self, xy: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.x, self.y = xy

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i].float() / 255, int(self.y[i])


def make_image_folder(root: Path) -> Path:
    """``root/<colour>/*.png``: 5 noisy 12x12 RGB images of each of three colours."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(["blue", "green", "red"]):
        (root / colour).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
            pixels[..., 2 - c] += 180
            Image.fromarray(pixels).save(root / colour / f"{i}.png")
    return root


@pytest.mark.parametrize("form", ["builtin name", "tensor pair", "image folder",
                                  "torch dataset"])
@pytest.mark.slow
def test_train_and_val_accept_every_data_form(form: str, tiny: zoo.Backbone, train_xy: Any,
                                              val_xy: Any, tmp_path: Path) -> None:
    if form == "builtin name":  # val defaults to the dataset's own validation split
        train, val, kwargs = "digits", None, {"limit_per_class": 2}
        classes, val_size = [str(i) for i in range(10)], 400
    elif form == "tensor pair":
        train, val, kwargs = train_xy, val_xy, {}
        classes, val_size = [str(i) for i in range(10)], 30
    elif form == "image folder":  # val defaults to a fixed 80/20 split of the folder
        train, val, kwargs = make_image_folder(tmp_path / "colours"), None, {}
        classes, val_size = ["blue", "green", "red"], 3
    else:
        train, val, kwargs = DigitsDataset(train_xy), DigitsDataset(val_xy), {}
        classes, val_size = [str(i) for i in range(10)], 30
    result = finetune(tiny.name, "partial", train, val, weights=None, **kwargs)
    assert result.config["class_names"] == classes
    assert result.config["num_classes"] == len(classes)
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    if val is None:
        val = train
    evaluated = zoo.evaluate(result.model, val)
    assert evaluated["samples"] == val_size
    assert evaluated["accuracy"] == pytest.approx(result.metrics["val_accuracy"])


def test_metrics_and_per_epoch_history(base: str, train_xy: Any, val_xy: Any) -> None:
    result = finetune(base, "linear_probe", train_xy, val_xy, epochs=3)
    metrics = result.metrics
    assert {"val_accuracy", "train_time_s", "trainable_params", "total_params"} <= set(metrics)
    assert metrics["trainable_params"] == 16 * 10 + 10  # the head only
    assert metrics["total_params"] == sum(p.numel() for p in result.model.parameters())
    assert metrics["epochs"] == 3
    # the metrics are the kept epoch's: the best one by default (tests/test_faithful_training)
    assert metrics["val_accuracy"] == result.history[metrics["kept_epoch"] - 1]["val_accuracy"]
    assert metrics["best_val_accuracy"] == max(h["val_accuracy"] for h in result.history)
    assert metrics["val_accuracy"] == metrics["best_val_accuracy"]
    assert metrics["last_val_accuracy"] == result.history[-1]["val_accuracy"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for record in result.history:
        assert set(record) >= RECORD_KEYS
        assert np.isfinite(record["train_loss"]) and 0 <= record["train_accuracy"] <= 1
    times = [h["time_s"] for h in result.history]
    assert times == sorted(times) and metrics["train_time_s"] >= times[-1]
    # lrs: the rates each group trained with that epoch (cosine schedule, 3 epochs).
    assert [h["lrs"]["head"] for h in result.history] == pytest.approx(
        [1e-2, 1e-2 * 0.75, 1e-2 * 0.25])
    assert result.checkpoint is None


# --------------------------------------------------------------------------- resume


def all_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, list | tuple) else ()
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(all_tensors(value, f"{prefix}/{key}"))
    return found


@pytest.mark.parametrize(("strategy", "augment"), [("gradual", False), ("full", True)])
@pytest.mark.slow
def test_resume_after_interruption_equals_the_uninterrupted_run_bitwise(
        strategy: str, augment: bool, base: str, train_xy: Any, val_xy: Any,
        tmp_path: Path) -> None:
    """gradual: the freeze state (and the cached prefix) must be restored; full with
    augmentation: the random streams must be."""
    kwargs = dict(epochs=3, augment=augment, checkpoint_kind="full")
    straight = finetune(base, strategy, train_xy, val_xy, output_dir=tmp_path / "A", **kwargs)

    with pytest.raises(ZooError, match=f"interrupted; .* resume with --resume {tmp_path}/B"):
        finetune(base, strategy, train_xy, val_xy, output_dir=tmp_path / "B",
                 callbacks=[InterruptAfter(0)], **kwargs)
    saved = torch.load(tmp_path / "B" / RESUME_FILE, weights_only=True)
    assert saved["epoch"] == 0 and len(saved["history"]) == 1

    seen_epochs: list[int] = []

    class Epochs(Callback):
        def on_epoch_start(self, run: Run, epoch: int) -> None:
            seen_epochs.append(epoch)

    resumed = finetune(base, strategy, train_xy, val_xy, resume=tmp_path / "B",
                       callbacks=[Epochs()], **kwargs)
    assert seen_epochs == [1, 2]
    assert resumed.checkpoint == tmp_path / "B"

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta = all_tensors(torch.load(tmp_path / "A" / RESUME_FILE, weights_only=True))
    tb = all_tensors(torch.load(tmp_path / "B" / RESUME_FILE, weights_only=True))
    assert ta.keys() == tb.keys() and any(k.startswith("/optimizer/state") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta
                                                         if not torch.equal(ta[k], tb[k])]
    fa, fb = (load_file(tmp_path / d / "model.safetensors") for d in "AB")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    for ha, hb in zip(straight.history, resumed.history, strict=True):
        assert (ha["train_loss"], ha["val_loss"], ha["lrs"], ha["trainable_params"]) == \
            (hb["train_loss"], hb["val_loss"], hb["lrs"], hb["trainable_params"])


def test_resume_refuses_another_runs_state(base: str, train_xy: Any, tmp_path: Path) -> None:
    finetune(base, "linear_probe", train_xy, output_dir=tmp_path / "run")
    with pytest.raises(ZooError, match="belongs to a different run"):
        finetune(base, "partial", train_xy, resume=tmp_path / "run", epochs=2)
    with pytest.raises(ZooError, match="nothing to resume"):
        finetune(base, "partial", train_xy, resume=tmp_path / "elsewhere")


# --------------------------------------------------------------------------- feature cache


@pytest.mark.parametrize(("strategy", "options"), [("linear_probe", None),
                                                   ("partial", {"frozen_groups": 1})])
def test_cached_and_uncached_training_end_with_the_same_weights(
        strategy: str, options: Any, base: str, train_xy: Any, val_xy: Any) -> None:
    store = FeatureStore()
    cached = finetune(base, strategy, train_xy, val_xy, epochs=2, strategy_options=options,
                      feature_store=store)
    uncached = finetune(base, strategy, train_xy, val_xy, epochs=2, strategy_options=options,
                        cache=False)
    # train and val computed once; the second epoch reads the train features again
    assert cached.metrics["feature_cache"] == {"hits": 1, "misses": 2}
    assert len(store) == 2
    assert "feature_cache" not in uncached.metrics
    a, b = cached.model.state_dict(), uncached.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert cached.history[-1]["val_accuracy"] == uncached.history[-1]["val_accuracy"]


def test_cache_is_recomputed_when_gradual_unfreezes_and_shared_across_runs(
        base: str, train_xy: Any, val_xy: Any) -> None:
    store = FeatureStore()
    gradual = finetune(base, "gradual", train_xy, val_xy, epochs=3, feature_store=store)
    # epoch 1: stem+block frozen; epoch 2: stem frozen; epoch 3: nothing frozen.
    # Each new frozen prefix is a new cache entry, for the train and the val data.
    assert gradual.metrics["feature_cache"] == {"hits": 0, "misses": 4}
    assert len(store) == 4
    # A later run freezing the same prefix of the same base on the same data reuses it.
    probe = finetune(base, "linear_probe", train_xy, val_xy, feature_store=store)
    assert probe.metrics["feature_cache"] == {"hits": 2, "misses": 0}
    # Other data is another key.
    other = finetune(base, "linear_probe", (train_xy[0][:10], train_xy[1][:10]), val_xy,
                     feature_store=store, num_classes=10)
    assert other.metrics["feature_cache"] == {"hits": 1, "misses": 1}


def test_augmentation_turns_the_cache_off(base: str, train_xy: Any) -> None:
    store = FeatureStore()
    result = finetune(base, "linear_probe", train_xy, augment=True, feature_store=store)
    assert len(store) == 0 and "feature_cache" not in result.metrics
    for kwargs in ({"augment": True}, {"cache": False}):
        with pytest.raises(zoo.IncompatibleError, match="feature_extract computes the frozen "
                                                        "features once"):
            finetune(base, "feature_extract", train_xy, **kwargs)


# --------------------------------------------------------------------------- errors


def test_labels_out_of_range_are_refused(tiny: zoo.Backbone, train_xy: Any) -> None:
    x, y = train_xy
    with pytest.raises(ZooError, match=r"validation labels must be in 0\.\.9, found 0\.\.12"):
        finetune(tiny.name, "full", (x, y), (x[:3], torch.tensor([0, 1, 12])), weights=None)
    with pytest.raises(ZooError, match="num_classes=5 but the training data has 10 classes"):
        finetune(tiny.name, "full", (x, y), weights=None, num_classes=5)
    with pytest.raises(ZooError, match="negative label"):
        finetune(tiny.name, "full", (x, y - 1), weights=None)


class PoisonHead(Callback):
    """Puts a NaN into the head's weights at the start of epoch ``epoch`` (0-based)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if epoch == self.epoch:
            with torch.no_grad():
                run.model.head.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_the_run_with_a_clear_error(base: str, train_xy: Any,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="training loss became nan in epoch 1; lower the"):
        finetune(base, "linear_probe", train_xy, callbacks=[PoisonHead(0)])
    out = tmp_path / "run"
    with pytest.raises(ZooError, match=f"loss became nan in epoch 2; the last good state is "
                                       f"in {out}"):
        finetune(base, "linear_probe", train_xy, epochs=2, output_dir=out,
                 callbacks=[PoisonHead(1)])
    saved = torch.load(out / RESUME_FILE, weights_only=True)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_huge_learning_rate_is_caught(base: str, train_xy: Any) -> None:
    with pytest.raises(ZooError, match="training loss became (nan|inf)"):
        finetune(base, "full", train_xy, lr=1e30, epochs=2)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_a_trained_and_a_reloaded_model(base: str, train_xy: Any, val_xy: Any,
                                                 tmp_path: Path) -> None:
    result = finetune(base, "partial", train_xy, val_xy, output_dir=tmp_path / "run")
    scores = zoo.evaluate(result.model, val_xy)
    numbers = {"accuracy", "top5_accuracy", "loss", "samples"}  # and per class (issue 13.3)
    assert numbers | {"per_class", "confusion_matrix", "class_names"} <= set(scores)
    assert scores["samples"] == 30
    assert scores["accuracy"] == pytest.approx(result.metrics["val_accuracy"])
    assert scores["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    assert scores["top5_accuracy"] >= scores["accuracy"]
    reloaded = zoo.evaluate(zoo.load_checkpoint(result.checkpoint), val_xy)
    assert {k: reloaded[k] for k in numbers} == pytest.approx({k: scores[k] for k in numbers})
    assert reloaded["confusion_matrix"] == scores["confusion_matrix"]


def test_evaluate_needs_to_know_the_preprocessing(tiny: zoo.Backbone, val_xy: Any) -> None:
    model = zoo.create_model(tiny.name, num_classes=10)
    with pytest.raises(ZooError, match="carries no preprocessing"):
        zoo.evaluate(model, val_xy)
    transform = zoo.transforms_for(tiny.name, weights=None)
    assert zoo.evaluate(model, val_xy, transform=transform)["samples"] == 30
