"""The registry: every backbone and strategy the loaded plugins declare, looked up by name.

Names are matched exactly, then through aliases (``registry.toml`` and each spec's own),
then by family prefix (``timm/<model>``). A name registered twice is an error naming both
plugins: a zoo that silently swaps one model's weights for another's is worse than none.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zoo.core.errors import DuplicateNameError, PluginError, UnknownNameError
from zoo.core.spec import Backbone, BackboneFamily, Strategy, resolve_callable
from zoo.plugins.manager import check_pending, get_plugin_manager


@dataclass
class Registry:
    """The specs collected from one set of loaded plugins."""

    backbones: dict[str, Backbone] = field(default_factory=dict)
    families: list[BackboneFamily] = field(default_factory=list)
    strategies: dict[str, Strategy] = field(default_factory=dict)
    backbone_aliases: dict[str, str] = field(default_factory=dict)
    strategy_aliases: dict[str, str] = field(default_factory=dict)

    def family_for(self, name: str) -> BackboneFamily | None:
        """The family whose prefix starts ``name``, if any."""
        return next((f for f in self.families if name.startswith(f.prefix)), None)


_cache: tuple[frozenset[int], Registry] | None = None


def _call_each(hook_name: str, on_register: Callable[[Any, str], None]) -> None:
    """Call one hook plugin by plugin, so every spec and every error names its plugin."""
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # in registration order: built-ins first
        plugin = impl.plugin_name

        def register(spec: Any, _plugin: str = plugin) -> None:
            on_register(spec, _plugin)

        try:
            impl.function(register=register)
        except (DuplicateNameError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin!r} raised in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc


def _build() -> Registry:
    registry = Registry()
    owners: dict[str, str] = {}

    def claim(name: str, plugin: str, kind: str) -> None:
        if name in owners:
            raise DuplicateNameError(
                f"{kind} {name!r} is registered by both plugin {owners[name]!r} and plugin "
                f"{plugin!r}; block one of them in registry.toml or via ZOO_LOAD_PLUGINS"
            )
        owners[name] = plugin

    def add_backbone(spec: Any, plugin: str) -> None:
        if isinstance(spec, BackboneFamily):
            spec = dataclasses.replace(spec, plugin=plugin)
            claim(spec.prefix + "*", plugin, "backbone family")
            registry.families.append(spec)
            return
        if not isinstance(spec, Backbone):
            raise PluginError(
                f"plugin {plugin!r} registered {spec!r} in register_backbones; expected a "
                "zoo.Backbone or zoo.BackboneFamily"
            )
        spec = dataclasses.replace(spec, plugin=plugin)
        claim(spec.name, plugin, "backbone")
        registry.backbones[spec.name] = spec
        for alias in spec.aliases:
            claim(alias, plugin, "backbone alias")
            registry.backbone_aliases[alias] = spec.name

    strategy_owners: dict[str, str] = {}

    def add_strategy(spec: Any, plugin: str) -> None:
        if not isinstance(spec, Strategy):
            raise PluginError(
                f"plugin {plugin!r} registered {spec!r} in register_strategies; "
                "expected a zoo.Strategy"
            )
        spec = dataclasses.replace(spec, plugin=plugin)
        for name in (spec.name, *spec.aliases):
            if name in strategy_owners:
                raise DuplicateNameError(
                    f"strategy {name!r} is registered by both plugin {strategy_owners[name]!r} "
                    f"and plugin {plugin!r}; block one of them in registry.toml or via "
                    "ZOO_LOAD_PLUGINS"
                )
            strategy_owners[name] = plugin
        registry.strategies[spec.name] = spec
        for alias in spec.aliases:
            registry.strategy_aliases[alias] = spec.name

    _call_each("register_backbones", add_backbone)
    _call_each("register_strategies", add_strategy)

    config = get_plugin_manager().config
    for alias, target in (config.aliases if config else {}).items():
        if target in registry.strategies or target in registry.strategy_aliases:
            registry.strategy_aliases.setdefault(alias, target)
        else:
            registry.backbone_aliases.setdefault(alias, target)
    return registry


def current() -> Registry:
    """The registry for the plugins loaded now (rebuilt when a plugin is (un)registered)."""
    global _cache
    pm = get_plugin_manager()
    key = frozenset(id(p) for p in pm.get_plugins())
    if _cache is None or _cache[0] != key:
        check_pending(pm)
        _cache = (key, _build())
    return _cache[1]


def _match(names: Iterable[str], include: str | Iterable[str] | None,
           exclude: str | Iterable[str] | None) -> list[str]:
    def as_list(p: str | Iterable[str] | None) -> list[str]:
        return [p] if isinstance(p, str) else list(p or [])

    includes, excludes = as_list(include), as_list(exclude)
    selected = {
        n for n in names
        if (not includes or any(fnmatch.fnmatchcase(n, p) for p in includes))
        and not any(fnmatch.fnmatchcase(n, p) for p in excludes)
    }
    return sorted(selected)


def list_backbones(pattern: str | Iterable[str] | None = None,
                   exclude: str | Iterable[str] | None = None) -> list[str]:
    """Registered backbone names matching the fnmatch ``pattern`` (all when None), sorted.

    A family's members (e.g. every timm model) are enumerated only when a pattern starts
    with its prefix (``"timm/*"``); otherwise only its featured members are listed.
    """
    registry = current()
    names = set(registry.backbones)
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    for family in registry.families:
        names.update(family.featured)
        if any(p.startswith(family.prefix) for p in patterns):
            names.update(family.prefix + n if not n.startswith(family.prefix) else n
                         for n in resolve_callable(family.list_names)())
    return _match(names, pattern, exclude)


def list_strategies(pattern: str | Iterable[str] | None = None) -> list[str]:
    """Registered strategy names matching the fnmatch ``pattern``, sorted."""
    return _match(current().strategies, pattern, None)


def canonical_backbone_name(name: str) -> str:
    """The registered name behind ``name`` (an alias or the name itself)."""
    registry = current()
    return registry.backbone_aliases.get(name, name)


def get_backbone(name: str) -> Backbone:
    """The backbone spec registered as ``name`` (aliases and family members resolved)."""
    registry = current()
    if isinstance(name, Backbone):
        return name
    resolved = registry.backbone_aliases.get(name, name)
    if resolved in registry.backbones:
        return registry.backbones[resolved]
    family = registry.family_for(resolved)
    if family is not None:
        try:
            spec = resolve_callable(family.resolve)(resolved)
        except Exception as exc:
            raise PluginError(
                f"plugin {family.plugin!r} failed to resolve {resolved!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if spec is not None:
            spec = dataclasses.replace(spec, plugin=family.plugin)
            registry.backbones[resolved] = spec
            return spec
        candidates = list(resolve_callable(family.list_names)())
        candidates = [family.prefix + c if not c.startswith(family.prefix) else c
                      for c in candidates]
        raise UnknownNameError.for_name("backbone", name, candidates,
                                        context=f" in the {family.prefix}* family")
    candidates = [*registry.backbones, *registry.backbone_aliases,
                  *(n for f in registry.families for n in f.featured)]
    raise UnknownNameError.for_name(
        "backbone", name, candidates, context="; run 'zoo list' to see the registered names"
    )


def get_strategy(name: str) -> Strategy:
    """The strategy spec registered as ``name`` (aliases resolved)."""
    registry = current()
    if isinstance(name, Strategy):
        return name
    resolved = registry.strategy_aliases.get(name, name)
    if resolved in registry.strategies:
        return registry.strategies[resolved]
    raise UnknownNameError.for_name(
        "strategy", name, [*registry.strategies, *registry.strategy_aliases],
        context="; run 'zoo list --strategies' to see them",
    )
