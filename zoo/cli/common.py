"""What the ``zoo`` subcommands share: the usage error, ``--option KEY=VALUE`` parsing, file
sizes for tables, and loading a model from a checkpoint folder or a Hub repo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zoo.core.errors import ZooError


class UsageError(ZooError):
    """A command line that does not parse."""


def parse_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--option KEY=VALUE`` flags as a dict, each value parsed as a strategy option (a
    number, bool, list... as the strategy expects)."""
    from zoo.models.strategy import parse_option_value  # lazy: keeps zoo list free of torch

    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = parse_option_value(value)
    return result


def size_text(num_bytes: int | None) -> str:
    """A file size for a table: "512 B", "1.5 MB"; "?" when unknown."""
    if num_bytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


def load_model(target: str) -> Any:
    """The model in a checkpoint folder, or in a Hub repo (``hf-hub:REPO``, or ``NAMESPACE/NAME``
    when no such folder exists)."""
    from zoo.persist.hub import from_pretrained  # lazy: keeps zoo list fast

    return from_pretrained(target)
