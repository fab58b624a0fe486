"""zoo.push_to_hub / pull_from_hub / from_pretrained with the real huggingface_hub client
against zoo.testing.hub_server on 127.0.0.1 (no mocks).

huggingface_hub reads HF_* environment variables at import, so scenarios that need them
(HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, timm's own HF_ENDPOINT) run in a subprocess with their
own HF_HOME; in-process calls pass ``endpoint=``, ``cache_dir=`` and ``token=``. Each "other
machine" is a fresh cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY
from huggingface_hub import HfApi, constants

import zoo
from zoo.core.errors import CheckpointError, HubError
from zoo.persist.checkpoint import load_checkpoint
from zoo.persist.hub import _safe_name, from_pretrained, pull_from_hub, push_to_hub
from zoo.testing.hub_server import HubServer

TOKEN = "hf_secret_test_token"
WRONG = "hf_wrong_secret_token"
REPO = "user/digits-probe"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ("model.safetensors", "config.json", "metrics.json", "README.md", "history.json")


# --------------------------------------------------------------------------- helpers


def _finetune(backbone: str, out: Path, **kwargs) -> zoo.FinetuneResult:
    """A one-epoch run on a few real digits: seconds, and a real checkpoint."""
    options = dict(weights=None, epochs=1, image_size=16, cache=False, quiet=True,
                   train=zoo.load_data("digits", limit_per_class=3),
                   val=zoo.load_data("digits", "val", limit_per_class=1))
    options.update(kwargs)
    return zoo.finetune(backbone, options.pop("strategy", "linear_probe"), output_dir=out,
                        **options)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _outputs(model: torch.nn.Module, size: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.rand(4, 3, size, size))


def _commit(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _run(script: str, tmp_path: Path, **env: str) -> dict:
    """Run ``script`` in a fresh interpreter (own HF_HOME, no inherited HF_*); return its JSON."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT), **env)
    path = tmp_path / "client.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path)], env=clean, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def no_ambient_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No HF_TOKEN and no stored login unless a test sets one (returns the login file)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    login = tmp_path / "hf-login-token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(login))
    return login


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="regular") as server:
        yield server


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A full checkpoint of cifar_resnet20 (linear probe) and its outputs on fixed inputs."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_HOME", str(out.parent / "zoo-home"))
        result = _finetune("cifar_resnet20", out)
    assert (out / "resume.pt").is_file()  # the runner leaves it; a push must not take it
    return out, _outputs(result.model)


@pytest.fixture
def checkpoint(trained: tuple[Path, torch.Tensor], tmp_path: Path) -> Path:
    """A private copy of the trained checkpoint, inside a parent folder with other files."""
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "secrets.env").write_text(f"HF_TOKEN={TOKEN}\n")
    copy = shutil.copytree(trained[0], parent / "run")
    (copy / "notes.txt").write_text("not part of the checkpoint")
    return copy


def _push(hub: HubServer, folder: Path, repo: str = REPO, **kwargs) -> str:
    return push_to_hub(folder, repo, token=TOKEN, endpoint=hub.endpoint, **kwargs)


def _pull(hub: HubServer, tmp_path: Path, repo: str = REPO, **kwargs) -> Path:
    """Pull into a fresh cache: every call is another machine."""
    cache = tmp_path / f"machine-{len(list(tmp_path.glob('machine-*')))}"
    kwargs.setdefault("token", TOKEN)
    return pull_from_hub(repo, endpoint=hub.endpoint, cache_dir=cache, **kwargs)


# --------------------------------------------------------------------------- round trips


@pytest.mark.slow
def test_push_then_pull_on_another_machine_gives_identical_outputs(
    hub: HubServer, checkpoint: Path, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    before = _hashes(checkpoint)
    url = _push(hub, checkpoint)
    assert url == f"{hub.endpoint}/{REPO}/commit/{_commit(url)}"
    assert _hashes(checkpoint) == before  # nothing local was written

    files = hub.repo_state(REPO)["commits"][_commit(url)]["files"]
    assert sorted(files) == sorted(SHARED)  # no resume.pt, notes.txt or the parent's files
    assert not any(m == "PUT" for m, _ in hub.requests)  # regular mode: inline, no xet/LFS

    folder = _pull(hub, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(SHARED)
    card = (folder / "README.md").read_text()
    assert f'zoo.from_pretrained("hf-hub:{REPO}")' in card and "library_name: zoo" in card
    assert TOKEN not in card + (folder / "config.json").read_text()
    assert {n: h for n, h in _hashes(folder).items() if n != "README.md"} == {
        n: h for n, h in before.items() if n in SHARED and n != "README.md"}

    model = from_pretrained(f"hf-hub:{REPO}", token=TOKEN, endpoint=hub.endpoint,
                            cache_dir=tmp_path / "machine-x")
    assert torch.equal(_outputs(model), trained[1])
    assert torch.equal(_outputs(from_pretrained(checkpoint)), trained[1])  # a local directory


@pytest.mark.slow
def test_delta_checkpoint_rebuilds_its_base_after_a_pull(
    hub: HubServer, pretrained: Callable[..., str], tmp_path: Path
) -> None:
    from safetensors import safe_open

    name = pretrained(TINY)  # a backbone whose registered weights are a local file
    result = _finetune(name, tmp_path / "delta", weights="default")
    config = json.loads((tmp_path / "delta" / "config.json").read_text())
    assert config["kind"] == "delta" and config["weights"]["tag"] == "local"
    with safe_open(tmp_path / "delta" / "model.safetensors", "pt") as tensors:
        assert set(tensors.keys()) == {"head.weight", "head.bias"}  # only what was trained

    _push(hub, tmp_path / "delta", "user/delta")
    model = from_pretrained("user/delta", token=TOKEN, endpoint=hub.endpoint,
                            cache_dir=tmp_path / "other-machine")
    assert torch.equal(_outputs(model), _outputs(result.model))

    # A delta whose base is an unregistered local file could not be rebuilt elsewhere.
    local = shutil.copytree(tmp_path / "delta", tmp_path / "local")
    source = config["weights"]["source"]
    config["weights"].update(tag=source.removeprefix("file:"), source=source)
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="nobody else can rebuild it"):
        _push(hub, local, "user/local")


@pytest.mark.slow
def test_second_push_uploads_only_the_changed_file(
    hub: HubServer, checkpoint: Path, tmp_path: Path
) -> None:
    first = _commit(_push(hub, checkpoint))
    card = checkpoint / "README.md"
    card.write_text(card.read_text() + "\nEvaluated on 8x8 digits.\n")
    hub.requests.clear()
    second = _commit(_push(hub, checkpoint))
    state = hub.repo_state(REPO)
    assert second != first and state["commits"][second]["operations"] == ["README.md"]
    assert [p for m, p in hub.requests if m == "POST" and "/commit/" in p] == [
        f"/api/models/{REPO}/commit/main"]

    assert _commit(_push(hub, checkpoint)) == second  # nothing changed: no new commit
    assert hub.repo_state(REPO)["branches"]["main"] == second
    assert "Evaluated on 8x8 digits." in (_pull(hub, tmp_path) / "README.md").read_text()


@pytest.mark.slow
def test_branches_and_tags_are_pulled_by_name(
    hub: HubServer, checkpoint: Path, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    _push(hub, checkpoint)
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_tag(REPO, tag="v1")
    other = _finetune("cifar_resnet20", tmp_path / "other", seed=3)
    url = _push(hub, tmp_path / "other", revision="experiment", commit_message="seed 3")
    state = hub.repo_state(REPO)
    assert state["branches"]["experiment"] == _commit(url) != state["branches"]["main"]
    assert state["commits"][_commit(url)]["title"] == "seed 3"

    def load(revision: str | None, repo: str = REPO) -> torch.nn.Module:
        return load_checkpoint(_pull(hub, tmp_path, repo, revision=revision))

    assert torch.equal(_outputs(load("v1")), trained[1])
    assert torch.equal(_outputs(load("experiment")), _outputs(other.model))
    assert torch.equal(_outputs(load(None, f"hf-hub:{REPO}@experiment")), _outputs(other.model))
    assert torch.equal(_outputs(load(_commit(url))), _outputs(other.model))


# --------------------------------------------------------------------------- errors


def _assert_error(error: pytest.ExceptionInfo, *phrases: str) -> None:
    message = str(error.value)
    assert "\n" not in message and TOKEN not in message and WRONG not in message
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.slow
def test_missing_repo_revision_file_and_bad_tokens_are_clear_errors(
    hub: HubServer, checkpoint: Path, tmp_path: Path, no_ambient_token: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _push(hub, checkpoint, private=True)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("user/not-a-checkpoint")
    api.upload_file(repo_id="user/not-a-checkpoint", path_or_fileobj=b"{}",
                    path_in_repo="config.json")

    with pytest.raises(HubError) as err:
        _pull(hub, tmp_path, "user/nope")
    _assert_error(err, "no repo 'user/nope'", hub.endpoint, "HF_TOKEN")
    with pytest.raises(HubError) as err:
        _pull(hub, tmp_path, revision="nope")
    _assert_error(err, f"repo {REPO!r}", "has no revision 'nope'")
    with pytest.raises(CheckpointError) as err:
        _pull(hub, tmp_path, "user/not-a-checkpoint")
    _assert_error(err, "not a zoo checkpoint", "model.safetensors")
    with pytest.raises(HubError) as err:  # private, and no token anywhere
        _pull(hub, tmp_path, token=None)
    _assert_error(err, f"no repo {REPO!r}", "private")
    with pytest.raises(HubError) as err:
        push_to_hub(checkpoint, "user/new", endpoint=hub.endpoint)
    _assert_error(err, "needs a token to push to user/new", "HF_TOKEN")
    with pytest.raises(HubError) as err:
        _pull(hub, tmp_path, token=WRONG)
    _assert_error(err, "refused the token (HTTP 401)")
    monkeypatch.setenv("HF_TOKEN", WRONG)  # a wrong token from the environment, too
    with pytest.raises(HubError) as err:
        push_to_hub(checkpoint, REPO, endpoint=hub.endpoint)
    _assert_error(err, "refused the token (HTTP 401)", "push to")

    # Token precedence: token= beats HF_TOKEN, which beats the stored login.
    assert _pull(hub, tmp_path, token=TOKEN).is_dir()  # HF_TOKEN is still the wrong one
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _pull(hub, tmp_path, token=None).is_dir()
    monkeypatch.delenv("HF_TOKEN")
    no_ambient_token.write_text(TOKEN)
    assert _pull(hub, tmp_path, token=None).is_dir()

    # Refused before any request: not a checkpoint, or weights that do not match config.json.
    hub.requests.clear()
    with pytest.raises(CheckpointError, match="has no config.json"):
        _push(hub, checkpoint.parent)
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        _push(hub, checkpoint)
    assert hub.requests == []

    hub.stop()
    with pytest.raises(HubError) as err:
        _pull(hub, tmp_path)
    _assert_error(err, "cannot reach", "not in the Hub cache")


@pytest.mark.slow
def test_tampered_files_are_refused_and_dropped_from_the_cache(
    hub: HubServer, checkpoint: Path, tmp_path: Path
) -> None:
    _push(hub, checkpoint)
    weights = (checkpoint / "model.safetensors").read_bytes()
    hub.tamper(REPO, "model.safetensors", weights[:-4] + b"\x01\x02\x03\x04")
    cache = tmp_path / "victim"
    with pytest.raises(CheckpointError, match="model.safetensors of .* git blob sha1"):
        pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint, cache_dir=cache)
    assert not [p for p in cache.rglob("model.safetensors") if p.exists()]

    # Same for a small file stored inline (checked by its git blob sha1).
    hub.tamper(REPO, "model.safetensors", weights)
    config = json.loads((checkpoint / "config.json").read_text())
    hub.tamper(REPO, "config.json", json.dumps({**config, "num_classes": 9}).encode())
    with pytest.raises(CheckpointError, match="config.json of .* does not match the git blob sha1"):
        _pull(hub, tmp_path)


@pytest.mark.slow
def test_a_pulled_checkpoint_is_checked_again_when_the_hub_is_unreachable(
    hub: HubServer, checkpoint: Path, tmp_path: Path
) -> None:
    _push(hub, checkpoint)
    cache = tmp_path / "laptop"
    folder = pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint, cache_dir=cache)
    hub.stop()
    again = pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint, cache_dir=cache)
    assert again == folder
    blob = (folder / "metrics.json").resolve()
    blob.write_text('{"val_accuracy": 1.0}')  # edited in the cache behind the Hub's back
    with pytest.raises(CheckpointError, match="metrics.json .* does not match"):
        pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint, cache_dir=cache)


def test_repo_paths_must_stay_inside_the_snapshot() -> None:
    assert _safe_name("model.safetensors") == "model.safetensors"
    for bad in ("../model.safetensors", "/etc/passwd", "a/../../b", "C:\\x", "..\\x", ""):
        with pytest.raises(CheckpointError, match="unsafe file path"):
            _safe_name(bad)


# --------------------------------------------------------------------------- env-driven


@pytest.mark.slow
def test_offline_load_after_a_pull_makes_no_request(
    hub: HubServer, checkpoint: Path, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    _push(hub, checkpoint)
    _, expected = trained
    pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint,
                  cache_dir=tmp_path / "hf-home" / "hub")
    seen = len(hub.requests)
    out = _run(
        f"""
        import json, torch, zoo
        model = zoo.from_pretrained("hf-hub:{REPO}")
        torch.manual_seed(1)
        with torch.no_grad():
            torch.save(model(torch.rand(4, 3, 16, 16)), {str(tmp_path / "y.pt")!r})
        try:
            zoo.from_pretrained("user/never-pulled")
        except zoo.ZooError as exc:
            print(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"}}))
        """,
        tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN,
    )
    assert len(hub.requests) == seen
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)
    assert out["error"].startswith("HubError: ") and "HF_HUB_OFFLINE" in out["error"]
    assert TOKEN not in out["error"]


@pytest.mark.slow
def test_lfs_upload_mode_round_trip_without_xet(
    checkpoint: Path, trained: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="lfs") as hub:
        _run(
            f"""
            import json, torch, zoo
            zoo.push_to_hub({str(checkpoint)!r}, {REPO!r})
            model = zoo.from_pretrained("hf-hub:{REPO}")
            torch.manual_seed(1)
            with torch.no_grad():
                torch.save(model(torch.rand(4, 3, 16, 16)), {str(tmp_path / "y.pt")!r})
            print(json.dumps({{}}))
            """,
            tmp_path, HF_HUB_DISABLE_XET="1", HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN,
        )
        puts = [p for m, p in hub.requests if m == "PUT"]
        assert len(puts) == 1 and ".git/lfs-upload/" in puts[0]  # the weights, through LFS
        files = hub.repo_state(REPO)["commits"][hub.repo_state(REPO)["branches"]["main"]]
        assert files["files"]["model.safetensors"]["lfs"]
        assert not files["files"]["config.json"]["lfs"]
        assert torch.equal(torch.load(tmp_path / "y.pt"), trained[1])

        # An LFS file is checked against the sha256 the Hub reports for it.
        hub.tamper(REPO, "model.safetensors", b"\0" * 1000)
        with pytest.raises(CheckpointError, match="does not match the sha256 the Hub reports"):
            pull_from_hub(REPO, token=TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "c")


@pytest.mark.slow
def test_timm_full_checkpoint_loads_with_timm_alone(hub: HubServer, tmp_path: Path) -> None:
    result = _finetune("timm/mobilenetv3_small_050", tmp_path / "timm", strategy="full",
                       image_size=32, checkpoint_kind="full",
                       train=zoo.load_data("digits", limit_per_class=2))
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "mobilenetv3_small_050"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    _push(hub, tmp_path / "timm", "user/timm-digits")

    out = _run(
        f"""
        import json, timm, torch
        model = timm.create_model("hf-hub:user/timm-digits", pretrained=True).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            torch.save(model(torch.rand(4, 3, 32, 32)), {str(tmp_path / "y.pt")!r})
        cfg = model.pretrained_cfg
        print(json.dumps({{"labels": list(cfg["label_names"]), "size": list(cfg["input_size"]),
                           "classes": model.num_classes}}))
        """,
        tmp_path, HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN,
    )
    assert out == {"labels": [str(i) for i in range(10)], "size": [3, 32, 32], "classes": 10}
    assert torch.equal(torch.load(tmp_path / "y.pt"), _outputs(result.model, 32))


def test_model_card_follows_hub_conventions() -> None:
    from huggingface_hub import ModelCard

    from zoo.persist.card import model_card

    weights = zoo.get_backbone("timm/resnet18").weights[0]
    config = {"backbone": "timm/resnet18", "kind": "delta", "num_classes": 3,
              "weights": {"tag": weights.tag, "sha256": "ab" * 32, "source": weights.source},
              "class_names": ["cat", "dog", "bird"], "dataset": "hf:user/pets",
              "strategy": {"name": "lora", "options": {"rank": 4}},
              "preprocessing": {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3},
              "training": {"epochs": 2, "lr": 0.001}}
    card = model_card(config, {"val_accuracy": 0.9, "epochs": 2, "feature_cache": {"hits": 1}})
    data = ModelCard(card).data.to_dict()
    assert data["library_name"] == "zoo" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == weights.license.lower()
    assert data["base_model"] == weights.source.removeprefix("hf-hub:")
    assert {"timm-resnet18", "lora", "delta-checkpoint"} <= set(data["tags"])
    assert data["datasets"] == ["user/pets"] and data["metrics"] == ["accuracy"]  # Hub id
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9
    assert "| val_accuracy | 0.9000 |" in card and "feature_cache" not in card
    assert 'model = zoo.from_pretrained("hf-hub:<namespace>/<name>")' in card
    assert '- strategy: `lora` with {"rank": 4}' in card and "lr=0.001" in card
