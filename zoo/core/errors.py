"""Errors zoo raises: each says what is wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """Base class for errors shown to users as one line (the CLI exits 2)."""


class UnknownNameError(ZooError, KeyError):
    """A backbone, strategy, dataset or weights tag that is not registered."""

    def __init__(self, message: str, *, name: str = "", candidates: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.candidates = list(candidates)

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def for_name(
        cls, kind: str, name: str, candidates: Iterable[str], context: str = ""
    ) -> UnknownNameError:
        """Build the error for ``name``, suggesting the closest of ``candidates``."""
        candidates = list(candidates)
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        if not close:
            lowered = name.lower()
            close = [c for c in candidates if lowered in c.lower()][:3]
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        return cls(f"unknown {kind} {name!r}{hint}{context}", name=name, candidates=candidates)


class DuplicateNameError(ZooError):
    """Two plugins registered the same name: refusing beats silently swapping weights."""


class PluginError(ZooError):
    """A plugin failed to import or raised inside one of its hooks."""


class IncompatibleError(ZooError):
    """A backbone and strategy (or options) that cannot work together, found before training."""


class CheckpointError(ZooError):
    """A checkpoint directory or file that is missing, corrupt or does not match its base."""


class WeightsError(ZooError):
    """Pretrained weights that cannot be fetched, verified or loaded."""


class HubError(ZooError):
    """A Hub request that failed: missing repo, revision or file, auth, network, offline."""
