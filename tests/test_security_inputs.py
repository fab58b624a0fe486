"""Hostile or mistaken inputs get one clear line, before anything is built (issue 12).

Issue 12.9: non-finite hyper-parameters are refused, a diverging run stops at its last good
state and never saves NaN weights. Medium bullets: resource bounds on what an untrusted
config.json or safetensors header can make zoo allocate, and inputs that used to end in
"internal error" (a corrupt resume.pt, a bad device, seed, top-k, --out, API types).
Every hostile file or folder is built here, in tmp_path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, TinyNet

import zoo
import zoo.cli
from zoo.core.arguments import MAX_CLASSES, MAX_INPUT_SIDE
from zoo.core.errors import CheckpointError, ZooError
from zoo.models.strategy import make_strategy
from zoo.persist.validate import (
    MAX_HEADER_BYTES,
    validate_config,
    validate_header,
    validate_safetensors,
)
from zoo.training.callbacks import RESUME_FILE, Callback, Run

FT = ["finetune", "--backbone", "cifar_resnet20", "--strategy", "partial", "--data", "digits",
      "--limit-per-class", "2", "--image-size", "8", "--epochs", "1", "--weights", "none",
      "--quiet"]
RUN_ARGS = dict(data="digits", limit_per_class=2, image_size=8, epochs=1, weights=None,
                quiet=True)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-epoch run of cifar_resnet20 on 20 digits: a checkpoint plus resume.pt,
    made with the same settings as ``FT`` so that ``--resume`` accepts its config."""
    home = tmp_path_factory.mktemp("run-home")
    old = os.environ.get("ZOO_HOME")
    os.environ["ZOO_HOME"] = str(home)
    try:
        out = tmp_path_factory.mktemp("run") / "run"
        args = dict(RUN_ARGS)
        zoo.finetune("cifar_resnet20", "partial", args.pop("data"), output_dir=out, **args)
    finally:
        if old is None:
            os.environ.pop("ZOO_HOME", None)
        else:
            os.environ["ZOO_HOME"] = old
    return out


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (zoo's own cache folder excluded) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "zoo-home" not in p.parts}


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("zoo: error:"), err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


def copy_run(run: Path, dst: Path, *, resume: bool = False) -> Path:
    dst.mkdir(parents=True)
    for path in run.iterdir():
        if path.is_file() and (resume or path.name != RESUME_FILE):
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def with_config(**changes: Any) -> Callable[[Path, Path], str]:
    """A copy of the run's checkpoint whose config.json has ``changes`` applied."""
    def build(tmp: Path, run: Path) -> str:
        target = copy_run(run, tmp / "ckpt")
        config = json.loads((target / "config.json").read_text())
        config.update(changes)
        (target / "config.json").write_text(json.dumps(config))
        return str(target)
    return build


def with_preprocessing(**changes: Any) -> Callable[[Path, Path], str]:
    def build(tmp: Path, run: Path) -> str:
        config = json.loads((run / "config.json").read_text())
        return with_config(preprocessing={**config["preprocessing"], **changes})(tmp, run)
    return build


def huge_header(tmp: Path, run: Path) -> str:
    """model.safetensors declaring a header just over the limit (the file is that big too),
    with config.json's recorded hash removed so that the header check is what acts."""
    target = Path(with_config(files={})(tmp, run))
    raw = b"{" + b" " * MAX_HEADER_BYTES + b"}"
    (target / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return str(target)


def resume_with(make: Callable[[Path, Path], None]) -> Callable[[Path, Path], str]:
    """A copy of the run (with resume.pt) whose resume.pt is rewritten by ``make``."""
    def build(tmp: Path, run: Path) -> str:
        target = copy_run(run, tmp / "resume-run", resume=True)
        make(target / RESUME_FILE, run / RESUME_FILE)
        return str(target)
    return build


def _garbage(path: Path, _: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)


def _foreign(path: Path, _: Path) -> None:
    torch.save(torch.zeros(3), path)


def _missing_fields(path: Path, _: Path) -> None:
    torch.save({"epoch": 0, "model": {}}, path)


def _refused_pickle(path: Path, _: Path) -> None:
    with path.open("wb") as handle:  # a pickle weights_only=True must refuse to load
        pickle.dump({"epoch": 0, "model": Path("/etc/passwd")}, handle, protocol=2)


def _nan_weights(path: Path, good: Path) -> None:
    state = torch.load(good, weights_only=True)
    name = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    torch.save(state, path)


def _wrong_shapes(path: Path, good: Path) -> None:
    state = torch.load(good, weights_only=True)
    name = next(k for k, t in state["model"].items() if t.ndim == 4)
    state["model"][name] = state["model"][name][:1]
    torch.save(state, path)


def _image(tmp: Path) -> str:
    from PIL import Image

    path = tmp / "img.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    return str(path)


def _existing_file(tmp: Path) -> str:
    path = tmp / "notes.txt"
    path.write_text("my notes")
    return str(path)


# --------------------------------------------------------------------------- CLI cases

# (id, issue item, build(tmp, run) -> argv, text the error line must contain)
CLI_CASES: list[tuple[str, str, Callable[[Path, Path], list[str]], str]] = [
    # Issue 12.9: non-finite hyper-parameters, and a learning rate that diverges.
    ("lr-inf", "12.9", lambda t, r: [*FT, "--lr", "inf", "--out", str(t / "out")],
     "lr must be a finite number > 0, got inf"),
    ("lr-nan", "12.9", lambda t, r: [*FT, "--lr", "nan", "--out", str(t / "out")], "lr"),
    ("option-inf", "12.9", lambda t, r: [*FT, "--option", "frozen_groups=inf"], "inf"),
    ("llrd-decay-nan", "12.9", lambda t, r: [
        "finetune", "--backbone", "cifar_resnet20", "--strategy", "llrd", *FT[5:],
        "--option", "decay=nan"], "nan"),
    ("lr-1e30-diverges", "12.9", lambda t, r: [*FT, "--lr", "1e30", "--out", str(t / "out")],
     "became nan in epoch 1; lower the learning rate (--lr, now 1e+30)"),
    ("resume-nan-weights", "12.9", lambda t, r: [
        *FT, "--resume", resume_with(_nan_weights)(t, r)], "holds nan/inf weights"),
    # Medium, resource bounds: sizes in an untrusted config.json, LoRA rank, header size.
    ("config-num-classes-1e6", "resources", lambda t, r: [
        "evaluate", with_config(num_classes=1_000_000, class_names=None)(t, r), "--data",
        "digits"], f"num_classes must be between 1 and {MAX_CLASSES}"),
    ("config-input-size-8192", "resources", lambda t, r: [
        "predict", with_preprocessing(input_size=[3, 8192, 8192])(t, r), _image(t)],
     "input_size"),
    ("config-crop-pct-0.001", "resources", lambda t, r: [
        "predict", with_preprocessing(crop_pct=0.001)(t, r), _image(t)], "crop_pct"),
    ("config-crop-pct-string", "resources", lambda t, r: [
        "predict", with_preprocessing(crop_pct="0.9")(t, r), _image(t)], "crop_pct"),
    ("config-vit-image-size-16384", "resources", lambda t, r: [
        "predict", with_config(backbone="vit_b_16", builder_kwargs={"image_size": 16384})(t, r),
        _image(t)], "image_size"),
    ("config-lora-rank-1e9", "resources", lambda t, r: [
        "predict", with_config(strategy={"name": "lora", "options": {"rank": 10**9}},
                               prepared=True)(t, r), _image(t)], "rank"),
    ("config-option-infinity", "resources", lambda t, r: [
        "predict", with_config(strategy={"name": "partial",
                                         "options": {"frozen_groups": math.inf}})(t, r),
        _image(t)], "strategy.options"),
    ("config-format-version-999", "resources", lambda t, r: [
        "predict", with_config(format_version=999)(t, r), _image(t)], "format_version 999"),
    ("safetensors-header-over-limit", "resources", lambda t, r: [
        "predict", huge_header(t, r), _image(t)], "header"),
    ("lora-rank-100000", "resources", lambda t, r: [
        "finetune", "--backbone", "cifar_resnet20", "--strategy", "lora", *FT[5:],
        "--option", "rank=100000"], "rank must be a whole number from 1 to 1024"),
    ("image-size-100000", "resources", lambda t, r: [*FT, "--image-size", "100000"],
     f"image_size must be None or a whole number from 1 to {MAX_INPUT_SIDE}"),
    # Medium, "internal error" today.
    ("resume-garbage", "internal", lambda t, r: [*FT, "--resume", resume_with(_garbage)(t, r)],
     "is corrupt or not a zoo resume state"),
    ("resume-foreign-torch-file", "internal", lambda t, r: [
        *FT, "--resume", resume_with(_foreign)(t, r)], "not a zoo resume state"),
    ("resume-missing-fields", "internal", lambda t, r: [
        *FT, "--resume", resume_with(_missing_fields)(t, r)], "not a zoo resume state"),
    ("resume-refused-pickle", "internal", lambda t, r: [
        *FT, "--resume", resume_with(_refused_pickle)(t, r)], "UnpicklingError"),
    ("resume-wrong-shapes", "internal", lambda t, r: [
        *FT, "--resume", resume_with(_wrong_shapes)(t, r)], "does not fit this run"),
    ("device-bogus", "internal", lambda t, r: [*FT, "--device", "bogus"], "unknown device"),
    ("device-cuda-7", "internal", lambda t, r: [*FT, "--device", "cuda:7"],
     "device 'cuda:7' does not exist here"),
    ("device-meta", "internal", lambda t, r: [*FT, "--device", "meta"], "unsupported device"),
    ("evaluate-device-bogus", "internal", lambda t, r: [
        "evaluate", str(r), "--data", "digits", "--device", "bogus"], "unknown device"),
    ("seed-2**70", "internal", lambda t, r: [*FT, "--seed", str(2**70)], "seed"),
    ("seed-negative", "internal", lambda t, r: [*FT, "--seed", "-1"], "seed"),
    ("top-k-zero", "internal", lambda t, r: ["predict", str(r), _image(t), "--top-k", "0"],
     "--top-k"),
    ("top-k-negative", "internal", lambda t, r: ["predict", str(r), _image(t), "--top-k", "-1"],
     "--top-k"),
    ("plan-num-classes-negative", "internal", lambda t, r: [
        "plan", "cifar_resnet20", "partial", "--num-classes", "-1"], "num_classes"),
    ("plan-lr-nan", "internal", lambda t, r: ["plan", "cifar_resnet20", "partial", "--lr", "nan"],
     "lr"),
    ("out-is-an-existing-file", "internal", lambda t, r: [*FT, "--out", _existing_file(t)],
     "not an existing file"),
]


@pytest.mark.parametrize(("item", "build", "expected"),
                         [pytest.param(i, b, e, id=n) for n, i, b, e in CLI_CASES])
def test_cli_refuses_with_one_line_and_writes_nothing(
    item: str, build: Callable[[Path, Path], list[str]], expected: str, run_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12.9 and the medium bullets (resource bounds, "internal error" today): exit 2,
    one ``zoo: error:`` line naming the problem, no file created or changed anywhere."""
    argv = build(tmp_path, run_dir)
    before, run_before = tree(tmp_path), tree(run_dir)
    capsys.readouterr()
    started = time.perf_counter()
    line = one_line_error(zoo.cli.main(argv), capsys.readouterr().err)
    assert expected in line, line
    if os.environ.get("ZOO_SHOW_ERRORS"):
        print(f"\n{item}: {line}", file=sys.__stderr__)
    assert tree(tmp_path) == before
    assert tree(run_dir) == run_before
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 30


# --------------------------------------------------------------------------- 12.9 NaN guard


class Poison(Callback):
    """Puts a NaN into ``tensor`` of the model at the start or end of epoch ``epoch``."""

    def __init__(self, epoch: int, tensor: str, when: str = "start") -> None:
        self.epoch, self.tensor, self.when = epoch, tensor, when

    def _poison(self, run: Run, epoch: int) -> None:
        if epoch == self.epoch:
            with torch.no_grad():
                run.model.state_dict()[self.tensor].view(-1)[0] = math.nan

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if self.when == "start":
            self._poison(run, epoch)

    def on_epoch_end(self, run: Run, epoch: int, record: dict[str, Any]) -> None:
        if self.when == "end":
            self._poison(run, epoch)


def test_weights_that_become_nan_stop_the_run_at_the_last_good_state(
    tiny: zoo.Backbone, digits: Callable[..., Any], tmp_path: Path
) -> None:
    """Issue 12.9: a NaN in a BatchNorm running mean leaves the training loss finite (train
    mode normalises with batch statistics), yet the weights are ruined: the run stops in
    that epoch, says where the last good state is, and saves nothing from it."""
    out = tmp_path / "run"
    with pytest.raises(ZooError) as info:
        zoo.finetune(tiny.name, "full", digits(2), epochs=2, weights=None, image_size=16,
                     output_dir=out, quiet=True, callbacks=[Poison(1, "stem.1.running_mean")])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the weights became nan/inf (1 tensors, e.g. "
                              "'stem.1.running_mean') in epoch 2; the last good state is in "
                              f"{out / RESUME_FILE} (after epoch 1); lower the learning rate")
    saved = torch.load(out / RESUME_FILE, weights_only=True)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert not (out / "model.safetensors").exists()


def test_finetune_never_writes_a_checkpoint_with_nan_tensors(
    tiny: zoo.Backbone, digits: Callable[..., Any], tmp_path: Path
) -> None:
    """Issue 12.9: weights spoiled after the last epoch's checks (here by a callback) are
    still caught before the checkpoint is written."""
    out = tmp_path / "run"
    with pytest.raises(ZooError, match=r"the weights became nan/inf \(1 tensors, e\.g\. "
                                       r"'head\.weight'\) in epoch 1"):
        zoo.finetune(tiny.name, "full", digits(2), epochs=1, weights=None, image_size=16,
                     output_dir=out, quiet=True,
                     callbacks=[Poison(0, "head.weight", when="end")])
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


# --------------------------------------------------------------------------- API arguments


class Untouchable(torch.utils.data.Dataset):
    """A dataset that fails the test if zoo reads it: arguments are checked first."""

    def __len__(self) -> int:
        raise AssertionError("the data was read before the arguments were checked")

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("the data was read before the arguments were checked")


API_CASES = {
    "batch_size-str": ("batch_size", {"batch_size": "64"}),
    "lr-str": ("lr", {"lr": "1e-3"}),
    "lr-inf": ("lr", {"lr": math.inf}),
    "strategy_options-list": ("strategy_options", {"strategy_options": [1]}),
    "strategy_options-nan": ("strategy_options", {"strategy_options": {"frozen_groups": math.nan}}),
    "weight_decay-nan": ("weight_decay", {"weight_decay": math.nan}),
    "weight_decay-negative": ("weight_decay", {"weight_decay": -0.1}),
    "backbone-none": ("backbone", {"backbone": None}),
    "epochs-true": ("epochs", {"epochs": True}),
    "epochs-1e9": ("epochs", {"epochs": 10**9}),
    "seed-2**70": ("seed", {"seed": 2**70}),
    "num_classes-zero": ("num_classes", {"num_classes": 0}),
    "image_size-huge": ("image_size", {"image_size": 100_000}),
    "scheduler-bogus": ("scheduler", {"scheduler": "warp"}),
    # Issue 15: the training options are checked up front too
    "augment-bogus": ("augment", {"augment": "extreme"}),
    "optimizer-bogus": ("optimizer", {"optimizer": "lion"}),
    "momentum-1": ("momentum", {"momentum": 1.0}),
    "label_smoothing-negative": ("label_smoothing", {"label_smoothing": -0.1}),
    "warmup_epochs-nan": ("warmup_epochs", {"warmup_epochs": math.nan}),
    "accumulate-zero": ("accumulate", {"accumulate": 0}),
    "clip_grad-zero": ("clip_grad", {"clip_grad": 0.0}),
    "ema-1": ("ema", {"ema": 1.0}),
    "loggers-str": ("loggers", {"loggers": "csv"}),
    "checkpoint_kind-bogus": ("checkpoint_kind", {"checkpoint_kind": "half"}),
    "device-bogus": ("device", {"device": "bogus"}),
    "output_dir-file": ("output_dir", {"output_dir": "FILE"}),
}


@pytest.mark.parametrize(("name", "override"), list(API_CASES.values()), ids=list(API_CASES))
def test_api_arguments_are_checked_before_anything_is_built(
    name: str, override: dict[str, Any], register_backbones: Callable[..., Any],
    tmp_path: Path
) -> None:
    """Medium bullet ("internal error" today): ``zoo.finetune`` with a wrongly typed or
    out-of-range argument raises one-line ZooError naming it, before the backbone is built
    or the data read."""
    builds: list[int] = []

    def builder(*, num_classes: int = 10) -> TinyNet:
        builds.append(num_classes)
        return TinyNet(num_classes=num_classes)

    spy = dataclasses.replace(TINY, name="spy_tiny", builder=builder)
    register_backbones(spy)
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    kwargs: dict[str, Any] = dict(backbone="spy_tiny", strategy="partial", train=Untouchable(),
                                  epochs=1, weights=None, quiet=True,
                                  output_dir=tmp_path / "out")
    kwargs.update(override)
    if kwargs["output_dir"] == "FILE":
        kwargs["output_dir"] = existing
    with pytest.raises(ZooError) as info:
        zoo.finetune(**kwargs)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert builds == []
    assert not (tmp_path / "out").exists() and existing.read_text() == "mine"


# --------------------------------------------------------------------------- resource bounds

VALID = {
    "backbone": "cifar_resnet20", "num_classes": 3, "kind": "full", "format_version": 1,
    "strategy": {"name": "lora", "options": {"rank": 8, "targets": ["conv"]}},
    "preprocessing": {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.2] * 3,
                      "crop_pct": 0.875, "interpolation": "bicubic"},
    "builder_kwargs": {"image_size": 224},
}
HOSTILE_CONFIGS = {
    "num_classes-1e6": ({"num_classes": 1_000_000}, "num_classes"),
    "input_size-8192": ({"preprocessing": {**VALID["preprocessing"],
                                           "input_size": [3, 8192, 8192]}}, "input_size"),
    "channels-1000": ({"preprocessing": {**VALID["preprocessing"], "input_size": [1000, 8, 8],
                                         "mean": [0.5] * 1000, "std": [0.2] * 1000}},
                      "input_size"),
    "crop_pct-0.001": ({"preprocessing": {**VALID["preprocessing"], "crop_pct": 0.001}},
                       "crop_pct"),
    "crop_pct-string": ({"preprocessing": {**VALID["preprocessing"], "crop_pct": "0.9"}},
                        "crop_pct"),
    "crop_pct-nan": ({"preprocessing": {**VALID["preprocessing"], "crop_pct": math.nan}},
                     "crop_pct"),
    "resize-over-limit": ({"preprocessing": {**VALID["preprocessing"],
                                             "input_size": [3, 4096, 4096]}}, "crop_pct"),
    "interpolation-bogus": ({"preprocessing": {**VALID["preprocessing"],
                                               "interpolation": "lanczos9"}}, "interpolation"),
    "image_size-16384": ({"builder_kwargs": {"image_size": 16384}}, "image_size"),
    "builder_kwargs-inf": ({"builder_kwargs": {"drop_rate": math.inf}}, "builder_kwargs"),
    "option-nan": ({"strategy": {"name": "lora", "options": {"alpha": math.nan}}},
                   "strategy.options"),
    "format_version-999": ({"format_version": 999}, "format_version"),
    "format_version-str": ({"format_version": "1"}, "format_version"),
}


@pytest.mark.parametrize(("change", "field"), list(HOSTILE_CONFIGS.values()),
                         ids=list(HOSTILE_CONFIGS))
def test_config_sizes_are_bounded_before_anything_is_built(change: dict[str, Any],
                                                           field: str) -> None:
    """Medium bullet (resource bounds): a 1 KB config.json cannot ask for gigabytes; each
    out-of-range size is one CheckpointError naming its field."""
    assert validate_config(json.loads(json.dumps(VALID))) is not None
    with pytest.raises(CheckpointError) as info:
        validate_config({**VALID, **change}, "config.json")
    assert field in str(info.value) and "\n" not in str(info.value)


def test_every_real_model_fits_the_config_bounds() -> None:
    """Medium bullet (resource bounds): the limits refuse no real model: every registered
    backbone and weights tag, and all of timm's pretrained configs (sizes, crops, classes)."""
    configs = []
    for name in zoo.list_backbones():
        spec = zoo.get_backbone(name)
        for w in (*spec.weights, None):
            size = list(w.input_size if w else spec.input_size)
            crop = size[-1] / w.resize_size if w and w.resize_size else 1.0
            configs.append((name, w.num_classes if w else spec.num_classes, size, crop,
                            dict(spec.builder_kwargs)))
    timm = pytest.importorskip("timm")
    for name in timm.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        # three volo configs resize *below* the input (crop_pct 1.15): zoo's transform only
        # crops, so it refuses them whatever the bounds (BatchTransform: crop_pct in (0, 1])
        if cfg is not None and (cfg.crop_pct or 1.0) <= 1:
            configs.append((name, cfg.num_classes or 1, list(cfg.input_size),
                            cfg.crop_pct or 1.0, {}))
    assert len(configs) > 1000
    for name, classes, size, crop, kwargs in configs:
        validate_config({"backbone": name, "num_classes": classes, "kind": "full",
                         "preprocessing": {"input_size": size, "mean": [0.5] * size[0],
                                           "std": [0.5] * size[0], "crop_pct": crop},
                         "builder_kwargs": kwargs}, name)


def test_lora_accepts_ranks_up_to_its_documented_limit() -> None:
    """Medium bullet (resource bounds): the LoRA rank limit (1024) leaves real ranks alone."""
    assert make_strategy("lora", {"rank": 1024}).rank == 1024
    with pytest.raises(zoo.IncompatibleError, match="rank must be a whole number from 1 to "
                                                    "1024, got 1025"):
        make_strategy("lora", {"rank": 1025})


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


PATHOLOGICAL_HEADERS = {
    # 89 MB of header used to cost minutes and gigabytes before it was refused.
    "over-the-size-limit": lambda: _safetensors(b"{" + b" " * MAX_HEADER_BYTES + b"}"),
    # 200,000 dimensions of 2**60: multiplying them out took 143 s.
    "shape-with-200000-dims": lambda: _safetensors(json.dumps(
        {"t": {"dtype": "F32", "shape": [2**60] * 200_000, "data_offsets": [0, 4]}}).encode(),
        b"\0" * 4),
    # nested 100,000 deep: Python's JSON parser raised RecursionError.
    "nested-100000-deep": lambda: _safetensors(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("make", list(PATHOLOGICAL_HEADERS.values()),
                         ids=list(PATHOLOGICAL_HEADERS))
def test_pathological_safetensors_headers_are_refused_fast(make: Callable[[], bytes],
                                                           tmp_path: Path) -> None:
    """Medium bullet (resource bounds): a header over ``MAX_HEADER_BYTES`` (16 MiB) is
    refused from its 8-byte length alone; absurd shapes and nesting are refused in well
    under a second, each as one "checkpoint is corrupt" line."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(make())
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="^checkpoint is corrupt: ") as info:
        validate_safetensors(path)
    assert time.perf_counter() - started < 1.0
    assert "\n" not in str(info.value)
    raw = path.read_bytes()[8:]
    with pytest.raises(CheckpointError, match="^checkpoint is corrupt: "):
        validate_header(raw, 4)
