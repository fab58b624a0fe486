"""timm backbones as stages: one per layer group where the forward pass is a plain sequence,
so that a partial freeze caches its whole frozen prefix."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.data.feature_cache import FeatureStore

SEQUENTIAL = {
    "timm/resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "head"],
    "timm/tf_efficientnet_lite0": ["stem", *(f"blocks_{i}" for i in range(7)), "head"],
    "timm/efficientnet_b0": ["stem", *(f"blocks_{i}" for i in range(7)), "head"],
    "timm/mobilenetv3_small_100": ["stem", *(f"blocks_{i}" for i in range(6)), "conv_head",
                                   "head"],
}


def composed(stages: list[zoo.Stage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage.forward(x)
    return x


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """The inputs here are tiny: a single torch thread is the fastest."""


@pytest.mark.parametrize("name", list(SEQUENTIAL))
@pytest.mark.slow
def test_plain_sequence_families_get_one_stage_per_layer_group(name: str) -> None:
    spec = zoo.get_backbone(name)
    model = zoo.create_model(name, num_classes=7).eval()
    groups = spec.layer_groups(model)
    stages = spec.stages(model)
    assert [g.name for g in groups] == SEQUENTIAL[name]
    assert [s.groups for s in stages] == [(g.name,) for g in groups]
    assert stages[-1].forward is model.get_classifier()  # the head is the classifier alone
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(composed(stages, x), model(x))
        pooled = composed(stages[:-1], x)
        assert pooled.shape == (2, model.get_classifier().in_features)
        model.train()  # drop path makes train mode random: only the shape is comparable
        assert composed(stages, x).shape == model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["timm/vit_tiny_patch16_224", "timm/convnext_atto"])
@pytest.mark.slow
def test_other_architectures_keep_two_stages(name: str) -> None:
    spec = zoo.get_backbone(name)
    model = zoo.create_model(name, num_classes=7).eval()
    names = [g.name for g in spec.layer_groups(model)]
    stages = spec.stages(model)
    assert [s.groups for s in stages] == [tuple(names[:-1]), ("head",)]


@pytest.mark.slow
def test_groups_other_than_expected_fall_back_to_two_stages() -> None:
    spec = zoo.get_backbone("timm/resnet18")
    model = zoo.create_model("timm/resnet18", num_classes=7).eval()
    # Fine-grained grouping (a group per residual block) is not one group per layer.
    fine = type(model).group_matcher(model, coarse=False)
    model.group_matcher = lambda coarse=False: fine
    names = [g.name for g in spec.layer_groups(model)]
    assert len(names) > 6
    stages = spec.stages(model)
    assert [s.groups for s in stages] == [tuple(names[:-1]), ("head",)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(composed(stages, x), model(x))


@pytest.mark.slow
def test_a_partial_freeze_of_a_timm_model_caches_the_frozen_prefix() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    y = torch.arange(8) % 2
    kwargs = dict(strategy_options={"frozen_groups": 4}, weights=None, epochs=2, batch_size=4,
                  quiet=True)
    store = FeatureStore()
    cached = zoo.finetune("timm/tf_efficientnet_lite0", "partial", (x, y), feature_store=store,
                          **kwargs)
    # stem + blocks_0..blocks_2 are frozen: computed in epoch 1, read back in epoch 2
    assert cached.metrics["feature_cache"] == {"hits": 1, "misses": 1}
    assert len(store) == 1
    uncached = zoo.finetune("timm/tf_efficientnet_lite0", "partial", (x, y), cache=False,
                            **kwargs)
    a, b = cached.model.state_dict(), uncached.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_lora_adapts_a_timm_backbone_whose_groups_name_parameters() -> None:
    """timm's groups list parameter names (``conv1.weight``); LoRA's parametrization renames
    them (``conv1.parametrizations.weight.original``) and they must stay in their group."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    result = zoo.finetune("timm/resnet18", "lora", (x, torch.arange(8) % 2), weights=None,
                          epochs=1, batch_size=4, quiet=True,
                          strategy_options={"targets": "conv"})
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or n.startswith("fc.") for n in trained)
    assert any(n.startswith("conv1.parametrizations.weight.") for n in trained)
