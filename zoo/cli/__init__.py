"""The ``zoo`` command: parses arguments, calls the public API, prints the result.

Errors a user can fix print one line (``zoo: error: ...``) and exit with status 2; an
unexpected failure prints one line too and exits 1. ``--debug`` shows the traceback.
``parser`` declares every flag; ``browse``, ``training``, ``weights``, ``compare`` and
``sharing`` hold the subcommands. Nothing here imports torch until a command needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from zoo.cli.parser import build_parser
from zoo.core.errors import ZooError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zoo`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ZOO_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return 2
        _name_columns(args)
        args.func(args)
        return 0
    except ZooError as exc:
        if debug:
            raise
        print(f"zoo: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"zoo: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _name_columns(args: argparse.Namespace) -> None:
    """Carry --image-column / --label-column with --data and --val (a str subclass, so the
    commands pass and record them as data names)."""
    columns = (getattr(args, "image_column", None), getattr(args, "label_column", None))
    if columns == (None, None):
        return
    from zoo.data.hf import DataSource  # lazy: keeps zoo list free of torch

    for key in ("data", "val"):
        if getattr(args, key, None) is not None:
            setattr(args, key, DataSource(getattr(args, key), *columns))


def _one_line(exc: BaseException) -> str:
    """The error message on one line (or the exception's type when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
