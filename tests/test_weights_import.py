"""Issue 18: weights you already have. A file carried in by hand is imported into the cache
where a download would have put it, or recognised by its sha256 when given as a path, so the
registered tag, its converter, its preprocessing and delta checkpoints all work offline.

Nothing here reaches a network: ``offline`` makes any download attempt fail the test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.core._io import file_sha256
from zoo.core.errors import WeightsError
from zoo.weights.sources import cached_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESNET20 = SHARED_DATA / "cifar-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED_DATA / "cifar-resnet" / "resnet56-4bfd9763.th"
needs_cifar = pytest.mark.skipif(not RESNET20.is_file(),
                                 reason=f"the CIFAR ResNet weights are not at {RESNET20.parent}")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test: everything must come from local files."""

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def cache_files(zoo_home: Path) -> list[str]:
    root = zoo_home / "weights"
    return sorted(p.name for p in root.rglob("*") if not p.is_dir())


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cifar_accuracy(model: torch.nn.Module, weights: str) -> float:
    data = zoo.load_data(SHARED_DATA / "cifar10-small", "test")
    images, labels = data.tensors
    transform = zoo.transforms_for("cifar_resnet20", weights)
    with torch.no_grad():
        predicted = model.eval()(transform(images)).argmax(1)
    return (predicted == labels).float().mean().item()


# --- the published CIFAR ResNet-20 file --------------------------------------------------------


@needs_cifar
@pytest.mark.slow
def test_imported_resnet20_file_gives_the_registered_tag_offline(
        zoo_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: `zoo weights import` puts the file where a download would, after which
    weights="cifar10" works offline (>= 75 % top-1) and `zoo info` shows it cached."""
    code, out, err = run_cli(capsys, "weights", "import", "cifar_resnet20:cifar10", str(RESNET20))
    assert code == 0, err
    spec = zoo.get_backbone("cifar_resnet20").get_weights("cifar10")
    assert cached_path(spec) is not None and str(cached_path(spec)) in out
    assert cache_files(zoo_home) == ["resnet20-12fca82f.th", "resnet20-12fca82f.th.sha256"]
    assert file_sha256(cached_path(spec)) == spec.sha256 == file_sha256(RESNET20)

    accuracy = cifar_accuracy(zoo.create_model("cifar_resnet20", weights="cifar10"), "cifar10")
    with capsys.disabled():
        print(f"imported ResNet-20 top-1 on cifar10-small/test: {accuracy:.3f}")
    assert accuracy >= 0.75

    code, out, _ = run_cli(capsys, "info", "cifar_resnet20")
    assert code == 0
    [row] = [line for line in out.splitlines() if line.startswith("cifar10 ")]
    assert "yes" in row.split()


@needs_cifar
def test_a_file_with_the_wrong_hash_is_refused_and_nothing_is_cached(
        zoo_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: importing another file under a tag shows both hashes and caches nothing."""
    resnet56_sha = file_sha256(RESNET56)
    code, out, err = run_cli(capsys, "weights", "import", "cifar_resnet20:cifar10", str(RESNET56))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("zoo: error: ")
    assert resnet56_sha in err and "12fca82f0bebc413" in err and "nothing was imported" in err
    assert cache_files(zoo_home) == []
    with pytest.raises(WeightsError, match="nothing was imported"):
        zoo.import_weights("cifar_resnet20", RESNET56, tag="cifar10")
    assert cache_files(zoo_home) == []


@needs_cifar
def test_the_same_file_given_by_path_is_the_registered_tag(zoo_home: Path) -> None:
    """Issue 18: a path whose sha256 is a registered tag's is that tag (converter,
    preprocessing, base of deltas), as a path, a file: path or a file:/// URL."""
    by_path = zoo.create_model("cifar_resnet20", weights=str(RESNET20))
    assert by_path.zoo_weights["tag"] == "cifar10"  # type: ignore[index]
    assert cache_files(zoo_home) == ["resnet20-12fca82f.th", "resnet20-12fca82f.th.sha256"]
    by_tag = zoo.create_model("cifar_resnet20", weights="cifar10")
    assert by_path.zoo_weights == by_tag.zoo_weights
    theirs = by_tag.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in by_path.state_dict().items())
    for form in (f"file:{RESNET20}", RESNET20.as_uri(), RESNET20):
        model = zoo.create_model("cifar_resnet20", weights=form)
        assert torch.equal(model.linear.weight, by_tag.linear.weight)
    assert zoo.transforms_for("cifar_resnet20", str(RESNET20)) == \
        zoo.transforms_for("cifar_resnet20", "cifar10")


@needs_cifar
@pytest.mark.slow
def test_delta_checkpoint_from_the_imported_tag_is_small_and_reloads_exactly(
        tmp_path: Path) -> None:
    """Issue 18: a delta saved from the imported tag is a few percent of the full checkpoint
    and reloads to exactly the same model, offline."""
    zoo.import_weights("cifar_resnet20:cifar10", RESNET20)
    data = zoo.load_data(SHARED_DATA / "cifar10-small", "train", limit_per_class=10)
    result = zoo.finetune("cifar_resnet20", "linear_probe", data, epochs=1, batch_size=50,
                          lr=1e-2, weights="cifar10", quiet=True)
    delta = zoo.save_checkpoint(result.model, tmp_path / "delta", kind="delta")
    full = zoo.save_checkpoint(result.model, tmp_path / "full", kind="full")
    delta_size = (delta / "model.safetensors").stat().st_size
    full_size = (full / "model.safetensors").stat().st_size
    print(f"delta {delta_size} bytes, full {full_size} bytes")
    assert delta_size < 0.05 * full_size

    reloaded = zoo.load_checkpoint(delta)
    ours = result.model.eval().state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in reloaded.state_dict().items())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


# --- a file that is none of the registered weights ---------------------------------------------


@needs_cifar
def test_an_unregistered_file_goes_through_the_backbones_converter(tmp_path: Path) -> None:
    """Issue 18: a file of the pytorch_resnet_cifar10 layout ('module.' keys) that is not
    the registered file still loads: the backbone's converter is tried before failing."""
    torch.manual_seed(3)
    own = zoo.create_model("cifar_resnet20").state_dict()
    path = tmp_path / "my-resnet20.th"
    torch.save({"best_prec1": 50.0, "state_dict": {f"module.{k}": v for k, v in own.items()}},
               path)
    model = zoo.create_model("cifar_resnet20", weights=path)
    assert model.zoo_weights["tag"] == str(path)  # type: ignore[index]
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())


@needs_cifar
def test_a_file_no_converter_fits_says_how_to_import(tmp_path: Path) -> None:
    """Issue 18: when nothing fits, the one-line error says how to import the file."""
    with pytest.raises(WeightsError) as err:
        zoo.create_model("resnet18", weights=RESNET20)
    message = str(err.value)
    assert "\n" not in message and "module.conv1.weight" in message
    assert f"zoo weights import resnet18:TAG {RESNET20}" in message


# --- torchvision's ResNet layout, carried in by hand -------------------------------------------


def torchvision_resnet18_file(directory: Path) -> tuple[Path, str, torch.nn.Module]:
    """A seeded torchvision ResNet-18 saved as torch.hub names it: resnet18-<sha256[:8]>.pth."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    tmp = directory / "resnet18.tmp"
    torch.save(reference.state_dict(), tmp)
    sha = file_sha256(tmp)
    path = directory / f"resnet18-{sha[:8]}.pth"
    tmp.rename(path)
    return path, sha, reference


@pytest.mark.slow
def test_torchvision_state_dict_imported_under_a_plugin_tag_gives_identical_outputs(
        tmp_path: Path, zoo_home: Path, register_backbones: Callable[..., Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: torchvision's file format, imported under a test plugin's tag (its hash is
    the torch.hub prefix in the URL), loads into the in-tree ResNet with identical outputs;
    `zoo weights list` shows it cached and `zoo weights verify` checks it."""
    path, sha, reference = torchvision_resnet18_file(tmp_path)
    resnet18 = zoo.get_backbone("resnet18")
    tagged = dataclasses.replace(resnet18.weights[0], tag="carried",
                                 source=f"https://models.invalid/zoo/{path.name}", sha256=None)
    register_backbones(dataclasses.replace(resnet18, name="test_resnet18", aliases=(),
                                           weights=(tagged,), default_weights="carried"))

    code, out, err = run_cli(capsys, "weights", "list", "test_resnet18")
    assert code == 0 and "carried *" in out and out.splitlines()[1].endswith("no")
    code, _, err = run_cli(capsys, "weights", "import", "test_resnet18", str(path))
    assert code == 0, err  # the tag was found by the file's sha256
    code, out, _ = run_cli(capsys, "weights", "list", "test_resnet18")
    assert out.splitlines()[1].split()[-2:] == [sha[:16] + "...", "yes"]

    model = zoo.create_model("test_resnet18", weights="carried").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    code, out, _ = run_cli(capsys, "weights", "verify")
    assert code == 0 and out.startswith(f"ok          {zoo_home}")
    cached = cached_path(tagged)
    assert cached is not None
    cached.write_bytes(cached.read_bytes()[:-4] + b"evil")
    code, out, err = run_cli(capsys, "weights", "verify")
    assert code == 2 and out.startswith("changed") and "1 of 1 cached weights files" in err


def test_force_is_only_for_weights_without_a_declared_hash(
        tmp_path: Path, zoo_home: Path, register_backbones: Callable[..., Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: a Hub tag with no declared sha256 (like every timm/* tag) needs --force;
    the computed hash is recorded, checked on every use, and matches the file by path."""
    from conftest import TINY

    torch.manual_seed(0)
    state = TINY.build().state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    hub_tag = zoo.Weights(tag="hub", source="hf-hub:someone/tiny", num_classes=10,
                          input_size=(3, 16, 16))
    register_backbones(dataclasses.replace(TINY, weights=(hub_tag,), default_weights="hub"))

    code, _, err = run_cli(capsys, "weights", "import", "tiny_cnn:hub", str(path))
    assert code == 2 and "declares no sha256" in err and "--force" in err
    assert cache_files(zoo_home) == []
    code, out, err = run_cli(capsys, "weights", "import", "tiny_cnn:hub", str(path), "--force")
    assert code == 0, err
    assert cache_files(zoo_home) == ["pytorch_model.bin", "pytorch_model.bin.sha256"]
    model = zoo.create_model("tiny_cnn", weights="hub")  # from the cache, no Hub contacted
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert zoo.create_model("tiny_cnn", weights=path).zoo_weights["tag"] == "hub"  # type: ignore[index]

    # a declared hash is never overridden by --force
    sha = hashlib.sha256(b"something else").hexdigest()
    declared = dataclasses.replace(hub_tag, tag="declared", source="hf-hub:someone/other",
                                   sha256=sha)
    register_backbones(dataclasses.replace(TINY, name="tiny_declared", weights=(declared,),
                                           default_weights="declared"))
    code, _, err = run_cli(capsys, "weights", "import", "tiny_declared", str(path), "--force")
    assert code == 2 and sha in err and file_sha256(path) in err
