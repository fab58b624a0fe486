"""Helpers for testing zoo and zoo plugins without the internet.

``check_backbone(name)`` (from ``zoo.testing.checks``) checks a backbone plugin the way the
runner uses it; ``zoo.testing.hub_server`` is a Hub-compatible server for 127.0.0.1.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"check_backbone": "zoo.testing.checks", "BackboneReport": "zoo.testing.checks",
         "BackboneCheckError": "zoo.testing.checks", "Check": "zoo.testing.checks"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Import torch-using helpers on first use, so ``zoo.testing.hub_server`` stays light."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zoo.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
