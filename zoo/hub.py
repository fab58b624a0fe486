"""Everything that talks to a Hugging Face Hub: the only module importing huggingface_hub.

- ``push_to_hub(dir, repo)`` uploads a checkpoint's own files (never anything else) in one
  commit; ``pull_from_hub(repo)`` downloads them into the Hub cache and checks every file
  against the hashes the Hub reports and the weights against config.json;
  ``from_pretrained(dir_or_repo)`` loads either.
- The token is the ``token=`` argument, else ``HF_TOKEN``, else the huggingface_hub login
  (``hf auth login``): huggingface_hub's own order. The endpoint is ``endpoint=``, else
  ``HF_ENDPOINT``. ``HF_HUB_OFFLINE=1`` serves a pulled checkpoint from the cache.
- Every failure is a one-line ``HubError`` (could not talk to the Hub: missing repo, revision
  or file, refused token, no network, offline) or ``CheckpointError`` (the files are not a
  valid zoo checkpoint, or do not match their hashes). Tokens never appear in messages.

huggingface_hub is imported inside the functions, so ``import zoo`` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import CheckpointError, HubError, WeightsError, ZooError

if TYPE_CHECKING:
    import torch
    from torch import nn

HUB_PREFIX = "hf-hub:"
# The model card's load snippet names this placeholder; a push fills in the repo id.
CARD_REPO_PLACEHOLDER = "hf-hub:<namespace>/<name>"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- errors


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub could not be reached" (the client's HTTP library's base)."""
    from huggingface_hub import errors as hf

    transport = getattr(hf, "HTTPError", None)  # httpx's HTTPError, which HfHubHTTPError extends
    return (hf.OfflineModeIsEnabled, ConnectionError, *([transport] if transport else []))


def _hub_name(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def _secrets(token: str | None) -> list[str]:
    """Every token that may have been sent: the argument and the one huggingface_hub finds."""
    found = [token] if token else []
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            found.append(stored)
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _translate(exc: BaseException, *, error: type[ZooError], repo_id: str,
               revision: str | None, hub: str, action: str, filename: str | None = None,
               token_sent: bool = True) -> ZooError | None:
    """The zoo error (one line, says what to do) for a huggingface_hub failure, else None."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}" if revision else repo_id
    what = f"{filename!r} from {where}" if filename else where
    if isinstance(exc, hf.GatedRepoError):
        return error(f"{where} on {hub} is gated: accept its terms on the Hub, then pass "
                     "token=, set HF_TOKEN or log in (hf auth login)")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return error(f"no repo {repo_id!r} on {hub}, or it is private and no valid token was "
                     "sent: check the name; for a private repo pass token=, set HF_TOKEN or "
                     "log in (hf auth login)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return error(f"repo {repo_id!r} on {hub} has no revision {revision!r}: check the "
                     "branch, tag or commit")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return error(f"{what} is not in the Hub cache and HF_HUB_OFFLINE is set: pull it "
                         "once while online, or unset HF_HUB_OFFLINE")
        return error(f"cannot reach {hub} and {what} is not in the Hub cache: check the "
                     "network (or HF_ENDPOINT / endpoint=)")
    if isinstance(exc, hf.EntryNotFoundError):
        return error(f"{where} on {hub} has no file {filename!r}" if filename
                     else f"a file is missing from {where} on {hub}")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return error(f"cannot {action} {where}: HF_HUB_OFFLINE is set; unset it to reach {hub}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status == 401 and not token_sent:
            return error(f"{hub} needs a token to {action} {where} (HTTP 401): pass token=, "
                         "set HF_TOKEN or log in (hf auth login)")
        if status == 401:
            return error(f"{hub} refused the token (HTTP 401) while trying to {action} {where}: "
                         "check token=, HF_TOKEN or hf auth login")
        if status == 403:
            return error(f"{hub} does not allow this token to {action} {where} (HTTP 403): "
                         "use a token with write access to that namespace")
        detail = (getattr(exc, "server_message", None) or str(exc) or "").strip()
        detail = detail.splitlines()[0] if detail else type(exc).__name__
        return error(f"{hub} answered HTTP {status} while trying to {action} {where}: {detail}")
    if isinstance(exc, hf.HFValidationError):
        return error(f"{repo_id!r} is not a valid Hub repo id: use namespace/name "
                     "(letters, digits, '-', '_', '.')")
    if isinstance(exc, _network_errors()):
        return error(f"cannot reach {hub} to {action} {where} ({type(exc).__name__}): check the "
                     "network (or HF_ENDPOINT / endpoint=)")
    if isinstance(exc, OSError):
        return error(f"could not {action} {where}: {exc}")
    return None


@contextlib.contextmanager
def _hub_errors(*, error: type[ZooError] = HubError, repo_id: str, revision: str | None,
                endpoint: str | None, token: str | None, action: str,
                filename: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub failures inside the block into one-line zoo errors, tokens removed."""
    try:
        yield
    except ZooError as exc:
        secrets = _secrets(token)
        if any(s in str(exc) for s in secrets):
            raise type(exc)(_scrub(str(exc), secrets)) from None
        raise
    except Exception as exc:
        secrets = _secrets(token)
        zoo_error = _translate(exc, error=error, repo_id=repo_id, revision=revision,
                               hub=_hub_name(endpoint), action=action, filename=filename,
                               token_sent=bool(secrets))
        if zoo_error is None:
            raise
        raise type(zoo_error)(_scrub(str(zoo_error), secrets)) from exc


def _split_repo(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """``hf-hub:ns/name@rev`` -> ("ns/name", "rev"); an explicit ``revision`` must agree."""
    repo, _, at = str(repo_id).removeprefix(HUB_PREFIX).partition("@")
    if at and revision and at != revision:
        raise HubError(f"{repo_id!r} names revision {at!r} but revision={revision!r} was passed")
    return repo, (revision or at or None)


def _token(token: str | None) -> str | None:
    return token or None  # "" means "not given": fall back to HF_TOKEN / the login


# --------------------------------------------------------------------------- one file


def hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | None = None,
) -> Path:
    """Download one file of a Hub model repo (or find it in the Hub cache) and return its path.

    Wraps ``huggingface_hub.hf_hub_download`` so that every failure becomes a one-line
    ``WeightsError`` saying what to check; the token never appears in a message.
    """
    import huggingface_hub

    token = _token(token)
    with _hub_errors(error=WeightsError, repo_id=repo_id, revision=revision, endpoint=endpoint,
                     token=token, action="download", filename=filename):
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, endpoint=endpoint, token=token,
            cache_dir=cache_dir,
        )
    return Path(path)


# --------------------------------------------------------------------------- push


def _open_checkpoint(directory: Path, stack: contextlib.ExitStack) -> tuple[dict[str, Any],
                                                                         dict[str, Any]]:
    """Open the checkpoint's files and validate them; return (config, name -> open file).

    Files are opened once and uploaded from these handles, so a save that replaces them
    meanwhile cannot mix an old config with new weights.
    """
    from zoo.checkpoint import CHECKPOINT_FILES, CONFIG_FILE, MODEL_FILE, STAGING, recover
    from zoo.validate import validate_config

    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if (directory / STAGING / "COMPLETE").is_file():
        recover(directory)  # finish a completed save that was interrupted while moving files
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a zoo checkpoint: it has no {name}")
    handles = {name: stack.enter_context((directory / name).open("rb"))
               for name in CHECKPOINT_FILES if (directory / name).is_file()}
    path = directory / CONFIG_FILE
    try:
        config = json.loads(handles[CONFIG_FILE].read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} is not valid JSON ({exc})") from None
    validate_config(config, path)
    expected = (config.get("files") or {}).get(MODEL_FILE)
    if not expected:
        raise CheckpointError(f"{path} records no sha256 for {MODEL_FILE}: re-save the "
                              "checkpoint with this version of zoo")
    if _digests(handles[MODEL_FILE])[0] != expected:
        raise CheckpointError(f"checkpoint is corrupt: {directory / MODEL_FILE} does not match "
                              "the sha256 recorded in config.json (modified or partly written)")
    for handle in handles.values():
        handle.seek(0)
    return config, handles


def _check_shareable(config: dict[str, Any], directory: Path) -> None:
    """Refuse a delta whose base only exists on this machine: nobody could rebuild it."""
    from zoo.checkpoint import base_is_registered

    if config["kind"] != "delta":
        return
    with contextlib.suppress(ZooError):  # an unknown backbone cannot be rebuilt either
        if base_is_registered(config):
            return
    weights = config.get("weights") or {}
    raise CheckpointError(
        f"{directory} is a delta checkpoint whose base weights ({weights.get('tag')!r}) are not "
        f"registered weights of {config['backbone']!r}, so nobody else can rebuild it: push a "
        "full checkpoint instead (zoo.save_checkpoint(zoo.load_checkpoint(dir, "
        "allow_untrusted_base=True), new_dir, kind='full'))"
    )


def push_to_hub(
    checkpoint_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a zoo checkpoint directory to a Hub model repo in one commit; return its URL.

    Only the checkpoint's own files go up (model.safetensors, config.json, metrics.json,
    README.md, history.json), never resume.pt or anything else in the directory. The repo
    is created if needed (``private`` applies only then) and the branch ``revision`` too;
    unchanged files are skipped by the Hub client. Nothing local is written, so a failed
    push can simply be retried. ``create_pr`` opens a pull request instead of committing.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from zoo.checkpoint import CARD_FILE

    directory = Path(checkpoint_dir).expanduser()
    repo, revision = _split_repo(repo_id, revision)
    token = _token(token)
    with contextlib.ExitStack() as stack:
        config, handles = _open_checkpoint(directory, stack)
        _check_shareable(config, directory)
        strategy = (config.get("strategy") or {}).get("name") or "no strategy"
        message = commit_message or f"Upload {config['backbone']} ({strategy}) checkpoint with zoo"
        api = HfApi(endpoint=endpoint, token=token, library_name="zoo")
        with _hub_errors(repo_id=repo, revision=revision, endpoint=endpoint, token=token,
                         action="push to"):
            repo = api.create_repo(repo, private=private, exist_ok=True).repo_id
            if revision and revision != "main" and not revision.startswith("refs/"):
                api.create_branch(repo, branch=revision, exist_ok=True)
            contents: dict[str, Any] = dict(handles)
            if CARD_FILE in handles:  # name this repo in the card's load snippet
                contents[CARD_FILE] = handles[CARD_FILE].read().replace(
                    CARD_REPO_PLACEHOLDER.encode(), f"{HUB_PREFIX}{repo}".encode())
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                          for name, content in contents.items()]
            info = api.create_commit(repo, operations, commit_message=message,
                                     revision=revision, create_pr=create_pr)
    return str(info.commit_url)


# --------------------------------------------------------------------------- pull


def _digests(source: Any) -> tuple[str, str]:
    """(sha256, git blob sha1) of a path or an open binary file, read once in chunks."""
    with contextlib.ExitStack() as stack:
        handle = source if hasattr(source, "read") else stack.enter_context(open(source, "rb"))
        size = os.fstat(handle.fileno()).st_size
        sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _safe_name(path: str) -> str:
    """A repo path that stays inside the snapshot folder (no absolute path, no '..')."""
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) or ":" in path:
        raise CheckpointError(f"the Hub answered an unsafe file path {path!r}: refusing it")
    return path


def _reported_hashes(api: Any, repo: str, commit: str, names: list[str]
                     ) -> dict[str, tuple[str, str]] | None:
    """What the Hub reports for ``names`` at ``commit``: name -> (hash name, digest).

    sha256 for LFS files, the git blob sha1 for regular ones. None when the Hub cannot be
    reached (offline or no network): then the cache's own record is used instead.
    """
    from huggingface_hub import RepoFile, constants
    from huggingface_hub import errors as hf

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        entries = api.get_paths_info(repo, names, revision=commit)
    except hf.HfHubHTTPError:
        raise  # the Hub answered: a refused token or a missing repo is an error, not offline
    except _network_errors():
        return None
    reported = {}
    for entry in entries:
        name = _safe_name(entry.path)
        if name not in names or not isinstance(entry, RepoFile):
            raise CheckpointError(f"the Hub answered an unexpected entry {name!r} for {repo}")
        reported[name] = (("sha256", entry.lfs.sha256) if entry.lfs
                          else ("git blob sha1", entry.blob_id))
    return reported


def _cached_hash(path: Path) -> tuple[str, str] | None:
    """The hash the Hub cache recorded for a file: its blob is named by the download's ETag."""
    blob = path.resolve().name
    if _SHA256.fullmatch(blob):
        return "sha256", blob
    if _COMMIT.fullmatch(blob):
        return "git blob sha1", blob
    return None  # a copied file (no symlinks on this system): nothing recorded


def _discard(path: Path) -> None:
    """Remove a bad file from the Hub cache (link and blob) so the next pull fetches it again."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path.absolute():
        blob.unlink(missing_ok=True)


def pull_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download a checkpoint from a Hub repo into the Hub cache and return its local folder.

    Only the checkpoint files are fetched. Each is checked against the hash the Hub reports
    for that commit (sha256 for LFS files, git blob sha1 otherwise; offline, against the
    cache's record), and model.safetensors against config.json's sha256; a mismatch is a
    ``CheckpointError`` and the bad file is dropped from the cache. With ``HF_HUB_OFFLINE=1``
    a previously pulled checkpoint is served from the cache without any request.
    """
    from huggingface_hub import HfApi, snapshot_download

    from zoo.checkpoint import CHECKPOINT_FILES, CONFIG_FILE, MODEL_FILE, read_config

    repo, revision = _split_repo(repo_id, revision)
    token = _token(token)
    where = f"{repo}@{revision}" if revision else repo
    with _hub_errors(repo_id=repo, revision=revision, endpoint=endpoint, token=token,
                     action="pull"):
        folder = Path(snapshot_download(
            repo, revision=revision, allow_patterns=list(CHECKPOINT_FILES), token=token,
            endpoint=endpoint, cache_dir=cache_dir))
        if not _COMMIT.fullmatch(folder.name):
            raise CheckpointError(f"the Hub answered an unexpected commit id for {where}")
        present = [n for n in CHECKPOINT_FILES if (folder / n).is_file()]
        for name in (CONFIG_FILE, MODEL_FILE):
            if name not in present:
                raise CheckpointError(f"{where} is not a zoo checkpoint: it has no {name}")
        api = HfApi(endpoint=endpoint, token=token)
        reported = _reported_hashes(api, repo, folder.name, present)
    if reported is not None and set(reported) != set(present):
        raise CheckpointError(f"the files of {where} in the cache ({sorted(present)}) differ "
                              f"from those on the Hub ({sorted(reported)}): pull again")
    sha256s = {}
    for name in present:
        path = folder / name
        expected = reported[name] if reported is not None else _cached_hash(path)
        actual = dict(zip(("sha256", "git blob sha1"), _digests(path), strict=True))
        sha256s[name] = actual["sha256"]
        if expected is not None and actual[expected[0]] != expected[1]:
            _discard(path)
            raise CheckpointError(
                f"{name} of {where} does not match the {expected[0]} the Hub reports "
                f"({expected[1][:12]}...): it was changed on the server or in transit, and "
                "was removed from the cache; do not use this checkpoint"
            )
    config = read_config(folder)
    recorded = (config.get("files") or {}).get(MODEL_FILE)
    if recorded != sha256s[MODEL_FILE]:
        _discard(folder / MODEL_FILE)
        _discard(folder / CONFIG_FILE)
        raise CheckpointError(f"{MODEL_FILE} of {where} does not match the sha256 in its "
                              "config.json: the checkpoint is corrupt or was tampered with")
    return folder


# --------------------------------------------------------------------------- load


def is_hub_id(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` means a Hub repo: ``hf-hub:<repo>``, or ``namespace/name`` that is not
    an existing local path."""
    if isinstance(name, os.PathLike):
        return False
    if name.startswith(HUB_PREFIX):
        return True
    return bool(_REPO_ID.fullmatch(name.partition("@")[0])) and not Path(name).exists()


def from_pretrained(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a checkpoint from a local directory or a Hub repo as an ``nn.Module`` in eval mode.

    ``hf-hub:<repo>[@revision]`` or ``namespace/name`` (when no such local path exists) is
    pulled with ``pull_from_hub`` first. A delta checkpoint rebuilds its base from the
    registry and checks the base weights' sha256.
    """
    from zoo.checkpoint import load_checkpoint

    if is_hub_id(repo_id_or_path):
        folder = pull_from_hub(str(repo_id_or_path), revision=revision, token=token,
                               endpoint=endpoint, cache_dir=cache_dir)
    else:
        if revision is not None:
            raise HubError(f"revision={revision!r} applies to Hub repos, but "
                           f"{str(repo_id_or_path)!r} is a local path")
        folder = Path(repo_id_or_path).expanduser()
        if not folder.exists():
            raise CheckpointError(f"no checkpoint directory {str(folder)!r}, and it is not a "
                                  "Hub repo id (namespace/name, or hf-hub:namespace/name)")
    return load_checkpoint(folder, device=device)
