"""The frozen-prefix activation cache: bounded memory, spill to disk, reuse across runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.data.feature_cache import CacheKey, FeatureStore


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo-home"))
    return tmp_path / "zoo-home"


def key(name: str) -> CacheKey:
    return CacheKey("net", "sha", "stem", name, "transform")


def batches(rows: int, width: int, value: float):
    def compute():
        for start in range(0, rows, 10):
            yield torch.full((min(10, rows - start), width), value)
    return compute


def test_entries_within_budget_stay_in_memory_and_are_reused() -> None:
    store = FeatureStore(memory_budget=10_000)
    first = store.get_or_compute(key("a"), batches(25, 4, 1.0), 25)
    again = store.get_or_compute(key("a"), batches(25, 4, 2.0), 25)
    assert again is first and torch.all(first == 1.0)
    assert (store.hits, store.misses) == (1, 1)
    assert store.memory_bytes == 25 * 4 * 4


def test_entries_past_the_budget_spill_to_a_memory_mapped_file(isolated_home: Path) -> None:
    store = FeatureStore(memory_budget=1_000)
    features = store.get_or_compute(key("big"), batches(100, 8, 3.0), 100)  # 3,200 bytes
    assert store.memory_bytes == 0  # nothing of it counts against the memory budget
    spilled = list((isolated_home / "features").iterdir())
    assert len(spilled) == 1 and spilled[0].stat().st_size == 3_200
    assert torch.all(features == 3.0)
    store.drop(key("big"))
    assert not spilled[0].exists()


def test_older_entries_are_evicted_to_make_room() -> None:
    store = FeatureStore(memory_budget=1_000)
    store.get_or_compute(key("old"), batches(20, 5, 1.0), 20)   # 400 bytes
    store.get_or_compute(key("mid"), batches(20, 5, 1.0), 20)   # 400 bytes
    store.get_or_compute(key("new"), batches(20, 5, 1.0), 20)   # evicts "old"
    assert store.get(key("old")) is None and store.get(key("new")) is not None
    assert store.memory_bytes <= 1_000


def test_a_failed_computation_leaves_no_entry() -> None:
    store = FeatureStore()

    def broken():
        yield torch.zeros(10, 2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.get_or_compute(key("x"), broken, 20)
    assert store.get(key("x")) is None and len(store) == 0


def finetune(strategy: str, store: FeatureStore, **kwargs):
    return zoo.finetune("cifar_resnet20", strategy, "digits", epochs=2, weights=None,
                        image_size=16, limit_per_class=10, quiet=True, feature_store=store,
                        **kwargs)


@pytest.mark.slow
def test_strategies_freezing_the_same_prefix_share_one_extraction() -> None:
    store = FeatureStore()
    finetune("linear_probe", store)
    misses = store.misses
    assert misses == 2  # train and val features, once each for both epochs
    finetune("feature_extract", store)
    assert store.misses == misses  # the second run reused them
    finetune("partial", store, strategy_options={"frozen_groups": 2})
    assert store.misses == misses + 2  # a different boundary: new features


@pytest.mark.slow
def test_augmentation_disables_the_cache_unless_views_are_asked_for() -> None:
    store = FeatureStore()
    plain = finetune("linear_probe", store, augment=True)
    assert store.misses == 0 and "feature_cache" not in plain.metrics
    finetune("linear_probe", store, augment=True, cache_views=2)
    assert store.misses == 3  # val once, and two augmented training views
    with pytest.raises(zoo.IncompatibleError, match="deterministic"):
        finetune("feature_extract", store, augment=True)


@pytest.mark.slow
def test_the_default_budget_is_2_gib_or_a_quarter_of_the_available_memory() -> None:
    from zoo.data.feature_cache import DEFAULT_CACHE_MEMORY, default_cache_memory, shared_store

    budget = default_cache_memory()
    assert 0 < budget <= DEFAULT_CACHE_MEMORY
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        available = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                         if line.startswith("MemAvailable:"))
        assert abs(budget - min(DEFAULT_CACHE_MEMORY, available // 4)) < 64 * 1024**2
    # A run that names no budget gets the default back, whatever an earlier run asked for.
    zoo.finetune("cifar_resnet20", "linear_probe", "digits", epochs=1, weights=None,
                 image_size=16, limit_per_class=2, quiet=True, cache_memory=1_000)
    assert shared_store().memory_budget == 1_000
    zoo.finetune("cifar_resnet20", "linear_probe", "digits", epochs=1, weights=None,
                 image_size=16, limit_per_class=2, quiet=True)
    assert abs(shared_store().memory_budget - budget) < 64 * 1024**2
