"""The plugin manager: built-in plugins, installed ones, the allow-list and the block list.

Built-in plugins are the modules listed in ``registry.toml``; third-party plugins are the
entry points of the ``zoo`` group. ``ZOO_LOAD_PLUGINS`` (a comma-separated list of
entry-point or distribution names) limits which third-party plugins load; set but empty,
only the built-ins load. Every hook implementation must match a hook spec
(``check_pending``), so a misspelled hook fails loudly instead of being ignored.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from zoo.core.errors import PluginError, ZooError
from zoo.plugins import hookspecs

DEFAULT_REGISTRY = Path(__file__).with_name("registry.toml")


@dataclass(frozen=True)
class RegistryConfig:
    """What ``registry.toml`` declares: built-in plugins, blocked plugins, aliases."""

    builtin: tuple[str, ...]
    blocked: frozenset[str]
    aliases: dict[str, str] = field(default_factory=dict)
    path: Path = DEFAULT_REGISTRY


def registry_path() -> Path:
    """The catalogue in use: ``$ZOO_REGISTRY`` if set, else the one shipped with zoo."""
    return Path(os.environ.get("ZOO_REGISTRY") or DEFAULT_REGISTRY)


def read_registry_config(path: Path | None = None) -> RegistryConfig:
    """Parse and validate ``registry.toml``; errors name the file, the line and the problem."""
    path = path or registry_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(
            f"{path}: registry file not found; unset ZOO_REGISTRY or fix the path"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ZooError(f"{path}: malformed TOML: {exc}") from None

    def fail(what: str) -> ZooError:
        return ZooError(f"{path}: {what}")

    unknown = set(data) - {"plugins", "aliases"}
    if unknown:
        raise fail(f"unknown table(s) {sorted(unknown)}; expected [plugins] and [aliases]")
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict):
        raise fail("[plugins] must be a table")
    builtin = plugins.get("builtin", [])
    blocked = plugins.get("blocked", [])
    for key, value in (("builtin", builtin), ("blocked", blocked)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(f"plugins.{key} must be a list of non-empty strings, got {value!r}")
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in aliases.items()
    ):
        raise fail('[aliases] must map names to names, like "resnet-18" = "resnet18"')
    return RegistryConfig(tuple(builtin), frozenset(blocked), dict(aliases), path)


def _allowed_third_party() -> set[str] | None:
    value = os.environ.get("ZOO_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(pm: pluggy.PluginManager, config: RegistryConfig, notes: list[str]) -> None:
    allowed = _allowed_third_party()
    for ep in importlib.metadata.entry_points(group="zoo"):
        dist = ep.dist.name if ep.dist is not None else ""
        if ep.name in config.blocked or dist in config.blocked:
            notes.append(f"plugin {ep.name!r} ({dist}) is blocked in {config.path.name}")
            continue
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} (from {dist or ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}; uninstall it, or load only the plugins you "
                f"want with ZOO_LOAD_PLUGINS=name1,name2 (empty for built-ins only)"
            ) from exc
        pm.register(plugin, name=ep.name)


def _load_builtins(pm: pluggy.PluginManager, config: RegistryConfig) -> None:
    for module_name in config.builtin:
        if module_name in config.blocked:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(
                f"built-in plugin {module_name!r} failed to import: {type(exc).__name__}: "
                f"{exc}; add it to plugins.blocked in {config.path} to start without it"
            ) from exc
        pm.register(module, name=module_name)


# Every change to any plugin manager takes the next number, so a generation seen once is
# never seen again, not even from a manager made after ``reset()``.
_generations = itertools.count(1)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the notes collected while loading (shown by ``zoo plugins``) and
    a ``generation`` that changes whenever a plugin is registered or unregistered, so caches
    built from the plugins (the registry) know when they are stale."""

    def __init__(self) -> None:
        super().__init__("zoo")
        self.notes: list[str] = []
        self.config: RegistryConfig | None = None
        self.generation = next(_generations)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` (see pluggy) and start a new generation."""
        try:
            return super().register(plugin, name)
        finally:
            self.generation = next(_generations)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        """Unregister ``plugin`` or the plugin called ``name`` and start a new generation."""
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation = next(_generations)


_pm: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading built-in and installed plugins on first use."""
    global _pm
    if _pm is None:
        pm = PluginManager()
        pm.add_hookspecs(hookspecs)
        pm.config = read_registry_config()
        _load_builtins(pm, pm.config)
        _load_entry_points(pm, pm.config, pm.notes)
        check_pending(pm)
        _pm = pm
    return _pm


def check_pending(pm: pluggy.PluginManager) -> None:
    """Fail loudly, naming the plugin, when a hook implementation matches no hook spec."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
        raise PluginError(f"{exc}; the hooks zoo knows are: {known}") from None


def plugin_distribution(plugin: str) -> str | None:
    """The distribution to ``pip install`` for the plugin registered as ``plugin``: the one
    that declares its entry point, "zoo" for a built-in, else the distribution that ships the
    plugin object's top-level module (None if nothing does, e.g. a test's object)."""
    for ep in importlib.metadata.entry_points(group="zoo"):
        if ep.name == plugin and ep.dist is not None:
            return ep.dist.name
    pm = get_plugin_manager()
    if pm.config is not None and plugin in pm.config.builtin:
        return "zoo"
    module = getattr(pm.get_plugin(plugin), "__module__", None) or getattr(
        pm.get_plugin(plugin), "__name__", None)
    if not isinstance(module, str):
        return None
    found = importlib.metadata.packages_distributions().get(module.partition(".")[0])
    return found[0] if found else None


def reset() -> None:
    """Forget the loaded plugins (the next call reloads them); for tests and long sessions."""
    global _pm
    _pm = None
