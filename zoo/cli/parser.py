"""Every ``zoo`` flag: ``build_parser``, one function per group of subcommands, and the flag
groups several subcommands share. The commands themselves live in the sibling modules."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from zoo.cli import browse, compare, sharing, training, weights
from zoo.cli.common import UsageError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
    p.set_defaults(func=browse.cmd_list)

    p = sub.add_parser("info", help="a backbone's groups and weights, or a strategy's options")
    p.add_argument("name")
    p.set_defaults(func=browse.cmd_info)

    p = sub.add_parser("plugins", help="loaded plugins and what they register")
    p.set_defaults(func=browse.cmd_plugins)

    p = sub.add_parser("datasets", help="built-in datasets")
    p.set_defaults(func=browse.cmd_datasets)

    p = sub.add_parser("check", help="check a backbone plugin: groups, head, stages, weights, "
                       "preprocessing (for plugin authors)")
    p.add_argument("name")
    p.add_argument("--no-forward", action="store_true",
                   help="build on the meta device only: no forward pass (large models)")
    p.add_argument("--image-size", type=int, help="input side for the forward pass")
    p.set_defaults(func=browse.cmd_check)

    p = sub.add_parser("plan", help="dry run: what a strategy trains on a backbone")
    p.add_argument("backbone")
    p.add_argument("strategy")
    p.add_argument("--option", action="append", metavar="KEY=VALUE")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="epochs (as zoo finetune)")
    p.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    p.add_argument("--num-classes", type=int)
    p.set_defaults(func=browse.cmd_plan)


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
    p.set_defaults(func=training.cmd_finetune, parser_defaults=functools.partial(_defaults, p))

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
    p.set_defaults(func=training.cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.set_defaults(func=training.cmd_predict)

    p = sub.add_parser("embed", help="feature vectors for images, to .npy or .safetensors")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="FILE.npy or FILE.safetensors")
    p.add_argument("--at", metavar="GROUP",
                   help="the output of this layer group (default: the head's input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device")
    p.set_defaults(func=training.cmd_embed)


def _add_weights_commands(sub: Any) -> None:
    """The weights and lr-find subcommands."""
    p = sub.add_parser("weights", help="manage pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", parser_class=Parser)
    w = wsub.add_parser("download", help="pre-fetch weights into the cache")
    w.add_argument("name", metavar="NAME[:TAG]")
    w.set_defaults(func=weights.cmd_weights_download)
    w = wsub.add_parser("import", help="put a weights file fetched elsewhere into the cache "
                        "(for machines without internet)")
    w.add_argument("name", metavar="NAME[:TAG]",
                   help="backbone and tag (default: the tag whose sha256 the file has)")
    w.add_argument("file", help="the weights file, e.g. resnet50-11ad3fa6.pth")
    w.add_argument("--force", action="store_true",
                   help="accept a file for weights whose sha256 the registry does not declare "
                   "(its sha256 is recorded and checked from then on)")
    w.set_defaults(func=weights.cmd_weights_import)
    w = wsub.add_parser("list", help="registered weights: source, size, sha256, cached or not")
    w.add_argument("name", nargs="?", metavar="NAME", help="one backbone (default: all listed)")
    w.add_argument("--json", action="store_true", help="machine-readable, full sha256")
    w.set_defaults(func=weights.cmd_weights_list)
    w = wsub.add_parser("verify", help="re-hash every cached weights file against its record")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.set_defaults(func=weights.cmd_weights_verify)

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
    p.set_defaults(func=weights.cmd_lr_find)


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
    p.set_defaults(func=compare.cmd_compare)

    p = sub.add_parser("demo", help="the built-in comparison (runs offline in minutes)")
    p.add_argument("--out", default="demo-report")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.set_defaults(func=compare.cmd_demo)


def _add_sharing_commands(sub: Any) -> None:
    """The export, push, pull and doctor subcommands."""
    p = sub.add_parser("export", help="a checkpoint as ONNX, TorchScript or a PEFT adapter")
    p.add_argument("checkpoint", help="checkpoint directory or hf-hub:REPO")
    p.add_argument("--format", choices=("onnx", "torchscript", "peft"), required=True)
    p.add_argument("--out", required=True,
                   help="file to write (for peft: the adapter folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=sharing.cmd_export)

    p = sub.add_parser("push", help="upload a checkpoint directory to a Hub repo")
    p.add_argument("directory")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--message", help="commit message")
    hub_args(p)
    p.set_defaults(func=sharing.cmd_push)

    p = sub.add_parser("pull", help="download a checkpoint from a Hub repo")
    p.add_argument("repo_id")
    hub_args(p)
    p.set_defaults(func=sharing.cmd_pull)

    p = sub.add_parser("doctor", help="environment report for bug reports")
    p.set_defaults(func=sharing.cmd_doctor)


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
