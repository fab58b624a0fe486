"""``zoo export``, ``push``, ``pull`` and ``doctor``: handing a model or a bug report to others."""

from __future__ import annotations

import argparse
import sys

from zoo.cli.common import UsageError, load_model
from zoo.doctor import report


def _hub_token(value: str | None) -> str | None:
    """``--token``: '-' reads the token from stdin (a token in the command line shows in the
    process list); None leaves HF_TOKEN or the hf login to huggingface_hub."""
    if value != "-":
        return value
    token = sys.stdin.readline().strip()
    if not token:
        raise UsageError("--token - reads the token from stdin, but stdin was empty: pipe it "
                         "in, e.g. zoo pull REPO --token - < ~/.hf-token")
    return token


def cmd_export(args: argparse.Namespace) -> None:
    """``zoo export CHECKPOINT --format F --out PATH``: ONNX, TorchScript or PEFT."""
    from zoo.deploy.export import export  # lazy: keeps zoo list free of torch

    path = export(load_model(args.checkpoint), args.format, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format}: {path}")


def cmd_push(args: argparse.Namespace) -> None:
    """``zoo push DIRECTORY REPO_ID``: upload a checkpoint folder to a Hub repo."""
    from zoo.persist.hub import push_to_hub  # lazy: keeps zoo list fast

    url = push_to_hub(args.directory, args.repo_id, token=_hub_token(args.token),
                      endpoint=args.endpoint,
                      private=args.private, revision=args.revision,
                      commit_message=args.message, create_pr=args.create_pr)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")


def cmd_pull(args: argparse.Namespace) -> None:
    """``zoo pull REPO_ID``: download a checkpoint; prints its local folder."""
    from zoo.persist.hub import pull_from_hub  # lazy: keeps zoo list fast

    path = pull_from_hub(args.repo_id, revision=args.revision, token=_hub_token(args.token),
                         endpoint=args.endpoint)
    print(path)


def cmd_doctor(args: argparse.Namespace) -> None:
    """``zoo doctor``: the environment report for bug reports."""
    print(report())
