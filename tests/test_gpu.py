"""The GPU path (issue 17): AMP, channels_last, compile, the feature cache and resume on the
device, and a GPU-trained checkpoint used on CPU. Tests marked ``gpu`` run only where CUDA
is available (``pytest -m gpu`` on a card); the rest check, on CPU, the parts of the input
pipeline and of the frozen prefix that every run goes through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, InterruptAfter, TinyNet, quick_finetune
from torch import nn

import zoo
from zoo.data.feature_cache import FeatureStore
from zoo.models.groups import FreezeState
from zoo.training.callbacks import RESUME_FILE, Callback, Run
from zoo.training.device import gather, input_workers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture
def base(pretrained: Callable[..., str]) -> str:
    """``test_tiny_cnn``: the tiny backbone with local "pretrained" weights."""
    return pretrained(TINY)


@pytest.fixture(scope="module")
def train_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """40 real 8x8 digits, four of each class, as a uint8 (x, y) pair."""
    return digits(4)


@pytest.fixture(scope="module")
def val_xy(digits: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return digits(2, "val")


def finetune(backbone: str, strategy: str, train: Any, val: Any = None,
             **kwargs: Any) -> zoo.FinetuneResult:
    return quick_finetune(backbone, strategy, train, val, **{"epochs": 2, **kwargs})


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# --------------------------------------------------------------------------- CPU


def test_workers_are_chosen_automatically_and_cpu_keeps_zero() -> None:
    """Issue 17.3: num_workers=None means min(8, CPUs) on CUDA and 0 on CPU (so CPU runs
    stay bitwise what they were); an explicit number is kept."""
    assert input_workers(None, torch.device("cpu")) == 0
    assert 1 <= input_workers(None, torch.device("cuda")) <= 8
    assert input_workers(3, torch.device("cuda")) == 3
    assert input_workers(2, torch.device("cpu")) == 2


def test_a_cpu_run_reports_its_input_pipeline(base: str, train_xy: Any) -> None:
    """Issue 17.3: the run's metrics say how images were read (0 workers, no pinning on CPU)."""
    result = finetune(base, "linear_probe", train_xy, epochs=1)
    assert result.metrics["input_pipeline"] == {"num_workers": 0, "pin_memory": False}


def test_gather_is_plain_indexing_without_pinning() -> None:
    """Issue 17.3: batches from in-memory tensors are ``x[idx]`` exactly (pinned on CUDA)."""
    x = torch.arange(60, dtype=torch.uint8).view(6, 10)
    idx = torch.tensor([4, 0, 5])
    assert torch.equal(gather(x, idx), x[idx])


class DropNet(TinyNet):
    """TinyNet with a dropout after the stem that belongs to no layer group."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop = nn.Dropout(0.5)


def drop_stages(model: DropNet) -> list[zoo.Stage]:
    return [zoo.Stage(("stem",), lambda x: model.drop(model.stem(x))),
            zoo.Stage(("block",), model.block), zoo.Stage(("head",), model.forward_head)]


def test_the_uncached_prefix_switches_only_ungrouped_modules_with_the_same_results(
        pretrained: Callable[..., str], train_xy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17.5a: without the cache, the frozen prefix no longer puts the whole model in
    eval mode every batch, only the modules no group owns (frozen groups are pinned by
    hooks). A dropout in the prefix that belongs to no group still runs in eval mode, and
    training ends with bitwise the weights the old whole-model switch gave."""
    spec = dataclasses.replace(TINY, name="tiny_drop", builder=DropNet, stages=drop_stages)
    name = pretrained(spec)
    seen: list[bool] = []

    class Watch(Callback):
        def on_train_start(self, run: Run) -> None:
            run.model.drop.register_forward_pre_hook(lambda m, _: seen.append(m.training))

    now = finetune(name, "partial", train_xy, cache=False, callbacks=[Watch()],
                   strategy_options={"frozen_groups": 1})
    assert seen and not any(seen)  # the dropout ran in eval mode every time
    ungrouped = FreezeState(now.model, spec.layer_groups(now.model)).ungrouped()
    assert now.model in ungrouped and now.model.drop in ungrouped
    assert now.model.stem not in ungrouped and now.model.head not in ungrouped

    # The old behaviour: every module of the model switched around each prefix call.
    monkeypatch.setattr(FreezeState, "ungrouped", lambda self: list(self.model.modules()))
    before = finetune(name, "partial", train_xy, cache=False,
                      strategy_options={"frozen_groups": 1})
    assert states_equal(now.model, before.model)
    assert now.history[-1]["train_loss"] == before.history[-1]["train_loss"]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["full", "partial"])
def test_amp_fine_tune_on_the_gpu(strategy: str, base: str, train_xy: Any,
                                  val_xy: Any) -> None:
    """Issue 17.4: on CUDA, bf16 autocast is on by default, the model trains on the device
    and its loss is finite; channels_last is the default for a convnet."""
    result = finetune(base, strategy, train_xy, val_xy, device="cuda",
                      strategy_options={"frozen_groups": 1} if strategy == "partial" else None)
    assert next(result.model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    conv = result.model.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert result.metrics["input_pipeline"]["pin_memory"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_channels_last_off_and_on_train_the_same_model(base: str, train_xy: Any) -> None:
    """Issue 17.4: channels_last changes the memory layout, not the result (fp32, no AMP)."""
    a = finetune(base, "full", train_xy, device="cuda", amp=False, channels_last=False)
    b = finetune(base, "full", train_xy, device="cuda", amp=False, channels_last=True)
    assert b.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not a.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_training_matches_eager_on_the_gpu(base: str, train_xy: Any) -> None:
    """Issue 17.4: compile=True trains the same model as eager (to rounding), on the card."""
    eager = finetune(base, "full", train_xy, device="cuda", amp=False, epochs=1)
    compiled = finetune(base, "full", train_xy, device="cuda", amp=False, epochs=1,
                        compile=True)
    for (k, p), q in zip(eager.model.state_dict().items(),
                         compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_feature_cache_on_the_gpu_matches_the_uncached_run(base: str, train_xy: Any,
                                                           val_xy: Any) -> None:
    """Issue 17.4: with the frozen prefix computed once on the device (under the same
    autocast as the uncached path) training ends where the uncached run does."""
    store = FeatureStore()
    cached = finetune(base, "linear_probe", train_xy, val_xy, device="cuda",
                      feature_store=store)
    uncached = finetune(base, "linear_probe", train_xy, val_xy, device="cuda", cache=False)
    assert cached.metrics["feature_cache"] == {"hits": 1, "misses": 2}
    for (k, p), q in zip(cached.model.state_dict().items(),
                         uncached.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_the_gpu(base: str, train_xy: Any, val_xy: Any, tmp_path: Path) -> None:
    """Issue 17.4: a run interrupted on the card resumes there (the state file loads to CPU
    first) and ends where the uninterrupted run does."""
    kwargs = dict(epochs=3, device="cuda", checkpoint_kind="full")
    straight = finetune(base, "gradual", train_xy, val_xy, output_dir=tmp_path / "A", **kwargs)
    with pytest.raises(zoo.ZooError, match="interrupted"):
        finetune(base, "gradual", train_xy, val_xy, output_dir=tmp_path / "B",
                 callbacks=[InterruptAfter(0)], **kwargs)
    assert torch.load(tmp_path / "B" / RESUME_FILE, weights_only=True)["epoch"] == 0
    resumed = finetune(base, "gradual", train_xy, val_xy, resume=tmp_path / "B", **kwargs)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert next(resumed.model.parameters()).device.type == "cuda"
    for (k, p), q in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_trained_on_the_gpu_predicts_the_same_on_cpu(
        base: str, train_xy: Any, val_xy: Any, tmp_path: Path) -> None:
    """Issue 17.4: the checkpoint of a GPU run holds exactly its weights and loads on CPU,
    where it predicts what the model predicted on the card."""
    trained = finetune(base, "partial", train_xy, val_xy, device="cuda",
                       output_dir=tmp_path / "ckpt", checkpoint_kind="full",
                       strategy_options={"frozen_groups": 1})
    loaded = zoo.load_checkpoint(tmp_path / "ckpt")
    assert next(loaded.parameters()).device.type == "cpu"
    assert states_equal(trained.model, loaded)
    on_gpu = zoo.evaluate(trained.model, val_xy, device="cuda")
    on_cpu = zoo.evaluate(loaded, val_xy, device="cpu")
    assert on_cpu["accuracy"] == on_gpu["accuracy"]
    assert on_cpu["loss"] == pytest.approx(on_gpu["loss"], rel=1e-3, abs=1e-4)
