"""Every timm weight by name (issue 16.1): ``timm/ARCH.TAG`` backbones, listed from a shipped
name index without importing torch, described by ``zoo info``, and downloaded through zoo's
verified cache (from a Hub server on 127.0.0.1: nothing leaves the machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.core._io import file_sha256
from zoo.weights.cache import recorded_sha256
from zoo.weights.sources import cached_path


@pytest.mark.slow
def test_the_shipped_name_index_matches_the_installed_timm() -> None:
    """Issue 16.1: the index is timm's own list of architectures and loadable tags; after a
    timm upgrade this fails until ``python -m zoo_timm.index`` is run."""
    import timm
    from zoo_timm.index import live_index, shipped_index

    shipped = shipped_index()
    assert shipped is not None, "plugins/zoo_timm/timm_index.txt is missing"
    version, index = shipped
    assert version == timm.__version__, "regenerate it: python -m zoo_timm.index"
    assert index == live_index()
    assert {"tv_in1k", "a1_in1k"} <= set(index["resnet50"])


def test_listing_every_timm_tag_imports_neither_torch_nor_timm() -> None:
    """Issue 16.1: ``zoo list 'timm/resnet50.*'`` reads the index, not timm (which imports
    torch); architectures and their tags are listed together."""
    code = ("import sys, zoo; names = zoo.list_backbones('timm/*'); "
            "print(len(names)); print(' '.join(zoo.list_backbones('timm/resnet50.*'))); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    assert int(out[0]) > 2500 and out[2] == "[]"
    tags = out[1].split()
    assert {"timm/resnet50.tv_in1k", "timm/resnet50.a1_in1k"} <= set(tags)
    assert all(t.startswith("timm/resnet50.") for t in tags)


def test_an_index_for_another_timm_version_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16.1: names come from the installed timm when the index was made for another."""
    from zoo_timm import index

    stale = tmp_path / "timm_index.txt"
    stale.write_text("# timm 0.0.1 (made by: python -m zoo_timm.index; do not edit)\n"
                     "resnet50 gone_in1k\n")
    monkeypatch.setattr(index, "INDEX_FILE", stale)
    index.shipped_index.cache_clear()
    try:
        names = index.timm_index()
    finally:
        index.shipped_index.cache_clear()
    assert "gone_in1k" not in names["resnet50"] and "tv_in1k" in names["resnet50"]


def test_arch_dot_tag_is_that_architecture_with_those_weights() -> None:
    """Issue 16.1: ``timm/resnet50.tv_in1k`` and ``timm/resnet50.a1_in1k`` resolve, each with
    its own weights as default and that tag's preprocessing; ``timm/resnet50`` has them all."""
    tv = zoo.get_backbone("timm/resnet50.tv_in1k")
    a1 = zoo.get_backbone("timm/resnet50.a1_in1k")
    assert tv.name == "timm/resnet50.tv_in1k" and tv.default_weights == "tv_in1k"
    assert tv.get_weights().source == "hf-hub:timm/resnet50.tv_in1k"
    assert tv.get_weights().license == "bsd-3-clause" and a1.get_weights().license == "apache-2.0"
    assert a1.get_weights().interpolation == "bicubic"
    assert a1.get_weights().resize_size == round(224 / 0.95)
    assert tv.get_weights().resize_size == 256
    whole = zoo.get_backbone("timm/resnet50")
    assert {"tv_in1k", "a1_in1k", "tv2_in1k"} <= {w.tag for w in whole.weights}
    assert zoo.transforms_for("timm/resnet50", "tv2_in1k").input_size == (3, 176, 176)


def test_an_unknown_tag_is_one_line_with_near_names() -> None:
    """Issue 16.1: a mistyped tag names the tags that exist."""
    with pytest.raises(zoo.UnknownNameError, match=r"timm/resnet50\.tv_in1k") as info:
        zoo.get_backbone("timm/resnet50.tv_in1kk")
    assert "\n" not in str(info.value)


def test_info_shows_each_tags_dataset_resolution_and_licence(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16.1: ``zoo info`` lists every tag with what it was trained on and at what size."""
    assert main(["info", "timm/resnet50.a1_in1k"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "ImageNet-1k" in rows["a1_in1k"] and "224x224" in rows["a1_in1k"]
    assert "apache-2.0" in rows["a1_in1k"] and "*" in rows["a1_in1k"].split()[1]
    assert "176x176" in rows["tv2_in1k"] and "bsd-3-clause" in rows["tv2_in1k"]
    assert "Instagram-1B > ImageNet-1k" in rows["fb_swsl_ig1b_ft_in1k"]


@pytest.mark.slow
def test_tag_weights_download_through_zoos_verified_cache(
        tmp_path: Path, zoo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16.1: ``timm/ARCH.TAG`` weights come from the Hub through zoo's cache, their
    sha256 recorded on first download and checked on every later use; a delta checkpoint
    of the tag-named backbone reloads from them."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from zoo.testing.hub_server import HubServer

    name, repo = "timm/mobilenetv3_small_050.lamb_in1k", "timm/mobilenetv3_small_050.lamb_in1k"
    torch.manual_seed(3)
    source = zoo.create_model(name).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "model.safetensors")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer(tmp_path / "hub", token="hf_test") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo(repo)
        api.upload_file(repo_id=repo, path_or_fileobj=tmp_path / "model.safetensors",
                        path_in_repo="model.safetensors")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        model = zoo.create_model(name, num_classes=4, weights="default")
    spec = zoo.get_backbone(name).get_weights()
    cached = cached_path(spec)
    assert cached is not None and cached.is_relative_to(zoo_home)
    assert recorded_sha256(cached) == file_sha256(tmp_path / "model.safetensors")
    assert model.zoo_weights["tag"] == "lamb_in1k"
    assert model.zoo_weights["sha256"] == recorded_sha256(cached)
    assert torch.equal(model.state_dict()["blocks.0.0.conv_dw.weight"],
                       source["blocks.0.0.conv_dw.weight"])

    # The Hub is gone now: the cached, recorded file is used, and a delta reloads from it.
    out = tmp_path / "run"
    zoo.save_checkpoint(model, out)
    reloaded = zoo.load_checkpoint(out)
    assert reloaded.zoo_config["kind"] == "delta"
    assert reloaded.zoo_config["backbone"] == name
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x))
