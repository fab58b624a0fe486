"""Issue 12, Hub items: a hostile Hub can neither write outside the Hub cache nor get changed
bytes accepted, and the token never leaks (messages, chained exceptions, --debug tracebacks).

Every test runs the real huggingface_hub client (and the real ``zoo`` command line) against
zoo.testing.hub_server on 127.0.0.1, turned hostile with ``HubServer.set_hostile`` or
``HubServer.tamper``; the Hub cache is a folder in tmp_path.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants

import zoo
from zoo.cli import main
from zoo.core.errors import CheckpointError, HubError, WeightsError
from zoo.persist.hub import pull_from_hub
from zoo.testing.hub_server import HubServer
from zoo.weights._hf import hub_download

TOKEN = "hf_secret_security_token"
WRONG = "hf_wrong_security_token"
REPO = "user/shared"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ambient token; the default Hub cache (what ``zoo pull`` uses) is tmp_path/home/hub."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    return tmp_path / "home" / "hub"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(root=tmp_path / "server", token=TOKEN) as server:
        yield server


@pytest.fixture
def shared(hub: HubServer, tmp_path: Path) -> Path:
    """A real checkpoint pushed to REPO; returns its local folder."""
    model = zoo.create_model("cifar_resnet20", num_classes=3, weights=None)
    folder = zoo.save_checkpoint(model, tmp_path / "checkpoint")
    zoo.push_to_hub(folder, REPO, token=TOKEN, endpoint=hub.endpoint)
    return folder


def _outside(tmp_path: Path) -> list[str]:
    """Every path under tmp_path that is neither in the Hub cache nor in the server's store."""
    inside = (tmp_path / "home", tmp_path / "server")
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if not any(p.is_relative_to(folder) for folder in inside))


def _pull(hub: HubServer, capsys: pytest.CaptureFixture[str], *args: str
          ) -> tuple[int, str, str]:
    """``zoo pull REPO`` against ``hub``; returns (exit status, stdout, stderr)."""
    status = main(["pull", REPO, "--endpoint", hub.endpoint, "--token", TOKEN, *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def _one_line_error(stderr: str, *phrases: str) -> None:
    """One ``zoo: error:`` line (after any progress bar), no traceback, naming ``phrases``."""
    errors = [line for line in stderr.splitlines() if line.startswith("zoo: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


# --------------------------------------------------------------------------- 12.2


# From the cache's blobs/, trees/ or .locks/<repo>/ folder, four '..' reach tmp_path.
LIES = {
    "etag": {"etag": "../../../../escaped-blob"},
    "absolute etag": {"etag": '"{tmp}/escaped-absolute"'},
    "commit": {"commit": "../../../../escaped-commit"},
    "file name": {"file_name": "../../../../escaped-name"},
}


@pytest.mark.parametrize("honest_answers", [0, 1], ids=["lies-at-once", "lies-after-checks"])
@pytest.mark.parametrize("lie", list(LIES))
@pytest.mark.slow
def test_hostile_hub_metadata_never_writes_outside_the_cache(
    hub: HubServer, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    lie: str, honest_answers: int,
) -> None:
    """Issue 12.2: a path-traversal ETag, commit id or file name makes ``zoo pull`` refuse
    with one line and write nothing outside the Hub cache, also when the server tells the
    lie only after answering zoo's own checks honestly."""
    before = _outside(tmp_path)
    lies = {kind: value.replace("{tmp}", str(tmp_path)) for kind, value in LIES[lie].items()}
    hub.set_hostile(**lies, honest_answers=honest_answers)
    status, _, stderr = _pull(hub, capsys)
    assert _outside(tmp_path) == before
    assert status == 2
    _one_line_error(stderr, "unsafe", "refusing it")

    hub.set_hostile()  # the same server, honest again: the pull works
    status, stdout, _ = _pull(hub, capsys)
    assert status == 0 and Path(stdout.strip()).is_relative_to(tmp_path / "home" / "hub")


def test_hub_download_and_from_pretrained_refuse_hostile_metadata(
    hub: HubServer, shared: Path, tmp_path: Path
) -> None:
    """Issue 12.2: the single-file download (used for ``hf-hub:`` weights) and
    ``from_pretrained`` refuse the same lies as ``zoo pull``."""
    before = _outside(tmp_path)
    for lies in ({"etag": "../../../../escaped"}, {"commit": "../../../../escaped"}):
        hub.set_hostile(**lies, honest_answers=1)
        with pytest.raises(HubError, match="unsafe") as error:
            hub_download(REPO, "config.json", endpoint=hub.endpoint, token=TOKEN)
        assert "\n" not in str(error.value) and TOKEN not in str(error.value)
        hub.set_hostile(**lies)
        with pytest.raises(HubError, match="unsafe"):
            zoo.from_pretrained(f"hf-hub:{REPO}", endpoint=hub.endpoint, token=TOKEN)
    assert _outside(tmp_path) == before
    with pytest.raises(HubError, match="not a branch, tag or commit name"):
        pull_from_hub(f"{REPO}@../../escaped", endpoint=hub.endpoint, token=TOKEN)


def test_a_cached_file_that_leads_outside_the_cache_is_refused(
    hub: HubServer, shared: Path, tmp_path: Path
) -> None:
    """Issue 12.2: every file the Hub client returns must really lie inside the cache; a
    snapshot link planted to point elsewhere is refused, and the file it points to is kept."""
    folder = pull_from_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
    secret = tmp_path / "elsewhere.json"
    secret.write_text('{"private": true}')
    (folder / "metrics.json").unlink()
    (folder / "metrics.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the Hub cache"):
        pull_from_hub(REPO, endpoint=hub.endpoint, token=TOKEN)
    assert secret.read_text() == '{"private": true}'


# --------------------------------------------------------------------------- 12.3


def _assert_no_chain(error: BaseException, *secrets: str) -> None:
    assert error.__cause__ is None and error.__context__ is None
    text = "".join(traceback.format_exception(error))
    assert not any(secret in text for secret in secrets), text


@pytest.mark.slow
def test_token_never_appears_in_errors_chains_or_debug_tracebacks(
    hub: HubServer, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12.3: a token read from a file (trailing newline) is stripped; a refused token
    gives an error with no chained exception (those hold the request headers), also under
    --debug, and the token is written to no file."""
    assert _pull(hub, capsys, "--token", TOKEN + "\n")[0] == 0

    args = ["pull", REPO, "--endpoint", hub.endpoint, "--token", WRONG + "\n"]
    assert main(args) == 2
    output = capsys.readouterr().err
    _one_line_error(output, "refused the token (HTTP 401)")
    assert WRONG not in output
    with pytest.raises(HubError) as error:
        main(["--debug", *args])
    _assert_no_chain(error.value, WRONG, "Bearer")
    hub.set_hostile(etag="../x")  # refused answers and tampered files: no chain either
    with pytest.raises(HubError) as error:
        pull_from_hub(REPO, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "c1")
    _assert_no_chain(error.value, TOKEN, "Bearer")
    hub.set_hostile()
    hub.tamper(REPO, "model.safetensors", b"changed")
    with pytest.raises(CheckpointError) as error:
        pull_from_hub(REPO, endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "c2")
    _assert_no_chain(error.value, TOKEN, "Bearer")

    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not [p for p in files if TOKEN.encode() in p.read_bytes() or WRONG.encode()
                in p.read_bytes()]


@pytest.mark.slow
def test_token_from_stdin_and_the_real_debug_traceback(
    hub: HubServer, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12.3: ``--token -`` reads the token from stdin (a token in the command line is
    in the process list), and ``zoo --debug`` shows a refused one nowhere in its traceback."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    assert main(["pull", REPO, "--endpoint", hub.endpoint, "--token", "-"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_dir()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["pull", REPO, "--endpoint", hub.endpoint, "--token", "-"]) == 2
    _one_line_error(capsys.readouterr().err, "stdin was empty")

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "zoo.cli", "--debug", "pull", REPO,
               "--endpoint", hub.endpoint, "--token", "-"]
    done = subprocess.run(command, input=WRONG + "\n", env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "HubError: " in done.stderr  # a traceback, as asked
    assert "During handling" not in done.stderr and "direct cause" not in done.stderr
    assert WRONG not in done.stdout + done.stderr


def test_help_says_how_to_keep_the_token_out_of_the_process_list(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12.3: ``--help`` of push and pull documents ``--token -``."""
    for command in ("pull", "push"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "'-' reads it from stdin" in text and "process list" in text


@pytest.mark.parametrize("token", ["hf_caf\u00e9_token", "hf_tab\tinside", "hf_nul\x00x"])
@pytest.mark.slow
def test_a_token_with_impossible_characters_is_refused_without_echoing_it(
    hub: HubServer, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12.3 / medium: a non-ASCII token or one with control characters gets a clear
    error, before any request, that never shows it (from token=, --token or the login)."""
    with pytest.raises(HubError, match="no Hub token has") as error:
        pull_from_hub(REPO, endpoint=hub.endpoint, token=token)
    assert token not in str(error.value) and token[3:7] not in str(error.value)
    assert main(["push", "somewhere", REPO, "--endpoint", hub.endpoint, "--token", token]) == 2
    _one_line_error(capsys.readouterr().err, "no Hub token has")
    login = Path(constants.HF_TOKEN_PATH)  # the token `hf auth login` stored
    login.parent.mkdir(parents=True, exist_ok=True)
    login.write_text(token + "\n")
    with pytest.raises(HubError, match="HF_TOKEN or your hf login") as error:
        hub_download(REPO, "config.json", endpoint=hub.endpoint)
    assert token[3:7] not in str(error.value)
    assert hub.requests == []


# --------------------------------------------------------------------------- 12.6


@pytest.mark.slow
def test_hub_download_refuses_bytes_that_differ_from_the_listed_hash(
    hub: HubServer, shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12.6: a Hub that serves changed bytes while listing the original hashes is
    refused by the single-file download too (git blob sha1 for regular files, sha256 for
    LFS ones), the bad file leaves the cache, and a cached file edited later is refused."""
    good = (shared / "config.json").read_bytes()
    path = hub_download(REPO, "config.json", endpoint=hub.endpoint, token=TOKEN)
    assert path.read_bytes() == good
    hub.tamper(REPO, "config.json", good.replace(b"cifar_resnet20", b"cifar_resnet56"))
    cache = tmp_path / "victim"
    with pytest.raises(WeightsError, match="does not match the git blob sha1 the Hub reports"):
        hub_download(REPO, "config.json", endpoint=hub.endpoint, token=TOKEN, cache_dir=cache)
    assert not list(cache.rglob("blobs/*")) and not list(cache.rglob("config.json"))

    # An LFS file (pushed through git-LFS: xet is off for this process) is checked by sha256.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(root=tmp_path / "lfs-server", token=TOKEN, upload_mode="lfs") as lfs:
        api = HfApi(endpoint=lfs.endpoint, token=TOKEN)
        api.create_repo(REPO)
        api.upload_folder(repo_id=REPO, folder_path=shared)
        assert api.get_paths_info(REPO, ["model.safetensors"])[0].lfs is not None
        weights = (shared / "model.safetensors").read_bytes()
        hub_download(REPO, "model.safetensors", endpoint=lfs.endpoint, token=TOKEN,
                     cache_dir=tmp_path / "lfs-cache")
        lfs.tamper(REPO, "model.safetensors", weights[:-1] + b"\0")
        with pytest.raises(WeightsError, match="does not match the sha256 the Hub reports"):
            hub_download(REPO, "model.safetensors", endpoint=lfs.endpoint, token=TOKEN,
                         cache_dir=tmp_path / "lfs-victim")
        with pytest.raises(CheckpointError, match="does not match the sha256 the Hub reports"):
            pull_from_hub(REPO, endpoint=lfs.endpoint, token=TOKEN, cache_dir=tmp_path / "c")

    # Edited in the cache after a download, while the Hub is unreachable: refused too.
    path.resolve().write_bytes(b'{"edited": true}')
    hub.stop()
    with pytest.raises(WeightsError, match="does not match the git blob sha1"):
        hub_download(REPO, "config.json", endpoint=hub.endpoint, token=TOKEN)


# --------------------------------------------------------------------------- medium


def test_credentials_in_the_endpoint_url_are_never_shown(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 12, medium: ``user:pass@`` in an endpoint URL is shown as ``***@``."""
    port = hub.port
    hub.stop()  # nothing listens there now
    endpoint = f"http://alice:hunter2@127.0.0.1:{port}"
    with pytest.raises(HubError, match=r"cannot reach http://\*\*\*@127\.0\.0\.1") as error:
        pull_from_hub(REPO, endpoint=endpoint, token=TOKEN)
    assert "hunter2" not in str(error.value) and "alice" not in str(error.value)
    assert main(["pull", REPO, "--endpoint", endpoint, "--token", TOKEN]) == 2
    output = capsys.readouterr()
    _one_line_error(output.err, "***@127.0.0.1")
    assert "hunter2" not in output.out + output.err
