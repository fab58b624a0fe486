"""Export (issue 16.3): ONNX and TorchScript files that run without zoo and say how to feed them.

Each exported file is run outside zoo (ONNX in onnxruntime, TorchScript in a fresh Python
process that imports only torch) and compared with the zoo model's own outputs, for an
in-tree ResNet, an in-tree ViT and a timm model, all with random weights (nothing is
downloaded). The files carry the preprocessing and class names as metadata.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo_vit
from conftest import registered
from zoo_vit.model import VisionTransformer, stages

import zoo
from zoo.cli import main as cli
from zoo.persist.config import config_from_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4  # the bar for |exported - zoo|

# The in-tree ViT code (zoo_vit.model.VisionTransformer), two blocks wide 32 at 32 px: the
# same modules as vit_b_16, small enough to export in seconds.
TINY_VIT = zoo.Backbone(
    name="test_vit_tiny",
    builder=functools.partial(VisionTransformer, image_size=32, patch_size=16, num_layers=2,
                              num_heads=2, hidden_dim=32, mlp_dim=64),
    groups=zoo_vit.layer_groups(2), head="heads.head", num_classes=1000,
    input_size=(3, 32, 32), stages=stages, description="a two-block in-tree ViT")

MODELS = {  # name: (backbone, builder arguments)
    "resnet": ("resnet18", {}),
    "vit": ("test_vit_tiny", {}),
    "timm": ("timm/test_vit", {"img_size": 64}),
}


def build(backbone: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """A random model with a random (not zero) 5-class head, so outputs differ per image."""
    torch.manual_seed(0)
    model = zoo.create_model(backbone, num_classes=5, **kwargs).eval()
    head = model.get_submodule(zoo.get_backbone(backbone).head)
    with torch.no_grad():
        head.weight.normal_(std=0.2)
        head.bias.normal_(std=0.2)
    return model


def probe(model: torch.nn.Module, batch: int = 3) -> torch.Tensor:
    size = model.zoo_config["preprocessing"]["input_size"] if hasattr(model, "zoo_config") \
        else None
    shape = size or [3, 32, 32]
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(7))


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each model exported both ways, with its input size and zoo's outputs on a probe."""
    folder = tmp_path_factory.mktemp("exported")
    result = {}
    with registered(TINY_VIT):
        for key, (backbone, kwargs) in MODELS.items():
            model = build(backbone, kwargs)
            size = list(zoo.get_backbone(backbone).input_size)
            if kwargs.get("img_size"):
                size = [3, kwargs["img_size"], kwargs["img_size"]]
            model.zoo_config = {**config_from_model(model), "builder_kwargs": kwargs,
                                "preprocessing": {"input_size": size, "mean": [0.5] * 3,
                                                  "std": [0.25] * 3, "crop_pct": 0.875,
                                                  "interpolation": "bicubic"},
                                "class_names": [f"class {i}" for i in range(5)]}
            x = probe(model)
            with torch.no_grad():
                expected = model(x)
            onnx_file = zoo.export(model, format="onnx", out=folder / f"{key}.onnx")
            script_file = zoo.export(model, format="torchscript", out=folder / f"{key}.pt")
            torch.save({"x": x, "expected": expected}, folder / f"{key}.probe.pt")
            result[key] = {"onnx": onnx_file, "torchscript": script_file, "x": x,
                           "expected": expected}
    return result


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.slow
def test_onnx_file_gives_zoos_outputs_in_onnxruntime(exported: dict[str, Any], key: str
                                                     ) -> None:
    """Issue 16.3: the ONNX file run by onnxruntime matches zoo (max abs difference <= 1e-4),
    for any batch size."""
    item = exported[key]
    diff = float((run_onnx(item["onnx"], item["x"]) - item["expected"]).abs().max())
    print(f"{key}: onnxruntime max abs difference {diff:.2e}")
    assert diff <= TOLERANCE
    assert item["expected"].abs().max() > 0.1  # not a trivially zero output
    one = run_onnx(item["onnx"], item["x"][:1])
    assert one.shape == (1, 5)
    assert float((one - item["expected"][:1]).abs().max()) <= TOLERANCE


@pytest.mark.slow
def test_onnx_metadata_says_how_to_feed_the_model(exported: dict[str, Any]) -> None:
    """Issue 16.3: metadata_props hold the input size, mean, std, crop_pct, interpolation and
    class names, each as its own entry and all together as JSON under 'zoo'."""
    props = metadata(exported["resnet"]["onnx"])
    assert json.loads(props["input_size"]) == [3, 224, 224]
    assert json.loads(props["mean"]) == [0.5] * 3
    assert json.loads(props["std"]) == [0.25] * 3
    assert json.loads(props["crop_pct"]) == 0.875
    assert props["interpolation"] == "bicubic"
    assert json.loads(props["class_names"]) == [f"class {i}" for i in range(5)]
    assert props["backbone"] == "resnet18"
    everything = json.loads(props["zoo"])
    assert everything["num_classes"] == 5 and everything["input_size"] == [3, 224, 224]
    graph = onnx.load(str(exported["resnet"]["onnx"])).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.slow
def test_torchscript_file_gives_zoos_outputs_in_a_fresh_process(
        exported: dict[str, Any], tmp_path: Path) -> None:
    """Issue 16.3: a new Python process that imports only torch loads each TorchScript file,
    reads zoo.json from it, and computes zoo's outputs (max abs difference <= 1e-4)."""
    jobs = {key: (str(item["torchscript"]), str(item["torchscript"]).replace(".pt", ".probe.pt"))
            for key, item in exported.items()}
    code = (
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "jobs, result = json.loads(sys.argv[1]), {}\n"
        "for key, (path, probe) in jobs.items():\n"
        "    extra = {'zoo.json': ''}\n"
        "    model = torch.jit.load(path, _extra_files=extra)\n"
        "    data = torch.load(probe)\n"
        "    with torch.no_grad():\n"
        "        diff = (model(data['x']) - data['expected']).abs().max().item()\n"
        "    result[key] = {'diff': diff, 'meta': json.loads(extra['zoo.json'])}\n"
        "print(json.dumps(result))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key, row in result.items():
        print(f"{key}: TorchScript (fresh process) max abs difference {row['diff']:.2e}")
        assert row["diff"] <= TOLERANCE, key
        assert row["meta"]["class_names"] == [f"class {i}" for i in range(5)]
        assert row["meta"]["mean"] == [0.5] * 3 and row["meta"]["interpolation"] == "bicubic"
    assert result["timm"]["meta"]["input_size"] == [3, 64, 64]


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def lora_delta(pretrained: Callable[..., str], tmp_path: Path) -> Path:
    """A delta checkpoint of a LoRA run (adapters unmerged) on real digits."""
    base = pretrained("cifar_resnet20")
    data = zoo.load_data("digits", limit_per_class=2)
    zoo.finetune(base, "lora", data.tensors, epochs=1, batch_size=10, lr=5e-2, image_size=16,
                 strategy_options={"rank": 2}, output_dir=tmp_path / "run", quiet=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kind"] == "delta"
    return tmp_path / "run"


@pytest.mark.slow
def test_cli_exports_a_lora_delta_checkpoint_merged(lora_delta: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.3: 'zoo export DIR' loads a delta checkpoint (its base rebuilt) and writes
    the full model, LoRA merged: same outputs, no adapter in the graph, the run's classes."""
    out = tmp_path / "model.onnx"
    assert cli(["export", str(lora_delta), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model = zoo.load_checkpoint(lora_delta)
    assert any(".lora_" in k for k in model.state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    assert float((run_onnx(out, x) - expected).abs().max()) <= TOLERANCE
    graph = onnx.load(str(out)).graph
    assert not any("lora" in init.name for init in graph.initializer)
    props = metadata(out)
    assert json.loads(props["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(props["input_size"]) == [3, 16, 16]
    assert props["strategy"] == "lora"
    assert any(".lora_" in k for k in model.state_dict())  # the loaded model is untouched

    script = tmp_path / "model.pt"
    assert cli(["export", str(lora_delta), "--format", "torchscript", "--out", str(script)]) == 0
    extra = {"zoo.json": ""}
    loaded = torch.jit.load(str(script), _extra_files=extra)
    assert float((loaded(x) - expected).abs().max()) <= TOLERANCE
    assert json.loads(extra["zoo.json"])["num_classes"] == 10


def test_export_never_replaces_a_file_unless_asked(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.3: --out that exists is refused in one line and left as it was; --overwrite
    replaces it atomically; no temporary file is left behind either way."""
    model = build("cifar_resnet20", {})
    directory = tmp_path / "ckpt"
    zoo.save_checkpoint(model, directory, kind="full")
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    code = cli(["export", str(directory), "--format", "torchscript", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    assert cli(["export", str(directory), "--format", "torchscript", "--out", str(out),
                "--overwrite"]) == 0
    assert torch.jit.load(str(out))(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert sorted(os.listdir(out.parent)) == ["model.pt"]


@pytest.mark.parametrize("case", ["symlink", "folder", "format", "not-a-checkpoint"])
def test_export_refuses_bad_targets_in_one_line(case: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.3: an --out that is a link or a folder, an unknown format or a source that is
    not a checkpoint: one clear line, exit 2, nothing written (a link's target untouched)."""
    directory = tmp_path / "ckpt"
    zoo.save_checkpoint(build("cifar_resnet20", {}), directory, kind="full")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out, fmt, source = tmp_path / "model.onnx", "onnx", str(directory)
    if case == "symlink":
        out.symlink_to(victim)
    elif case == "folder":
        out.mkdir()
    elif case == "format":
        fmt = "tflite"
    else:
        source = str(victim)
    before = sorted(os.listdir(tmp_path))
    code = cli(["export", source, "--format", fmt, "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == before
    assert victim.read_text() == "keep"


def test_python_export_refuses_unknown_format_and_missing_out(tmp_path: Path) -> None:
    """Issue 16.3: zoo.export's own argument checks are ZooErrors saying what to pass."""
    model = build("cifar_resnet20", {})
    with pytest.raises(zoo.ZooError, match="unknown export format 'tflite'"):
        zoo.export(model, format="tflite", out=tmp_path / "m")
    with pytest.raises(zoo.ZooError, match="out=PATH"):
        zoo.export(model, format="onnx")
    assert os.listdir(tmp_path) == []
