"""Where zoo keeps its own data on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def zoo_home() -> Path:
    """zoo's data folder: ``$ZOO_HOME``, or ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_HOME") or Path.home() / ".cache" / "zoo").expanduser()
