"""The hooks a zoo plugin can implement.

A plugin is a module (or object) with functions decorated by ``zoo.hookimpl`` whose names
match the specs below. zoo calls each hook once per plugin, with a ``register`` callback;
a hook implementation whose name matches no spec is an error (``check_pending``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from zoo.core.spec import Backbone, BackboneFamily, DatasetSpec, Strategy

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")


@hookspec
def register_backbones(register: Callable[[Backbone | BackboneFamily], None]) -> None:
    """Register backbones (architectures with layer groups and weights).

    :param register: call it once per ``zoo.Backbone`` (or ``zoo.BackboneFamily``, a
        lazily resolved set of names sharing a prefix such as ``timm/``).
    """


@hookspec
def register_strategies(register: Callable[[Strategy], None]) -> None:
    """Register freeze strategies (ways of choosing which layer groups learn, and how fast).

    :param register: call it once per ``zoo.Strategy``.
    """


@hookspec
def register_datasets(register: Callable[[DatasetSpec], None]) -> None:
    """Register datasets that ``zoo.load_data(name)`` and ``--data NAME`` load by name.

    :param register: call it once per ``zoo.DatasetSpec``; its loader is only called (and
        its module only imported) when the dataset is loaded.
    """


@hookspec
def register_loggers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register training loggers (W&B, MLflow, ...), chosen by name with ``loggers=[...]``.

    :param register: call it once per logger, ``register(name, factory)``; the factory takes
        ``(output_dir, **options)`` and returns a ``zoo.Callback`` (typed ``Any`` here: the
        plugin layer sits below training and must not import it).
    """
