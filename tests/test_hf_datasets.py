"""Hugging Face datasets and path,label CSV files as zoo data (issue 16.2). Every dataset is
built here, locally: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.cli import main

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "fox"]


def _pictures(n: int = 15) -> tuple[list[Image.Image], list[int]]:
    """n small images of mixed sizes; class c is bright in channel c."""
    images, labels = [], []
    for i in range(n):
        c = i % 3
        pixels = np.full((12 + i % 4, 14, 3), 30, np.uint8)
        pixels[..., c] = 200 + i
        images.append(Image.fromarray(pixels))
        labels.append(c)
    return images, labels


def _dataset(image: str = "img", label: str = "animal") -> Any:
    images, labels = _pictures()
    features = datasets.Features({image: datasets.Image(),
                                  label: datasets.ClassLabel(names=NAMES),
                                  "note": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {image: images, label: labels, "note": ["x"] * len(labels)}, features=features)


def test_dataset_object_columns_and_classes_from_features() -> None:
    """Issue 16.2: a datasets.Dataset loads with its Image and ClassLabel columns found from
    the features, class names from the ClassLabel, pixels as in the PIL images."""
    ds = _dataset()
    data = zoo.load_data(ds)
    assert data.classes == NAMES and len(data) == 15
    assert data.targets.tolist() == ds["animal"]
    image, label = data[0]
    assert label == 0 and image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(np.array(ds[0]["img"])).permute(2, 0, 1))
    assert data.cache_refusal() is None  # Arrow rows never change: features may be cached


@pytest.mark.slow
def test_dataset_dict_splits_and_finetune_uses_validation(tiny: zoo.Backbone) -> None:
    """Issue 16.2: a DatasetDict gives train / validation (for "val") / test; finetune on it
    validates on its validation split and records the ClassLabel names."""
    ds = _dataset()
    dd = datasets.DatasetDict(train=ds.select(range(9)), validation=ds.select(range(9, 15)))
    assert len(zoo.load_data(dd, "train")) == 9
    assert len(zoo.load_data(dd, "val")) == 6
    assert len(zoo.load_data(dd, "test")) == 6  # no test split: validation serves
    result = zoo.finetune(tiny.name, "partial", dd, weights=None, epochs=1, batch_size=4,
                          quiet=True)
    assert result.config["class_names"] == NAMES
    assert "val_accuracy" in result.metrics


def test_saved_folder_and_parquet_file_load_alike(tmp_path: Path) -> None:
    """Issue 16.2: a save_to_disk folder (DatasetDict or single Dataset) and a parquet file
    load by path; a single dataset splits 80/20 (stratified) like an ImageFolder."""
    ds = _dataset()
    datasets.DatasetDict(train=ds, test=ds.select(range(3))).save_to_disk(tmp_path / "dd")
    ds.save_to_disk(tmp_path / "one")
    ds.to_parquet(tmp_path / "one.parquet")
    assert len(zoo.load_data(str(tmp_path / "dd"), "test")) == 3
    for path in (tmp_path / "one", tmp_path / "one.parquet"):
        train, val = zoo.load_data(str(path), "train"), zoo.load_data(path, "val")
        assert (len(train), len(val)) == (12, 3)
        assert val.targets.bincount().tolist() == [1, 1, 1]
        assert train.classes == NAMES


def test_named_columns_and_ambiguous_features(tmp_path: Path) -> None:
    """Issue 16.2: image_column= / label_column= pick columns; with two Image columns and
    none named the error says which flag to pass; string labels become sorted classes."""
    images, labels = _pictures(6)
    features = datasets.Features({"a": datasets.Image(), "b": datasets.Image(),
                                  "kind": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"a": images, "b": images[::-1],
                                     "kind": [NAMES[c] for c in labels]}, features=features)
    with pytest.raises(zoo.ZooError, match="image_column=") as info:
        zoo.load_data(ds)
    assert "\n" not in str(info.value)
    data = zoo.load_data(ds, image_column="b", label_column="kind")
    assert data.classes == NAMES
    assert data.targets.tolist() == labels
    assert torch.equal(data[0][0], torch.from_numpy(np.array(images[-1])).permute(2, 0, 1))
    with pytest.raises(zoo.ZooError, match="no column 'nope'"):
        zoo.load_data(ds, image_column="nope", label_column="kind")


def test_cli_columns_and_evaluate_on_a_saved_dataset(tiny: zoo.Backbone, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.2: `zoo finetune/evaluate --data FOLDER --image-column --label-column`."""
    _dataset(image="photo", label="kind").save_to_disk(tmp_path / "saved")
    out = tmp_path / "ckpt"
    assert main(["finetune", "--backbone", tiny.name, "--strategy", "partial", "--data",
                 str(tmp_path / "saved"), "--image-column", "photo", "--label-column", "kind",
                 "--weights", "none", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--data", str(tmp_path / "saved"), "--image-column",
                 "photo", "--json"]) == 0
    assert '"samples": 3' in capsys.readouterr().out


def test_a_transform_refuses_feature_caching() -> None:
    """Issue 16.2: a dataset with a transform (with_transform) may change on every read, so
    zoo reads it lazily and refuses to cache features from it, saying why."""
    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        batch["img"] = [torch.rand(3, 8, 8) for _ in batch["img"]]
        return batch

    data = zoo.load_data(_dataset().with_transform(transform))
    assert data.classes == NAMES and data[0][0].dtype == torch.float32
    reason = data.cache_refusal()
    assert reason is not None and "transform" in reason


def test_hf_name_without_datasets_network_is_one_line_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16.2: hf:OWNER/NAME goes through datasets.load_dataset; a name that cannot load
    (here: offline, not cached) is a one-line ZooError naming it."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(zoo.ZooError, match="hf:nobody/no-such-set") as info:
        zoo.load_data("hf:nobody/no-such-set")
    assert "\n" not in str(info.value)
    with pytest.raises(zoo.ZooError, match="OWNER/NAME"):
        zoo.load_data("hf:a/b/c")


# --------------------------------------------------------------------------- CSV


def _csv_folder(root: Path) -> Path:
    images, labels = _pictures(10)
    (root / "pics").mkdir(parents=True)
    rows = ["path,label"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        image.save(root / "pics" / f"{i}.png")
        rows.append(f"pics/{i}.png,{NAMES[label]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_csv_of_paths_and_labels(tmp_path: Path) -> None:
    """Issue 16.2: a CSV of path,label rows (paths relative to its folder) loads as an
    ImageFolder would: sorted class names, a stratified 80/20 split, cacheable."""
    csv_file = _csv_folder(tmp_path)
    train, val = zoo.load_data(str(csv_file), "train"), zoo.load_data(csv_file, "val")
    assert train.classes == NAMES and len(train) + len(val) == 10
    assert val.targets.bincount().tolist() == [1, 1, 1]
    assert train.cache_refusal() is None


@pytest.mark.parametrize("row", ["../outside.png,cat", "/etc/passwd,cat", "link/0.png,cat",
                                 "pics/alias.png,cat", "pics,cat"])
def test_csv_never_reads_outside_its_folder(tmp_path: Path, row: str) -> None:
    """Issue 16.2: the CSV is untrusted: a row that leaves its folder, is absolute, passes
    through a symbolic link (to a folder or a file) or names a folder is a one-line error
    naming the row, and nothing is read."""
    csv_file = _csv_folder(tmp_path / "set")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.symlink(tmp_path, tmp_path / "set" / "link")
    os.symlink(tmp_path / "outside.png", tmp_path / "set" / "pics" / "alias.png")
    csv_file.write_text(csv_file.read_text() + row + "\n")
    with pytest.raises(zoo.ZooError, match="row 12") as info:
        zoo.load_data(csv_file)
    assert "\n" not in str(info.value)
