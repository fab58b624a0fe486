"""Issue 13.1 and 13.4: what zoo trains on, evaluates and predicts is the same picture.

13.1: one preprocessing everywhere. Every image, whatever its size, is resized keeping its
aspect ratio to ``size / crop_pct`` and centre-cropped to ``size`` (timm's and
torchvision's evaluation transform) by one function, ``zoo.data.transforms.resize_crop``,
from what the checkpoint records; so ``predict`` on a file gives exactly the probabilities
training's validation computed, and ``evaluate``'s accuracy.

13.4: features are cached only for inputs that never change between reads (zoo's folders,
tensors, built-in sets, or a Dataset declaring ``deterministic = True``); a random
augmentation is never replayed, and already-normalised images are refused with a hint.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, with_local_weights
from PIL import Image
from torch.utils.data import Dataset

import zoo
from zoo.core.errors import IncompatibleError, ZooError
from zoo.data.dataset import load_data
from zoo.data.feature_cache import FeatureStore
from zoo.data.imagedata import ImageData
from zoo.data.sources import load_image
from zoo.data.transforms import BatchTransform, Geometry, resize_crop, transform_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (height, width) of the copies of each photo: mixed sizes and aspect ratios.
SIZES = [(24, 40), (40, 24), (30, 30), (18, 50), (36, 48), (28, 21), (50, 33), (22, 22)]


def photo_folder(root: Path) -> Path:
    """``root/{train,val}/{cat,coffee,rocket}/*.png``: scikit-image's sample photos, each
    cropped differently and saved at one of ``SIZES`` (even copies train, odd ones val)."""
    from skimage import data as photos

    for name, photo in {"cat": photos.chelsea(), "coffee": photos.coffee(),
                        "rocket": photos.rocket()}.items():
        image = Image.fromarray(photo)
        width, height = image.size
        for i, (h, w) in enumerate(SIZES):
            left, top = i * width // 40, (i % 3) * height // 30
            box = (left, top, left + width * 3 // 4, top + height * 3 // 4)
            folder = root / ("val" if i % 2 else "train") / name
            folder.mkdir(parents=True, exist_ok=True)
            image.crop(box).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def tiny_photo_net(base_weights_file: Callable[..., tuple[Path, str]],
                   register_backbones: Callable[..., Any]) -> str:
    """The tiny backbone with local "pretrained" weights whose preprocessing resizes to 20
    and crops 16 (crop_pct 0.8), bicubic, mean 0.5 / std 0.25: every part of the geometry
    differs from the defaults."""
    path, sha = base_weights_file(TINY)
    spec = with_local_weights(TINY, path, sha, "tiny_photo_net")
    weights = dataclasses.replace(spec.weights[0], input_size=(3, 16, 16), resize_size=20,
                                  interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)
    register_backbones(dataclasses.replace(spec, weights=(weights,)))
    return "tiny_photo_net"


class ValidationLogits(zoo.Callback):
    """Records the head's outputs while the runner validates (the head is in eval mode only
    then), so a test sees the probabilities training itself computed."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def on_train_start(self, run: Any) -> None:
        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if not module.training:
                self.logits.append(output.detach().float())

        run.model.head.register_forward_hook(keep)

    def on_epoch_start(self, run: Any, epoch: int) -> None:
        self.logits.clear()


# --------------------------------------------------------------------------- 13.1


@pytest.mark.slow
def test_predict_gives_the_probabilities_and_accuracy_of_training_and_evaluate(
        tiny_photo_net: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue 13.1: on a folder of real photos of mixed sizes, ``predict`` over every
    validation image reproduces the probabilities training's validation computed (within
    1e-5), its loss, and ``evaluate``'s accuracy exactly; so do a reloaded checkpoint, the
    folder read lazily, and the CLI."""
    recorder = ValidationLogits()
    result = zoo.finetune(tiny_photo_net, "linear_probe", photos, epochs=1, batch_size=8,
                          lr=0.05, quiet=True, output_dir=tmp_path / "run",
                          callbacks=[recorder])
    pre = result.config["preprocessing"]
    assert (pre["crop_pct"], pre["interpolation"]) == (0.8, "bicubic")  # what predict reads
    trained = torch.cat(recorder.logits).softmax(1)

    files = sorted((photos / "val").glob("*/*.png"))  # the order the val split is read in
    labels = torch.tensor([["cat", "coffee", "rocket"].index(p.parent.name) for p in files])
    assert len(files) == len(trained) == 12
    model = zoo.load_checkpoint(tmp_path / "run")
    transform = transform_from_config(model.zoo_config["preprocessing"])
    with torch.no_grad():  # exactly what `zoo predict` does for each file
        predicted = torch.cat([model(transform.prepare_image(load_image(p))).softmax(1)
                               for p in files])
    torch.testing.assert_close(predicted, trained, rtol=0, atol=1e-5)
    loss = -predicted[torch.arange(len(files)), labels].log().mean().item()
    assert loss == pytest.approx(result.history[-1]["val_loss"], abs=1e-5)

    accuracy = (predicted.argmax(1) == labels).double().mean().item()  # 4/12 is not a float32
    assert result.metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert zoo.evaluate(model, photos)["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    lazy = load_data(photos, "val", in_memory=False)
    assert zoo.evaluate(model, lazy)["accuracy"] == pytest.approx(accuracy, abs=1e-12)

    from zoo.cli import main

    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), *map(str, files), "--top-k", "1"]) in (0, None)
    printed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("  ")]
    assert printed == [["cat", "coffee", "rocket"][i] for i in predicted.argmax(1).tolist()]


def test_one_factory_builds_the_checkpoint_and_the_weights_transform(
        tiny_photo_net: str, photos: Path, tmp_path: Path) -> None:
    """Issue 14: a checkpoint's recorded preprocessing and ``zoo.transforms_for`` on its
    weights go through one factory, so on a real photo they give the same tensor, bit for
    bit, and the same one the geometry spells out by hand."""
    zoo.finetune(tiny_photo_net, "linear_probe", photos, epochs=1, batch_size=8, lr=0.05,
                 quiet=True, output_dir=tmp_path / "run")
    recorded = zoo.load_checkpoint(tmp_path / "run").zoo_config["preprocessing"]
    from_checkpoint = transform_from_config(recorded)
    from_weights = zoo.transforms_for(tiny_photo_net, "local")
    assert from_checkpoint == from_weights
    assert (from_weights.crop_pct, from_weights.interpolation) == (0.8, "bicubic")

    photo = load_image(sorted((photos / "val" / "cat").glob("*.png"))[0])
    x = from_checkpoint.prepare_image(photo)
    assert torch.equal(x, from_weights.prepare_image(photo))
    by_hand = resize_crop(photo, Geometry((16, 16), 0.8, "bicubic")).float() / 255
    assert torch.equal(x, ((by_hand - 0.5) / 0.25)[None])


@pytest.mark.slow
def test_a_hub_copy_predicts_what_the_run_validated(
        tiny_photo_net: str, photos: Path, tmp_path: Path) -> None:
    """Issue 13.1: the Hub copy of a checkpoint carries the preprocessing, and applies it:
    pulled on another machine, it evaluates and predicts as the run did."""
    from zoo.persist.hub import from_pretrained, push_to_hub
    from zoo.testing.hub_server import HubServer

    result = zoo.finetune(tiny_photo_net, "linear_probe", photos, epochs=1, quiet=True,
                          output_dir=tmp_path / "run", lr=0.05)
    files = sorted((photos / "val").glob("*/*.png"))
    token = "hf_faithful_test_token"
    with HubServer(root=tmp_path / "hub", token=token, upload_mode="regular") as hub:
        push_to_hub(tmp_path / "run", "user/photos", token=token, endpoint=hub.endpoint)
        pulled = from_pretrained("hf-hub:user/photos", token=token, endpoint=hub.endpoint,
                                 cache_dir=tmp_path / "other-machine")
    assert pulled.zoo_config["preprocessing"] == result.config["preprocessing"]
    transform = transform_from_config(pulled.zoo_config["preprocessing"])
    with torch.no_grad():
        for path in files:
            x = transform.prepare_image(load_image(path))
            torch.testing.assert_close(pulled(x), result.model(x), rtol=0, atol=1e-6)
    assert zoo.evaluate(pulled, photos)["accuracy"] == pytest.approx(
        result.metrics["val_accuracy"], abs=1e-12)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (33, 33), (20, 70), (7, 9)])
@pytest.mark.parametrize(("crop_pct", "interpolation"), [(1.0, "bilinear"), (0.875, "bicubic"),
                                                         (0.9, "bilinear")])
def test_resize_crop_is_torchvisions_evaluation_transform(
        shape: tuple[int, int], crop_pct: float, interpolation: str) -> None:
    """Issue 13.1: the one geometry is torchvision's Resize(shorter side = floor(size /
    crop_pct), antialiased) then CenterCrop(size), for any size and aspect ratio."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    geometry = Geometry((16, 16), crop_pct, interpolation)
    assert geometry.resize_size == (math.floor(16 / crop_pct),) * 2  # timm's scale size
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    expected = tvf.center_crop(tvf.resize(image, [geometry.resize_size[0]], interpolation=mode,
                                          antialias=True), [16, 16]).clamp(0, 1)
    torch.testing.assert_close(resize_crop(image, geometry), expected, rtol=0, atol=1e-6)
    # a batch of one size gets the same, image by image (the fast path for tensors)
    transform = BatchTransform((3, 16, 16), (0.0,) * 3, (1.0,) * 3, crop_pct=crop_pct,
                               interpolation=interpolation)
    torch.testing.assert_close(transform(image[None])[0], expected, rtol=0, atol=1e-6)


def stripes(path: Path) -> Path:
    """A 20 x 60 image: 10 red columns, 40 green, 10 blue."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:50, 1] = pixels[:, 50:, 2] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_images_keep_their_aspect_ratio_and_are_centre_cropped(tmp_path: Path) -> None:
    """Issue 13.1: a wide image is never squashed: its centre (all green here) fills the
    input, whether fitted alone (predict), in a folder of mixed sizes, or as a tensor."""
    path = stripes(tmp_path / "wide.png")
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 10, 10)
    assert torch.equal(load_image(path, image_size=10), green)
    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        stripes(tmp_path / "folder" / cls / "wide.png")
        Image.new("RGB", (10, 10)).save(tmp_path / "folder" / cls / "square.png")
        Image.new("RGB", (10, 10)).save(tmp_path / "folder" / cls / "square2.png")
    data = load_data(tmp_path / "folder", classes=["a"])  # most common size: 10 x 10
    wide = [image for image, _ in data if image.max() > 0]
    assert data.image_shape == (3, 10, 10) and all(torch.equal(w, green) for w in wide)
    tensor = load_image(path)[None]
    assert torch.equal(load_data((tensor, torch.tensor([0])), image_size=10)[0][0], green)


def test_a_hostile_elongated_image_is_fitted_without_a_huge_resize() -> None:
    """Issue 13.1 (robustness): a 1 x 20000 image is not resized to 256 x 5 million pixels
    first: past 4x the input's aspect ratio the ends are dropped (the crop drops them
    anyway)."""
    image = torch.zeros(3, 1, 20_000, dtype=torch.uint8)
    image[:, :, 9_000:11_000] = 200
    out = resize_crop(image, Geometry((224, 224), 0.875))
    assert out.shape == (3, 224, 224) and int(out.float().mean()) > 150


def test_the_feature_cache_is_keyed_by_the_preprocessing(tiny: zoo.Backbone,
                                                         photos: Path) -> None:
    """Issue 13.1: the same folder fitted to another geometry is another cache entry, and
    the same geometry reuses it; the data's fingerprint names its geometry, lazily too."""
    store = FeatureStore()

    def run(size: int) -> dict[str, Any]:
        return zoo.finetune(tiny.name, "linear_probe", photos, epochs=1, weights=None,
                            image_size=size, quiet=True, feature_store=store).metrics

    assert run(16)["feature_cache"] == {"hits": 0, "misses": 2}
    assert run(16)["feature_cache"] == {"hits": 2, "misses": 0}
    assert run(12)["feature_cache"] == {"hits": 0, "misses": 2}
    for in_memory in (True, False):
        data = load_data(photos, in_memory=in_memory)
        prints = {data.at(Geometry((16, 16), crop, mode)).fingerprint()
                  for crop, mode in [(1.0, "bilinear"), (0.8, "bilinear"), (0.8, "bicubic")]}
        assert len(prints) == 3


# --------------------------------------------------------------------------- 13.4


class Digits(Dataset):
    """A user's own Dataset of uint8 digits; ``shift=True`` moves each image by a random
    offset on every read (a random augmentation). Counts how often each item is read."""

    classes = [str(i) for i in range(10)]

    def __init__(self, xy: tuple[torch.Tensor, torch.Tensor], *, shift: bool = False) -> None:
        self.x, self.y = xy
        self.shift = shift
        self.reads: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads[i] += 1
        image = self.x[i]
        if self.shift:
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            image = image.roll((dy, dx), dims=(1, 2))
        return image, int(self.y[i])


def train_on(data: Any, val: Any, **kwargs: Any) -> zoo.FinetuneResult:
    options = dict(epochs=3, batch_size=10, lr=1e-2, quiet=True, image_size=16, weights=None)
    options.update(kwargs)
    return zoo.finetune("tiny_cnn", options.pop("strategy", "linear_probe"), data, val,
                        **options)


@pytest.mark.slow
def test_a_dataset_with_a_random_transform_is_never_cached(
        tiny: zoo.Backbone, digits: Callable[..., Any], capsys: pytest.CaptureFixture) -> None:
    """Issue 13.4: a Dataset that changes between reads is read anew every epoch (no cache
    entry, no hit), and the run says so: one log line, and in its metrics."""
    store = FeatureStore()
    train = Digits(digits(3), shift=True)
    result = train_on(train, digits(1, "val"), feature_store=store, quiet=False)
    log = [line for line in capsys.readouterr().err.splitlines() if "feature cache" in line]
    assert log == ["zoo: feature cache off: Digits gives a different image when an item is "
                   "read twice (a random transform?), so every epoch reads it anew"]
    assert result.metrics["feature_cache"] == {"used": False, "reason": log[0][5:]}
    assert len(store) == 0 and store.hits == store.misses == 0
    assert min(train.reads[i] for i in range(len(train))) >= 3  # once an epoch at least
    train_on(Digits(digits(3), shift=True), digits(1, "val"), feature_store=store)
    assert "feature cache" not in capsys.readouterr().err  # quiet runs log nothing


def test_a_dataset_is_cached_only_when_it_declares_itself_deterministic(
        tiny: zoo.Backbone, digits: Callable[..., Any]) -> None:
    """Issue 13.4: zoo cannot prove a Dataset never changes, so an undeclared one is not
    cached (the reason says how to declare it); ``deterministic = True`` turns the cache on,
    ``False`` keeps it off; zoo's own tensors are cached as before."""
    store = FeatureStore()
    plain = train_on(Digits(digits(3)), digits(1, "val"), feature_store=store)
    assert plain.metrics["feature_cache"]["used"] is False
    assert "set Digits.deterministic = True" in plain.metrics["feature_cache"]["reason"]
    assert len(store) == 0

    declared = Digits(digits(3))
    declared.deterministic = True  # type: ignore[attr-defined]
    cached = train_on(declared, digits(1, "val"), feature_store=store)
    assert cached.metrics["feature_cache"] == {"hits": 2, "misses": 2}

    refused = Digits(digits(3))
    refused.deterministic = False  # type: ignore[attr-defined]
    off = train_on(refused, digits(1, "val"), feature_store=store)
    reason = off.metrics["feature_cache"]["reason"]
    assert reason == "feature cache off: Digits.deterministic is False"
    tensors = train_on(digits(3), digits(1, "val"), feature_store=FeatureStore())
    assert tensors.metrics["feature_cache"] == {"hits": 2, "misses": 2}
    torch.testing.assert_close(cached.model.head.weight, plain.model.head.weight)


def test_feature_extract_on_an_undeclared_dataset_says_what_to_do(
        tiny: zoo.Backbone, digits: Callable[..., Any]) -> None:
    """Issue 13.4: a strategy that needs the cache names why the data cannot have it."""
    with pytest.raises(IncompatibleError, match=r"set Digits\.deterministic = True") as error:
        train_on(Digits(digits(3)), None, strategy="feature_extract")
    assert "\n" not in str(error.value)


def normalised(x: torch.Tensor) -> torch.Tensor:
    """What torchvision's ToTensor + Normalize(ImageNet mean/std) makes of uint8 images."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (x.float().expand(*x.shape[:-3], 3, *x.shape[-2:]) / 255 - mean) / std


class Normalised(Digits):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(i)
        return normalised(image), label


def test_already_normalised_images_are_refused_with_a_hint(
        tiny: zoo.Backbone, digits: Callable[..., Any]) -> None:
    """Issue 13.4: floats outside [0, 1] are never normalised a second time: a Dataset or
    tensors that went through Normalize are refused, saying to remove it; 0..255 floats
    are refused saying to divide by 255. One line each, before any training."""
    x, y = digits(2)
    hint = r"look normalised already: remove Normalize from your transform"
    with pytest.raises(ZooError, match=hint) as error:
        train_on(Normalised((x, y)), None)
    assert "\n" not in str(error.value)
    with pytest.raises(ZooError, match=hint):
        load_data((normalised(x), y))
    with pytest.raises(ZooError, match=hint):
        ImageData(normalised(x), y, [str(i) for i in range(10)])
    with pytest.raises(ZooError, match="divide by 255"):
        load_data((x.float(), y))
    ok = load_data((x.float() / 255, y))  # [0, 1] floats are fine
    assert ok.dtype == torch.float32
