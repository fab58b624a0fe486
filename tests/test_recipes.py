"""The recipes of docs/recipes.md, run end to end on real data (small enough for CPU).

Pretrain-then-transfer: train cifar_resnet20 from scratch on digits 0-4, share it through a
Hub (zoo.testing.hub_server on 127.0.0.1, real huggingface_hub client), pull it on "another
machine" (an empty cache), and fine-tune it on digits 5-9. With the same small budget it
must do at least as well as training from scratch. Digits are 8x8, so image_size=8 keeps
this fast; measured margins over five seeds were 19-44 accuracy points.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

import zoo
from zoo.testing.hub_server import HubServer

TOKEN = "hf_recipe_token"
SOURCE_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]


@pytest.fixture(autouse=True)
def no_ambient_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the token passed explicitly is used (no HF_TOKEN, no stored login)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login"))


@pytest.mark.slow
def test_pretrain_push_pull_then_transfer_beats_scratch(tmp_path: Path) -> None:
    # 1. Pretrain on the source task (digits 0-4) and save a full checkpoint.
    source = zoo.finetune(
        "cifar_resnet20", "full",
        zoo.load_data("digits", classes=SOURCE_CLASSES, limit_per_class=60),
        zoo.load_data("digits", "val", classes=SOURCE_CLASSES, limit_per_class=20),
        weights=None, epochs=3, batch_size=32, lr=3e-3, image_size=8, quiet=True,
        output_dir=tmp_path / "digits-0-4", checkpoint_kind="full",
    )
    assert source.metrics["val_accuracy"] >= 0.8

    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        # 2. Share it.
        zoo.push_to_hub(tmp_path / "digits-0-4", "user/digits-0-4", token=TOKEN,
                        endpoint=hub.endpoint)
        # 3. On another machine (an empty Hub cache), pull it.
        pulled = zoo.pull_from_hub("user/digits-0-4", token=TOKEN, endpoint=hub.endpoint,
                                   cache_dir=tmp_path / "other-machine")
    assert (pulled / "metrics.json").read_text() == \
        (tmp_path / "digits-0-4" / "metrics.json").read_text()

    # 4. Fine-tune on the target task (digits 5-9), starting from the pulled weights: the
    #    head is replaced by a new one for the new classes; everything else transfers.
    def run(weights: Path | None) -> float:
        result = zoo.finetune(
            "cifar_resnet20", "full",
            zoo.load_data("digits", classes=TARGET_CLASSES, limit_per_class=10),
            zoo.load_data("digits", "val", classes=TARGET_CLASSES, limit_per_class=30),
            weights=weights, epochs=2, batch_size=10, lr=3e-3, image_size=8, quiet=True,
        )
        return result.metrics["val_accuracy"]

    transferred = run(pulled / "model.safetensors")
    scratch = run(None)
    print(f"transferred {transferred:.3f}, scratch {scratch:.3f}")
    assert transferred >= scratch, (transferred, scratch)
