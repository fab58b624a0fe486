"""``zoo list``, ``info``, ``plugins``, ``datasets``, ``check`` and ``plan``: looking at backbones,
strategies, plugins and datasets before training. ``zoo list`` imports no torch."""

from __future__ import annotations

import argparse
import json

import zoo
from zoo.cli.common import parse_options, size_text
from zoo.core.table import table
from zoo.plugins.registry import current, list_datasets
from zoo.plugins.summary import plugin_summary


def cmd_list(args: argparse.Namespace) -> None:
    """``zoo list [PATTERN]``: backbone names, or strategies with ``--strategies``."""
    if args.strategies:
        names = zoo.list_strategies(args.pattern)
        if args.json:
            print(json.dumps([{"name": n, "description": zoo.get_strategy(n).description}
                              for n in names], indent=2))
        else:
            for n in names:
                print(f"{n:16} {zoo.get_strategy(n).description}")
        return
    names = zoo.list_backbones(args.pattern)
    if args.json:
        print(json.dumps(names, indent=2))
    else:
        print("\n".join(names))


def cmd_info(args: argparse.Namespace) -> None:
    """``zoo info NAME``: a backbone's layer groups and weights, or a strategy's options."""

    registry = current()
    if args.name in registry.strategies or args.name in registry.strategy_aliases:
        spec = zoo.get_strategy(args.name)
        print(f"strategy: {spec.name}  (plugin {spec.plugin})\n{spec.description}")
        for key, doc in spec.options.items():
            print(f"  --option {key}=...  {doc}")
        return
    import torch  # lazy: keeps zoo list free of torch

    from zoo.models.build import assign_groups  # lazy: keeps zoo list free of torch
    from zoo.weights.cache import describe  # lazy: keeps zoo list fast

    spec = zoo.get_backbone(args.name)
    with torch.device("meta"):
        model = spec.build()
    groups = spec.layer_groups(model)
    owner = assign_groups(model, groups, spec.name)
    sizes = dict.fromkeys((g.name for g in groups), 0)
    for pname, p in model.named_parameters():
        sizes[owner[pname]] += p.numel()
    print(f"backbone: {spec.name}  (plugin {spec.plugin})")
    if spec.description:
        print(spec.description)
    print(f"input size: {'x'.join(map(str, spec.input_size))}, classes: {spec.num_classes}, "
          f"head: {spec.head}, parameters: {sum(sizes.values()):,}")
    if spec.aliases:
        print(f"aliases: {', '.join(spec.aliases)}")
    rows = [("group", "parameters")] + [(g, f"{n:,}") for g, n in sizes.items()]
    print("\nlayer groups (input to output):\n" + table(rows))
    weights = describe(spec)
    if not weights:
        print("\nweights: none declared (random initialisation only)")
        return
    datasets = {w.tag: str(w.meta.get("dataset") or "?") for w in spec.weights}
    rows = [("tag", "default", "dataset", "resolution", "source", "size", "cached", "license")]
    for w in weights:
        rows.append((w["tag"], "*" if w["default"] else "", datasets[w["tag"]],
                     "x".join(map(str, w["input_size"][1:])), w["source"],
                     size_text(w["size_bytes"]), "yes" if w["cached"] else "no",
                     str(w.get("license") or "?")))
    print("\nweights:\n" + table(rows))


def cmd_plugins(args: argparse.Namespace) -> None:
    """``zoo plugins``: each loaded plugin, its hooks and what it registers."""
    plugins, notes = plugin_summary()
    rows = [("plugin", "hooks", "backbones", "strategies", "datasets")]
    rows += [(p.name, ",".join(p.hooks), " ".join([str(p.backbones), *p.families]),
              str(p.strategies), str(p.datasets)) for p in plugins]
    print(table(rows))
    for note in notes:
        print(f"note: {note}")


def cmd_datasets(args: argparse.Namespace) -> None:
    """``zoo datasets``: the registered datasets (built-in and from plugins)."""
    def shown(value: object) -> str:
        return "?" if value is None else str(value)

    rows = [("name", "classes", "image", "train", "val", "description")]
    for d in list_datasets():
        height, width = d.image_size or (None, None)
        rows.append((d.name, shown(d.num_classes),
                     f"{shown(d.channels)}x{shown(height)}x{shown(width)}",
                     shown(d.train_size), shown(d.val_size), d.description))
    print(table(rows))
    print("\nAny ImageFolder directory works too: DIR/<class>/*.jpg, or DIR/train and DIR/val.")


def cmd_check(args: argparse.Namespace) -> None:
    """``zoo check NAME``: the plugin-author checks of a backbone."""
    from zoo.testing.checks import check_backbone  # lazy: keeps zoo list free of torch

    report = check_backbone(args.name, forward=not args.no_forward,
                            image_size=args.image_size, raise_on_failure=False)
    print(report.table())
    report.raise_for_failures()


def cmd_plan(args: argparse.Namespace) -> None:
    """``zoo plan BACKBONE STRATEGY``: a dry run of what trains, per layer group."""
    from zoo.models.strategy import plan  # lazy: keeps zoo list free of torch

    report = plan(args.backbone, args.strategy, parse_options(args.option), epochs=args.epochs,
                  lr=args.lr, num_classes=args.num_classes)
    print(f"{report.backbone} x {report.strategy} {json.dumps(report.options)}, "
          f"{args.epochs} epoch(s), lr {args.lr}")
    print(report.table())
    share = report.trainable_params / max(report.total_params, 1)
    print(f"\n{report.trainable_params:,} of {report.total_params:,} parameters train "
          f"({share:.2%}).")
