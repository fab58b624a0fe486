"""The built-in backbone plugins: zoo_resnet, zoo_vit and zoo_cifar_resnet.

Each plugin is called directly (``register_backbones(register=list.append)``), exactly as
zoo's registry calls it, so these tests need nothing of the registry but the spec classes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import zoo_cifar_resnet
import zoo_resnet
import zoo_vit
from torch import nn
from zoo_cifar_resnet import model as cifar_model
from zoo_resnet import model as resnet_model
from zoo_vit import model as vit_model

import zoo
from zoo.core.spec import resolve_callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # test data on these machines, not part of zoo
needs_data = pytest.mark.skipif(
    not (DATA / "cifar-resnet").is_dir() or not (DATA / "cifar10-small").is_dir(),
    reason=f"shared test data not found at {DATA} (CIFAR-10 images and ResNet-20 weights)",
)


def _specs(plugin: object) -> list[zoo.Backbone]:
    specs: list[zoo.Backbone] = []
    plugin.register_backbones(register=specs.append)  # type: ignore[attr-defined]
    return specs


SPECS = {s.name: s for p in (zoo_resnet, zoo_vit, zoo_cifar_resnet) for s in _specs(p)}
# Built for real (values compared) below this size; larger ones are checked on "meta".
REAL_LIMIT = 100_000_000


def test_registered_names() -> None:
    assert sorted(SPECS) == sorted([
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
        "resnext50_32x4d", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
        "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
    ])
    assert SPECS["cifar_resnet20"].aliases == ("resnet20",)


def test_registration_does_not_import_torch() -> None:
    code = ("import sys, zoo_resnet, zoo_vit, zoo_cifar_resnet; "
            "assert 'torch' not in sys.modules, 'registration imported torch'")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit_b_16"])
@pytest.mark.slow
def test_torchvision_state_dict_loads_strictly(name: str) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name).eval()
    with torch.no_grad():  # perturb everything, e.g. ViT's zero-initialised head
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
    ours = SPECS[name].build().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2 if name.startswith("resnet") else 1, 3, 224, 224)
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _owners(groups: tuple[zoo.LayerGroup, ...], tensor_name: str) -> list[str]:
    return [g.name for g in groups if g.owns(tensor_name)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_groups_cover_every_parameter_once(name: str) -> None:
    spec = SPECS[name]
    with torch.device("meta"):
        model = spec.build(num_classes=7)
    groups = spec.layer_groups()
    assert groups[-1].name == "head"
    for param_name, _ in model.named_parameters():
        assert len(_owners(groups, param_name)) == 1, (param_name, _owners(groups, param_name))
    names = [n for n, _ in model.named_parameters()]
    for member in (m for g in groups for m in g.members):  # and no member names nothing
        assert any(n == member or n.startswith(member + ".") for n in names), member
    head = model.get_submodule(spec.head)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert _owners(groups, spec.head + ".weight") == ["head"]
    stages = resolve_callable(spec.stages)(model)
    assert [g for s in stages for g in s.groups] == [g.name for g in groups]


HEADS = {resnet_model.ResNet: "fc", vit_model.VisionTransformer: "heads.head",
         cifar_model.CifarResNet: "linear"}


def _check_stages(model: nn.Module, stages_fn: object, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        nn.init.normal_(model.get_submodule(HEADS[type(model)]).weight)  # ViT's head is zero
        expected = model(x)
        y = x
        for stage in stages_fn(model):  # type: ignore[operator]
            y = stage.forward(y)
    assert y.shape == expected.shape
    if x.device.type != "meta":
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.slow
def test_stages_compose_to_the_model(name: str) -> None:
    spec = SPECS[name]
    builder = resolve_callable(spec.builder)
    with torch.device("meta"):
        size = sum(p.numel() for p in spec.build().parameters())
    device = torch.device("cpu" if size < REAL_LIMIT else "meta")
    # Small inputs: ViTs rebuilt for two patches a side, ImageNet ResNets at 64 px.
    kwargs, pixels = {}, spec.input_size[-1]
    if name.startswith("vit_"):
        pixels = 2 * int(name.rsplit("_", 1)[1])
        kwargs = {"image_size": pixels}
    elif spec.input_size[-1] > 64:
        pixels = 64
    torch.manual_seed(0)
    with device:
        model = builder(num_classes=5, **kwargs)
        x = torch.randn(2, 3, pixels, pixels)
    _check_stages(model, resolve_callable(spec.stages), x)


def test_small_vit_stages_and_size_check() -> None:
    """The stages of a tiny ViT, plus the clear error for a wrong input size."""
    torch.manual_seed(0)
    model = vit_model.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                        hidden_dim=16, mlp_dim=32, num_classes=4)
    _check_stages(model, vit_model.stages, torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size=48"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit_model.vit_b_16(image_size=100)


def test_weights_match_torchvision_facts() -> None:
    """Every declared ImageNet weight agrees with torchvision's own metadata."""
    for name, spec in SPECS.items():
        if name.startswith("cifar_"):
            continue
        enum = torchvision.models.get_model_weights(name)
        assert spec.default_weights == enum.DEFAULT.name.lower()
        for w in spec.weights:
            tv = enum[w.tag.upper()]
            transform = tv.transforms()
            assert w.source == tv.url and tv.url.endswith(f"-{w.sha256}.pth")
            assert w.meta["num_params"] == tv.meta["num_params"]
            assert w.meta["acc@1"] == tv.meta["_metrics"]["ImageNet-1K"]["acc@1"]
            assert w.meta["recipe"] == tv.meta["recipe"]
            assert [w.resize_size] == transform.resize_size
            assert [w.input_size[-1]] == transform.crop_size
            assert w.interpolation == transform.interpolation.value
            assert (list(w.mean), list(w.std)) == (transform.mean, transform.std)
            assert w.categories == tuple(tv.meta["categories"])
            assert w.input_size == spec.input_size  # built at the size the weights need


def test_convert_checkpoint_formats_and_errors() -> None:
    state = cifar_model.resnet20().state_dict()
    wrapped = {"best_prec1": 90.0, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    for checkpoint in (wrapped, state):
        assert list(cifar_model.convert_checkpoint(checkpoint)) == list(state)
    with pytest.raises(ValueError, match="not a CIFAR ResNet checkpoint"):
        cifar_model.convert_checkpoint({"state_dict": {"fc.weight": torch.zeros(1)}})


@needs_data
@pytest.mark.slow
def test_cifar_resnet_checkpoints_and_accuracy() -> None:
    from PIL import Image
    from torchvision.transforms import v2

    for depth in (20, 56):  # the declared hashes match the published files
        weights = SPECS[f"cifar_resnet{depth}"].get_weights()
        path = DATA / "cifar-resnet" / weights.source.rsplit("/", 1)[1]
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(weights.sha256)

    spec = SPECS["cifar_resnet20"]
    weights = spec.get_weights("cifar10")
    checkpoint = torch.load(DATA / "cifar-resnet" / "resnet20-12fca82f.th",
                            weights_only=True, map_location="cpu")
    model = spec.build().eval()
    model.load_state_dict(resolve_callable(weights.convert)(checkpoint), strict=True)

    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(weights.mean), list(weights.std))])
    images, labels = [], []
    for label, category in enumerate(weights.categories):
        for path in sorted((DATA / "cifar10-small" / "test" / category).glob("*.jpg"))[:50]:
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(label)
    with torch.no_grad():
        predictions = model(torch.stack(images)).argmax(dim=1)
    accuracy = (predictions == torch.tensor(labels)).float().mean().item()
    print(f"ResNet-20 top-1 on {len(labels)} CIFAR-10 JPEG test images: {accuracy:.1%}")
    assert len(labels) == 500 and accuracy >= 0.75
