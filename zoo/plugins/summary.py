"""What each loaded plugin registers, for ``zoo plugins`` and ``zoo doctor``: the hooks it
implements and how many backbones, backbone families, strategies and datasets came from
it."""

from __future__ import annotations

from dataclasses import dataclass

from zoo.plugins.manager import get_plugin_manager
from zoo.plugins.registry import current


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin; ``families`` are the name patterns (``"timm/*"``) of the backbone
    families it registers, whose members are built on demand."""

    name: str
    hooks: tuple[str, ...]
    backbones: int
    families: tuple[str, ...]
    strategies: int
    datasets: int


def plugin_summary() -> tuple[tuple[PluginInfo, ...], tuple[str, ...]]:
    """Every loaded plugin in load order, and the notes written while loading them (a blocked
    plugin, for one). Loads the plugins if that has not happened yet."""
    pm = get_plugin_manager()
    registry = current()
    plugins = []
    for name, plugin in pm.list_name_plugin():
        plugins.append(PluginInfo(
            name=name,
            hooks=tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or [])),
            backbones=sum(1 for b in registry.backbones.values() if b.plugin == name),
            families=tuple(f.prefix + "*" for f in registry.families if f.plugin == name),
            strategies=sum(1 for s in registry.strategies.values() if s.plugin == name),
            datasets=sum(1 for d in registry.datasets.values() if d.plugin == name),
        ))
    return tuple(plugins), tuple(pm.notes)
