"""Which images form which split: the fixed seed-0 train/val splits, an ImageFolder's class
folders and files, and the class selection and per-class limit of ``load_data``.

Splits never depend on the caller's seed, so a train and a val split never overlap.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from zoo.core.errors import UnknownNameError, ZooError
from zoo.data.sources import IMAGE_EXTENSIONS, _shown

# The seed of every fixed train/val split; it never changes, so splits never overlap.
SPLIT_SEED = 0


def _select(labels: Tensor, class_names: Sequence[str], keep: Sequence[int | str] | None,
            limit: int | None, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """Positions to keep, their new labels and the new class names (see load_data)."""
    positions = torch.arange(len(labels))
    names = list(class_names)
    if keep is not None:
        ids = [_class_id(k, names) for k in keep]
        if not ids:
            raise ZooError("classes= is empty; name at least one class to keep")
        if len(set(ids)) != len(ids):
            raise ZooError(f"classes= names a class twice: {list(keep)!r}")
        mapping = torch.full((len(names),), -1, dtype=torch.int64)
        mapping[ids] = torch.arange(len(ids))
        relabelled = mapping[labels]
        positions = positions[relabelled >= 0]
        labels = relabelled[relabelled >= 0]
        names = [names[i] for i in ids]
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ZooError(f"limit_per_class must be a positive int; got {limit!r}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        kept = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(len(names)):
            kept[order[labels[order] == c][:limit]] = True
        positions, labels = positions[kept], labels[kept]
    return positions, labels, names


def _class_id(key: int | str, names: list[str]) -> int:
    if isinstance(key, str):
        if key not in names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise UnknownNameError.for_name("class", key, names,
                                            context=f" in classes=; the classes are {shown}")
        return names.index(key)
    try:
        if isinstance(key, bool):
            raise TypeError
        index = operator.index(key)
    except TypeError:
        raise ZooError(f"classes= takes class indices or names; got {key!r}") from None
    if not 0 <= index < len(names):
        raise ZooError(f"class index {index} in classes= is out of range: the data has "
                       f"{len(names)} classes (0..{len(names) - 1})")
    return index


def _stratified_split(labels: Tensor, val_count: Callable[[int], int],
                      seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Train and val indices, in one seeded shuffled order: val takes ``val_count(n)`` of
    each class's n items."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        is_val[members[: val_count(len(members))]] = True
    return order[~is_val[order]], order[is_val[order]]


def _check_labels(labels: Tensor, num_classes: int | None, what: str) -> None:
    if len(labels) and int(labels.min()) < 0:
        raise ZooError(f"{what} holds a negative label ({int(labels.min())}); labels are class "
                       "indices 0..K-1")
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise ZooError(f"{what} holds label {int(labels.max())} but there are only "
                       f"{num_classes} classes (0..{num_classes - 1})")


@dataclass
class _SplitFiles:
    """One split of an ImageFolder: its files (relative to ``split_root``) and labels, the
    training files whose headers fix the image size, and the links that were not followed."""

    split_root: Path
    split_name: str
    classes: list[str]
    files: list[str]
    labels: Tensor
    header_files: list[Path]
    links: list[str]


def _split_files(root: Path, split: str) -> _SplitFiles:
    """Find the files of ``split`` in ``root`` (see ``_load_folder``)."""
    train_root = root / "train"
    links: list[str] = []
    if _is_real_dir(train_root):
        class_names = list(_class_folders(train_root))
        files, labels = _scan(train_root, class_names, train_root, links)
        header_files = [train_root / f for f in files]
        if split == "train":
            return _SplitFiles(train_root, "train", class_names, files, labels, header_files,
                               [str(train_root / link) for link in links])
        order = ("test", "val") if split == "test" else ("val", "test")
        found = [root / d for d in order if _is_real_dir(root / d)]
        if not found:
            raise ZooError(f"{_shown(root)} has train/ but no val/ or test/ folder; add one or "
                           "put the class folders directly in it for an 80/20 split")
        links = []
        files, labels = _scan(found[0], class_names, train_root, links)
        return _SplitFiles(found[0], found[0].name, class_names, files, labels, header_files,
                           [str(found[0] / link) for link in links])
    class_names = list(_class_folders(root))
    all_files, all_labels = _scan(root, class_names, root, links)
    train, val = _stratified_split(
        all_labels, lambda n: max(1, int(n * 0.2 + 0.5)) if n >= 2 else 0)
    pick = (train if split == "train" else val).tolist()
    return _SplitFiles(root, "train" if split == "train" else "val", class_names,
                       [all_files[i] for i in pick], all_labels[pick],
                       [root / f for f in all_files], [str(root / link) for link in links])


def _is_real_dir(path: Path) -> bool:
    """Whether ``path`` is a directory; a symlink to one is refused, never followed."""
    if path.is_symlink():
        if path.is_dir():
            raise ZooError(f"{_shown(path)} is a symbolic link to a folder; zoo never follows "
                           "links inside a dataset folder (they can loop or lead out of it): "
                           "replace it with a real folder")
        return False
    return path.is_dir()


def _class_name(folder: str) -> str:
    """A class folder's name as a class name: bytes that are not UTF-8 are shown as \\xNN, so
    the name is a plain str that JSON, model cards and terminals all accept."""
    return os.fsencode(folder).decode("utf-8", "backslashreplace")


def _class_folders(root: Path) -> dict[str, str]:
    """Class names, sorted, each mapped to its folder's name in ``root``; or a ZooError
    saying how to lay the folder out. A symlinked folder is refused (see ``_is_real_dir``)."""
    folders: dict[str, str] = {}
    for entry in _entries(root):
        if entry.name.startswith(".") or not _is_real_dir(Path(entry.path)):
            continue
        name = _class_name(entry.name)
        if name in folders:
            raise ZooError(f"{_shown(root)} has two class folders named {name!r} (once bytes "
                           "that are not UTF-8 are shown as \\xNN); rename one")
        folders[name] = entry.name
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        what = "holds images but no class folders" if loose else "has no class folders"
        raise ZooError(f"{_shown(root)} {what}; lay it out as {_shown(root)}/<class>/*.jpg (or "
                       f"{_shown(root)}/train/<class>/*.jpg with a val/ or test/ folder beside "
                       "it)")
    return dict(sorted(folders.items()))


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise ZooError(f"cannot read folder {_shown(folder)}: {exc.strerror}") from None


def _scan(root: Path, class_names: list[str], train_root: Path,
          links: list[str]) -> tuple[list[str], Tensor]:
    """Image files (relative to ``root``, sorted, searched recursively) and their labels;
    the symlinks met (not followed) are added to ``links``."""
    files: list[str] = []
    labels: list[int] = []
    present = _class_folders(root)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise ZooError(f"{_shown(root)} has class folder(s) {unknown} that "
                       f"{_shown(train_root)} lacks; the splits must share their classes")
    for label, name in enumerate(class_names):
        if name not in present:
            continue
        before = len(links)
        found = _image_files(root, present[name], links)
        if not found:
            hint = "; symbolic links are not followed" if len(links) > before else ""
            raise ZooError(f"class folder {_shown(root / present[name])} has no images "
                           f"({', '.join(IMAGE_EXTENSIONS)}){hint}; add some or remove the "
                           "folder")
        files += found
        labels += [label] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64)


def _image_files(root: Path, folder: str, links: list[str]) -> list[str]:
    """Image files under ``root/folder``, relative to ``root``, sorted. Only regular files
    are taken and no symlink is followed (a loop or a link out of the dataset would read
    files twice or from anywhere); links named like images or pointing to folders go to
    ``links``."""
    found: list[str] = []
    pending = [folder]
    while pending:
        relative = pending.pop()
        for entry in _entries(root / relative):
            child = os.path.join(relative, entry.name)
            image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink():
                if image or entry.is_dir():
                    links.append(child)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(child)
            elif image and entry.is_file(follow_symlinks=False):
                found.append(child)
    return sorted(found)
