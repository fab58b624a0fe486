"""zoo.predict and zoo.embed (issue 16.4): images as paths, PIL images or tensors, the
checkpoint's own preprocessing, and the `zoo predict` / `zoo embed` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import zoo
from zoo.cli import main
from zoo.data.sources import load_image
from zoo.data.transforms import transform_from_config

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (210, 30, 20)}


def _folder(root: Path) -> Path:
    """Three colour classes, images of mixed sizes (so each one is fitted on its own)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            h, w = 18 + 3 * i, 30 - 2 * i
            noise = rng.integers(-30, 30, (h, w, 3))
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def trained(tiny: zoo.Backbone, tmp_path: Path) -> tuple[Path, Path, Any]:
    """A tiny checkpoint trained on a colour folder: (checkpoint dir, data dir, model)."""
    data = _folder(tmp_path / "colours")
    result = zoo.finetune(tiny.name, "partial", str(data), weights=None, epochs=1,
                          batch_size=8, output_dir=tmp_path / "ckpt", quiet=True)
    return tmp_path / "ckpt", data, result.model


def _images(data: Path) -> list[Path]:
    return sorted(data.glob("*/*.png"))


@pytest.mark.slow
def test_predict_agrees_on_paths_pil_and_tensors(trained: tuple[Path, Path, Any]) -> None:
    """Issue 16.4: a file, the same picture as a PIL image, as a uint8 CHW tensor and as a
    float [0, 1] tensor all give the same top-k classes and probabilities."""
    ckpt, data, _ = trained
    paths = _images(data)[:4]
    pils = [Image.open(p).convert("RGB") for p in paths]
    uint8 = [load_image(p) for p in paths]
    floats = [t.float() / 255 for t in uint8]
    by_path = zoo.predict(ckpt, paths, top_k=3, batch_size=3)
    assert len(by_path) == 4 and all(len(row) == 3 for row in by_path)
    assert all(name in COLOURS for row in by_path for name, _ in row)
    # float images are resized without rounding to 8 bits: equal to ~1e-5, not bitwise
    for other, tolerance in ((pils, 0.0), (uint8, 0.0), (floats, 1e-4)):
        got = zoo.predict(ckpt, other, top_k=3)
        for a, b in zip(by_path, got, strict=True):
            assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=tolerance)
            assert [n for n, _ in a] == [n for n, _ in b]


def test_predict_probabilities_match_evaluate(trained: tuple[Path, Path, Any]) -> None:
    """Issue 16.4: predict fits images exactly as evaluate does: its probabilities give the
    same accuracy and loss on the same images."""
    ckpt, data, model = trained
    metrics = zoo.evaluate(model, str(data), split="val")
    val = zoo.load_data(str(data), "val")
    paths = [val._origin.root / val._origin.files[i] for i in val._index.tolist()]
    rows = zoo.predict(ckpt, paths, top_k=3)
    names = val.classes
    probs = torch.tensor([[dict(row)[c] for c in names] for row in rows])
    labels = val.targets
    loss = float(torch.nn.functional.nll_loss(probs.log(), labels))
    accuracy = float((probs.argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert loss == pytest.approx(metrics["loss"], abs=1e-5)


def test_embed_is_the_heads_input(trained: tuple[Path, Path, Any]) -> None:
    """Issue 16.4: the head applied to embed's vectors gives the model's own logits."""
    _, data, model = trained
    paths = _images(data)[:5]
    vectors = zoo.embed(model, paths, batch_size=2)
    assert vectors.shape == (5, 16)
    transform = transform_from_config(model.zoo_config["preprocessing"])
    x = torch.cat([transform.prepare_image(load_image(p)) for p in paths])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.head(vectors), model(x), atol=1e-5)


def test_embed_at_a_group_gives_its_output(trained: tuple[Path, Path, Any]) -> None:
    """Issue 16.4: at="stem" / at="block" give those groups' outputs (C x H x W per image);
    a group that is no stage boundary is an error listing the ones that are."""
    _, data, model = trained
    paths = _images(data)[:3]
    assert zoo.embed(model, paths, at="stem").shape == (3, 8, 16, 16)
    assert zoo.embed(model, paths, at="block").shape == (3, 16, 8, 8)
    with pytest.raises(zoo.ZooError, match="stem, block") as info:
        zoo.embed(model, paths, at="layer9")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
@pytest.mark.slow
def test_embed_cli_writes_a_file_that_loads_back(trained: tuple[Path, Path, Any],
                                                 tmp_path: Path, suffix: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.4: `zoo embed` writes .npy / .safetensors holding embed()'s vectors, never
    over an existing file without --overwrite."""
    ckpt, data, _ = trained
    paths = [str(p) for p in _images(data)[:4]]
    out = tmp_path / f"vectors{suffix}"
    assert main(["embed", str(ckpt), *paths, "--out", str(out)]) == 0
    expected = zoo.embed(ckpt, paths)
    loaded = (torch.from_numpy(np.load(out)) if suffix == ".npy"
              else load_file(out)["embeddings"])
    assert torch.equal(loaded, expected)
    before = out.read_bytes()
    assert main(["embed", str(ckpt), *paths[:1], "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["embed", str(ckpt), *paths[:1], "--out", str(out), "--overwrite",
                 "--at", "stem"]) == 0
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_predict_cli_keeps_its_format(trained: tuple[Path, Path, Any],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.4: `zoo predict` (now through zoo.predict) prints each path, then one
    `probability index name` line per class."""
    ckpt, data, _ = trained
    paths = [str(p) for p in _images(data)[:2]]
    assert main(["predict", str(ckpt), *paths, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and lines[3] == paths[1]
    expected = zoo.predict(ckpt, paths[:1], top_k=2)[0]
    for line, (name, p) in zip(lines[1:3], expected, strict=True):
        prob, index, shown = line.split()
        assert shown == name and prob == f"{p:.2%}"
        assert sorted(COLOURS)[int(index)] == name


def test_predict_refuses_bad_images_in_one_line(trained: tuple[Path, Path, Any],
                                                tmp_path: Path) -> None:
    """Issue 16.4: a missing file, a normalised float tensor or an HWC array is a one-line
    ZooError."""
    ckpt, _, _ = trained
    cases = [tmp_path / "missing.png", torch.full((3, 8, 8), -1.0),
             np.zeros((8, 8, 3), np.uint8)]
    for bad in cases:
        with pytest.raises(zoo.ZooError) as info:
            zoo.predict(ckpt, [bad])
        assert "\n" not in str(info.value)
