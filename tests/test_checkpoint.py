"""Checkpoints: full and delta, LoRA merged and unmerged, and files that cannot be trusted.

A checkpoint is a directory: model.safetensors, config.json, metrics.json, README.md. A
*delta* holds only the tensors training changed and names its base weights by sha256;
loading rebuilds the base and refuses one whose hash differs. Bases here are seeded random
models saved locally and registered as "pretrained" (see conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import registered, with_local_weights
from safetensors.torch import load_file

import zoo
from zoo.core.errors import CheckpointError
from zoo.data.transforms import transform_from_config
from zoo.models.strategy import make_strategy
from zoo.persist import checkpoint as ckpt
from zoo.persist.config import config_from_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONE = "cifar_resnet20"
NAME = "test_cifar_resnet20"


@pytest.fixture(scope="module")
def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    data = zoo.load_data("digits", limit_per_class=2)
    assert data.tensors is not None
    return data.tensors


@pytest.fixture
def base(pretrained: Callable[..., str]) -> str:
    return pretrained(BACKBONE)


def train(backbone: str, strategy: str, data: Any, out: Path | None, *, kind: str = "auto",
          options: dict[str, Any] | None = None, image_size: int = 16,
          **kwargs: Any) -> zoo.FinetuneResult:
    return zoo.finetune(backbone, strategy, data, epochs=1, batch_size=10, lr=1e-2,
                        image_size=image_size, strategy_options=options, output_dir=out,
                        checkpoint_kind=kind, quiet=True, **kwargs)


def probe(size: int = 16) -> torch.Tensor:
    return torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, size: int = 16) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(probe(size)), b(probe(size)))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def tensor_names(directory: Path) -> set[str]:
    return set(load_file(directory / ckpt.MODEL_FILE))


def edit_config(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / ckpt.CONFIG_FILE
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------- full and delta


@pytest.mark.parametrize("kind", ["full", "delta"])
@pytest.mark.slow
def test_checkpoint_reloads_to_identical_outputs(kind: str, base: str, train_data: Any,
                                                 tmp_path: Path) -> None:
    result = train(base, "partial", train_data, tmp_path / "run", kind=kind,
                   options={"frozen_groups": 2})
    assert result.checkpoint == tmp_path / "run"
    for name in ("model.safetensors", "config.json", "metrics.json", "README.md"):
        assert (result.checkpoint / name).is_file()
    loaded = zoo.load_checkpoint(result.checkpoint)
    assert not loaded.training
    assert_same_model(result.model, loaded)

    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["kind"] == kind
    assert config["backbone"] == base
    assert config["num_classes"] == 10
    assert config["class_names"] == [str(i) for i in range(10)]
    assert config["strategy"] == {"name": "partial", "options": {"frozen_groups": 2}}
    assert config["weights"]["tag"] == "local"
    assert config["weights"]["sha256"] == zoo.get_backbone(base).weights[0].sha256
    assert config["preprocessing"]["input_size"] == [3, 16, 16]
    assert config["zoo_version"] == zoo.__version__
    metrics = json.loads((result.checkpoint / "metrics.json").read_text())
    assert metrics["trainable_params"] == result.metrics["trainable_params"]
    card = (result.checkpoint / "README.md").read_text()
    assert card.startswith("---\n") and f"# {base} fine-tuned with partial" in card


def test_delta_holds_only_what_training_changed(base: str, train_data: Any,
                                               tmp_path: Path) -> None:
    """Frozen groups (stem, layer1) are left out; trained groups' BN statistics are kept."""
    result = train(base, "partial", train_data, tmp_path / "run", options={"frozen_groups": 2})
    names = tensor_names(result.checkpoint)
    assert not any(n.startswith(("conv1.", "bn1.", "layer1.")) for n in names)
    assert {"layer2.0.bn1.running_mean", "layer3.2.bn2.num_batches_tracked",
            "linear.weight", "linear.bias"} <= names
    assert names == {k for k in result.model.state_dict()
                     if not k.startswith(("conv1.", "bn1.", "layer1."))}


@pytest.mark.slow
def test_delta_for_linear_probe_on_resnet50_is_under_one_percent_of_full(
        pretrained: Callable[..., str], tmp_path: Path) -> None:
    name = pretrained("resnet50")
    data = zoo.load_data("digits", limit_per_class=5)
    result = train(name, "linear_probe", data, None, image_size=32)
    delta = zoo.save_checkpoint(result.model, tmp_path / "delta", kind="delta")
    full = zoo.save_checkpoint(result.model, tmp_path / "full", kind="full")
    delta_size = (delta / ckpt.MODEL_FILE).stat().st_size
    full_size = (full / ckpt.MODEL_FILE).stat().st_size
    assert tensor_names(delta) == {"fc.weight", "fc.bias"}
    assert delta_size < 0.01 * full_size, (delta_size, full_size)
    assert_same_model(result.model, zoo.load_checkpoint(delta), size=32)


def test_a_model_without_pretrained_base_is_saved_in_full(tiny: zoo.Backbone, train_data: Any,
                                                          tmp_path: Path) -> None:
    result = train(tiny.name, "full", train_data, tmp_path / "run", weights=None)
    assert json.loads((result.checkpoint / "config.json").read_text())["kind"] == "full"
    assert tensor_names(result.checkpoint) == set(result.model.state_dict())
    assert_same_model(result.model, zoo.load_checkpoint(result.checkpoint))


def test_asking_for_a_delta_of_an_unregistered_base_saves_full_and_says_so(
        base_weights_file: Callable[..., tuple[Path, str]], tiny: zoo.Backbone,
        train_data: Any, tmp_path: Path) -> None:
    """A local weights file cannot be rebuilt elsewhere: "auto" saves full quietly, an
    explicit "delta" saves full with a warning that says why and what to do."""
    path, _ = base_weights_file(tiny)
    result = train(tiny.name, "linear_probe", train_data, None, weights=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = zoo.save_checkpoint(result.model, tmp_path / "auto")
    with pytest.warns(UserWarning, match="not the delta asked for.*register the weights"):
        asked = zoo.save_checkpoint(result.model, tmp_path / "asked", kind="delta")
    for saved in (auto, asked):
        assert json.loads((saved / "config.json").read_text())["kind"] == "full"
        assert_same_model(result.model, zoo.load_checkpoint(saved))


# --------------------------------------------------------------------------- base hash


@pytest.fixture
def delta_run(base: str, train_data: Any, tmp_path: Path) -> zoo.FinetuneResult:
    return train(base, "linear_probe", train_data, tmp_path / "run")


def test_delta_declaring_a_different_base_sha_is_refused(delta_run: zoo.FinetuneResult) -> None:
    def other_sha(config: dict[str, Any]) -> None:
        config["weights"]["sha256"] = "0" * 64

    edit_config(delta_run.checkpoint, other_sha)
    with pytest.raises(CheckpointError, match="needs the exact base weights"):
        zoo.load_checkpoint(delta_run.checkpoint)


def test_delta_on_other_registered_base_weights_is_refused(
        train_data: Any, base_weights_file: Callable[..., tuple[Path, str]],
        tmp_path: Path) -> None:
    """Later, the same name and tag point at other (valid, self-consistent) weights."""
    spec = zoo.get_backbone(BACKBONE)
    with registered(with_local_weights(spec, *base_weights_file(BACKBONE, seed=0), NAME)):
        result = train(NAME, "linear_probe", train_data, tmp_path / "run")
    with registered(with_local_weights(spec, *base_weights_file(BACKBONE, seed=1), NAME)), \
            pytest.raises(CheckpointError, match="needs the exact base weights"):
        zoo.load_checkpoint(result.checkpoint)


@pytest.mark.parametrize("declared", [True, False], ids=["sha-declared", "no-sha-declared"])
def test_delta_whose_base_file_changed_is_refused(declared: bool, train_data: Any,
                                                 base_weights_file: Callable[..., Any],
                                                 tmp_path: Path) -> None:
    original, sha = base_weights_file(BACKBONE)
    path = tmp_path / original.name
    path.write_bytes(original.read_bytes())
    spec = with_local_weights(zoo.get_backbone(BACKBONE), path, sha if declared else None,
                              "test_mutable_base")
    with registered(spec):
        result = train(spec.name, "linear_probe", train_data, tmp_path / "run")
        assert_same_model(result.model, zoo.load_checkpoint(result.checkpoint))
        state = torch.load(path, weights_only=True)
        state["conv1.weight"][0, 0, 0, 0] += 1.0
        torch.save(state, path)
        with pytest.raises(CheckpointError, match="base weights"):
            zoo.load_checkpoint(result.checkpoint)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.slow
def test_unmerged_lora_checkpoint_holds_only_adapters_and_head(base: str, train_data: Any,
                                                              tmp_path: Path) -> None:
    result = train(base, "lora", train_data, tmp_path / "run", options={"rank": 2})
    names = tensor_names(result.checkpoint)
    adapters = {n for n in names if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    assert adapters and names - adapters == {"linear.weight", "linear.bias"}
    assert adapters == {k for k in result.model.state_dict() if ".lora_" in k}
    loaded = zoo.load_checkpoint(result.checkpoint)
    assert_same_model(result.model, loaded)
    full = zoo.load_checkpoint(zoo.save_checkpoint(result.model, tmp_path / "full",
                                                   kind="full"))
    assert_same_model(result.model, full)


def test_merged_lora_checkpoint_holds_no_adapter_tensors(base: str, train_data: Any,
                                                        tmp_path: Path) -> None:
    result = train(base, "lora", train_data, tmp_path / "run",
                   options={"rank": 2, "merge": True})
    names = tensor_names(result.checkpoint)
    assert not any("lora" in n or "parametrizations" in n for n in names)
    assert "linear.weight" in names and "layer1.0.conv1.weight" in names
    loaded = zoo.load_checkpoint(result.checkpoint)
    assert not any("lora" in k for k in loaded.state_dict())
    assert_same_model(result.model, loaded)


@pytest.mark.slow
def test_lora_model_with_a_shape_changing_builder_argument_saves_and_reloads(
        tmp_path: Path) -> None:
    """The base a checkpoint is checked against is built with its builder_kwargs, also on the
    meta device (``model_from_config``): a LoRA ViT built with ``img_size=64`` has a larger
    ``pos_embed`` than the default, and saving it once failed ("does not rebuild")."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = zoo.create_model("timm/test_vit", num_classes=3, img_size=64)
    config = {**config_from_model(model), "builder_kwargs": {"img_size": 64}}
    lora = make_strategy("lora", {"rank": 2})
    model = lora.prepare(model, zoo.get_backbone("timm/test_vit").layer_groups(model))
    saved = zoo.save_checkpoint(model, tmp_path / "vit", strategy=lora, config=config)
    loaded = zoo.load_checkpoint(saved)
    assert loaded.state_dict()["pos_embed"].shape == model.state_dict()["pos_embed"].shape
    assert_same_model(model, loaded, size=64)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tiny: zoo.Backbone, train_data: Any, tmp_path: Path) -> Path:
    result = train(tiny.name, "full", train_data, tmp_path / "run", weights=None)
    return result.checkpoint


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_classes", "ten", "field 'num_classes' must be int"),
    ("kind", "partial", "kind must be 'full' or 'delta'"),
    ("class_names", ["a", "b"], "class_names must be 10 strings"),
    ("preprocessing", {"input_size": [3, 16], "mean": [0], "std": [1]},
     "preprocessing.input_size"),
    ("backbone", None, "field 'backbone' must be str"),
])
def test_config_with_a_bad_field_is_refused(field: str, value: Any, message: str,
                                            saved: Path) -> None:
    edit_config(saved, lambda config: config.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        zoo.load_checkpoint(saved)


def test_config_that_is_not_json_is_refused(saved: Path) -> None:
    (saved / ckpt.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint is corrupt"):
        zoo.load_checkpoint(saved)


@pytest.mark.parametrize("recorded_hash", [True, False])
def test_truncated_weights_file_is_corrupt(recorded_hash: bool, saved: Path) -> None:
    if not recorded_hash:  # then the safetensors header check must catch it
        edit_config(saved, lambda config: config.pop("files"))
    model_file = saved / ckpt.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checkpoint is corrupt"):
        zoo.load_checkpoint(saved)


def test_missing_directory_and_missing_files_are_checkpoint_errors(saved: Path,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        zoo.load_checkpoint(tmp_path / "nowhere")
    (saved / ckpt.MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="checkpoint is corrupt"):
        zoo.load_checkpoint(saved)


# --------------------------------------------------------------------------- interrupted saves


def test_save_killed_before_complete_leaves_the_previous_checkpoint(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = zoo.load_checkpoint(saved)
    other = zoo.create_model("tiny_cnn", num_classes=10)

    real = ckpt.write_text_atomic

    def killed(path: Any, text: str) -> None:
        if Path(path).name == "COMPLETE":
            raise KeyboardInterrupt  # the process dies between the files and the marker
        real(path, text)

    monkeypatch.setattr(ckpt, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        zoo.save_checkpoint(other, saved, kind="full")
    staging = saved / ckpt.STAGING
    assert (staging / ckpt.MODEL_FILE).is_file() and not (staging / "COMPLETE").exists()
    monkeypatch.undo()

    assert_same_model(before, zoo.load_checkpoint(saved))
    assert not staging.exists()


def test_save_killed_inside_safetensors_write_leaves_the_previous_checkpoint(
        saved: Path) -> None:
    """safetensors writes a ``.tmpXXXXXX`` file and renames it: a kill in between leaves
    that temp file in zoo's staging folder, which the next load discards."""
    before = zoo.load_checkpoint(saved)
    staging = saved / ckpt.STAGING
    staging.mkdir()
    (staging / ".tmpA1b2C3").write_bytes(b"half a safetensors file")
    assert_same_model(before, zoo.load_checkpoint(saved))
    assert not staging.exists()


def test_save_killed_after_complete_is_rolled_forward(saved: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    other = zoo.create_model("tiny_cnn", num_classes=10)
    calls = 0
    real = ckpt.recover

    def killed(directory: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the final move into place: the process dies before it
            raise KeyboardInterrupt
        real(directory)

    monkeypatch.setattr(ckpt, "recover", killed)
    with pytest.raises(KeyboardInterrupt):
        zoo.save_checkpoint(other, saved, kind="full")
    monkeypatch.undo()
    assert (saved / ckpt.STAGING / "COMPLETE").is_file()
    assert_same_model(other, zoo.load_checkpoint(saved))
    assert not (saved / ckpt.STAGING).exists()


def test_a_model_saved_outside_finetune_keeps_its_weights_crop_and_interpolation(
        base_weights_file: Callable[..., tuple[Path, str]],
        register_backbones: Callable[..., Any], tmp_path: Path) -> None:
    # Weights published for 256 px resized, 224 px centre-cropped, bicubic images (as
    # torchvision's ViT and many timm weights are): a checkpoint of a model straight from
    # create_model must predict with that preprocessing, not a plain resize.
    spec = zoo.get_backbone(BACKBONE)
    path, sha = base_weights_file(BACKBONE)
    local = with_local_weights(spec, path, sha, "test_cropped_resnet20")
    cropped = dataclasses.replace(local.weights[0], input_size=(3, 32, 32), resize_size=40,
                                  interpolation="bicubic")
    local = dataclasses.replace(local, weights=(cropped,))
    register_backbones(local)
    model = zoo.create_model(local.name, weights="default")
    zoo.save_checkpoint(model, tmp_path / "ckpt", kind="full")

    recorded = json.loads((tmp_path / "ckpt" / "config.json").read_text())["preprocessing"]
    assert recorded["crop_pct"] == pytest.approx(0.8)
    assert recorded["interpolation"] == "bicubic"
    image = torch.randint(0, 256, (1, 3, 50, 60), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    saved = transform_from_config(zoo.load_checkpoint(tmp_path / "ckpt").zoo_config[
        "preprocessing"])
    assert torch.equal(saved(image), zoo.transforms_for(local.name)(image))
