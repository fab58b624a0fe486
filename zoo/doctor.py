"""``zoo doctor``: the environment in one report, for bug reports."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path

from zoo.core import __version__
from zoo.core.errors import ZooError
from zoo.core.paths import zoo_home
from zoo.plugins.summary import plugin_summary

PACKAGES = ("torch", "torchvision", "timm", "huggingface-hub", "safetensors", "pluggy",
            "numpy", "pillow")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def report() -> str:
    """Versions, device, cache location and size, and plugins (loaded or failed)."""
    lines = [f"zoo {__version__}", f"python {platform.python_version()} "
             f"({platform.system()} {platform.machine()}), {os.cpu_count()} CPUs"]
    lines += [f"{dist} {_version(dist)}" for dist in PACKAGES]
    try:
        import torch  # lazy: a broken torch is reported, not raised

        if torch.cuda.is_available():
            device = ", ".join(torch.cuda.get_device_name(i)
                               for i in range(torch.cuda.device_count()))
        else:
            device = "CPU only (no CUDA device)"
        lines.append(f"device: {device}; torch threads {torch.get_num_threads()}")
    except Exception as exc:  # a broken torch install is exactly what doctor must show
        lines.append(f"device: torch failed to import: {type(exc).__name__}: {exc}")
    home = zoo_home()
    size = _folder_size(home) if home.exists() else 0
    lines.append(f"cache: {home} ({size / 1e6:.1f} MB){'' if home.exists() else ' (empty)'}")
    lines.append(f"ZOO_LOAD_PLUGINS={os.environ.get('ZOO_LOAD_PLUGINS', '(unset: all)')}")
    try:
        plugins, notes = plugin_summary()
        lines += [f"plugin {p.name}: {p.backbones} backbones"
                  f"{' + ' + ', '.join(p.families) if p.families else ''}, "
                  f"{p.strategies} strategies, {p.datasets} datasets" for p in plugins]
        lines += [f"note: {note}" for note in notes]
    except ZooError as exc:
        lines.append(f"plugins FAILED: {exc}")
    return "\n".join(lines)
