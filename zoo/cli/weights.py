"""``zoo weights download|import|list|verify`` and ``zoo lr-find``."""

from __future__ import annotations

import argparse
import json

from zoo.cli.common import parse_options, size_text
from zoo.core.errors import WeightsError
from zoo.core.table import table


def cmd_weights_download(args: argparse.Namespace) -> None:
    """``zoo weights download NAME[:TAG]``: fetch weights into the cache, print the path."""
    from zoo.weights.load import download  # lazy: keeps zoo list free of torch

    name, _, tag = args.name.partition(":")
    path = download(name, tag or None)
    print(f"{args.name}: {path}")


def cmd_weights_import(args: argparse.Namespace) -> None:
    """``zoo weights import NAME[:TAG] FILE``: put a file fetched elsewhere into the cache."""
    from zoo.weights.importing import import_weights  # lazy: keeps zoo list free of torch

    path = import_weights(args.name, args.file, force=args.force)
    print(f"imported {args.file} as {args.name}: {path}")


def cmd_weights_list(args: argparse.Namespace) -> None:
    """``zoo weights list [NAME]``: registered weights, their source, size, sha256, cached."""
    from zoo.weights.cache import list_weights  # lazy: keeps zoo list fast

    rows = list_weights(args.name)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("no weights registered" + (f" for {args.name}" if args.name else ""))
        return
    shown = [("backbone", "tag", "source", "size", "sha256", "cached")]
    for r in rows:
        sha = r["recorded_sha256"] or r["sha256"]
        shown.append((r["backbone"], r["tag"] + (" *" if r["default"] else ""), r["source"],
                      size_text(r["size_bytes"]), (sha[:16] + "...") if sha else "-",
                      "yes" if r["cached"] else "no"))
    print(table(shown))


def cmd_weights_verify(args: argparse.Namespace) -> None:
    """``zoo weights verify``: re-hash every cached file; fail when one does not match."""
    from zoo.weights.cache import verify_cache
    from zoo.weights.sources import weights_dir  # lazy: keeps zoo list fast

    rows = verify_cache()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['status']:10}  {r['path']}")
        print(f"{len(rows)} cached weights files in {weights_dir()}")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise WeightsError(
            f"{len(bad)} of {len(rows)} cached weights files do not match the sha256 recorded "
            "when they were cached (listed above): delete them, then download or "
            "'zoo weights import' them again"
        )


def cmd_lr_find(args: argparse.Namespace) -> None:
    """``zoo lr-find BACKBONE STRATEGY``: the learning-rate range test and its plot."""
    from zoo.training.lr_find import lr_find  # lazy: keeps zoo list free of torch

    weights = None if args.weights in ("none", "random") else args.weights
    result = lr_find(args.backbone, args.strategy, args.data, weights=weights,
                     strategy_options=parse_options(args.option), batch_size=args.batch_size,
                     start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter,
                     device=args.device, seed=args.seed, out=args.out,
                     overwrite=args.overwrite, limit_per_class=args.limit_per_class,
                     image_size=args.image_size)
    print(f"suggested learning rate: {result.suggestion:.2e} (steepest descent; the "
          f"minimum / 10 is {result.minimum:.2e}; {len(result.lrs)} batches)")
    print(f"plot: {result.plot}")
