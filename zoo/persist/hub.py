"""Checkpoints on a Hugging Face Hub: push, pull and ``from_pretrained``.

- ``push_to_hub(dir, repo)`` uploads a checkpoint's own files (never anything else) in one
  commit; ``pull_from_hub(repo)`` downloads them into the Hub cache and checks every file
  against the hashes the Hub reports and the weights against config.json;
  ``from_pretrained(dir_or_repo)`` loads either.
- The token is the ``token=`` argument, else ``HF_TOKEN``, else the huggingface_hub login
  (``hf auth login``): huggingface_hub's own order. The endpoint is ``endpoint=``, else
  ``HF_ENDPOINT``. ``HF_HUB_OFFLINE=1`` serves a pulled checkpoint from the cache.
- Failures are one-line ``HubError`` (could not talk to the Hub) or ``CheckpointError``
  (the files are not a valid zoo checkpoint, or do not match their hashes). The checks on
  every Hub answer and the error translation live in ``zoo.weights._hf``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.core.errors import CheckpointError, HubError, ZooError
from zoo.persist.config import base_is_registered
from zoo.persist.folder import (
    CARD_FILE,
    CHECKPOINT_FILES,
    CONFIG_FILE,
    MODEL_FILE,
    open_checkpoint,
    read_config,
)
from zoo.weights._hf import (
    _REPO_ID,
    CARD_REPO_PLACEHOLDER,
    HUB_PREFIX,
    _cache_root,
    _cached_hash,
    _check_inside,
    _discard,
    _hub_errors,
    _network_errors,
    _redact,
    _remember_revision,
    _split_repo,
    _token,
    _verify,
    _without_chain,
)
from zoo.weights._hub_answers import COMMIT, printable, unsafe_name

if TYPE_CHECKING:
    import torch
    from torch import nn


def _open_checkpoint(directory: Path, stack: contextlib.ExitStack) -> tuple[dict[str, Any],
                                                                         dict[str, Any]]:
    """Open the checkpoint's files and validate them; return (config, name -> open file).

    Files are opened once, together (``zoo.persist.folder.open_checkpoint``), and uploaded from
    these handles, so a save that replaces them meanwhile cannot mix an old config with new
    weights. Only the checkpoint files config.json lists go up, and never through a symbolic
    link out of the folder (a ``history.json`` linked to a credentials file is refused).
    """
    config, handles = stack.enter_context(open_checkpoint(directory, CHECKPOINT_FILES))
    if not (config.get("files") or {}).get(MODEL_FILE):
        raise CheckpointError(f"{directory / CONFIG_FILE} records no sha256 for {MODEL_FILE}: "
                              "re-save the checkpoint with this version of zoo")
    return config, handles


def _check_shareable(config: dict[str, Any], directory: Path) -> None:
    """Refuse a delta whose base only exists on this machine: nobody could rebuild it."""
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


@_without_chain
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
    from huggingface_hub import CommitOperationAdd, HfApi  # lazy: only for Hub calls

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
    return printable(_redact(str(info.commit_url)))  # the server's text, shown to the user


# --------------------------------------------------------------------------- pull


def _safe_name(path: str) -> str:
    """A repo path that stays inside the snapshot folder (see ``unsafe_name``)."""
    if unsafe_name(path):
        raise CheckpointError(f"the Hub answered an unsafe file path {path!r}: refusing it")
    return path


def _listing(repo: str, revision: str | None, endpoint: str | None, token: str | None
             ) -> tuple[str, dict[str, tuple[str, str]]] | None:
    """(commit that ``revision`` names, what the Hub reports for each file there: name ->
    (hash name, digest)), checked before anything is downloaded.

    sha256 for LFS files, the git blob sha1 for regular ones. None when the Hub cannot be
    reached (offline or no network): then the cache's own record is used instead.
    """
    from huggingface_hub import HfApi, RepoFile, constants
    from huggingface_hub import errors as hf  # lazy: only for Hub calls

    if constants.HF_HUB_OFFLINE:
        return None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        commit = api.repo_info(repo, revision=revision).sha
        if not COMMIT.fullmatch(str(commit)):  # also checked by check_answer
            raise CheckpointError(f"the Hub answered an unsafe commit id for {repo}: refusing it")
        entries = list(api.list_repo_tree(repo, revision=commit, recursive=True))
    except hf.HfHubHTTPError:
        raise  # the Hub answered: a refused token or a missing repo is an error, not offline
    except _network_errors():
        return None
    reported = {}
    for entry in entries:
        name = _safe_name(entry.path)
        if isinstance(entry, RepoFile):
            reported[name] = (("sha256", entry.lfs.sha256) if entry.lfs
                              else ("git blob sha1", entry.blob_id))
    return commit, reported


def _snapshot_files(folder: Path, cache: Path, where: str,
                    reported: dict[str, tuple[str, str]] | None) -> list[str]:
    """The checkpoint files in a downloaded snapshot, checked to lie inside the cache and to be
    the ones the Hub lists."""
    if not COMMIT.fullmatch(folder.name):
        raise CheckpointError(f"the Hub answered an unexpected commit id for {where}")
    present = [n for n in CHECKPOINT_FILES if (folder / n).is_file()]
    for name in present:
        _check_inside(folder / name, cache, f"{name} of {where}", CheckpointError)
    for name in (CONFIG_FILE, MODEL_FILE):
        if name not in present:
            raise CheckpointError(f"{where} is not a zoo checkpoint: it has no {name}")
    if reported is not None and set(reported) != set(present):
        raise CheckpointError(f"the files of {where} in the cache ({sorted(present)}) differ "
                              f"from those on the Hub ({sorted(reported)}): pull again")
    return present


@_without_chain
def pull_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download a checkpoint from a Hub repo into the Hub cache and return its local folder.

    Only the checkpoint files are fetched, by the commit id the Hub names for ``revision``
    (checked first, with the file list). Each file must lie inside the cache and match the
    hash the Hub reports for that commit (sha256 for LFS files, git blob sha1 otherwise;
    offline, the cache's record), and model.safetensors config.json's sha256; a mismatch is a
    ``CheckpointError`` and the bad file is dropped from the cache. With ``HF_HUB_OFFLINE=1``
    a previously pulled checkpoint is served from the cache without any request.
    """
    from huggingface_hub import snapshot_download  # lazy: only for Hub calls

    repo, revision = _split_repo(repo_id, revision)
    token = _token(token)
    where = f"{repo}@{revision}" if revision else repo
    cache = _cache_root(cache_dir)
    with _hub_errors(repo_id=repo, revision=revision, endpoint=endpoint, token=token,
                     action="pull"):
        listing = _listing(repo, revision, endpoint, token)
        folder = Path(snapshot_download(
            repo, revision=listing[0] if listing else revision,
            allow_patterns=list(CHECKPOINT_FILES), token=token, endpoint=endpoint,
            cache_dir=cache))
    reported = ({n: h for n, h in listing[1].items() if n in CHECKPOINT_FILES} if listing
                else None)
    if listing and folder.name != listing[0]:
        raise CheckpointError(f"the Hub client returned another commit than {listing[0]} "
                              f"for {where}: refusing it")
    present = _snapshot_files(folder, cache, where, reported)
    sha256s = {name: _verify(folder / name, reported[name] if reported is not None else
                             _cached_hash(folder / name), f"{name} of {where}", cache,
                             CheckpointError)
               for name in present}
    config = read_config(folder)
    recorded = (config.get("files") or {}).get(MODEL_FILE)
    if recorded != sha256s[MODEL_FILE]:
        _discard(folder / MODEL_FILE, cache)
        _discard(folder / CONFIG_FILE, cache)
        raise CheckpointError(f"{MODEL_FILE} of {where} does not match the sha256 in its "
                              "config.json: the checkpoint is corrupt or was tampered with")
    if listing:
        _remember_revision(cache, repo, revision, listing[0])
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
    from zoo.persist.checkpoint import load_checkpoint  # lazy: keeps zoo push/pull free of torch

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
