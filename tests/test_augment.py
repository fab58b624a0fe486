"""Issue 15 (data augmentation): presets on torchvision v2, batched, seeded, cache-friendly;
mixup/cutmix with soft targets; evaluation never augments."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.transforms import v2

from zoo.core.errors import ZooError
from zoo.data.augment import (
    PRESETS,
    Augmentation,
    AugmentTransform,
    MixupCutmix,
    as_augmentation,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from zoo.data.augment_ops import (
    TRIVIAL_OPS,
    TRIVIAL_SPACE,
    apply_trivial_op,
    random_resized_crop,
    random_resized_crop_boxes,
)
from zoo.data.transforms import BatchTransform

BASE = BatchTransform((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_seeded_and_keep_shape(preset: str) -> None:
    """Issue 15 augmentation: each preset gives the same output for the same seed (so runs
    repeat and cache_views can precompute views), another output for another seed."""
    t = AugmentTransform.wrap(BASE, preset)
    x = batch()
    a, b, c = t(x, gen(1)), t(x, gen(1)), t(x, gen(2))
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert t.deterministic == (preset == "none")
    assert torch.equal(a, c) == (preset == "none")


def test_each_image_gets_its_own_draw() -> None:
    """Issue 15 augmentation: batched, yet not one crop for the whole batch (as v2 on a batch
    would give)."""
    x = batch(1).expand(16, -1, -1, -1).contiguous()
    out = AugmentTransform.wrap(BASE, "light")(x, gen(0))
    distinct = {tuple(img.flatten()[:64].tolist()) for img in out}
    assert len(distinct) > 8


def test_eval_never_augments() -> None:
    """Issue 15 augmentation: the eval transform (augment=False) is the plain BatchTransform,
    and its cache key says so."""
    t = AugmentTransform.wrap(BASE, "strong")
    ev = replace(t, augment=False)
    x = batch()
    assert ev.deterministic and torch.equal(ev(x, gen(1)), BASE(x))
    assert ev.cache_key() == BASE.cache_key()
    assert t.cache_key() != BASE.cache_key()


def test_cache_keys_name_the_augmentation() -> None:
    """Issue 15 augmentation: cache_views keys differ per preset and per custom pipeline."""
    keys = {AugmentTransform.wrap(BASE, p).cache_key() for p in PRESETS}
    assert len(keys) == len(PRESETS)
    custom = AugmentTransform.wrap(BASE, v2.ColorJitter(brightness=0.3))
    assert "ColorJitter" in custom.cache_key()


def test_any_v2_pipeline_is_applied_per_image_and_seeded() -> None:
    """Issue 15 augmentation: a v2 pipeline from Python, repeatable from the generator, and
    the global RNG is left as it was."""
    pipeline = v2.Compose([v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4)])
    t = AugmentTransform.wrap(BASE, pipeline)
    x = batch()
    state = torch.get_rng_state()
    a = t(x, gen(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, t(x, gen(5))) and not torch.equal(a, t(x, gen(6)))
    assert not t.deterministic


def test_a_pipeline_that_changes_the_size_is_one_clear_error() -> None:
    """Issue 15 augmentation: bad input is a one-line ZooError."""
    t = AugmentTransform.wrap(BASE, v2.RandomCrop(8))
    with pytest.raises(ZooError, match="changed the image shape") as info:
        t(batch(), gen(0))
    assert "\n" not in str(info.value)
    with pytest.raises(ZooError, match="unknown augmentation preset 'heavy'"):
        as_augmentation("heavy")


@pytest.mark.parametrize("name", TRIVIAL_OPS)
def test_batched_trivial_augment_ops_match_torchvision_v2(name: str) -> None:
    """Issue 15 augmentation: each batched TrivialAugmentWide op, image i at its own
    magnitude, equals v2 applying that op to image i alone."""
    ta = v2.TrivialAugmentWide()
    x = torch.rand(6, 3, 20, 28, generator=gen(0))
    table = TRIVIAL_SPACE[name][0](31, 20, 28)
    mags = torch.zeros(6) if table is None else table[torch.tensor([0, 5, 10, 20, 25, 30])]
    mags = mags.float() * (torch.tensor([1, -1, 1, -1, 1, -1.0]) if TRIVIAL_SPACE[name][1]
                           else 1)
    ours = apply_trivial_op(x, name, mags)
    ref = torch.stack([ta._apply_image_or_video_transform(x[i].clone(), name, float(mags[i]),
                                                          ta.interpolation, ta._fill)
                       for i in range(6)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_random_resized_crop_boxes_lie_inside_and_respect_scale() -> None:
    """Issue 15 augmentation: crops as v2.RandomResizedCrop draws them."""
    boxes = random_resized_crop_boxes(500, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3), gen(0))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 40).all() and (y2 <= 30).all()
    area = (x2 - x1) * (y2 - y1) / 1200
    assert area.min() > 0.05 and area.max() <= 1.0
    full = random_resized_crop(torch.rand(4, 3, 8, 8), gen(0), scale=(1, 1), ratio=(1, 1))
    assert full.shape == (4, 3, 8, 8)


def test_mixup_cutmix_targets_sum_to_one_and_match_the_images() -> None:
    """Issue 15 (done when): mixup targets sum to 1; the images are mixed in the same
    proportion as the targets (mixup: blend; cutmix: the pasted area)."""
    x = torch.rand(6, 3, 16, 16, generator=gen(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixup = MixupCutmix(5, mixup_alpha=0.8, cutmix_alpha=0.0)
    images, targets = mixup(x, labels, gen(3))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = float(targets[1, 1])  # label 1 at row 1, partner (row 4) has label 4
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.flip(0))
    cutmix = MixupCutmix(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    images, targets = cutmix(x, labels, gen(4))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    from_partner = (images != x).any(1)[1].float().mean()  # pixels of row 1 taken from row 4
    kept = (targets[1, 1] - 0.1 / 5) / 0.9
    assert abs(float(kept) - (1 - float(from_partner))) < 1e-6
    assert torch.equal(cutmix(x, labels, gen(4))[0], images)


def test_soft_target_loss_equals_cross_entropy_on_one_hot_targets() -> None:
    """Issue 15 augmentation: the soft-target loss matching mixup; on one-hot (and smoothed)
    targets it equals torch's cross-entropy."""
    logits = torch.randn(5, 4, generator=gen(0))
    labels = torch.tensor([0, 1, 2, 3, 1])
    hard = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(soft_target_cross_entropy(logits, smooth_one_hot(labels, 4)), hard)
    smooth = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, smooth_one_hot(labels, 4, 0.2)), smooth)


def test_strong_asks_for_a_batch_mixer_and_others_do_not() -> None:
    """Issue 15 augmentation: only `strong` mixes batches."""
    assert Augmentation("strong").batch_mix(10) is not None
    assert all(Augmentation(p).batch_mix(10) is None for p in ("none", "light", "standard"))
