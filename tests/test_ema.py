"""Issue 15 (EMA of the weights): ModelEma follows the formula, differs from the raw
weights, handles buffers, swaps in for evaluation and restores the raw weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.training.ema import ModelEma


def model_with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train_steps(model: nn.Module, ema: ModelEma, steps: int) -> list[dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    for i in range(steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        ema.update(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    return snapshots


def test_ema_follows_the_formula_and_differs_from_the_raw_weights() -> None:
    """Issue 15 (done when): EMA weights differ from the raw ones and follow
    ema = d * ema + (1 - d) * w, buffers included; integer buffers are copied."""
    model = model_with_bn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, decay=0.9)
    snapshots = train_steps(model, ema, 5)
    for name, first in start.items():
        if not first.is_floating_point():
            assert torch.equal(ema.shadow[name], snapshots[-1][name])
            continue
        expected = first.clone()
        for snap in snapshots:
            expected = 0.9 * expected + 0.1 * snap[name]
        torch.testing.assert_close(ema.shadow[name], expected)
    assert not torch.allclose(ema.shadow["0.weight"], model.state_dict()["0.weight"])
    assert not torch.allclose(ema.shadow["1.running_mean"], model.state_dict()["1.running_mean"])


def test_applied_swaps_the_average_in_and_restores_the_raw_weights() -> None:
    """Issue 15 EMA: evaluate with EMA weights swapped in; raw weights restored after, also
    when the block raises; the optimizer's parameters stay the same objects."""
    model = model_with_bn()
    ema = ModelEma(model, decay=0.5)
    train_steps(model, ema, 3)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    x = torch.randn(5, 4)
    with ema.applied(model.eval()) as swapped:
        assert torch.equal(swapped.state_dict()["0.weight"], ema.shadow["0.weight"])
        out_ema = model(x)
    with pytest.raises(RuntimeError), ema.applied(model):
        raise RuntimeError("boom")
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert not torch.allclose(out_ema, model(x))


def test_state_dict_round_trip_and_warmup() -> None:
    """Issue 15 EMA: resumable state; warmup decay grows as (1 + n) / (10 + n)."""
    model = model_with_bn()
    ema = ModelEma(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    train_steps(model, ema, 2)
    assert ema.current_decay() == pytest.approx(3 / 12)
    other = ModelEma(model_with_bn(), decay=0.999, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())


def test_bad_decay_and_changed_models_are_clear_errors() -> None:
    """Issue 15 EMA: one-line errors."""
    with pytest.raises(ZooError, match="EMA decay must be between 0 and 1"):
        ModelEma(model_with_bn(), decay=1.5)
    ema = ModelEma(model_with_bn(), decay=0.9)
    with pytest.raises(ZooError, match="tensors changed"):
        ema.update(nn.Linear(2, 2))
