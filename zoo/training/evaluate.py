"""Evaluation by class name: match a dataset's classes to a model's, count a confusion
matrix, summarise it per class, and write ``evaluation.json`` and ``confusion_matrix.png``.
``evaluation_loop`` is the one loop behind ``zoo.evaluate``, ``zoo evaluate`` and the
trainer's per-epoch validation.

A label is an index into the classes of the data it came from, so comparing it with a
model's output index is only right when both lists agree. ``map_classes`` matches them by
name (a subset of the model's classes is fine, a class it does not know is an error) and
falls back to indices, saying so, only where one side has no names.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from zoo.core._io import atomic_write, write_json_atomic
from zoo.core.errors import ZooError
from zoo.data.dataset import load_data
from zoo.data.imagedata import ImageData
from zoo.data.transforms import BatchTransform, prepare_inputs, transform_from_config
from zoo.training.device import Batches, resolve_device

EVALUATION_JSON = "evaluation.json"
CONFUSION_PNG = "confusion_matrix.png"
EVALUATION_FORMAT = "zoo-evaluation"
TOP_K = 5  # top-k accuracy is reported only for models with more than TOP_K classes
MAX_DENSE_CLASSES = 1000  # above this the confusion matrix is listed as non-zero cells
MAX_CELL_COUNTS = 20  # cells show their counts in the PNG up to this many classes
MAX_AXIS_NAMES = 60  # axes show class names up to this many classes
_OUTPUTS = (EVALUATION_JSON, CONFUSION_PNG)
_TEMP = re.compile(r"\.(evaluation\.json|confusion_matrix\.png)\.[A-Za-z0-9_]+\.tmp")
_JSON_START = ('{\n  "format": "' + EVALUATION_FORMAT + '"').encode()


# --------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassMapping:
    """How a dataset's labels become a model's class indices."""

    lookup: Tensor  # data label -> model class index (-1 for a data class with no images)
    names: list[str]  # the model's classes, as reported (its names, or the data's, or indices)
    by: str  # "name" or "index"
    note: str | None  # said when labels were matched by index


def index_names(count: int) -> list[str]:
    """The names zoo gives classes that have none: "0", "1", ..."""
    return [str(i) for i in range(count)]


def _named(names: Sequence[str] | None) -> bool:
    """Whether ``names`` are real class names, not absent or only label numbers."""
    return names is not None and list(names) != index_names(len(names))


def _shown(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(_shown(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _pairs(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"{i}={_shown(n)}" for i, n in enumerate(names[:limit]))
    return shown + (", ..." if len(names) > limit else "")


def map_classes(model_names: Sequence[str] | None, num_classes: int,
                data: ImageData) -> ClassMapping:
    """Map ``data``'s labels to the model's class indices, by name where both sides have
    names; otherwise by index, only where the class counts fit, with a note saying so."""
    present = data.targets.unique().tolist()
    if present and (present[0] < 0 or present[-1] >= len(data.classes)):
        raise ZooError(f"the data's labels run {present[0]}..{present[-1]} but it names "
                       f"{len(data.classes)} classes; relabel the data")
    if _named(model_names) and _named(data.classes):
        return _by_name(list(model_names), data, present)  # type: ignore[arg-type]
    return _by_index(model_names, num_classes, data, present)


def _by_name(model_names: list[str], data: ImageData, present: list[int]) -> ClassMapping:
    position: dict[str, int] = {}
    repeated = {n for n, count in Counter(model_names).items() if count > 1}
    for i, name in enumerate(model_names):
        position.setdefault(name, i)
    lookup = torch.full((len(data.classes),), -1, dtype=torch.int64)
    counts = torch.bincount(data.targets, minlength=len(data.classes)).tolist()
    unknown, ambiguous = [], []
    for label in present:
        name = data.classes[label]
        if name in repeated:
            ambiguous.append(name)
        elif name not in position:
            unknown.append(f"{_shown(name)} ({counts[label]} images)")
        else:
            lookup[label] = position[name]
    model = f"the model's {len(model_names)} classes ({_listing(model_names)})"
    if unknown:
        which = f"class {unknown[0]} is" if len(unknown) == 1 else \
            f"classes {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''} are"
        raise ZooError(f"the data's {which} not one of {model}; evaluate on data whose class "
                       "folders are named like the model's classes (a subset is fine)")
    if ambiguous:
        raise ZooError(f"the data's class {_shown(ambiguous[0])} names more than one of "
                       f"{model}, so its images cannot be scored; leave it out")
    return ClassMapping(lookup, model_names, "name", None)


def _by_index(model_names: Sequence[str] | None, num_classes: int, data: ImageData,
              present: list[int]) -> ClassMapping:
    lookup = torch.arange(len(data.classes), dtype=torch.int64)
    if _named(data.classes):  # the model has no names: take the data's, in order
        if len(data.classes) != num_classes:
            raise ZooError(f"the model records no class names and has {num_classes} classes, "
                           f"but the data has {len(data.classes)} "
                           f"({_listing(data.classes)}), so they cannot be matched; use "
                           f"data with the model's {num_classes} classes in its training "
                           "order, or a checkpoint that records its class names")
        return ClassMapping(lookup, list(data.classes), "index",
                            "the model records no class names, so the data's classes were "
                            f"taken as its classes in order ({_pairs(data.classes)})")
    if present and present[-1] >= num_classes:
        raise ZooError(f"the data's labels reach {present[-1]} but the model has {num_classes} "
                       f"classes (0..{num_classes - 1}); relabel the data or use data "
                       "with class names")
    if _named(model_names):
        names = list(model_names)  # type: ignore[arg-type]
        note = ("the data has no class names (labels only), so its labels were taken as the "
                f"model's class indices ({_pairs(names)})")
    else:
        names = index_names(num_classes)
        note = ("neither the model nor the data has class names (only label numbers), so "
                "labels were taken as the model's class indices")
    return ClassMapping(lookup, names, "index", note)


# --------------------------------------------------------------------------- counting


class Tally:
    """Running counts over batches: (true, predicted) pairs, summed loss, top-k hits."""

    def __init__(self, mapping: ClassMapping) -> None:
        self.mapping = mapping
        self.num_classes = len(mapping.names)
        self.pairs: Counter[int] = Counter()  # true * num_classes + predicted -> images
        self.loss_sum = 0.0
        self.top_k = 0
        self.samples = 0

    def add(self, logits: Tensor, labels: Tensor) -> None:
        """Count one batch: ``logits`` over the model's classes, ``labels`` the data's."""
        n = self.num_classes
        if logits.ndim != 2 or logits.shape[1] != n:
            raise ZooError(f"the model outputs {tuple(logits.shape)} logits but its config "
                           f"records {n} classes; the checkpoint does not match its head")
        target = self.mapping.lookup.to(labels.device)[labels]
        self.loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        if n > TOP_K:
            hits = (logits.topk(TOP_K, 1).indices == target[:, None]).any(1)
            self.top_k += int(hits.sum())
        codes = (target * n + logits.argmax(1)).cpu()  # counted on the CPU: deterministic
        values, counts = codes.unique(return_counts=True)
        self.pairs.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))
        self.samples += len(labels)

    @property
    def correct(self) -> int:
        """How many images were predicted as their true class."""
        n = self.num_classes
        return sum(count for code, count in self.pairs.items() if code // n == code % n)

    def result(self) -> dict[str, Any]:
        """Overall and per-class accuracy, loss and the confusion matrix (rows: true class,
        columns: predicted class, over the model's classes)."""
        n, samples = self.num_classes, self.samples
        rows: Counter[int] = Counter()
        correct: Counter[int] = Counter()
        for code, count in self.pairs.items():
            true, predicted = divmod(code, n)
            rows[true] += count
            if true == predicted:
                correct[true] += count
        names = self.mapping.names
        result: dict[str, Any] = {"accuracy": sum(correct.values()) / samples}
        if n > TOP_K:
            result[f"top{TOP_K}_accuracy"] = self.top_k / samples
        result.update({
            "loss": self.loss_sum / samples,
            "samples": samples,
            "class_names": list(names),
            "per_class": [{"class": names[i], "index": i, "samples": rows[i],
                           "correct": correct[i], "accuracy": correct[i] / rows[i]}
                          for i in sorted(rows)],
            "confusion_matrix": self._dense() if n <= MAX_DENSE_CLASSES else None,
            "matched_by": self.mapping.by,
        })
        if n > MAX_DENSE_CLASSES:
            result["confusion_cells"] = [[*divmod(code, n), count]
                                         for code, count in sorted(self.pairs.items())]
        if self.mapping.note:
            result["note"] = self.mapping.note
        return result

    def _dense(self) -> list[list[int]]:
        n = self.num_classes
        matrix = torch.zeros(n * n, dtype=torch.int64)
        if self.pairs:
            matrix[torch.tensor(list(self.pairs))] = torch.tensor(list(self.pairs.values()))
        return matrix.view(n, n).tolist()


# --------------------------------------------------------------------------- the loop


def same_classes(num_classes: int) -> ClassMapping:
    """Labels that are the model's class indices already (a run's own validation data)."""
    return ClassMapping(torch.arange(num_classes), index_names(num_classes), "index", None)


@torch.no_grad()
def evaluation_loop(batches: Iterable[tuple[Tensor, Tensor, Tensor]],
                    logits_of: Callable[[Tensor, Tensor], Tensor],
                    tally: Tally | Callable[[int], Tally], device: torch.device) -> Tally | None:
    """The one evaluation loop, shared by ``evaluate`` (so ``zoo evaluate``) and the
    trainer's validation: the logits of each ``(indices, images, labels)`` batch
    (``logits_of(indices, images)``) counted into ``tally``, or into the Tally that
    ``tally(num_classes)`` makes from the first batch's logits; None without batches."""
    counts = tally if isinstance(tally, Tally) else None
    for idx, images, labels in batches:
        logits = logits_of(idx, images)
        if counts is None:  # a bare model: its output size tells its classes
            counts = tally(logits.shape[-1])  # type: ignore[operator]
        counts.add(logits, labels.to(device))
    return counts


def evaluate(model: nn.Module, data: Any, *, batch_size: int = 128, split: str = "val",
             device: str | torch.device | None = None,
             transform: BatchTransform | None = None) -> dict[str, Any]:
    """Accuracy, loss, per-class accuracy and confusion matrix of ``model`` on ``data`` (any
    form ``finetune`` accepts), its classes matched to the model's by name.

    The data may hold any subset of the model's classes (predictions stay over all of them);
    a class the model does not know is an error. Where either side has no class names
    (tensors, a model without ``class_names``) labels are matched by index if the counts
    fit, and the result's ``note`` says so (see ``map_classes``). Top-5 accuracy is reported
    only for models with more than 5 classes. The input transform comes from the model's zoo
    config (set by ``finetune`` and ``load_checkpoint``) unless ``transform`` is given.
    """
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    dataset = load_data(data, split)
    if len(dataset) == 0:
        raise ZooError("the evaluation data holds no images")
    config = getattr(model, "zoo_config", None) or {}
    if transform is None:
        pre = config.get("preprocessing")
        if pre is None:
            raise ZooError("the model carries no preprocessing; pass transform=")
        transform = transform_from_config(pre)
    names, num_classes = config.get("class_names"), config.get("num_classes")
    # a checkpoint's classes are known up front, so a mismatch is refused before any work
    tally = Tally(map_classes(names, num_classes, dataset)) if num_classes else \
        functools.partial(_tally_for, names, dataset)
    transform, (dataset,) = prepare_inputs(transform, dataset)  # as finetune and predict fit
    was_training = model.training
    model.eval().to(dev)
    try:
        batches = Batches(dataset, batch_size)(torch.arange(len(dataset)))
        counts = evaluation_loop(batches, functools.partial(_logits, model, transform, dev),
                                 tally, dev)
    finally:
        model.train(was_training)
    assert counts is not None
    return counts.result()


def _tally_for(names: Sequence[str] | None, data: ImageData, num_classes: int) -> Tally:
    return Tally(map_classes(names, num_classes, data))


def _logits(model: nn.Module, transform: BatchTransform, dev: torch.device, idx: Tensor,
            images: Tensor) -> Tensor:
    return model(transform(images.to(dev))).float()


# --------------------------------------------------------------------------- output folder


def check_evaluation_dir(directory: str | os.PathLike[str]) -> Path:
    """Refuse an output folder zoo must not write an evaluation into, before any work.

    Accepted: a missing or empty folder, or one holding only an earlier evaluation's files
    (``evaluation.json`` written by zoo, ``confusion_matrix.png``). Anything else is the
    user's, and zoo never replaces files it did not write.
    """
    path = Path(directory)
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise ZooError(f"{path} is an existing file, not a folder: name a new or empty folder "
                       "for the evaluation")
    entries = sorted(os.listdir(path))
    foreign = [e for e in entries if e not in _OUTPUTS and not _TEMP.fullmatch(e)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ZooError(f"{path} holds files zoo did not write ({shown}): name a new or empty "
                       "folder, or an earlier evaluation's --out folder")
    for name in set(_OUTPUTS) & set(entries):
        if not stat.S_ISREG(os.lstat(path / name).st_mode):
            raise ZooError(f"{path / name} is a symbolic link or not a regular file: zoo never "
                           "writes through links; remove it or name another folder")
    if entries and not _is_evaluation(path / EVALUATION_JSON):
        raise ZooError(f"{path} holds {', '.join(entries[:3])} but no evaluation.json written "
                       "by zoo, so zoo will not replace them; name a new or empty folder")
    return path


def _is_evaluation(path: Path) -> bool:
    """Whether ``path`` starts as the evaluation.json zoo writes (read without following a
    link, and only its first bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        return handle.read(len(_JSON_START)) == _JSON_START


def write_evaluation(directory: str | os.PathLike[str], result: dict[str, Any],
                     about: dict[str, Any] | None = None) -> list[Path]:
    """Write ``evaluation.json`` and (up to ``MAX_DENSE_CLASSES`` classes)
    ``confusion_matrix.png`` into a folder ``check_evaluation_dir`` accepts, each atomically;
    returns the files written."""
    path = check_evaluation_dir(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / EVALUATION_JSON,
                      {"format": EVALUATION_FORMAT, "format_version": 1, **(about or {}),
                       **result})
    written = [path / EVALUATION_JSON]
    if result.get("confusion_matrix") is not None:
        plot_confusion(result, path / CONFUSION_PNG)
        written.append(path / CONFUSION_PNG)
    return written


def plot_confusion(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw ``result``'s confusion matrix as a PNG (rows: true class, columns: predicted),
    class names on the axes and, for small matrices, the counts in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # lazy: matplotlib takes ~0.4 s, only for the plot

    matrix = np.asarray(result["confusion_matrix"], dtype=np.int64)
    n = len(matrix)
    side = min(3.0 + 0.45 * n, 16.0)
    figure = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest", vmin=0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if n <= MAX_AXIS_NAMES:
        labels = [_axis_label(name) for name in result["class_names"]]
        axes.set_xticks(range(n), labels, rotation=45 if n > 4 else 0,
                        ha="right" if n > 4 else "center")
        axes.set_yticks(range(n), labels)
    if n <= MAX_CELL_COUNTS:
        high = matrix.max() or 1
        for (true, predicted), count in np.ndenumerate(matrix):
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=9,
                      color="white" if count > high / 2 else "black")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{result['samples']} images, accuracy {result['accuracy']:.1%}")
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", bbox_inches="tight")


def _axis_label(name: str) -> str:
    """A class name as plain text on an axis: short, one line, no mathtext."""
    name = " ".join(name.split())
    name = name if len(name) <= 24 else name[:23] + "..."
    return name.replace("$", r"\$")
