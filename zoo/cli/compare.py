"""``zoo compare`` and ``zoo demo``: backbones x strategies against training from scratch."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from zoo.cli.common import UsageError, parse_options
from zoo.cli.training import training_kwargs


def cmd_compare(args: argparse.Namespace) -> None:
    """``zoo compare``: the sweep, then its table, its sentences and the report's path."""
    from zoo.experiments.report import format_table
    from zoo.experiments.sweep import compare  # lazy: keeps zoo list free of torch

    kwargs = training_kwargs(args)
    result = compare(
        args.backbones, args.strategies, args.data, args.val, budget=args.budget,
        output_dir=args.out, seeds=tuple(args.seeds),
        weights=None if args.weights in ("none", "random") else args.weights,
        strategy_options=per_strategy_options(args.option, args.strategies), **kwargs,
    )
    print(format_table(result))
    print("\n" + "\n".join(result.summary["lines"]))
    print(f"\nreport: {result.report_path}")


def per_strategy_options(pairs: Sequence[str] | None,
                         strategies: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """``zoo compare``'s ``--option``: ``STRATEGY.KEY=VALUE`` for one strategy, ``KEY=VALUE``
    for every strategy that is not ``scratch``."""
    if not pairs:
        return None
    result: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key = pair.partition("=")[0]
        name, dot, _ = key.partition(".")
        if dot and name not in strategies:
            raise UsageError(f"--option {pair}: {name!r} is not one of --strategies "
                             f"({', '.join(strategies)})")
        targets = [name] if dot else [s for s in strategies if s != "scratch"]
        value = parse_options([pair[len(name) + 1:] if dot else pair])
        for target in targets:
            result.setdefault(target, {}).update(value)
    return result


def cmd_demo(args: argparse.Namespace) -> None:
    """``zoo demo``: the built-in comparison (``make demo``)."""
    from zoo.experiments.demo import run_demo  # lazy: keeps zoo list free of torch

    run_demo(args.out, quick=args.quick)  # prints its table, summary and report path
