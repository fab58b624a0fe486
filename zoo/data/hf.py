"""Hugging Face ``datasets`` and CSV files as zoo data.

``load_data`` sends here: ``hf:OWNER/NAME[:config]`` (through ``datasets.load_dataset``), a
folder written by ``save_to_disk``, a ``.parquet`` file, a ``datasets.Dataset`` or
``DatasetDict`` object, and a ``.csv`` of ``path,label`` rows. The image and label columns
are found from the features (one ``Image``, one ``ClassLabel``) unless named; class names
come from the ``ClassLabel``. ``datasets`` is an optional extra (``pip install
zoo[hf-datasets]``); CSV files need nothing more.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.core.errors import ZooError
from zoo.data.imagedata import ImageData
from zoo.data.sources import _as_chw, _DatasetSource, _shown
from zoo.data.splits import _SplitFiles, _stratified_split

INSTALL = "pip install 'zoo[hf-datasets]' (or pip install datasets)"
# Which DatasetDict split serves each zoo split, in order of preference.
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "test"),
               "test": ("test", "validation", "val", "valid")}
CSV_MAX_BYTES = 256 * 2**20


class DataSource(str):
    """A data spec (``hf:NAME``, a saved dataset folder, a parquet file) that also names its
    image and label columns; it is a ``str`` so it goes everywhere a data name does."""

    image_column: str | None
    label_column: str | None

    def __new__(cls, text: str, image_column: str | None = None,
                label_column: str | None = None) -> DataSource:
        self = super().__new__(cls, text)
        self.image_column = image_column
        self.label_column = label_column
        return self


def is_hf_object(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` or ``DatasetDict`` (without importing
    ``datasets`` when the caller never did)."""
    module = type(data).__module__ or ""
    return module.startswith("datasets.") and type(data).__name__ in ("Dataset", "DatasetDict")


def is_dataset_dict(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.DatasetDict``: it holds its own validation split."""
    return is_hf_object(data) and type(data).__name__ == "DatasetDict"


def is_hf_path(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` or a parquet file."""
    if path.is_dir() and not path.is_symlink():
        return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return path.suffix.lower() == ".parquet" and path.is_file()


def _datasets() -> Any:
    try:
        import datasets  # optional: zoo[hf-datasets]
    except ImportError:
        raise ZooError(f"Hugging Face datasets need the datasets package: {INSTALL}") from None
    return datasets


def load_hf(data: Any, split: str, image_column: str | None,
            label_column: str | None) -> ImageData:
    """One split of a Hugging Face dataset (a spec string, a path or an object) as an
    ImageData. A DatasetDict gives its train/validation/test split; a single dataset read
    from a path is split 80/20 (stratified, seed 0) as an ImageFolder is; a Dataset object
    is used whole, whatever ``split`` is, as a torch Dataset is."""
    if isinstance(data, DataSource):
        image_column = image_column or data.image_column
        label_column = label_column or data.label_column
    name, source = _open(data)
    if type(source).__name__ == "DatasetDict":
        ds, part = _pick_split(source, split, name)
        if part != "all":
            return _wrap_hf(ds, image_column, label_column, name, part)
        return _split_whole(_wrap_hf(ds, image_column, label_column, name, "train"), split)
    whole = _wrap_hf(source, image_column, label_column, name, "")
    return _split_whole(whole, split) if isinstance(data, str) else whole


def _open(data: Any) -> tuple[str, Any]:
    """The display name and the Dataset or DatasetDict ``data`` refers to."""
    if is_hf_object(data):
        info = getattr(data, "info", None)
        return (getattr(info, "dataset_name", None) or type(data).__name__), data
    datasets = _datasets()
    text = os.fspath(data)
    try:
        if text.startswith("hf:"):
            repo, _, config = text[3:].partition(":")
            if repo.count("/") > 1 or not repo:
                raise ZooError(f"{text} is not hf:OWNER/NAME[:config]")
            return text, datasets.load_dataset(repo, config or None)
        path = Path(text).expanduser()
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq  # optional: comes with datasets

            return path.stem, datasets.Dataset(pq.read_table(path))
        return path.name, datasets.load_from_disk(str(path))
    except ZooError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ZooError(f"cannot load the Hugging Face dataset {_shown(text)}: {reason}") from None


def _pick_split(dd: Any, split: str, name: str) -> tuple[Any, str]:
    """The DatasetDict split serving zoo's ``split`` (``"all"`` when only a train split
    exists and the 80/20 split of it must be made)."""
    for key in SPLIT_NAMES[split]:
        if key in dd:
            return dd[key], ("train" if split == "train" else key)
    if "train" in dd and len(dd) == 1:
        return dd["train"], "all"
    raise ZooError(f"{name} has splits {', '.join(dd)} and none for {split!r}; name one of "
                   f"{', '.join(SPLIT_NAMES[split])} or pass a single split")


def _split_whole(data: ImageData, split: str) -> ImageData:
    train, val = _stratified_split(
        data.targets, lambda n: max(1, int(n * 0.2 + 0.5)) if n >= 2 else 0)
    picked = data.subset(train if split == "train" else val)
    picked.split = "train" if split == "train" else "val"
    return picked


def _find_column(features: dict[str, Any], kind: str, given: str | None, what: str) -> str:
    if given is not None:
        if given not in features:
            raise ZooError(f"the dataset has no column {given!r} for the {what}; its columns "
                           f"are {', '.join(features)}")
        return given
    found = [k for k, f in features.items() if type(f).__name__ == kind]
    if len(found) == 1:
        return found[0]
    flag = "image" if what == "images" else "label"
    why = f"{len(found)} {kind} columns ({', '.join(found)})" if found else f"no {kind} column"
    raise ZooError(f"the dataset has {why}; name the {what} with {flag}_column= (CLI "
                   f"--{flag}-column); its columns are {', '.join(features)}")


def _wrap_hf(ds: Any, image_column: str | None, label_column: str | None, name: str,
             split: str) -> ImageData:
    """A Dataset as a lazy ImageData reading ``image_column``; labels read once from the
    Arrow table (never through a transform)."""
    features = dict(ds.features)
    image_col = _find_column(features, "Image", image_column, "images")
    label_col = _find_column(features, "ClassLabel", label_column, "labels")
    if len(ds) == 0:
        raise ZooError(f"the dataset {name} ({split}) is empty")
    raw = ds.with_format(None)
    values = list(raw[label_col])
    feature = features[label_col]
    if type(feature).__name__ == "ClassLabel":
        classes = [str(c) for c in feature.names]
        labels = torch.as_tensor(values, dtype=torch.int64)
    elif all(isinstance(v, str) for v in values):
        classes = sorted(set(values))
        lookup = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([lookup[v] for v in values], dtype=torch.int64)
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        labels = torch.tensor(values, dtype=torch.int64)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    else:
        raise ZooError(f"label column {label_col!r} must hold ClassLabel, int or str values")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise ZooError(f"label column {label_col!r} holds labels outside 0..{len(classes) - 1} "
                       "(a ClassLabel's -1 means unlabelled); drop those rows")
    source = _HFSource(ds, image_col)
    first = source.load(0)
    dtype = torch.uint8 if first.dtype == torch.uint8 else torch.float32
    return ImageData._from_origin(source, torch.arange(len(ds)), labels, classes,
                                  shape=tuple(first.shape), dtype=dtype, name=name, split=split)


class _HFSource(_DatasetSource):
    """The images of a Hugging Face Dataset. Without a transform (``with_transform`` /
    ``set_transform``) every read gives the same image, so they may be read up front and
    features from them cached; with one, they are read anew every time."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.transformed = dataset.format.get("type") == "custom"
        super().__init__(dataset if self.transformed else dataset.with_format(None))
        self.column = column
        self.eager = not self.transformed

    def load(self, i: int) -> Tensor:
        return _as_chw(self.dataset[i][self.column])

    def identity(self, indices: Sequence[int]) -> bytes | None:
        fingerprint = getattr(self.dataset, "_fingerprint", None)
        if self.transformed or not fingerprint:
            return None
        index = torch.as_tensor(list(indices), dtype=torch.int64).numpy().tobytes()
        return f"hf:{fingerprint}:{self.column}\0".encode() + index

    def refusal(self, indices: Sequence[int]) -> str | None:
        if not self.transformed:
            return None
        return ("the Hugging Face dataset has a transform (with_transform/set_transform) that "
                "may change an image on every read, so every epoch reads it anew")


# --------------------------------------------------------------------------- CSV


def load_csv(path: Path, split: str) -> _SplitFiles:
    """The files of ``split`` listed in a CSV of ``path,label`` rows (an optional header
    ``path,label``), paths relative to the CSV's folder, split 80/20 (stratified, seed 0).

    The CSV is untrusted: a path that is absolute, leaves the folder (``..``) or passes
    through a symbolic link is an error naming its row; only regular files are listed."""
    root = path.parent
    try:
        if path.stat().st_size > CSV_MAX_BYTES:
            raise ZooError(f"{_shown(path)} is over {CSV_MAX_BYTES >> 20} MiB; is it a CSV of "
                           "path,label rows?")
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except UnicodeDecodeError:
        raise ZooError(f"{_shown(path)} is not UTF-8 text; save it as a UTF-8 CSV of "
                       "path,label rows") from None
    except (OSError, csv.Error) as exc:
        raise ZooError(f"cannot read {_shown(path)}: {exc}") from None
    header = bool(rows) and [c.strip().lower() for c in rows[0]] == ["path", "label"]
    files: list[str] = []
    names: list[str] = []
    for number, row in enumerate(rows[header:], start=1 + header):  # numbered as lines
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ZooError(f"{_shown(path)} row {number}: expected path,label; got {row!r}")
        files.append(_member(root, row[0].strip(), f"{_shown(path)} row {number}"))
        names.append(row[1].strip())
    if not files:
        raise ZooError(f"{_shown(path)} lists no images; write one path,label row per image")
    classes = sorted(set(names))
    labels = torch.tensor([classes.index(n) for n in names], dtype=torch.int64)
    train, val = _stratified_split(
        labels, lambda n: max(1, int(n * 0.2 + 0.5)) if n >= 2 else 0)
    pick = (train if split == "train" else val).tolist()
    return _SplitFiles(root, "train" if split == "train" else "val", classes,
                       [files[i] for i in pick], labels[pick], [root / f for f in files], [])


def _member(root: Path, text: str, where: str) -> str:
    """``text`` as a path inside ``root`` that is a regular file reached through no symbolic
    link; or a ZooError saying why not."""
    parts = Path(text).parts
    if Path(text).is_absolute() or ".." in parts or not parts:
        raise ZooError(f"{where}: {text!r} is not a path inside the CSV's folder; list files "
                       "relative to it, without '..'")
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            raise ZooError(f"{where}: no such file {_shown(current)}") from None
        if stat.S_ISLNK(mode):
            raise ZooError(f"{where}: {_shown(current)} is a symbolic link, and zoo never "
                           "follows links in a dataset; copy the file in instead")
    if not stat.S_ISREG(mode):
        raise ZooError(f"{where}: {_shown(current)} is not a regular file")
    return os.path.join(*parts)
