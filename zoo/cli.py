"""The ``zoo`` command: parses arguments, calls the public API, prints the result.

Errors a user can fix print one line (``zoo: error: ...``) and exit with status 2; an
unexpected failure prints one line too and exits 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zoo.core.errors import ZooError


class UsageError(ZooError):
    """A command line that does not parse."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _options(pairs: Sequence[str] | None) -> dict[str, Any]:
    from zoo.models.strategy import parse_option_value

    result: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = parse_option_value(value)
    return result


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> None:
    import zoo

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
    import zoo
    from zoo.plugins.registry import current

    registry = current()
    if args.name in registry.strategies or args.name in registry.strategy_aliases:
        spec = zoo.get_strategy(args.name)
        print(f"strategy: {spec.name}  (plugin {spec.plugin})\n{spec.description}")
        for key, doc in spec.options.items():
            print(f"  --option {key}=...  {doc}")
        return
    import torch

    from zoo.models.build import assign_groups
    from zoo.weights.load import describe

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
    print("\nlayer groups (input to output):\n" + _table(rows))
    weights = describe(spec)
    if not weights:
        print("\nweights: none declared (random initialisation only)")
        return
    datasets = {w.tag: str(w.meta.get("dataset") or "?") for w in spec.weights}
    rows = [("tag", "default", "dataset", "resolution", "source", "size", "cached", "license")]
    for w in weights:
        rows.append((w["tag"], "*" if w["default"] else "", datasets[w["tag"]],
                     "x".join(map(str, w["input_size"][1:])), w["source"],
                     _size(w["size_bytes"]), "yes" if w["cached"] else "no",
                     str(w.get("license") or "?")))
    print("\nweights:\n" + _table(rows))


def cmd_plugins(args: argparse.Namespace) -> None:
    from zoo.plugins.manager import get_plugin_manager
    from zoo.plugins.registry import current

    pm = get_plugin_manager()
    registry = current()
    rows = [("plugin", "hooks", "backbones", "strategies")]
    for name, plugin in pm.list_name_plugin():
        hooks = ",".join(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        backbones = sum(1 for b in registry.backbones.values() if b.plugin == name)
        families = [f.prefix + "*" for f in registry.families if f.plugin == name]
        strategies = sum(1 for s in registry.strategies.values() if s.plugin == name)
        rows.append((name, hooks, " ".join([str(backbones)] + families), str(strategies)))
    print(_table(rows))
    for note in pm.notes:
        print(f"note: {note}")


def cmd_datasets(args: argparse.Namespace) -> None:
    from zoo.data.dataset import list_datasets

    rows = [("name", "classes", "image", "train", "val", "description")]
    for d in list_datasets():
        rows.append((d.name, str(d.num_classes), f"{d.channels}x{d.image_size[0]}x"
                     f"{d.image_size[1]}", str(d.train_size), str(d.val_size), d.description))
    print(_table(rows))
    print("\nAny ImageFolder directory works too: DIR/<class>/*.jpg, or DIR/train and DIR/val.")


def cmd_plan(args: argparse.Namespace) -> None:
    from zoo.models.strategy import plan

    report = plan(args.backbone, args.strategy, _options(args.option), epochs=args.epochs,
                  lr=args.lr, num_classes=args.num_classes)
    print(f"{report.backbone} x {report.strategy} {json.dumps(report.options)}, "
          f"{args.epochs} epoch(s), lr {args.lr}")
    print(report.table())
    share = report.trainable_params / max(report.total_params, 1)
    print(f"\n{report.trainable_params:,} of {report.total_params:,} parameters train "
          f"({share:.2%}).")


def _require_default_weights(backbone: str, strategy: str, options: dict[str, Any]) -> None:
    """Refuse, in the command line's words, a pretrained run of a backbone without weights."""
    import zoo
    from zoo.models.strategy import make_strategy

    spec = zoo.get_backbone(backbone)
    if spec.default_weights is None and make_strategy(strategy, options).pretrained:
        raise UsageError(f"backbone {spec.name!r} declares no pretrained weights: pass "
                         "--weights none to train it from random initialisation, or "
                         "--weights FILE")


def cmd_check(args: argparse.Namespace) -> None:
    from zoo.testing.checks import check_backbone

    report = check_backbone(args.name, forward=not args.no_forward,
                            image_size=args.image_size, raise_on_failure=False)
    print(report.table())
    report.raise_for_failures()


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


def _training_kwargs(args: argparse.Namespace) -> dict[str, Any]:
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
        strategy_options=_options(args.option), seed=args.seed,
        checkpoint_kind=args.checkpoint, **_training_kwargs(args))


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
    import zoo

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
    import zoo

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


def _load_model(target: str) -> Any:
    if target.startswith("hf-hub:") or (not Path(target).exists() and target.count("/") == 1):
        from zoo.persist.hub import from_pretrained

        return from_pretrained(target)
    from zoo.persist.checkpoint import load_checkpoint

    return load_checkpoint(target)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import zoo
    from zoo.training.evaluate import check_evaluation_dir, write_evaluation

    if args.out is not None:
        check_evaluation_dir(args.out)  # before the slow part: never over a user's files
    model = _load_model(args.checkpoint)
    metrics = zoo.evaluate(model, args.data, split=args.split, device=args.device)
    written = write_evaluation(args.out, metrics, {"checkpoint": args.checkpoint,
                                                    "data": args.data, "split": args.split}
                               ) if args.out is not None else []
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(_evaluation_text(metrics))
    if written:
        print("wrote " + " and ".join(str(p) for p in written))
    if written and metrics["confusion_matrix"] is None:
        print(f"no confusion_matrix.png: {len(metrics['class_names'])} classes are too many to "
              "draw; evaluation.json lists the matrix's non-zero cells")


def _printable(name: str) -> str:
    """A class name on one table row: control characters (a newline in a folder name) shown
    as escapes."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def _evaluation_text(metrics: dict[str, Any], max_rows: int = 100) -> str:
    """Overall accuracy (top-5 where reported), loss, and a per-class table."""
    correct = sum(c["correct"] for c in metrics["per_class"])
    head = (f"accuracy {metrics['accuracy']:.2%} ({correct}/{metrics['samples']} images)"
            + (f", top-5 {metrics['top5_accuracy']:.2%}" if "top5_accuracy" in metrics else "")
            + f", loss {metrics['loss']:.4f}")
    rows = [("class", "images", "correct", "accuracy")]
    rows += [(_printable(c["class"]), str(c["samples"]), str(c["correct"]),
              f"{c['accuracy']:.2%}") for c in metrics["per_class"][:max_rows]]
    lines = [head, _table(rows)]
    if len(metrics["per_class"]) > max_rows:
        lines.append(f"... {len(metrics['per_class']) - max_rows} more classes (see --out or "
                     "--json)")
    if metrics.get("note"):
        lines.append(f"note: {metrics['note']}")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> None:
    from zoo.deploy.inference import predict_indexed

    if args.top_k < 1:
        raise UsageError(f"--top-k must be 1 or more, got {args.top_k}")
    rows = predict_indexed(args.checkpoint, args.images, top_k=args.top_k,
                           batch_size=args.batch_size, device=args.device)
    for image_path, row in zip(args.images, rows, strict=True):
        print(image_path)
        for i, name, p in row:
            print(f"  {p:6.2%}  {i:4d}  {name}")


def cmd_embed(args: argparse.Namespace) -> None:
    from zoo.deploy.inference import check_embedding_path, embed, save_embeddings

    check_embedding_path(args.out, args.overwrite)  # before the slow part
    vectors = embed(args.checkpoint, args.images, at=args.at, batch_size=args.batch_size,
                    device=args.device)
    out = save_embeddings(vectors, args.out, overwrite=args.overwrite,
                          metadata={"at": args.at or "head-input", "images": str(len(vectors))})
    print(f"wrote {len(vectors)} embeddings of shape {tuple(vectors.shape[1:])} to {out}")


def cmd_weights_download(args: argparse.Namespace) -> None:
    from zoo.weights.load import download

    name, _, tag = args.name.partition(":")
    path = download(name, tag or None)
    print(f"{args.name}: {path}")


def cmd_weights_import(args: argparse.Namespace) -> None:
    from zoo.weights.load import import_weights

    path = import_weights(args.name, args.file, force=args.force)
    print(f"imported {args.file} as {args.name}: {path}")


def cmd_weights_list(args: argparse.Namespace) -> None:
    from zoo.weights.load import list_weights

    rows = list_weights(args.name)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("no weights registered" + (f" for {args.name}" if args.name else ""))
        return
    table = [("backbone", "tag", "source", "size", "sha256", "cached")]
    for r in rows:
        sha = r["recorded_sha256"] or r["sha256"]
        table.append((r["backbone"], r["tag"] + (" *" if r["default"] else ""), r["source"],
                      _size(r["size_bytes"]), (sha[:16] + "...") if sha else "-",
                      "yes" if r["cached"] else "no"))
    print(_table(table))


def cmd_weights_verify(args: argparse.Namespace) -> None:
    from zoo.core.errors import WeightsError
    from zoo.weights.load import verify_cache, weights_dir

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
    from zoo.training.lr_find import lr_find

    weights = None if args.weights in ("none", "random") else args.weights
    result = lr_find(args.backbone, args.strategy, args.data, weights=weights,
                     strategy_options=_options(args.option), batch_size=args.batch_size,
                     start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter,
                     device=args.device, seed=args.seed, out=args.out,
                     overwrite=args.overwrite, limit_per_class=args.limit_per_class,
                     image_size=args.image_size)
    print(f"suggested learning rate: {result.suggestion:.2e} (steepest descent; the "
          f"minimum / 10 is {result.minimum:.2e}; {len(result.lrs)} batches)")
    print(f"plot: {result.plot}")


def cmd_compare(args: argparse.Namespace) -> None:
    from zoo.experiments.compare import compare, format_table

    kwargs = _training_kwargs(args)
    result = compare(
        args.backbones, args.strategies, args.data, args.val, budget=args.budget,
        output_dir=args.out, seeds=tuple(args.seeds),
        weights=None if args.weights in ("none", "random") else args.weights,
        strategy_options=_strategy_options(args.option, args.strategies), **kwargs,
    )
    print(format_table(result))
    print("\n" + "\n".join(result.summary["lines"]))
    print(f"\nreport: {result.report_path}")


def _strategy_options(pairs: Sequence[str] | None,
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
        value = _options([pair[len(name) + 1:] if dot else pair])
        for target in targets:
            result.setdefault(target, {}).update(value)
    return result


def cmd_demo(args: argparse.Namespace) -> None:
    from zoo.experiments.compare import run_demo

    run_demo(args.out, quick=args.quick)  # prints its table, summary and report path


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
    from zoo.deploy.export import export

    path = export(_load_model(args.checkpoint), args.format, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format}: {path}")


def cmd_push(args: argparse.Namespace) -> None:
    from zoo.persist.hub import push_to_hub

    url = push_to_hub(args.directory, args.repo_id, token=_hub_token(args.token),
                      endpoint=args.endpoint,
                      private=args.private, revision=args.revision,
                      commit_message=args.message, create_pr=args.create_pr)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")


def cmd_pull(args: argparse.Namespace) -> None:
    from zoo.persist.hub import pull_from_hub

    path = pull_from_hub(args.repo_id, revision=args.revision, token=_hub_token(args.token),
                         endpoint=args.endpoint)
    print(path)


def cmd_doctor(args: argparse.Namespace) -> None:
    from zoo.doctor import report

    print(report())


# --------------------------------------------------------------------------- parser


DEFAULT_EPOCHS = 3  # zoo finetune, zoo compare and zoo plan alike (finetune's own default)


def _defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Each of ``parser``'s destinations and its default value."""
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def data_columns(p: argparse.ArgumentParser) -> None:
    """--image-column and --label-column, for Hugging Face datasets."""
    p.add_argument("--image-column", help="a Hugging Face dataset's image column "
                   "(default: its Image feature)")
    p.add_argument("--label-column", help="a Hugging Face dataset's label column "
                   "(default: its ClassLabel feature)")


def common_training(p: argparse.ArgumentParser) -> None:
    """The training flags finetune and compare share."""
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    training_options(p)
    p.add_argument("--image-size", type=int, help="input resolution (default: the weights')")
    p.add_argument("--limit-per-class", type=int, help="keep N training images per class")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--strict", action="store_true",
                   help="refuse image files that do not decode (default: skip and count)")
    data_columns(p)


def training_options(p: argparse.ArgumentParser) -> None:
    """Issue 15's options, shared by finetune and compare."""
    p.add_argument("--weights", default="default", help="weights tag, path, or 'none'")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps; None: cuda when there is one")
    p.add_argument("--augment", nargs="?", const=True, default=False,
                   choices=("none", "light", "standard", "strong"),
                   help="training augmentation preset; bare --augment is zoo's original "
                   "pad-crop-flip")
    p.add_argument("--cache-views", type=int, default=0, metavar="K",
                   help="with --augment, cache K augmented views of the frozen prefix")
    p.add_argument("--no-cache", action="store_true", help="never cache frozen features")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="optimizer (no weight decay on norms and biases)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing")
    p.add_argument("--scheduler", default="cosine",
                   choices=("cosine", "linear", "step", "onecycle", "constant", "none"),
                   help="learning-rate schedule, stepped per batch")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warmup, in epochs (fractions allowed)")
    p.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="step every N batches (the update of an N times larger batch)")
    p.add_argument("--clip-grad", type=float, metavar="NORM",
                   help="clip the gradient norm to NORM; None: no clipping")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an EMA of the weights; the best epoch keeps the better of "
                   "raw and EMA; None: no EMA")
    p.add_argument("--tensorboard", action="store_true",
                   help="log to OUT/tensorboard as well as OUT/metrics.csv")


def keep_args(p: argparse.ArgumentParser) -> None:
    """--keep and --patience: which epoch a run keeps, and early stopping."""
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="which epoch the checkpoint holds: the best by validation "
                   "accuracy (ties: lower val loss, then the earlier epoch) or the last")
    p.add_argument("--patience", type=int, metavar="N",
                   help="stop after N epochs without a better validation accuracy")


def hub_args(p: argparse.ArgumentParser) -> None:
    """--revision, --endpoint and --token, for push and pull."""
    p.add_argument("--revision")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--token", metavar="TOKEN|-",
                   help="Hub token; '-' reads it from stdin, which keeps it out of the "
                   "process list that other users can see (default: HF_TOKEN or your hf "
                   "login)")


def _add_browse_commands(sub: Any) -> None:
    """The list, info, plugins, datasets, check and plan subcommands: looking before training."""
    p = sub.add_parser("list", help="list backbones (or strategies)")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'resnet*' or 'timm/vit*'")
    p.add_argument("--strategies", action="store_true", help="list strategies instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="a backbone's groups and weights, or a strategy's options")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plugins", help="loaded plugins and what they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("datasets", help="built-in datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("check", help="check a backbone plugin: groups, head, stages, weights, "
                       "preprocessing (for plugin authors)")
    p.add_argument("name")
    p.add_argument("--no-forward", action="store_true",
                   help="build on the meta device only: no forward pass (large models)")
    p.add_argument("--image-size", type=int, help="input side for the forward pass")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="dry run: what a strategy trains on a backbone")
    p.add_argument("backbone")
    p.add_argument("strategy")
    p.add_argument("--option", action="append", metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="epochs (as zoo finetune)")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    p.add_argument("--num-classes", type=int)
    p.set_defaults(func=cmd_plan)


def _add_training_commands(sub: Any) -> None:
    """The finetune, evaluate, predict and embed subcommands."""
    p = sub.add_parser("finetune", help="fine-tune a backbone with a strategy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="RUN.yaml",
                   help="replay a run file (a run folder's run.yaml); flags override it")
    p.add_argument("--backbone")
    p.add_argument("--strategy")
    p.add_argument("--data", help="built-in dataset name or ImageFolder dir")
    p.add_argument("--val", help="validation data (default: the dataset's val split)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="strategy option")
    p.add_argument("--out", help="checkpoint directory (new, empty, or a zoo checkpoint with "
                   "--overwrite; default: a new folder runs/BACKBONE-STRATEGY-DATE-TIME)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the zoo checkpoint already in --out")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run")
    p.add_argument("--checkpoint", choices=("auto", "delta", "full"), default="auto",
                   help="auto: a delta when the base weights are registered, else full")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    common_training(p)
    keep_args(p)
    p.set_defaults(func=cmd_finetune, parser_defaults=functools.partial(_defaults, p))

    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a dataset, per class too")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("--data", required=True,
                   help="its classes are matched to the model's by name; a subset is fine")
    p.add_argument("--split", default="val")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="a new or empty folder (or an earlier evaluation's) for "
                                 "evaluation.json and confusion_matrix.png")
    data_columns(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", help="feature vectors for images, to .npy or .safetensors")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="FILE.npy or FILE.safetensors")
    p.add_argument("--at", metavar="GROUP",
                   help="the output of this layer group (default: the head's input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.set_defaults(func=cmd_embed)


def _add_weights_commands(sub: Any) -> None:
    """The weights and lr-find subcommands."""
    p = sub.add_parser("weights", help="manage pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", parser_class=Parser)
    w = wsub.add_parser("download", help="pre-fetch weights into the cache")
    w.add_argument("name", metavar="NAME[:TAG]")
    w.set_defaults(func=cmd_weights_download)
    w = wsub.add_parser("import", help="put a weights file fetched elsewhere into the cache "
                        "(for machines without internet)")
    w.add_argument("name", metavar="NAME[:TAG]",
                   help="backbone and tag (default: the tag whose sha256 the file has)")
    w.add_argument("file", help="the weights file, e.g. resnet50-11ad3fa6.pth")
    w.add_argument("--force", action="store_true",
                   help="accept a file for weights whose sha256 the registry does not declare "
                   "(its sha256 is recorded and checked from then on)")
    w.set_defaults(func=cmd_weights_import)
    w = wsub.add_parser("list", help="registered weights: source, size, sha256, cached or not")
    w.add_argument("name", nargs="?", metavar="NAME", help="one backbone (default: all listed)")
    w.add_argument("--json", action="store_true", help="machine-readable, full sha256")
    w.set_defaults(func=cmd_weights_list)
    w = wsub.add_parser("verify", help="re-hash every cached weights file against its record")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.set_defaults(func=cmd_weights_verify)

    p = sub.add_parser("lr-find", help="learning-rate range test: suggest a rate, plot loss "
                       "against rate")
    p.add_argument("backbone")
    p.add_argument("strategy")
    p.add_argument("--data", required=True, help="built-in dataset name or ImageFolder dir")
    p.add_argument("--out", default="lr_find.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="strategy option")
    p.add_argument("--weights", default="default", help="weights tag, path, or 'none'")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="(default: %(default)s)")
    p.add_argument("--end-lr", type=float, default=10.0, help="(default: %(default)s)")
    p.add_argument("--num-iter", type=int, default=100, help="batches (default: %(default)s)")
    p.add_argument("--limit-per-class", type=int, help="keep N training images per class")
    p.add_argument("--image-size", type=int, help="input resolution (default: the weights')")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_lr_find)


def _add_compare_commands(sub: Any) -> None:
    """The compare and demo subcommands."""
    p = sub.add_parser("compare", help="strategies x backbones versus training from scratch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbones", nargs="+", required=True)
    p.add_argument("--strategies", nargs="+", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--val")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], help="random seeds")
    p.add_argument("--option", action="append", metavar="[STRATEGY.]KEY=VALUE",
                   help="strategy option, for one strategy (partial.freeze_to=layer2) or all")
    p.add_argument("--budget", type=float, help="wall-clock seconds per run")
    common_training(p)
    keep_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the built-in comparison (runs offline in minutes)")
    p.add_argument("--out", default="demo-report")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.set_defaults(func=cmd_demo)


def _add_sharing_commands(sub: Any) -> None:
    """The export, push, pull and doctor subcommands."""
    p = sub.add_parser("export", help="a checkpoint as ONNX, TorchScript or a PEFT adapter")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("--format", choices=("onnx", "torchscript", "peft"), required=True)
    p.add_argument("--out", required=True,
                   help="file to write (for peft: the adapter folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a checkpoint directory to a Hub repo")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--message", help="commit message")
    hub_args(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download a checkpoint from a Hub repo")
    p.add_argument("repo_id")
    hub_args(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("doctor", help="environment report for bug reports")
    p.set_defaults(func=cmd_doctor)


def build_parser() -> Parser:
    """The argument parser for every ``zoo`` subcommand."""
    parser = Parser(prog="zoo", description="A plugin-based model zoo for transfer learning.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_browse_commands(sub)
    _add_training_commands(sub)
    _add_weights_commands(sub)
    _add_compare_commands(sub)
    _add_sharing_commands(sub)
    return parser


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
    from zoo.data.hf import DataSource

    for key in ("data", "val"):
        if getattr(args, key, None) is not None:
            setattr(args, key, DataSource(getattr(args, key), *columns))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
