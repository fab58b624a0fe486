"""``zoo finetune``, ``evaluate``, ``predict`` and ``embed``: training a model and using it."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import zoo
from zoo.cli.common import UsageError, load_model, parse_options
from zoo.core.table import table


def _require_default_weights(backbone: str, strategy: str, options: dict[str, Any]) -> None:
    """Refuse, in the command line's words, a pretrained run of a backbone without weights."""
    from zoo.models.strategy import make_strategy  # lazy: keeps zoo list free of torch

    spec = zoo.get_backbone(backbone)
    if spec.default_weights is None and make_strategy(strategy, options).pretrained:
        raise UsageError(f"backbone {spec.name!r} declares no pretrained weights: pass "
                         "--weights none to train it from random initialisation, or "
                         "--weights FILE")


def new_run_dir(backbone: str, strategy: str, root: Path = Path("runs"),
                now: datetime.datetime | None = None) -> Path:
    """Create and return ``root/<backbone>-<strategy>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``...
    when taken): where ``zoo finetune`` saves a run given no ``--out``, never a used folder."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{backbone}-{strategy}-{stamp}")
    root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``finetune`` keyword arguments that ``zoo finetune`` and ``zoo compare`` share."""
    loggers = ["csv", "tensorboard", "console"] if getattr(args, "tensorboard", False) else None
    return dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, device=args.device, augment=args.augment,
        cache=not args.no_cache, cache_views=args.cache_views,
        limit_per_class=args.limit_per_class, quiet=args.quiet, image_size=args.image_size,
        strict=args.strict, keep=args.keep, patience=args.patience, optimizer=args.optimizer,
        momentum=args.momentum, label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        scheduler=None if args.scheduler == "none" else args.scheduler,
        accumulate=args.accumulate, clip_grad=args.clip_grad, ema=args.ema, loggers=loggers)


def _finetune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Every ``finetune`` keyword argument ``zoo finetune``'s flags give."""
    return dict(
        backbone=args.backbone, strategy=args.strategy, train=args.data, val=args.val,
        weights=None if args.weights in ("none", "random") else args.weights,
        strategy_options=parse_options(args.option), seed=args.seed,
        checkpoint_kind=args.checkpoint, **training_kwargs(args))


def _with_run_file(args: argparse.Namespace) -> dict[str, Any]:
    """``zoo finetune``'s settings: those of ``--config FILE`` with every flag given on the
    command line (one that differs from its default) taking precedence."""
    given = _finetune_kwargs(args)
    if args.config is None:
        missing = [f"--{k}" for k in ("backbone", "strategy", "data")
                   if getattr(args, k) is None]
        if missing:
            raise UsageError(f"zoo finetune needs {', '.join(missing)} (or --config RUN.yaml)")
        return given
    settings = zoo.load_run(args.config)
    defaults = _finetune_kwargs(argparse.Namespace(**args.parser_defaults()))
    explicit = {k: v for k, v in given.items() if v != defaults[k]}
    merged = {**given, **settings, **explicit}
    missing = [k for k in ("backbone", "strategy", "train") if merged.get(k) is None]
    if missing:
        raise UsageError(f"{args.config} names no {missing[0]}; add it there or on the "
                         "command line")
    return merged


def cmd_finetune(args: argparse.Namespace) -> None:
    """``zoo finetune``: train (into a new ``runs/`` folder unless ``--out``), then
    print each epoch and where the checkpoint is."""
    kwargs = _with_run_file(args)
    if kwargs["weights"] == "default":
        _require_default_weights(kwargs["backbone"], kwargs["strategy"],
                                 dict(kwargs["strategy_options"] or {}))
    out = args.out
    if out is None and args.resume is None:  # a trained model is never thrown away
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun pass --out DIR: every process must name the "
                             "same folder")
        out = new_run_dir(kwargs["backbone"], kwargs["strategy"])
        print(f"saving the run to {out} (choose the folder with --out)", flush=True)
    try:
        result = zoo.finetune(**kwargs, output_dir=out, resume=args.resume,
                              overwrite=args.overwrite)
    except BaseException:
        if out is not None and args.out is None:
            with contextlib.suppress(OSError):  # only if still empty: nothing was trained
                Path(out).rmdir()
        raise
    _print_run(result)


def _print_run(result: Any) -> None:
    """Each epoch, which one the checkpoint kept, and where it is."""
    m = result.metrics
    for record in result.history:
        val = f", val accuracy {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
        kept = "  <- kept" if record["epoch"] == m.get("kept_epoch") and val else ""
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}{val} "
              f"({record['epoch_time_s']:.1f} s){kept}")
    if m.get("stopped_early"):
        print(f"stopped early: no better validation accuracy in {m['patience']} epoch(s)")
    if m.get("val_accuracy") is not None:
        print(f"kept epoch {m['kept_epoch']} ({m['keep']}): val accuracy "
              f"{m['val_accuracy']:.4f} (last epoch {m['last_val_accuracy']:.4f})")
    elif m.get("keep_note"):
        print(f"note: {m['keep_note']}")
    print(f"trainable parameters: {m['trainable_params']:,} of {m['total_params']:,}; "
          f"training time {m['train_time_s']:.1f} s")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """``zoo evaluate CHECKPOINT --data D``: accuracy overall and per class."""
    # lazy: keeps zoo list free of torch
    from zoo.training.evaluate import check_evaluation_dir, write_evaluation

    if args.out is not None:
        check_evaluation_dir(args.out)  # before the slow part: never over a user's files
    model = load_model(args.checkpoint)
    metrics = zoo.evaluate(model, args.data, split=args.split, device=args.device)
    written = write_evaluation(args.out, metrics, {"checkpoint": args.checkpoint,
                                                    "data": args.data, "split": args.split}
                               ) if args.out is not None else []
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(evaluation_text(metrics))
    if written:
        print("wrote " + " and ".join(str(p) for p in written))
    if written and metrics["confusion_matrix"] is None:
        print(f"no confusion_matrix.png: {len(metrics['class_names'])} classes are too many to "
              "draw; evaluation.json lists the matrix's non-zero cells")


def _printable(name: str) -> str:
    """A class name on one table row: control characters (a newline in a folder name) shown
    as escapes."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def evaluation_text(metrics: dict[str, Any], max_rows: int = 100) -> str:
    """Overall accuracy (top-5 where reported), loss, and a per-class table."""
    correct = sum(c["correct"] for c in metrics["per_class"])
    head = (f"accuracy {metrics['accuracy']:.2%} ({correct}/{metrics['samples']} images)"
            + (f", top-5 {metrics['top5_accuracy']:.2%}" if "top5_accuracy" in metrics else "")
            + f", loss {metrics['loss']:.4f}")
    rows = [("class", "images", "correct", "accuracy")]
    rows += [(_printable(c["class"]), str(c["samples"]), str(c["correct"]),
              f"{c['accuracy']:.2%}") for c in metrics["per_class"][:max_rows]]
    lines = [head, table(rows)]
    if len(metrics["per_class"]) > max_rows:
        lines.append(f"... {len(metrics['per_class']) - max_rows} more classes (see --out or "
                     "--json)")
    if metrics.get("note"):
        lines.append(f"note: {metrics['note']}")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> None:
    """``zoo predict CHECKPOINT IMAGE...``: the top-k classes of each image."""
    from zoo.deploy.inference import predict_indexed  # lazy: keeps zoo list free of torch

    if args.top_k < 1:
        raise UsageError(f"--top-k must be 1 or more, got {args.top_k}")
    rows = predict_indexed(args.checkpoint, args.images, top_k=args.top_k,
                           batch_size=args.batch_size, device=args.device)
    for image_path, row in zip(args.images, rows, strict=True):
        print(image_path)
        for i, name, p in row:
            print(f"  {p:6.2%}  {i:4d}  {name}")


def cmd_embed(args: argparse.Namespace) -> None:
    """``zoo embed CHECKPOINT IMAGE... --out FILE``: feature vectors to a file."""
    # lazy: keeps zoo list free of torch
    from zoo.deploy.inference import check_embedding_path, embed, save_embeddings

    check_embedding_path(args.out, args.overwrite)  # before the slow part
    vectors = embed(args.checkpoint, args.images, at=args.at, batch_size=args.batch_size,
                    device=args.device)
    out = save_embeddings(vectors, args.out, overwrite=args.overwrite,
                          metadata={"at": args.at or "head-input", "images": str(len(vectors))})
    print(f"wrote {len(vectors)} embeddings of shape {tuple(vectors.shape[1:])} to {out}")
