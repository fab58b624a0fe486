"""Dataset folders and image files are untrusted input (issue 12, items 7 and 8, and the
one-class and non-UTF-8 bullets).

- Every pixel mode Pillow opens decodes to the picture it shows: 16-bit integers scaled by
  their range, floats clipped to [0, 1], palettes, alpha, CMYK and YCbCr converted; a mode
  without a known range (32-bit integers, NaN floats) is refused with one line naming the
  file, never decoded to a silently wrong image.
- zoo never follows a symbolic link inside a dataset folder: a loop cannot multiply images
  or put one file in two splits, and a link cannot make zoo read a file outside the folder.
  A symlinked class, train/ or val/ folder is refused; links further down are ignored with
  one warning. Only regular files are opened (a FIFO never blocks a scan).
- Training refuses data with a single class; a class folder whose name is not UTF-8 trains,
  saves, reloads, evaluates and predicts, its class name shown with \\xNN escapes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from torch.utils.data import Dataset

import zoo
from zoo import cli
from zoo.core.errors import ZooError
from zoo.data.sources import load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 4x4 grey ramps: the value each pixel should decode to (0..255) and its 16-bit source.
RAMP8 = np.array([0, 17, 34, 51, 68, 85, 102, 119, 136, 153, 170, 187, 204, 221, 238, 255],
                 dtype=np.uint8).reshape(4, 4)
RAMP16 = RAMP8.astype(np.uint16) * 257  # 0..65535: x * 257 / 65535 * 255 == x


def grey(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8 and t.shape[0] == 1
    return t[0].numpy()


def one_line_error(exc: pytest.ExceptionInfo[ZooError], *needles: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    for needle in needles:
        assert needle in text, text
    return text


# --------------------------------------------------------------------------- Issue 12.7


def _write(path: Path, img: Image.Image) -> Path:
    img.save(path)
    return path


def sixteen_bit_png(path: Path) -> Path:
    return _write(path, Image.fromarray(RAMP16))  # Pillow reopens it as "I;16"


def big_endian_tiff(path: Path) -> Path:
    img = Image.frombytes("I;16B", (4, 4), RAMP16.astype(">u2").tobytes())
    return _write(path, img)


def sixteen_bit_pgm(path: Path) -> Path:
    path.write_bytes(b"P5 4 4 65535\n" + RAMP16.astype(">u2").tobytes())  # opens as "I"
    return path


def float_tiff(path: Path) -> Path:
    values = RAMP8.astype(np.float32) / 255
    values[0, 0], values[3, 3] = -0.5, 7.0  # clipped to 0 and 1
    return _write(path, Image.fromarray(values, "F"))


def palette_png(path: Path) -> Path:
    img = Image.fromarray(RAMP8, "L").convert("P")
    img.info["transparency"] = 0
    return _write(path, img)


def cmyk_jpeg_like_tiff(path: Path) -> Path:
    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[..., 3] = 255 - RAMP8  # black ink only: the grey ramp
    return _write(path, Image.fromarray(cmyk, "CMYK"))


def ycbcr_tiff(path: Path) -> Path:
    planes = np.stack([RAMP8, np.full_like(RAMP8, 128), np.full_like(RAMP8, 128)], axis=-1)
    return _write(path, Image.fromarray(planes, "YCbCr").convert("RGB"))


def rgba_png(path: Path) -> Path:
    rgba = np.stack([RAMP8] * 3 + [np.full_like(RAMP8, 7)], axis=-1)
    return _write(path, Image.fromarray(rgba, "RGBA"))


def la_png(path: Path) -> Path:
    return _write(path, Image.fromarray(np.stack([RAMP8, RAMP8], -1), "LA"))


MODES = {"I;16 png": sixteen_bit_png, "I;16B tiff": big_endian_tiff,
         "I pgm": sixteen_bit_pgm, "F tiff": float_tiff, "P+transparency png": palette_png,
         "CMYK tiff": cmyk_jpeg_like_tiff, "YCbCr": ycbcr_tiff, "RGBA png": rgba_png,
         "LA png": la_png}


@pytest.mark.parametrize("make", MODES.values(), ids=list(MODES))
def test_every_pixel_mode_decodes_to_the_picture_it_shows(make: Any, tmp_path: Path) -> None:
    """Issue 12.7: 16-bit PNG/TIFF/PGM, float TIFF, palette with transparency, CMYK, YCbCr,
    RGBA and LA all decode to the same grey ramp (to within rounding), grey and RGB."""
    path = make(tmp_path / ("image.tif" if "tiff" in make.__name__ else "image.png"))
    expected = RAMP8.astype(int)
    assert np.abs(grey(load_image(path, channels=1)).astype(int) - expected).max() <= 1
    rgb = load_image(path).numpy().astype(int)
    assert rgb.shape == (3, 4, 4)
    assert np.abs(rgb - expected).max() <= 1


def test_sixteen_bit_pngs_in_a_training_folder_are_scaled_not_saturated(tmp_path: Path) -> None:
    """Issue 12.7: a folder of 16-bit PNGs (Pillow's "I;16") trains on the real picture,
    not on a 99.6 % white one, in memory and read lazily alike."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            sixteen_bit_png(tmp_path / cls / f"{i}.png")
    for in_memory in (True, False):
        data = zoo.load_data(tmp_path, in_memory=in_memory)
        assert data.image_shape == (1, 4, 4)
        for i in range(len(data)):
            assert np.array_equal(grey(data[i][0]), RAMP8)


def test_pil_images_from_a_torch_dataset_are_scaled_too() -> None:
    """Issue 12.7: the same conversion applies to PIL images a torch Dataset yields."""

    class Sixteen(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            return Image.fromarray(RAMP16), i

    data = zoo.load_data(Sixteen())
    assert np.array_equal(grey(data[1][0]), RAMP8)


def thirty_two_bit_tiff(path: Path) -> Path:
    return _write(path, Image.fromarray(np.array([[70000, -5]], dtype=np.int32), "I"))


def nan_tiff(path: Path) -> Path:
    return _write(path, Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32), "F"))


@pytest.mark.parametrize(("make", "reason"), [(thirty_two_bit_tiff, "no known 0..1 range"),
                                              (nan_tiff, "NaN")])
def test_pixels_without_a_known_range_are_refused_naming_the_file(
        make: Any, reason: str, tmp_path: Path) -> None:
    """Issue 12.7: 32-bit integer and NaN float images are refused with one line naming the
    file, by ``load_image`` (predict) and in a folder (skipped with a warning, or an error
    with strict=True) -- never decoded to a wrong picture."""
    bad = make(tmp_path / "bad.tif")
    with pytest.raises(ZooError) as exc:
        load_image(bad)
    one_line_error(exc, "bad.tif", reason)

    folder = tmp_path / "data"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            sixteen_bit_png(folder / cls / f"{i}.png")
    bad.rename(folder / "a" / "bad.png")  # its content, not its name, decides how it decodes
    with pytest.raises(ZooError) as exc:
        zoo.load_data(folder, strict=True)
    one_line_error(exc, "bad.png", reason)
    with pytest.warns(UserWarning, match=f"skipped 1 image.*bad.png.*{reason}"):
        data = zoo.load_data(folder)
    assert len(data) == 4 and all(np.array_equal(grey(x), RAMP8) for x, _ in data)


# --------------------------------------------------------------------------- Issue 12.8


def distinct_folder(root: Path, per_class: int = 5) -> int:
    """``root/cat`` and ``root/dog`` of 2x2 images, each one grey value: the value names
    the file, so a file read twice shows up as a repeated value."""
    value = 0
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            value += 1
            Image.new("L", (2, 2), value).save(root / cls / f"{i}.png")
    return value


def values(data: zoo.ImageData) -> list[int]:
    return [int(x[0, 0, 0]) for x, _ in data]


def test_a_symlink_loop_neither_multiplies_images_nor_leaks_into_val(tmp_path: Path) -> None:
    """Issue 12.8: ``cat/loop -> .`` (and ``cat/up -> ..``) are not followed: each file is
    read once, in one split, and the ignored links are named in one warning."""
    root = tmp_path / "data"
    count = distinct_folder(root)
    (root / "cat" / "loop").symlink_to(".")
    (root / "cat" / "up").symlink_to("..")
    with pytest.warns(UserWarning, match="ignored 2 symbolic link"):
        train = values(zoo.load_data(root, "train"))
    with pytest.warns(UserWarning, match="never follows links"):
        val = values(zoo.load_data(root, "val"))
    assert sorted(train + val) == list(range(1, count + 1))


def test_links_out_of_the_folder_are_never_read(tmp_path: Path) -> None:
    """Issue 12.8: a file or folder linked from outside the dataset is not read (an
    untrusted folder cannot make zoo read any file), and the outside is left unchanged."""
    root = tmp_path / "data"
    count = distinct_folder(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("L", (2, 2), 200).save(outside / "secret.png")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir())
    (root / "cat" / "secret.png").symlink_to(outside / "secret.png")
    (root / "dog" / "more").symlink_to(outside)
    with pytest.warns(UserWarning, match="symbolic link"):
        data = zoo.load_data(root, "train")
    with pytest.warns(UserWarning, match="symbolic link"):
        data_val = zoo.load_data(root, "val")
    assert 200 not in values(data) + values(data_val)
    assert len(data) + len(data_val) == count
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir()) == before


@pytest.mark.parametrize("link", ["class", "val"])
def test_a_symlinked_class_or_split_folder_is_refused(link: str, tmp_path: Path) -> None:
    """Issue 12.8: a class folder or a val/ folder that is a link (``val -> train`` would put
    every file in both splits) is refused with one line, not followed."""
    root = tmp_path / "data"
    distinct_folder(root / "train")
    if link == "class":
        (root / "train" / "bird").symlink_to(tmp_path)
    else:
        (root / "val").symlink_to("train")
    with pytest.raises(ZooError) as exc:
        zoo.load_data(root, "train" if link == "class" else "val")
    one_line_error(exc, "symbolic link to a folder", "replace it with a real folder")


def test_a_file_swapped_for_a_link_after_the_scan_is_not_read(tmp_path: Path) -> None:
    """Issue 12.8: a lazily read folder opens each file without following a link, so a
    file replaced by a link after loading is refused rather than read."""
    root = tmp_path / "data"
    distinct_folder(root)
    data = zoo.load_data(root, in_memory=False)
    Image.new("L", (2, 2), 200).save(tmp_path / "secret.png")
    for path in (root / "cat").iterdir():
        path.unlink()
        path.symlink_to(tmp_path / "secret.png")
    with pytest.raises(ZooError) as exc:
        [x for x, _ in data]
    one_line_error(exc, "cannot decode image", "cat")


def test_a_fifo_named_like_an_image_is_not_opened(tmp_path: Path) -> None:
    """Issue 12.8: only regular files are read; a FIFO named ``x.png`` would block forever."""
    root = tmp_path / "data"
    count = distinct_folder(root)
    os.mkfifo(root / "cat" / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = len(zoo.load_data(root, "train")) + len(zoo.load_data(root, "val"))
    assert total == count


# --------------------------------------------------------------------------- Issue 12, medium


def test_a_one_class_dataset_is_refused_before_training(tiny: zoo.Backbone,
                                                        tmp_path: Path) -> None:
    """Issue 12 (medium, one class): a folder with one class, or labels that are all the
    same, would train and report 100 %; it is refused with one line, before training."""
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "cat" / f"{i}.png")
    with pytest.raises(ZooError) as exc:
        zoo.finetune(tiny.name, "linear_probe", root, weights=None, quiet=True)
    one_line_error(exc, "only one class ('cat')", "at least two")
    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ZooError) as exc:
        zoo.finetune(tiny.name, "linear_probe", (x, torch.full((6,), 3)), num_classes=5,
                     weights=None, quiet=True)
    one_line_error(exc, "only one class ('3')")
    assert cli.main(["finetune", "--backbone", tiny.name, "--strategy", "linear_probe",
                     "--data", str(root), "--quiet"]) == 2


@pytest.mark.slow
def test_a_class_folder_named_in_non_utf8_bytes_trains_saves_loads_and_predicts(
        pretrained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12 (medium, non-UTF-8 class folder): ``b"caf\\xe9"`` is a valid Linux name; its
    class name is ``caf\\xe9`` (the byte shown as an escape) everywhere: training, the
    checkpoint's config.json and model card, reloading, evaluation and ``zoo predict``."""
    base = pretrained(TINY)
    root = tmp_path / "data"
    folders = [os.fsdecode(b"caf\xe9"), "dog"]
    for k, cls in enumerate(folders):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            name = os.fsdecode(b"\xff%d.png" % i)  # file names need not be UTF-8 either
            Image.new("RGB", (8, 8), (200 * k, 40 * i, 0)).save(root / cls / name)
    assert zoo.load_data(root, in_memory=False).fingerprint()
    result = zoo.finetune(base, "linear_probe", root, epochs=1, batch_size=4, quiet=True,
                          output_dir=tmp_path / "run")
    assert result.model.zoo_config["class_names"] == ["caf\\xe9", "dog"]
    checkpoint = Path(result.checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    assert config["class_names"] == ["caf\\xe9", "dog"]
    assert "caf\\xe9" in (checkpoint / "README.md").read_text(encoding="utf-8")
    model = zoo.load_checkpoint(checkpoint)
    assert zoo.evaluate(model, root)["samples"] == 2
    query = tmp_path / "query.png"
    query.write_bytes(next((root / folders[0]).iterdir()).read_bytes())
    capsys.readouterr()
    assert cli.main(["predict", str(checkpoint), str(query), "--top-k", "2"]) == 0
    assert "caf\\xe9" in capsys.readouterr().out
