"""Issue 13.3, "class names, not indices": ``zoo.evaluate`` and ``zoo evaluate`` match the
data's classes to the model's by name.

A label is an index into the classes of the data it came from: a dogs-only folder labels
its dogs 0, which is "cat" for a cat/dog model. So evaluation maps classes by name (a
subset of the model's classes is fine, an unknown class is a one-line error), falls back
to indices only where one side has no names (and says so), and reports per-class accuracy
and a confusion matrix over the model's classes; ``--out`` writes them as
``evaluation.json`` and ``confusion_matrix.png``, never over files zoo did not write.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo import cli
from zoo.core.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Each class is a colour the tiny network learns in a few epochs: (R, G, B) emphasis.
COLOURS = {"bird": 1, "cat": 0, "dog": 2, "fox": 1}


def write_images(folder: Path, colour: str, count: int, seed: int) -> None:
    """``count`` noisy 12x12 RGB images dominated by ``colour``'s channel."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 70, (12, 12, 3), dtype=np.uint8)
        pixels[..., COLOURS[colour]] += 170
        Image.fromarray(pixels).save(folder / f"{colour}{i}.png")


def make_folder(root: Path, val: dict[str, int], train: dict[str, int] | None = None) -> Path:
    """``root/train/<class>`` and ``root/val/<class>``: evaluation reads all of val/."""
    for split, counts in (("train", train or dict.fromkeys(val, 1)), ("val", val)):
        for name, count in counts.items():  # a class's images are the same in every folder
            seed = zlib.crc32(f"{split}/{name}".encode())
            write_images(root / split / name, name, count, seed)
    return root


def train(tiny: zoo.Backbone, tmp_path: Path, classes: tuple[str, ...]) -> zoo.FinetuneResult:
    """A tiny model trained to tell ``classes`` apart, saved under ``tmp_path/run``."""
    data = make_folder(tmp_path / "train-data", dict.fromkeys(classes, 6),
                       dict.fromkeys(classes, 12))
    return zoo.finetune(tiny.name, "full", data, weights=None, epochs=8, batch_size=8,
                        lr=3e-2, image_size=16, quiet=True, output_dir=tmp_path / "run")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_counts(result: dict[str, Any]) -> None:
    """The per-class figures and the confusion matrix add up to the overall ones."""
    matrix = np.array(result["confusion_matrix"])
    n = len(result["class_names"])
    assert matrix.shape == (n, n)
    assert matrix.sum() == result["samples"]
    assert np.trace(matrix) / result["samples"] == pytest.approx(result["accuracy"])
    for row in result["per_class"]:
        assert result["class_names"][row["index"]] == row["class"]
        assert matrix[row["index"]].sum() == row["samples"] > 0
        assert matrix[row["index"], row["index"]] == row["correct"]
        assert row["accuracy"] == pytest.approx(row["correct"] / row["samples"])
    absent = set(range(n)) - {row["index"] for row in result["per_class"]}
    assert all(matrix[i].sum() == 0 for i in absent)


# --------------------------------------------------------------------------- by name


@pytest.mark.slow
def test_a_model_that_calls_every_dog_a_cat_scores_zero_on_a_dogs_only_folder(
        tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.3: a dogs-only folder labels its dogs 0, the cat/dog model's "cat" index;
    matched by name, a model answering "cat" to everything gets none of them right."""
    model = train(tiny, tmp_path, ("cat", "dog")).model
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1e3, -1e3]))  # always "cat"
    dogs = make_folder(tmp_path / "dogs", {"dog": 5})
    result = zoo.evaluate(model, dogs)
    assert result["accuracy"] == 0.0  # it was 1.0 when labels were compared as indices
    assert result["matched_by"] == "name" and "note" not in result
    assert result["class_names"] == ["cat", "dog"]
    assert result["per_class"] == [{"class": "dog", "index": 1, "samples": 5, "correct": 0,
                                    "accuracy": 0.0}]
    assert result["confusion_matrix"] == [[0, 0], [5, 0]]  # true dog, predicted cat


def test_a_subset_in_another_index_order_is_scored_as_the_full_set(
        tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.3: in a cat/dog folder cat is label 0 and dog 1; the bird/cat/dog model
    calls them 1 and 2. The subset's per-class results equal the full set's rows."""
    model = train(tiny, tmp_path, ("bird", "cat", "dog")).model
    full = zoo.evaluate(model, make_folder(tmp_path / "all", {"bird": 4, "cat": 4, "dog": 4}))
    subset = zoo.evaluate(model, make_folder(tmp_path / "two", {"cat": 4, "dog": 4}))
    assert full["accuracy"] >= 0.75  # the model did learn the colours
    assert subset["class_names"] == full["class_names"] == ["bird", "cat", "dog"]
    assert subset["per_class"] == full["per_class"][1:]
    assert subset["confusion_matrix"] == [[0, 0, 0], *full["confusion_matrix"][1:]]
    check_counts(full)
    check_counts(subset)


def test_a_class_the_model_does_not_know_is_a_one_line_error(
        tiny: zoo.Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.3: an extra class folder was "internal error: IndexError"; now the error
    names the class and lists the model's classes, and nothing is written."""
    checkpoint = train(tiny, tmp_path, ("cat", "dog")).checkpoint
    data = make_folder(tmp_path / "three", {"cat": 2, "dog": 2, "fox": 3})
    with pytest.raises(ZooError, match="class 'fox' \\(3 images\\) is not one of the model's "
                                       "2 classes \\('cat', 'dog'\\)"):
        zoo.evaluate(zoo.load_checkpoint(checkpoint), data)
    out = tmp_path / "report"
    code, stdout, err = run_cli(["evaluate", str(checkpoint), "--data", str(data), "--out",
                                 str(out)], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("zoo: error: ") and "'fox'" in err
    assert "internal error" not in err and not out.exists()


def test_a_long_list_of_model_classes_is_truncated_in_the_error() -> None:
    """Issue 13.3: the error lists at most ten of the model's classes, then how many."""
    from zoo.data.imagedata import ImageData
    from zoo.training.evaluate import map_classes

    names = [f"class{i}" for i in range(50)]
    data = ImageData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]),
                     ["class3", "zebra"])
    with pytest.raises(ZooError) as exc:
        map_classes(names, 50, data)
    text = str(exc.value)
    assert "'zebra' (1 images)" in text and "'class9', ... (50 in all)" in text
    assert "class10" not in text and "\n" not in text


# --------------------------------------------------------------------------- by index


def test_without_names_on_one_side_labels_are_matched_by_index_and_the_result_says_so(
        tiny: zoo.Backbone, tmp_path: Path) -> None:
    """Issue 13.3: tensors have labels only, and a model from ``zoo.create_model`` records
    no class names: labels are taken as class indices when the counts fit, with a note;
    when they do not fit, a one-line error."""
    model = train(tiny, tmp_path, ("cat", "dog")).model
    x = torch.randint(0, 255, (6, 3, 12, 12), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1, 1, 1])
    result = zoo.evaluate(model, (x, y))
    assert result["matched_by"] == "index" and "(0='cat', 1='dog')" in result["note"]
    assert [c["samples"] for c in result["per_class"]] == [2, 4]
    check_counts(result)
    with pytest.raises(ZooError, match="labels reach 2 but the model has 2 classes"):
        zoo.evaluate(model, (x, torch.tensor([0, 1, 2, 0, 1, 2])))

    bare = zoo.create_model(tiny.name, num_classes=2)  # no zoo config, so no class names
    transform = zoo.transforms_for(tiny.name, weights=None)
    pets = make_folder(tmp_path / "pets", {"cat": 2, "dog": 3})
    result = zoo.evaluate(bare, pets, transform=transform)
    assert result["class_names"] == ["cat", "dog"] and result["matched_by"] == "index"
    assert "records no class names" in result["note"]
    check_counts(result)
    three = make_folder(tmp_path / "three", {"bird": 1, "cat": 1, "dog": 1})
    with pytest.raises(ZooError, match="records no class names and has 2 classes, but the "
                                       "data has 3"):
        zoo.evaluate(bare, three, transform=transform)


@pytest.mark.slow
def test_top5_is_reported_only_for_more_than_five_classes(
        tiny: zoo.Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.3: top-5 of a 2-class model is always 100 %, so it is not reported; a
    10-class model (digits) reports it."""
    checkpoint = train(tiny, tmp_path, ("cat", "dog")).checkpoint
    pets = make_folder(tmp_path / "pets", {"cat": 2, "dog": 2})
    assert "top5_accuracy" not in zoo.evaluate(zoo.load_checkpoint(checkpoint), pets)
    code, out, _ = run_cli(["evaluate", str(checkpoint), "--data", str(pets)], capsys)
    assert code == 0 and "accuracy" in out and "top-5" not in out

    digits = zoo.finetune(tiny.name, "full", "digits", weights=None, limit_per_class=2,
                          epochs=1, batch_size=10, image_size=16, quiet=True)
    result = zoo.evaluate(digits.model, zoo.load_data("digits", "val", limit_per_class=2))
    assert 0.0 <= result["accuracy"] <= result["top5_accuracy"] <= 1.0
    assert result["matched_by"] == "index"  # "0".."9" are label numbers on both sides


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_prints_per_class_accuracy_and_writes_json_and_png(
        tiny: zoo.Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.3: ``zoo evaluate DIR --data D --out OUT`` prints the overall and per-class
    accuracy and writes evaluation.json and a valid confusion_matrix.png; running it again
    into the same folder replaces its own files."""
    checkpoint = train(tiny, tmp_path, ("bird", "cat", "dog")).checkpoint
    data = make_folder(tmp_path / "two", {"dog": 3, "cat": 2})
    out = tmp_path / "report"
    argv = ["evaluate", str(checkpoint), "--data", str(data), "--out", str(out)]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0, stdout
    lines = stdout.splitlines()
    assert lines[0].startswith("accuracy ") and "/5 images)" in lines[0]
    assert lines[1].split() == ["class", "images", "correct", "accuracy"]
    assert [line.split()[:2] for line in lines[2:4]] == [["cat", "2"], ["dog", "3"]]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["format"] == "zoo-evaluation" and report["data"] == str(data)
    assert report["class_names"] == ["bird", "cat", "dog"]
    check_counts(report)
    with Image.open(out / "confusion_matrix.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
        image.verify()
    assert sorted(os.listdir(out)) == ["confusion_matrix.png", "evaluation.json"]
    assert run_cli(argv, capsys)[0] == 0  # an earlier evaluation's folder is zoo's own
    assert sorted(os.listdir(out)) == ["confusion_matrix.png", "evaluation.json"]


@pytest.mark.parametrize("setup, needle", [
    (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt"),
    (lambda out: (out / "evaluation.json").write_text('{"mine": 1}'), "no evaluation.json"),
    (lambda out: (out / "evaluation.json").symlink_to(out.parent / "target.json"),
     "symbolic link"),
])
@pytest.mark.slow
def test_out_never_replaces_files_zoo_did_not_write(
        setup: Any, needle: str, tiny: zoo.Backbone, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.3 (untrusted output folder): ``--out`` must be new, empty, or an earlier
    evaluation's; anything else is refused before evaluating, and left as it was."""
    checkpoint = train(tiny, tmp_path, ("cat", "dog")).checkpoint
    data = make_folder(tmp_path / "pets", {"cat": 1, "dog": 1})
    out = tmp_path / "mine"
    out.mkdir()
    (tmp_path / "target.json").write_text("outside")
    setup(out)
    before = {p.name: (p.is_symlink(), p.read_bytes()) for p in out.iterdir()}
    code, stdout, err = run_cli(["evaluate", str(checkpoint), "--data", str(data), "--out",
                                 str(out)], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and needle in err
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in out.iterdir()} == before
    assert (tmp_path / "target.json").read_text() == "outside"


def test_a_model_with_thousands_of_classes_gets_the_non_zero_cells_not_a_dense_matrix(
        tmp_path: Path) -> None:
    """Issue 13.3 (resources): a 200,000-class head would need a 320 GB dense matrix, so
    above 1,000 classes the result lists the non-zero cells and no PNG is drawn."""
    from zoo.data.imagedata import ImageData
    from zoo.training.evaluate import Tally, map_classes, write_evaluation

    n = 5000
    names = [f"c{i}" for i in range(n)]
    data = ImageData(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]),
                     ["c7", "c4999"])
    tally = Tally(map_classes(names, n, data))
    logits = torch.zeros(3, n)
    logits[0, 7] = logits[1, 4999] = logits[2, 3] = 1.0
    logits[2, 4999] = 0.5  # second best: within the top 5
    tally.add(logits, data.targets)
    result = tally.result()
    assert result["confusion_matrix"] is None
    assert result["confusion_cells"] == [[7, 7, 1], [4999, 3, 1], [4999, 4999, 1]]
    assert result["accuracy"] == pytest.approx(2 / 3) and result["top5_accuracy"] == 1.0
    assert [p.name for p in write_evaluation(tmp_path / "out", result)] == ["evaluation.json"]
