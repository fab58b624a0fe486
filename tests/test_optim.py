"""Issue 15 (optimisation): no decay on norms/biases, label smoothing, per-batch schedules
with warmup that keep per-group rates, gradient accumulation and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.training.optim import (
    SCHEDULES,
    GradientStep,
    build_optimizer,
    build_scheduler,
    classification_loss,
    no_decay_names,
    schedule_factor,
)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5))


def zoo_groups(model: nn.Module) -> list[dict]:
    """Two layer groups at their own rates, as zoo's runner registers them."""
    params = list(model.parameters())
    return [{"params": params[:4], "lr": 1e-4, "name": "body"},
            {"params": params[4:], "lr": 1e-3, "name": "head"}]


def test_norms_and_biases_get_no_weight_decay_and_groups_keep_their_rates() -> None:
    """Issue 15 (done when): no decay on norm/bias params; each layer group keeps its name
    and lr in both halves."""
    model = small_model()
    opt = build_optimizer(zoo_groups(model), "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            decays = not (p.ndim <= 1)
            assert group["weight_decay"] == (0.05 if decays else 0.0), names[id(p)]
    assert {(g["name"], g["lr"]) for g in opt.param_groups} == {("body", 1e-4), ("head", 1e-3)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert no_decay_names(model) == {"0.bias", "1.weight", "1.bias", "4.bias", "5.weight",
                                     "5.bias"}


def test_decay_on_everything_when_asked_and_sgd_momentum() -> None:
    """Issue 15 optimisation: optimizer choice and the opt-out."""
    model = small_model()
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9,
                          decay_norm_and_bias=True)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 for g in opt.param_groups)
    with pytest.raises(ZooError, match="unknown optimizer 'adam'.*adamw, sgd"):
        build_optimizer(model, "adam")


def test_model_no_weight_decay_names_are_exempt() -> None:
    """Issue 15 optimisation: what a model lists in no_weight_decay() (ViT's pos_embed) is
    not decayed, as in timm."""
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.fc = nn.Linear(8, 2)

        def no_weight_decay(self) -> set[str]:
            return {"pos_embed"}

    model = WithToken()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    undecayed = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is model.pos_embed for p in undecayed)
    assert not any(p is model.fc.weight for p in undecayed)


def test_label_smoothing_changes_the_loss_as_computed_by_hand() -> None:
    """Issue 15 (done when): smoothing changes the loss value exactly as computed by hand."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    eps, k = 0.1, 3
    log_p = logits.log_softmax(1)
    by_hand = 0.0
    for i, y in enumerate(labels.tolist()):
        target = [eps / k] * k
        target[y] += 1 - eps
        by_hand += -sum(t * float(log_p[i, j]) for j, t in enumerate(target))
    by_hand /= 2
    plain = classification_loss(0.0)(logits, labels)
    smoothed = classification_loss(eps)(logits, labels)
    assert math.isclose(float(smoothed), by_hand, rel_tol=1e-6)
    assert not math.isclose(float(smoothed), float(plain), rel_tol=1e-3)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    expected = -(soft * log_p).sum(1).mean()
    torch.testing.assert_close(classification_loss(eps)(logits, soft), expected)


def test_warmup_lr_trace_and_per_group_rates_compose() -> None:
    """Issue 15 (done when): warmup's lr trace, stepped per batch, fractional warmup epochs;
    every group's own base rate is scaled by the same factor."""
    model = small_model()
    opt = build_optimizer(zoo_groups(model), lr=1e-3)
    sched = build_scheduler(opt, "cosine", epochs=3, steps_per_epoch=4, warmup_epochs=0.5)
    trace = []
    for _ in range(12):
        trace.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    head = [t["head"] for t in trace]
    assert head[:2] == pytest.approx([0.5e-3, 1e-3])  # 2 warmup steps: 1/2, 2/2
    cos = [1e-3 * 0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    assert head[2:] == pytest.approx(cos)
    assert [t["body"] for t in trace] == pytest.approx([h / 10 for h in head])


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_starts_near_its_peak_and_ends_low(name: str) -> None:
    """Issue 15 optimisation: cosine, linear, step, one-cycle, constant are per-step factors."""
    factors = [schedule_factor(s, 100, name, warmup_steps=10) for s in range(100)]
    assert all(0 <= f <= 1.0 + 1e-9 for f in factors)
    assert max(factors) == pytest.approx(1.0)
    if name == "constant":
        assert factors[10:] == [1.0] * 90
    else:
        assert factors[-1] < 0.1
    if name != "onecycle":
        assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_bad_schedule_arguments_are_one_line_errors() -> None:
    """Issue 15 optimisation: unknown scheduler and impossible warmup are clear errors."""
    opt = build_optimizer(small_model(), lr=1e-3)
    with pytest.raises(ZooError, match="unknown scheduler 'cosin'"):
        build_scheduler(opt, "cosin", epochs=1, steps_per_epoch=1)
    with pytest.raises(ZooError, match="warmup_epochs must be between 0 and epochs"):
        build_scheduler(opt, "cosine", epochs=2, steps_per_epoch=5, warmup_epochs=3)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulating_n_micro_batches_matches_one_n_times_batch(optimizer: str) -> None:
    """Issue 15 (done when): accumulation over N micro-batches gives the same weights as an
    N x batch, within float tolerance (with clipping on, so the clip sees the same norm)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    big, small = mlp(1), mlp(1)
    loss_fn = classification_loss(0.1)
    steppers = []
    for model in (big, small):
        opt = build_optimizer(model, optimizer, lr=0.05, weight_decay=0.01)
        sched = build_scheduler(opt, "linear", epochs=1, steps_per_epoch=3, warmup_epochs=0.4)
        steppers.append(GradientStep(opt, accumulate=1 if model is big else 4, clip_grad=0.5,
                                     scheduler=sched))
    for step in range(3):
        chunk = slice(step * 16, (step + 1) * 16)
        assert steppers[0].backward(loss_fn(big(x[chunk]), y[chunk]))
        for micro in range(4):
            part = slice(step * 16 + micro * 4, step * 16 + micro * 4 + 4)
            stepped = steppers[1].backward(loss_fn(small(x[part]), y[part]))
            assert stepped == (micro == 3)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert steppers[1].steps == 3 and steppers[0].last_grad_norm is not None


def test_clipping_bounds_the_gradient_norm_and_flush_steps_a_partial_accumulation() -> None:
    """Issue 15 optimisation: clip by norm before stepping; a partial accumulation at the
    end of an epoch is stepped, as the mean of what it holds."""
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stepper = GradientStep(opt, accumulate=4, clip_grad=1e-3)
    x = torch.randn(8, 6) * 100
    assert not stepper.backward(model(x).pow(2).mean())
    before = [p.detach().clone() for p in model.parameters()]
    assert stepper.flush() and not stepper.flush()
    after = [p.detach() for p in model.parameters()]
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, after, strict=True)))
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)  # lr 1 x clipped norm
    assert stepper.last_grad_norm > 1.0
