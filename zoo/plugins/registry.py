"""The registry: every backbone, strategy and dataset the loaded plugins declare, by name.

Names are matched exactly, then through aliases (``registry.toml`` and each spec's own),
then by family prefix (``timm/<model>``). A name registered twice is an error naming both
plugins: a zoo that silently swaps one model's weights for another's is worse than none.
The registry is rebuilt whenever the plugin manager's ``generation`` changes, that is
whenever a plugin is registered or unregistered.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from zoo.core.errors import DuplicateNameError, PluginError, UnknownNameError
from zoo.core.spec import Backbone, BackboneFamily, DatasetSpec, Strategy, resolve_callable
from zoo.plugins.manager import check_pending, get_plugin_manager


def claim(owners: dict[str, str], kind: str, name: str, plugin: str) -> None:
    """Record that ``plugin`` registers the ``kind`` name ``name`` in ``owners``: zoo's one
    duplicate-name check, for every kind of name (backbones, their aliases and families,
    strategies, datasets, loggers)."""
    if name in owners:
        raise DuplicateNameError(
            f"{kind} name {name!r} is registered by both plugin {owners[name]!r} and plugin "
            f"{plugin!r}; block one of them in registry.toml or via ZOO_LOAD_PLUGINS"
        )
    owners[name] = plugin


def call_each(hook_name: str, on_register: Callable[..., None]) -> None:
    """Call the hook ``hook_name`` plugin by plugin (built-ins first), passing each a
    ``register`` callback: ``register(*args)`` calls ``on_register(plugin_name, *args)``,
    so every spec and every error names its plugin."""
    hook = getattr(get_plugin_manager().hook, hook_name)
    for impl in hook.get_hookimpls():
        plugin = impl.plugin_name

        def register(*args: Any, _plugin: str = plugin) -> None:
            on_register(_plugin, *args)

        try:
            impl.function(register=register)
        except (DuplicateNameError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin!r} raised in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc


def _expect(spec: Any, kinds: type | tuple[type, ...], plugin: str, hook: str,
            expected: str) -> None:
    if not isinstance(spec, kinds):
        raise PluginError(f"plugin {plugin!r} registered {spec!r} in {hook}; expected {expected}")


@dataclass
class Registry:
    """The specs collected from one set of loaded plugins.

    ``resolved`` holds the family members ``get_backbone`` has resolved (``timm/resnet34``);
    they are kept apart from ``backbones`` so that looking one up never changes what
    ``list_backbones`` lists.
    """

    backbones: dict[str, Backbone] = field(default_factory=dict)
    families: list[BackboneFamily] = field(default_factory=list)
    strategies: dict[str, Strategy] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    backbone_aliases: dict[str, str] = field(default_factory=dict)
    strategy_aliases: dict[str, str] = field(default_factory=dict)
    dataset_aliases: dict[str, str] = field(default_factory=dict)
    resolved: dict[str, Backbone] = field(default_factory=dict)
    owners: dict[str, dict[str, str]] = field(default_factory=dict)

    def family_for(self, name: str) -> BackboneFamily | None:
        """The family whose prefix starts ``name``, if any."""
        return next((f for f in self.families if name.startswith(f.prefix)), None)

    def _add(self, kind: str, plugin: str, spec: Any, specs: dict[str, Any],
             aliases: dict[str, str]) -> None:
        spec = dataclasses.replace(spec, plugin=plugin)
        for name in (spec.name, *spec.aliases):
            claim(self.owners.setdefault(kind, {}), kind, name, plugin)
        specs[spec.name] = spec
        aliases.update(dict.fromkeys(spec.aliases, spec.name))

    def add_backbone(self, plugin: str, spec: Any) -> None:
        """Add a ``Backbone`` or a ``BackboneFamily`` (whose ``prefix*`` is its name)."""
        hook = "register_backbones"
        _expect(spec, (Backbone, BackboneFamily), plugin, hook,
                "a zoo.Backbone or zoo.BackboneFamily")
        if isinstance(spec, BackboneFamily):
            claim(self.owners.setdefault("backbone", {}), "backbone", spec.prefix + "*", plugin)
            self.families.append(dataclasses.replace(spec, plugin=plugin))
        else:
            self._add("backbone", plugin, spec, self.backbones, self.backbone_aliases)

    def add_strategy(self, plugin: str, spec: Any) -> None:
        """Add a ``Strategy``."""
        _expect(spec, Strategy, plugin, "register_strategies", "a zoo.Strategy")
        self._add("strategy", plugin, spec, self.strategies, self.strategy_aliases)

    def add_dataset(self, plugin: str, spec: Any) -> None:
        """Add a ``DatasetSpec``."""
        _expect(spec, DatasetSpec, plugin, "register_datasets", "a zoo.DatasetSpec")
        self._add("dataset", plugin, spec, self.datasets, self.dataset_aliases)

    def add_config_aliases(self, aliases: dict[str, str]) -> None:
        """Add ``registry.toml``'s aliases, each to the kind its target is registered as;
        an alias a spec already declares keeps the spec's meaning."""
        for alias, target in aliases.items():
            if target in self.strategies or target in self.strategy_aliases:
                self.strategy_aliases.setdefault(alias, target)
            elif target in self.datasets or target in self.dataset_aliases:
                self.dataset_aliases.setdefault(alias, target)
            else:
                self.backbone_aliases.setdefault(alias, target)


def _build() -> Registry:
    registry = Registry()
    call_each("register_backbones", registry.add_backbone)
    call_each("register_strategies", registry.add_strategy)
    call_each("register_datasets", registry.add_dataset)
    config = get_plugin_manager().config
    registry.add_config_aliases(config.aliases if config else {})
    return registry


# (plugin manager generation, the registry built from its plugins)
_cache: tuple[int, Registry] | None = None


def current() -> Registry:
    """The registry for the plugins loaded now (rebuilt when a plugin is (un)registered)."""
    global _cache
    pm = get_plugin_manager()
    if _cache is None or _cache[0] != pm.generation:
        check_pending(pm)
        _cache = (pm.generation, _build())
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


def _members(family: BackboneFamily) -> list[str]:
    """Every member name of ``family``, prefix included."""
    return [n if n.startswith(family.prefix) else family.prefix + n
            for n in resolve_callable(family.list_names)()]


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
            names.update(_members(family))
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
    spec = registry.backbones.get(resolved) or registry.resolved.get(resolved)
    if spec is not None:
        return spec
    family = registry.family_for(resolved)
    if family is None:
        candidates = [*registry.backbones, *registry.backbone_aliases,
                      *(n for f in registry.families for n in f.featured)]
        raise UnknownNameError.for_name(
            "backbone", name, candidates,
            context="; run 'zoo list' to see the registered names")
    try:
        spec = resolve_callable(family.resolve)(resolved)
    except Exception as exc:
        raise PluginError(
            f"plugin {family.plugin!r} failed to resolve {resolved!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if spec is None:
        raise UnknownNameError.for_name("backbone", name, _members(family),
                                        context=f" in the {family.prefix}* family")
    spec = dataclasses.replace(spec, plugin=family.plugin)
    registry.resolved[resolved] = spec
    return spec


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


def find_dataset(name: str) -> DatasetSpec | None:
    """The dataset spec registered as ``name`` (aliases resolved), or None if there is none."""
    registry = current()
    return registry.datasets.get(registry.dataset_aliases.get(name, name))


def get_dataset(name: str) -> DatasetSpec:
    """The dataset spec registered as ``name`` (aliases resolved)."""
    spec = find_dataset(name)
    if spec is None:
        registry = current()
        raise UnknownNameError.for_name(
            "dataset", name, [*registry.datasets, *registry.dataset_aliases],
            context="; run 'zoo datasets' to see them")
    return spec


def list_datasets(pattern: str | Iterable[str] | None = None,
                  exclude: str | Iterable[str] | None = None) -> list[DatasetSpec]:
    """The registered datasets whose names match the fnmatch ``pattern`` (all when None),
    sorted by name: their specs, so ``zoo datasets`` shows what each holds without
    loading it (loading one may still need its optional package)."""
    registry = current()
    return [registry.datasets[n] for n in _match(registry.datasets, pattern, exclude)]
