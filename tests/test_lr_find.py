"""Issue 15 (lr-find): the learning-rate range test on a tiny backbone — a suggestion, a
valid PNG, the caller's model untouched; and the `zoo lr-find` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.core.errors import ZooError
from zoo.training.lr_find import lr_find, suggest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_range_test_suggests_a_rate_writes_a_png_and_leaves_the_model_alone(
        tiny: zoo.Backbone, digits: Any, tmp_path: Path) -> None:
    """Issue 15 lr-find: exponentially growing rates, a suggestion inside the range, a
    valid PNG; the caller's model weights are unchanged."""
    x, y = digits(8)
    model = zoo.create_model(tiny, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_find(tiny, "full", (x, y), model=model, weights=None, num_iter=40,
                     batch_size=16, out=tmp_path / "lr.png")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert result.lrs[0] == pytest.approx(1e-7)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))  # exponential
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert len(result.losses) == len(result.lrs) <= 40
    assert result.plot.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png"]


def test_suggestion_is_the_steepest_descent() -> None:
    """Issue 15 lr-find: on a made-up loss curve the suggestion is where it falls fastest
    (against log lr), and min/10 is a tenth of the minimum's rate."""
    lrs = [10 ** (-7 + i * 0.08) for i in range(100)]
    losses = [2.0 - 1.5 / (1 + pow(2.718, -(i - 60) / 3)) + (0.02 * (i - 80) ** 2
              if i > 80 else 0) for i in range(100)]
    steep, minimum = suggest(lrs, losses)
    assert steep == pytest.approx(lrs[60], rel=0.2)
    assert minimum == pytest.approx(min(zip(losses, lrs, strict=True))[1] / 10)


def test_cli_prints_a_suggestion_and_writes_the_png(tiny: zoo.Backbone, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15 lr-find: `zoo lr-find BACKBONE STRATEGY --data D --out PNG`; an existing
    file is not overwritten (one-line error, exit 2)."""
    out = tmp_path / "find.png"
    args = ["lr-find", "tiny_cnn", "linear_probe", "--data", "digits", "--weights", "none",
            "--num-iter", "20", "--batch-size", "32", "--limit-per-class", "5", "--out",
            str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "suggested learning rate" in printed and str(out) in printed
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_ranges_are_refused() -> None:
    """Issue 15 lr-find: one clear error before anything is built."""
    with pytest.raises(ZooError, match="start_lr < end_lr"):
        lr_find("tiny_cnn", "full", "digits", start_lr=1.0, end_lr=0.1)
