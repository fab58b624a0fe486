"""Everything that talks to a Hugging Face Hub: the only module importing huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from zoo.errors import WeightsError


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
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    hub = endpoint or "the Hugging Face Hub"
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id, filename, revision=revision, endpoint=endpoint, token=token,
            cache_dir=cache_dir,
        )
    except errors.GatedRepoError as exc:
        raise WeightsError(
            f"{where} on {hub} is gated: accept its terms on the Hub, then log in "
            "(hf auth login) or set HF_TOKEN"
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise WeightsError(
            f"no repo {repo_id!r} on {hub}: check the name, or log in (hf auth login) "
            "or set HF_TOKEN if it is private"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise WeightsError(
            f"repo {repo_id!r} on {hub} has no revision {revision!r}: check the branch, tag "
            "or commit after '@'"
        ) from exc
    except errors.LocalEntryNotFoundError as exc:
        raise WeightsError(
            f"cannot reach {hub} to download {filename!r} from {where}, and it is not in "
            "the cache: check the network (or HF_ENDPOINT), or copy the file and use a "
            "file: source"
        ) from exc
    except errors.EntryNotFoundError as exc:
        raise WeightsError(f"repo {where} on {hub} has no file {filename!r}") from exc
    except errors.OfflineModeIsEnabled as exc:
        raise WeightsError(
            f"{filename!r} from {where} is not cached and HF_HUB_OFFLINE is set: "
            "unset it to download"
        ) from exc
    except errors.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if token:
            detail = detail.replace(token, "***")
        raise WeightsError(
            f"{hub} answered HTTP {status} for {filename!r} in {where}: {detail}"
        ) from exc
    return Path(path)
