"""PEFT interop for LoRA (issue 16.5): zoo's adapters load in PEFT and PEFT's load in zoo.

Both compute ``W x + (B A x) * alpha / r``; only the storage differs (zoo: a weight
parametrization; PEFT: ``lora_A``/``lora_B`` modules). The bases are seeded random models
saved locally and registered as weights (conftest.py), so the adapter has a base that both
sides rebuild. Also: ``save_checkpoint(model, DIR, strategy=lora)`` on a model that
``finetune`` did not make records the strategy, so the checkpoint loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zoo_vit
from safetensors.torch import load_file, save_file
from zoo_strategies.lora import LoRA
from zoo_vit.model import VisionTransformer, stages

import zoo
from zoo.cli import main as cli
from zoo.models.strategy import make_strategy
from zoo.persist.config import config_from_model

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-5  # the bar for |PEFT - zoo|
TINY_VIT = zoo.Backbone(  # the in-tree ViT code, two blocks wide 32 at 32 px
    name="vit_tiny",
    builder=functools.partial(VisionTransformer, image_size=32, patch_size=16, num_layers=2,
                              num_heads=2, hidden_dim=32, mlp_dim=64),
    groups=zoo_vit.layer_groups(2), head="heads.head", num_classes=1000,
    input_size=(3, 32, 32), stages=stages, description="a two-block in-tree ViT")


def images(size: int, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def lora_model(backbone: str, options: dict[str, Any], num_classes: int = 4) -> torch.nn.Module:
    """The registered base with zoo LoRA adapters whose B is non-zero (as after training)
    and a new, trained-looking head: what a LoRA run leaves."""
    torch.manual_seed(1)
    model = zoo.create_model(backbone, weights="local", num_classes=num_classes)
    strategy = make_strategy("lora", options)
    model = strategy.prepare(model, zoo.get_backbone(backbone).layer_groups(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)
    model.zoo_strategy = strategy
    return model.eval()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def peft_base(backbone: str, num_classes: int = 4) -> torch.nn.Module:
    """The base PEFT is given: the same registered weights, a head of the task's size."""
    return zoo.create_model(backbone, weights="local", num_classes=num_classes).eval()


def base_named(pretrained: Callable[..., str], arch: str) -> str:
    """``arch`` registered as ``peft_base`` with local seeded "pretrained" weights."""
    spec = zoo.get_backbone(arch)  # renamed first: conftest names files after the backbone
    return pretrained(dataclasses.replace(spec, name=arch.replace("/", "_")), name="peft_base")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.abs().max() > 0.05  # a real output, not zeros
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- zoo -> PEFT


@pytest.mark.parametrize("arch,options,size", [
    ("resnet18", {"rank": 2, "alpha": 4}, 32),  # Conv2d adapters (and a Linear head)
    ("timm/test_vit", {"rank": 3, "alpha": 3}, 160),  # timm: Linear qkv/proj/mlp, Conv2d patch
])
@pytest.mark.slow
def test_zoo_lora_checkpoint_loads_in_peft(arch: str, options: dict[str, Any], size: int,
                                           pretrained: Callable[..., str],
                                           tmp_path: Path) -> None:
    """Issue 16.5: 'zoo export DIR --format peft' writes adapter_model.safetensors and
    adapter_config.json; PeftModel.from_pretrained(base, FOLDER) computes the zoo model's
    outputs (max abs difference <= 1e-5), keys and shapes as PEFT names them."""
    name = base_named(pretrained, arch)
    model = lora_model(name, options)
    zoo.save_checkpoint(model, tmp_path / "ckpt", strategy=model.zoo_strategy)
    assert cli(["export", str(tmp_path / "ckpt"), "--format", "peft",
                "--out", str(tmp_path / "adapter")]) == 0
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    x = images(size)
    expected = outputs(zoo.load_checkpoint(tmp_path / "ckpt"), x)
    peft_model = peft.PeftModel.from_pretrained(peft_base(name), str(tmp_path / "adapter"))
    diff = max_diff(outputs(peft_model, x), expected)
    print(f"{arch}: zoo -> PEFT max abs difference {diff:.2e}")
    assert diff <= TOLERANCE

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == (
        "LORA", options["rank"], options["alpha"])
    head = zoo.get_backbone(name).head
    assert config["modules_to_save"] == [head]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for k in tensors if k.endswith(".lora_A.weight")}
    assert adapted == {k.split(".parametrizations.")[0] for k in model.state_dict()
                       if k.endswith(".lora_A")}
    for path in adapted:  # Linear: (r, in), (out, r); conv: (r, in, k, k), (out, r, 1, 1)
        weight = model.get_submodule(path).parametrizations.weight.original
        a, b = tensors[f"base_model.model.{path}.lora_A.weight"], \
            tensors[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape == (options["rank"], *weight.shape[1:])
        assert b.shape == (weight.shape[0], options["rank"], *[1] * (weight.dim() - 2))
    assert f"base_model.model.{head}.weight" in tensors


def test_peft_export_refuses_what_peft_would_compute_differently(
        register_backbones: Callable[..., Any], base_weights_file: Callable[..., Any],
        tmp_path: Path) -> None:
    """Issue 16.5: LoRA on a MultiheadAttention's out_proj has no effect in PEFT (the attention
    reads the weight directly), so exporting it is one clear error, not a silently different
    adapter; leaving it out with the 'modules' option exports exactly."""
    from conftest import with_local_weights

    path, sha = base_weights_file(TINY_VIT)
    register_backbones(with_local_weights(TINY_VIT, path, sha, "vit_tiny_local"))
    model = lora_model("vit_tiny_local", {"rank": 2})
    with pytest.raises(zoo.ZooError, match="out_proj.*MultiheadAttention reads this weight"):
        zoo.export(model, format="peft", out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    model = lora_model("vit_tiny_local", {"rank": 2, "modules": ["*.mlp.*", "conv_proj"]})
    out = zoo.export(model, format="peft", out=tmp_path / "adapter")
    x = images(32)
    peft_model = peft.PeftModel.from_pretrained(peft_base("vit_tiny_local"), str(out))
    diff = max_diff(outputs(peft_model, x), outputs(model, x))
    print(f"in-tree ViT (mlp + conv_proj): zoo -> PEFT max abs difference {diff:.2e}")
    assert diff <= TOLERANCE


def test_peft_export_needs_adapters_and_a_free_folder(pretrained: Callable[..., str],
                                                      tmp_path: Path) -> None:
    """Issue 16.5: a model without adapters (or merged ones) is refused; an existing adapter
    folder is replaced only with overwrite=True, and other files in it are left alone."""
    name = pretrained("cifar_resnet20")
    plain = zoo.create_model(name, weights="local", num_classes=3)
    with pytest.raises(zoo.ZooError, match="no LoRA adapters"):
        zoo.export(plain, format="peft", out=tmp_path / "a")
    model = lora_model(name, {"rank": 2}, num_classes=3)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    zoo.export(model, format="peft", out=out)
    first = (out / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("lora_B")).add_(1.0)
    with pytest.raises(zoo.ZooError, match="already holds a PEFT adapter.*--overwrite"):
        zoo.export(model, format="peft", out=out)
    assert (out / "adapter_model.safetensors").read_bytes() == first
    zoo.export(model, format="peft", out=out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) + os.listdir(out) if n.startswith(".")]


# --------------------------------------------------------------------------- PEFT -> zoo


def peft_adapter(backbone: str, folder: Path, targets: list[str], modules_to_save: list[str],
                 **config: Any) -> torch.nn.Module:
    """An adapter made by PEFT itself (random A and B), saved with save_pretrained."""
    torch.manual_seed(2)
    lora = peft.LoraConfig(target_modules=targets, modules_to_save=modules_to_save,
                           init_lora_weights=False, **config)
    model = peft.get_peft_model(peft_base(backbone), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a trained adapter's size, not init_lora_weights=False's
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("arch,targets,config,size", [
    ("resnet18", ["conv1", "layer1.0.conv2", "layer4.1.conv1", "layer3.0.downsample.0"],
     {"r": 4, "lora_alpha": 8}, 32),
    ("timm/test_vit", ["qkv", "proj", "fc2"], {"r": 2, "lora_alpha": 5, "use_rslora": True},
     160),
])
@pytest.mark.slow
def test_peft_adapter_loads_in_zoo(arch: str, targets: list[str], config: dict[str, Any],
                                   size: int, pretrained: Callable[..., str],
                                   tmp_path: Path) -> None:
    """Issue 16.5: zoo.load_peft_adapter applies a PEFT LoRA folder to its registered base and
    computes PEFT's outputs (<= 1e-5); the result saves as a zoo checkpoint that loads."""
    name = base_named(pretrained, arch)
    head = zoo.get_backbone(name).head
    peft_model = peft_adapter(name, tmp_path / "adapter", targets, [head], **config)
    x = images(size)
    expected = outputs(peft_model, x)
    model = zoo.load_peft_adapter(tmp_path / "adapter", name, weights="local")
    diff = max_diff(outputs(model, x), expected)
    print(f"{arch}: PEFT -> zoo max abs difference {diff:.2e}")
    assert diff <= TOLERANCE
    adapted = {k.split(".parametrizations.")[0] for k in model.state_dict() if ".lora_A" in k}
    assert adapted == {p for p, m in peft_model.base_model.model.named_modules()
                       if isinstance(m, peft.tuners.lora.LoraLayer)}
    options = model.zoo_config["strategy"]["options"]
    rank, alpha = config["r"], config["lora_alpha"]
    assert options["rank"] == rank
    assert math.isclose(options["alpha"] / rank, alpha / (math.sqrt(rank)
                        if config.get("use_rslora") else rank))

    zoo.save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["kind"] == "delta"
    assert float((outputs(zoo.load_checkpoint(tmp_path / "ckpt"), x) - expected).abs().max()) \
        <= TOLERANCE


def test_adapter_written_by_zoo_loads_back_without_naming_its_base(
        pretrained: Callable[..., str], tmp_path: Path) -> None:
    """Issue 16.5: a zoo-written adapter records its base (backbone, weights sha256, class
    names, preprocessing), so load_peft_adapter(FOLDER) alone rebuilds the same model."""
    name = pretrained("resnet18")
    model = lora_model(name, {"rank": 2, "alpha": 2})
    model.zoo_config = {**config_from_model(model),
                        "class_names": ["ant", "bee", "cat", "dog"]}
    out = zoo.export(model, format="peft", out=tmp_path / "adapter")
    again = zoo.load_peft_adapter(out)
    x = images(32)
    assert float((outputs(again, x) - outputs(model, x)).abs().max()) <= TOLERANCE
    assert again.zoo_config["class_names"] == ["ant", "bee", "cat", "dog"]
    assert again.zoo_config["weights"]["sha256"] == model.zoo_weights["sha256"]
    with pytest.raises(zoo.CheckpointError, match="is a PEFT adapter.*zoo.load_peft_adapter"):
        zoo.load_checkpoint(out)  # the folder says what it is and how to load it


# --------------------------------------------------------------------------- hostile folders


def _break(case: str, folder: Path, outside: Path) -> str:
    """Damage a good adapter folder one way; return what the error must say."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    weights = folder / "adapter_model.safetensors"
    if case == "weights-symlink-out":
        os.replace(weights, outside)
        weights.symlink_to(outside)
        return "symbolic link"
    if case == "not-lora":
        config["peft_type"] = "IA3"
        expected = "LoRA adapters only"
    elif case == "huge-rank":
        config["r"] = 10**9
        expected = "r must be a whole number from 1 to 1024"
    elif case == "dora":
        config["use_dora"] = True
        expected = "use_dora is set"
    elif case in ("wrong-shape", "unknown-module"):
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("lora_A.weight"))
        if case == "wrong-shape":
            tensors[key] = torch.zeros(7, 3)
            expected = "should be a float tensor of shape"
        else:
            tensors[key.replace("conv1", "conv99", 1)] = tensors.pop(key)
            expected = "does not have"
        save_file(tensors, str(weights))
    else:
        raise AssertionError(case)
    config_path.write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("case", ["weights-symlink-out", "not-lora", "huge-rank", "dora",
                                  "wrong-shape", "unknown-module"])
def test_bad_adapter_folders_are_refused_in_one_line(case: str, pretrained: Callable[..., str],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.5: an adapter folder from a stranger is checked before use: links out of the
    folder, other PEFT methods, absurd ranks, DoRA, wrong shapes and unknown modules are one
    clear ZooError."""
    name = pretrained("resnet18")
    folder = tmp_path / "adapter"
    peft_adapter(name, folder, ["conv1", "layer1.0.conv1"], ["fc"], r=2, lora_alpha=2)
    expected = _break(case, folder, tmp_path / "elsewhere.safetensors")
    with pytest.raises(zoo.ZooError) as info:
        zoo.load_peft_adapter(folder, name, weights="local")
    message = str(info.value)
    assert expected in message and "\n" not in message, message


# --------------------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_records_a_strategy_passed_by_the_caller(tmp_path: Path) -> None:
    """Issue 16.5 fix: save_checkpoint(model, DIR, strategy=lora) on a model finetune did not
    make used to write strategy: null, and the checkpoint could not load. Now the strategy
    (made by make_strategy or directly as LoRA(...)) is recorded and the checkpoint loads."""
    x = images(32)
    for strategy in (make_strategy("lora", {"rank": 2}), LoRA(rank=3, alpha=6.0)):
        model = zoo.create_model("cifar_resnet20", num_classes=3)
        strategy.prepare(model, zoo.get_backbone("cifar_resnet20").layer_groups(model))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.05)
        directory = tmp_path / f"rank{strategy.rank}"
        zoo.save_checkpoint(model, directory, strategy=strategy)
        record = json.loads((directory / "config.json").read_text())["strategy"]
        assert record["name"] == "lora" and record["options"]["rank"] == strategy.rank
        loaded = zoo.load_checkpoint(directory)
        assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_save_checkpoint_refuses_adapters_it_could_not_rebuild(tmp_path: Path) -> None:
    """Issue 16.5 fix: adapters with no strategy, or with a strategy whose options build other
    adapters, are refused in one line before anything is written."""
    model = zoo.create_model("cifar_resnet20", num_classes=3)
    make_strategy("lora", {"rank": 2}).prepare(
        model, zoo.get_backbone("cifar_resnet20").layer_groups(model))
    with pytest.raises(zoo.ZooError, match="no strategy is recorded: pass strategy="):
        zoo.save_checkpoint(model, tmp_path / "a")
    with pytest.raises(zoo.ZooError, match="does not rebuild this model's tensors"):
        zoo.save_checkpoint(model, tmp_path / "b", strategy=make_strategy("lora", {"rank": 4}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
