"""End-to-end tests of zoo.testing.hub_server with the real huggingface_hub client (no mocks).

huggingface_hub reads HF_* environment variables at import, so scenarios that need them
(HF_HUB_DISABLE_XET, HF_HUB_OFFLINE) run in a subprocess with their own HF_HOME; the others
pass ``endpoint=``, ``cache_dir=`` and ``token=`` explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from zoo.testing.hub_server import HubServer, git_blob_sha1

TOKEN = "hf_test_token"
REPO = "user/model"
ROOT = Path(__file__).resolve().parents[1]


def _write_model(folder: Path, seed: int) -> Path:
    """A ~5 MB random .safetensors-named file and a small config, like a real checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(os.urandom(5_000_000))
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    return folder


def _hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def _run_client(script: str, tmp_path: Path, **env: str) -> dict:
    """Run ``script`` in a fresh interpreter with its own HF_HOME; return the JSON it prints."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT), **env)
    path = tmp_path / "client.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run(
        [sys.executable, str(path)], env=clean, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="regular") as server:
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def _download(hub: HubServer, tmp_path: Path, filename: str, **kwargs) -> str:
    """hf_hub_download into a fresh cache (a warm cache would hide server errors)."""
    cache = tmp_path / f"cache-{len(list(tmp_path.glob('cache-*')))}"
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("repo_id", REPO)
    return hf_hub_download(filename=filename, endpoint=hub.endpoint, cache_dir=cache, **kwargs)


def test_regular_mode_roundtrip_and_incremental_upload(
    hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    src = _write_model(tmp_path / "src", seed=1)
    url = api.create_repo(REPO)
    assert url == f"{hub.endpoint}/{REPO}"
    api.upload_folder(repo_id=REPO, folder_path=src)
    assert not any(method == "PUT" for method, _ in hub.requests)  # all inline, no LFS, no xet

    pulled = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "c1", token=TOKEN)
    assert _hashes(pulled) == _hashes(src)

    (src / "config.json").write_text(json.dumps({"seed": 2}))
    hub.requests.clear()
    info = api.upload_folder(repo_id=REPO, folder_path=src)
    state = hub.repo_state(REPO)
    assert state["commits"][info.oid]["operations"] == ["config.json"]
    assert [m for m, p in hub.requests if p.endswith("/commit/main")] == ["POST"]

    pulled = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "c2", token=TOKEN)
    assert _hashes(pulled) == _hashes(src)


@pytest.mark.slow
def test_lfs_mode_roundtrip_without_xet(tmp_path: Path) -> None:
    src = _write_model(tmp_path / "src", seed=1)
    with HubServer(root=tmp_path / "hub", token=TOKEN, upload_mode="lfs") as hub:
        out = _run_client(
            f"""
            import json, os
            from pathlib import Path
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo({REPO!r})
            first = api.upload_folder(repo_id={REPO!r}, folder_path={str(src)!r})
            Path({str(src)!r}, "model.safetensors").write_bytes(os.urandom(5_000_000))
            second = api.upload_folder(repo_id={REPO!r}, folder_path={str(src)!r})
            print(json.dumps({{"first": first.oid, "second": second.oid}}))
            """,
            tmp_path,
            HF_HUB_DISABLE_XET="1",
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=TOKEN,
        )
        # One LFS PUT per upload: the big file each time, never the small json.
        puts = [path for method, path in hub.requests if method == "PUT"]
        assert len(puts) == 2 and all(".git/lfs-upload/" in p for p in puts)
        state = hub.repo_state(REPO)
        assert state["commits"][out["second"]]["operations"] == ["model.safetensors"]
        files = state["commits"][out["second"]]["files"]
        assert files["model.safetensors"]["lfs"] and not files["config.json"]["lfs"]

        tree = {f.path: f for f in HfApi(endpoint=hub.endpoint, token=TOKEN).list_repo_tree(REPO)}
        assert tree["model.safetensors"].lfs.sha256 == _hashes(src)["model.safetensors"]

        # This process has hf_xet installed: downloads still use plain HTTP.
        pulled = snapshot_download(
            REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=TOKEN
        )
        assert _hashes(pulled) == _hashes(src)


def test_branches_tags_and_pull_requests(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.upload_file(repo_id=REPO, path_or_fileobj=b"v0", path_in_repo="a.txt")
    api.create_branch(REPO, branch="dev")
    api.upload_file(repo_id=REPO, path_or_fileobj=b"dev", path_in_repo="a.txt", revision="dev")
    api.create_tag(REPO, tag="v1", revision="dev")
    api.upload_file(repo_id=REPO, path_or_fileobj=b"later", path_in_repo="a.txt", revision="dev")
    pr = api.upload_file(repo_id=REPO, path_or_fileobj=b"pr", path_in_repo="a.txt", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"

    for revision, expected in [
        ("main", b"v0"),
        ("dev", b"later"),
        ("v1", b"dev"),
        ("refs/pr/1", b"pr"),
    ]:
        path = _download(hub, tmp_path, "a.txt", revision=revision)
        assert Path(path).read_bytes() == expected, revision

    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [t.name for t in refs.tags] == ["v1"]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    api.delete_branch(REPO, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, "a.txt", revision="dev")


def test_missing_repo_revision_and_file(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.upload_file(repo_id=REPO, path_or_fileobj=b"{}", path_in_repo="config.json")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, "config.json", repo_id="user/nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        _download(hub, tmp_path, "nope.json")
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")
    assert not api.repo_exists("user/nope")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(repo_id="user/nope", path_or_fileobj=b"x", path_in_repo="x")


def test_private_repo_is_invisible_without_token(
    hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    api.create_repo(REPO, private=True)
    api.upload_file(repo_id=REPO, path_or_fileobj=b"secret", path_in_repo="w.bin")
    assert api.repo_info(REPO).private
    with pytest.raises(RepositoryNotFoundError) as err:
        _download(hub, tmp_path, "w.bin", token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).repo_info(REPO)
    assert Path(_download(hub, tmp_path, "w.bin")).read_bytes() == b"secret"

    api.create_repo("user/public")
    api.upload_file(repo_id="user/public", path_or_fileobj=b"open", path_in_repo="w.bin")
    path = _download(hub, tmp_path, "w.bin", repo_id="user/public", token=False)
    assert Path(path).read_bytes() == b"open"


def test_wrong_token_is_refused_and_never_echoed(hub: HubServer, tmp_path: Path) -> None:
    bad = HfApi(endpoint=hub.endpoint, token="hf_wrong_secret")
    with pytest.raises(HfHubHTTPError) as err:
        bad.create_repo(REPO)
    assert not isinstance(err.value, RepositoryNotFoundError)
    response = err.value.response
    assert response.status_code == 401
    assert response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert "hf_wrong_secret" not in response.text + str(dict(response.headers))
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=False).create_repo(REPO)
    assert err.value.response.status_code == 401


def test_offline_mode_serves_a_pulled_snapshot_from_cache(
    hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "weights.bin").write_bytes(os.urandom(1000))
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=src)
    cache = tmp_path / "hf_home" / "hub"
    snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache, token=TOKEN)

    seen = len(hub.requests)
    out = _run_client(
        f"""
        import json
        from huggingface_hub import snapshot_download
        print(json.dumps({{"path": snapshot_download({REPO!r})}}))
        """,
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT=hub.endpoint,
    )
    assert _hashes(out["path"]) == _hashes(src)
    assert len(hub.requests) == seen


def test_tamper_changes_served_bytes_but_not_recorded_hashes(
    hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    original, tampered = b'{"lr": 0.1}', b'{"lr": 9.9}'
    api.create_repo(REPO)
    api.upload_file(repo_id=REPO, path_or_fileobj=original, path_in_repo="config.json")
    hub.tamper(REPO, "config.json", tampered)

    assert Path(_download(hub, tmp_path, "config.json")).read_bytes() == tampered
    (entry,) = api.get_paths_info(REPO, ["config.json"])
    assert entry.blob_id == git_blob_sha1(original) != git_blob_sha1(tampered)


def test_head_headers_and_range_request(hub: HubServer, api: HfApi) -> None:
    data = os.urandom(4096)
    api.create_repo(REPO)
    api.upload_file(repo_id=REPO, path_or_fileobj=data, path_in_repo="w.bin")
    url = f"{hub.endpoint}/{REPO}/resolve/main/w.bin"

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        headers = resp.headers
    assert headers["ETag"] == f'"{git_blob_sha1(data)}"'
    assert headers["Content-Length"] == "4096"
    assert len(headers["X-Repo-Commit"]) == 40
    assert "X-Xet-Hash" not in headers

    request = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == "bytes 100-199/4096"
        assert resp.read() == data[100:200]


def test_commits_deletes_and_stale_parent(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    first = api.upload_file(repo_id=REPO, path_or_fileobj=b"1", path_in_repo="logs/a.txt")
    api.upload_file(repo_id=REPO, path_or_fileobj=b"2", path_in_repo="keep.txt")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(
            repo_id=REPO, path_or_fileobj=b"3", path_in_repo="x", parent_commit=first.oid
        )
    assert err.value.response.status_code == 412

    api.delete_folder("logs", repo_id=REPO)
    assert api.list_repo_files(REPO) == ["keep.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", repo_id=REPO)
    assert [c.title for c in api.list_repo_commits(REPO)][-1] == "initial commit"
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)


def test_dataset_repos(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    url = api.create_repo("user/data", repo_type="dataset")
    assert url == f"{hub.endpoint}/datasets/user/data"
    api.upload_file(
        repo_id="user/data", repo_type="dataset", path_or_fileobj=b"x,y", path_in_repo="d.csv"
    )
    path = _download(hub, tmp_path, "d.csv", repo_id="user/data", repo_type="dataset")
    assert Path(path).read_bytes() == b"x,y"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/data", repo_type="dataset")
    assert err.value.response.status_code == 409
    assert api.create_repo("user/data", repo_type="dataset", exist_ok=True) == url


def test_urls_follow_the_host_the_client_used(hub: HubServer) -> None:
    localhost = hub.endpoint.replace("127.0.0.1", "localhost")
    url = HfApi(endpoint=localhost, token=TOKEN).create_repo(REPO)
    assert url == f"{localhost}/{REPO}"


def test_command_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo.testing.hub_server", "--root", str(tmp_path), "--port", "0"]
        + ["--token", TOKEN],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = proc.stdout.readline().split()[4]
        request = urllib.request.Request(
            f"{endpoint}/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.load(resp)["name"] == "user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
