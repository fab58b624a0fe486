"""Talking to a Hugging Face Hub safely: the only module importing huggingface_hub.

- ``hub_download(repo, filename)`` fetches one file into the Hub cache and checks it against
  the hash the Hub lists for it; it is how weights named ``hf-hub:...`` arrive.
- Every failure becomes a one-line ``HubError`` (missing repo, revision or file, refused
  token, no network, offline) with no exception chain (it can hold request headers); tokens
  never appear in messages and ``user:pass@`` in an endpoint URL is shown as ``***@``. A
  token is stripped of surrounding whitespace and must be printable ASCII.
- A Hub is not trusted: the Hub client names cache files after what the server answers
  (ETag, commit id, file names), so every answer the client receives during a zoo call is
  checked against the Hub's own formats before the client can use it (``check_answer`` in
  ``zoo.weights._hub_answers``),
  and every file the client returns must lie inside the Hub cache.

``zoo.persist.hub`` builds push, pull and ``from_pretrained`` on these pieces.
huggingface_hub is imported inside the functions: building or training a model imports this
module (through ``zoo.weights``) but loads the Hub client only when it talks to a Hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from zoo.core._io import write_text_atomic
from zoo.core.errors import HubError, WeightsError, ZooError
from zoo.weights._hub_answers import COMMIT, SHA256, check_answer, printable, unsafe_name

HUB_PREFIX = "hf-hub:"
# The model card's load snippet names this placeholder; a push fills in the repo id.
CARD_REPO_PLACEHOLDER = "hf-hub:<namespace>/<name>"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# user:pass@ in a URL (greedy up to the host: a password may hold a raw '@').
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s]*@")
_F = TypeVar("_F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- errors


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub could not be reached" (the client's HTTP library's base)."""
    from huggingface_hub import errors as hf  # lazy: only for Hub calls

    transport = getattr(hf, "HTTPError", None)  # httpx's HTTPError, which HfHubHTTPError extends
    return (hf.OfflineModeIsEnabled, ConnectionError, *([transport] if transport else []))


def _redact(text: str) -> str:
    """``text`` with the ``user:pass@`` of every URL in it shown as ``***@``."""
    return _URL_CREDENTIALS.sub("***@", text)


def _hub_name(endpoint: str | None) -> str:
    from huggingface_hub import constants  # lazy: only for Hub calls

    return _redact(endpoint or constants.ENDPOINT)


def _secrets(token: str | None) -> list[str]:
    """Every token that may have been sent: the argument and the one huggingface_hub finds."""
    found = [token] if token else []
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token  # lazy: only for Hub calls

        stored = get_token()
        if stored:
            found.append(stored)
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return _redact(text)


def _chain_text(exc: BaseException) -> str:
    """Everything printed for ``exc`` and the exceptions chained to it (to look for secrets)."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is not None and all(current is not s for s in seen):
            seen.append(current)
            pending += [current.__cause__, current.__context__]
    return "\n".join(f"{e!s} {e.args!r}" for e in seen)


def _translate(exc: BaseException, *, error: type[ZooError], repo_id: str,
               revision: str | None, hub: str, action: str, filename: str | None = None,
               token_sent: bool = True) -> ZooError | None:
    """The zoo error (one line, says what to do) for a huggingface_hub failure, else None."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf  # lazy: only for Hub calls

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
        detail = printable(detail.splitlines()[0]) if detail else type(exc).__name__
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
    """Turn huggingface_hub failures inside the block into one-line zoo errors, tokens removed.

    Every answer the Hub client receives meanwhile is checked first (``check_answer``).
    Errors are raised ``from None``: a chained client exception can hold the request headers.
    """
    try:
        with _checked_answers():
            yield
    except ZooError as exc:
        secrets = _secrets(token)
        if _scrub(str(exc), secrets) != str(exc):
            raise type(exc)(_scrub(str(exc), secrets)) from None
        raise
    except Exception as exc:
        secrets = _secrets(token)
        zoo_error = _translate(exc, error=error, repo_id=repo_id, revision=revision,
                               hub=_hub_name(endpoint), action=action, filename=filename,
                               token_sent=bool(secrets))
        if zoo_error is None and _scrub(_chain_text(exc), secrets) == _chain_text(exc):
            raise  # a bug with nothing secret in it: keep the whole traceback
        if zoo_error is None:
            zoo_error = error(f"could not {action} {repo_id}: {type(exc).__name__}: "
                              f"{printable(str(exc).strip().partition(chr(10))[0])}")
        raise type(zoo_error)(_scrub(str(zoo_error), secrets)) from None


def _without_chain(function: _F) -> _F:
    """Raise ``function``'s zoo errors with no chained exception (no ``__cause__`` nor
    ``__context__``): the Hub client's exceptions can hold request headers, the token too."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ZooError as exc:
            error = exc
        error.__cause__ = error.__context__ = None  # raised below, outside the except block,
        error.__suppress_context__ = True  # so Python does not chain it again
        raise error

    return wrapper  # type: ignore[return-value]


def _split_repo(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """``hf-hub:ns/name@rev`` -> ("ns/name", "rev"); an explicit ``revision`` must agree."""
    repo, _, at = str(repo_id).removeprefix(HUB_PREFIX).partition("@")
    if at and revision and at != revision:
        raise HubError(f"{repo_id!r} names revision {at!r} but revision={revision!r} was passed")
    _check_revision(revision or at or None)
    return repo, (revision or at or None)


def _check_revision(revision: str | None, error: type[ZooError] = HubError) -> None:
    """Refuse a revision that could name a path outside the cache's ``refs`` folder."""
    if revision is not None and unsafe_name(revision):
        raise error(f"revision {revision!r} is not a branch, tag or commit name: use e.g. "
                    "'main', 'v1.0', 'refs/pr/1' or a 40-character commit id")


def _checked_token(token: str | None, source: str) -> str | None:
    """``token`` stripped of surrounding whitespace; an error that never shows it if it cannot
    be a Hub token (they are printable ASCII without spaces)."""
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise HubError(f"{source} is empty: pass a Hub token (hf_...), or none to use HF_TOKEN "
                       "or your hf login")
    if not all("!" <= c <= "~" for c in token):
        raise HubError(f"{source} contains a character no Hub token has (a space, a control "
                       "character or a non-ASCII character; the token is not shown): copy the "
                       "token again from your Hub settings")
    return token


def _token(token: str | None) -> str | None:
    """The token to send: ``token`` checked and stripped; None when not given ("" neither), so
    huggingface_hub finds HF_TOKEN or the login itself (checked here the same way)."""
    if token:
        return _checked_token(token, "the Hub token given (token= or --token)")
    from huggingface_hub import get_token  # lazy: only for Hub calls

    _checked_token(get_token(), "the Hub token in HF_TOKEN or your hf login (hf auth login)")
    return None


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The Hub cache folder the client writes to for ``cache_dir``."""
    from huggingface_hub import constants  # lazy: only for Hub calls

    return Path(cache_dir).expanduser() if cache_dir else Path(constants.HF_HUB_CACHE)


def _check_inside(path: Path, cache: Path, what: str, error: type[ZooError]) -> None:
    """Refuse a file the Hub client returned unless it really lies inside the Hub cache."""
    if not path.resolve().is_relative_to(cache.resolve()):
        raise error(f"the Hub client returned {what} from outside the Hub cache "
                    f"{cache.resolve()}: refusing to use it (the Hub may be malicious)")


# --------------------------------------------------------------------------- answers


_answer_lock = threading.Lock()
_answer_users = 0


@contextlib.contextmanager
def _checked_answers() -> Iterator[None]:
    """Check every answer the Hub client receives during the block (its shared session gets
    ``check_answer`` as a response hook while any zoo call needs it)."""
    from huggingface_hub import get_session  # lazy: only for Hub calls

    global _answer_users
    with _answer_lock:
        session = get_session()
        hooks = session.event_hooks
        if check_answer not in hooks["response"]:
            session.event_hooks = {**hooks, "response": [*hooks["response"], check_answer]}
        _answer_users += 1
    try:
        yield
    finally:
        with _answer_lock:
            _answer_users -= 1
            hooks = session.event_hooks
            if not _answer_users and check_answer in hooks["response"]:
                kept = [hook for hook in hooks["response"] if hook is not check_answer]
                session.event_hooks = {**hooks, "response": kept}


# --------------------------------------------------------------------------- one file


def _file_facts(repo: str, filename: str, revision: str | None, endpoint: str | None,
                token: str | None) -> tuple[str, tuple[str, str]] | None:
    """(commit that ``revision`` names, (hash name, digest) the Hub reports for ``filename``
    there); None when the Hub cannot be reached (offline or no network)."""
    from huggingface_hub import HfApi, RepoFile, constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hf  # lazy: only for Hub calls

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
        commit = get_hf_file_metadata(url, token=token, endpoint=endpoint).commit_hash
        if not COMMIT.fullmatch(str(commit)):  # also checked by check_answer
            raise WeightsError(f"the Hub answered an unsafe commit id for {repo}: refusing it")
        entries = HfApi(endpoint=endpoint, token=token).get_paths_info(
            repo, [filename], revision=commit)
    except hf.HfHubHTTPError:
        raise  # the Hub answered: a refused token or a missing file is an error, not offline
    except _network_errors():
        return None
    for entry in entries:
        if isinstance(entry, RepoFile) and entry.path == filename:
            return commit, (("sha256", entry.lfs.sha256) if entry.lfs
                            else ("git blob sha1", entry.blob_id))
    raise WeightsError(f"{repo}@{commit} on {_hub_name(endpoint)} does not list {filename!r} "
                       "although it serves it: the Hub is inconsistent; refusing the file")


@_without_chain
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


def _cached_hash(path: Path) -> tuple[str, str] | None:
    """The hash the Hub cache recorded for a file: its blob is named by the download's ETag."""
    blob = path.resolve().name
    if SHA256.fullmatch(blob):
        return "sha256", blob
    if COMMIT.fullmatch(blob):
        return "git blob sha1", blob
    return None  # a copied file (no symlinks on this system): nothing recorded


def _discard(path: Path, cache: Path) -> None:
    """Remove a bad file from the Hub cache (link and blob) so the next pull fetches it again;
    never anything outside the cache."""
    blob = path.resolve()
    if path.absolute().is_relative_to(cache.absolute()):
        path.unlink(missing_ok=True)
    if blob != path.absolute() and blob.is_relative_to(cache.resolve()):
        blob.unlink(missing_ok=True)


def _verify(path: Path, expected: tuple[str, str] | None, what: str, cache: Path,
            error: type[ZooError]) -> str:
    """Return ``path``'s sha256 once it matches ``expected`` (hash name, digest); on a
    mismatch drop it from the cache and raise ``error``."""
    actual = dict(zip(("sha256", "git blob sha1"), _digests(path), strict=True))
    if expected is not None and actual[expected[0]] != expected[1]:
        _discard(path, cache)
        raise error(f"{what} does not match the {expected[0]} the Hub reports "
                    f"({expected[1][:12]}...): it was changed on the server or in transit, and "
                    "was removed from the cache; do not use it")
    return actual["sha256"]


def _remember_revision(cache: Path, repo: str, revision: str | None, commit: str) -> None:
    """Record ``revision -> commit`` in the Hub cache's ``refs`` as the client does, so that
    offline use finds the files by branch or tag (zoo downloads by the checked commit id)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name  # lazy: only for Hub calls

    name = revision or constants.DEFAULT_REVISION
    ref = cache / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / name
    if name != commit and not (ref.is_file() and ref.read_text() == commit):
        write_text_atomic(ref, commit)


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

    Wraps ``huggingface_hub.hf_hub_download``: the file must match the sha256 (LFS) or git
    blob sha1 the Hub lists for it (offline: the hash its cache entry is named after), else
    it is dropped from the cache. Every failure is a one-line ``WeightsError`` saying what to
    check (a ``HubError`` for a Hub answering unsafe metadata); the token is never shown.
    """
    import huggingface_hub  # lazy: only for Hub calls

    token = _token(token)
    _check_revision(revision, WeightsError)
    if unsafe_name(filename):
        raise WeightsError(f"{filename!r} is not a file name inside a Hub repo")
    cache = _cache_root(cache_dir)
    with _hub_errors(error=WeightsError, repo_id=repo_id, revision=revision, endpoint=endpoint,
                     token=token, action="download", filename=filename):
        facts = _file_facts(repo_id, filename, revision, endpoint, token)
        path = Path(huggingface_hub.hf_hub_download(
            repo_id, filename, revision=facts[0] if facts else revision, endpoint=endpoint,
            token=token, cache_dir=cache,
        ))
    what = f"{filename} of {repo_id}"
    _check_inside(path, cache, what, WeightsError)
    _verify(path, facts[1] if facts else _cached_hash(path), what, cache, WeightsError)
    if facts:
        _remember_revision(cache, repo_id, revision, facts[0])
    return path
