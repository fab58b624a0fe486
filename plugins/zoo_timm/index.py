"""A name index of timm's architectures and pretrained tags, so listing needs no torch.

``import timm`` imports torch (seconds); ``zoo list 'timm/*'`` should not. The index
(``timm_index.txt``, shipped beside this module) holds, for the timm version it was made
from, one line per architecture: its name, then the tags of the weights zoo can load, the
default first. It is used only while the installed timm has that exact version; otherwise
the names come from timm itself. Regenerate it after upgrading timm::

    python -m zoo_timm.index
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

INDEX_FILE = Path(__file__).with_name("timm_index.txt")
_HEADER = "# timm "


def installed_timm_version() -> str | None:
    """The installed timm's version, read from its metadata (imports nothing)."""
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None


def usable(cfg: Any) -> bool:
    """Whether zoo can load the weights a timm pretrained cfg describes: a Hub repo holding a
    timm state dict (``custom_load`` applies to the original URL, except ``"hf"``) with a
    classifier (feature-only weights have no head to replace)."""
    return bool(cfg.hf_hub_id) and bool(cfg.num_classes) and cfg.custom_load != "hf" \
        and not cfg.hf_hub_filename


def live_index() -> dict[str, tuple[str, ...]]:
    """Every timm architecture and its usable tags (default first), from timm itself."""
    import timm
    from timm.models import get_arch_pretrained_cfgs

    index: dict[str, tuple[str, ...]] = {}
    for arch in timm.list_models():
        cfgs = get_arch_pretrained_cfgs(arch).values()
        index[arch] = tuple(dict.fromkeys(c.tag for c in cfgs if c.tag and usable(c)))
    return index


def format_index(version: str, index: dict[str, tuple[str, ...]]) -> str:
    """The index file's text: a version header, then ``arch tag tag ...`` lines."""
    lines = [f"{_HEADER}{version} (made by: python -m zoo_timm.index; do not edit)"]
    lines += [" ".join((arch, *tags)) for arch, tags in sorted(index.items())]
    return "\n".join(lines) + "\n"


@functools.cache
def shipped_index() -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """The shipped index as (timm version, index), or None when the file is missing."""
    try:
        text = INDEX_FILE.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    first, _, rest = text.partition("\n")
    if not first.startswith(_HEADER):
        return None
    version = first.removeprefix(_HEADER).split()[0]
    index = {}
    for line in rest.splitlines():
        arch, *tags = line.split()
        index[arch] = tuple(tags)
    return version, index


def timm_index() -> dict[str, tuple[str, ...]]:
    """The index for the installed timm: the shipped file when its version matches (no torch
    import), else built from timm (imports it)."""
    shipped = shipped_index()
    if shipped is not None and shipped[0] == installed_timm_version():
        return shipped[1]
    return live_index()


def write_index(path: Path = INDEX_FILE) -> Path:
    """Write the index of the installed timm to ``path`` (atomically)."""
    import timm

    text = format_index(timm.__version__, live_index())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".timm_index.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(write_index())
