"""Checkpoints: a directory with model.safetensors, config.json, metrics.json and README.md.

Two kinds. **full** holds every tensor. **delta** holds only the tensors that differ from
the pretrained base (trained parameters, BN statistics of trained groups, the head,
adapters); loading rebuilds the base from the registry and checks the sha256 of its
weights file before applying the delta.

Saving never leaves a half-written checkpoint: every file is first written into a staging
folder and fsynced, a ``COMPLETE`` marker is written, then the files are moved into place.
A save killed before the marker leaves the previous checkpoint untouched; one killed
after it is rolled forward by the next load or save.

Checkpoint folders may come from strangers, and they hold the user's work, so:

- zoo moves, deletes, reads and uploads only the names in ``CHECKPOINT_FILES``, and never
  through a symbolic link: a staging folder that is a link or holds anything zoo did not
  write is refused, and so is a file that links out of the folder (a Hugging Face cache
  snapshot's links into its own ``blobs`` folder excepted).
- zoo writes only into a new or empty folder or one that is already a zoo checkpoint (it
  holds ``LOCK_FILE`` or a valid config.json), and deletes only files that its previous save
  listed in config.json's ``files``.
- One writer at a time: a save holds ``LOCK_FILE`` exclusively (a second writer gets a
  ``CheckpointError``) and moves its files into place holding ``READ_LOCK_FILE``
  exclusively; readers open the files they need under a shared ``READ_LOCK_FILE`` lock, so
  they see the old checkpoint or the new one, whole. A reader finishes an interrupted save
  only when no writer is alive, and a folder it cannot write to (a pulled snapshot) is read
  without locks, checked by the sha256 that config.json records for the weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from zoo.core._io import file_sha256, write_text_atomic
from zoo.core.arguments import CHECKPOINT_KINDS
from zoo.core.errors import CheckpointError, UnknownNameError, WeightsError, ZooError
from zoo.persist.card import model_card

if TYPE_CHECKING:
    from zoo.core.spec import Backbone

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
HISTORY_FILE = "history.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE, HISTORY_FILE)
RESUME_FILE = "resume.pt"  # written by the trainer after every epoch of a run with output_dir
STAGING = ".zoo-staging"
LOCK_FILE = ".zoo-lock"  # one writer at a time; its presence marks a folder zoo writes to
READ_LOCK_FILE = ".zoo-read-lock"  # readers share it; a save's final moves hold it alone
LOCK_TIMEOUT_S = 60.0
FORMAT_VERSION = 1
_MARKER = "COMPLETE"
# Temp files a save killed midway leaves in its staging folder: atomic_write's for the
# marker, and the one safetensors' save_file writes before renaming (Rust's tempfile).
_MARKER_TEMP = re.compile(r"\.COMPLETE\.[A-Za-z0-9_]+\.tmp|\.tmp[A-Za-z0-9]{6}")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_DIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a PyPI distribution name
_READ_ATTEMPTS = 40  # a reader racing a writer retries, 50 ms apart, before calling it corrupt


# --------------------------------------------------------------------------- the folder


def check_output_dir(directory: str | os.PathLike[str] | None, *, overwrite: bool = False,
                     resume: str | os.PathLike[str] | None = None) -> None:
    """Refuse, before any training, a folder zoo must not write a checkpoint into.

    Accepted: a missing or empty folder, the folder of the run being resumed, or a zoo
    checkpoint folder (one that already holds a checkpoint or run only with ``overwrite``).
    Refused: an existing file, or a folder holding files zoo did not write.
    """
    if directory is None:
        return
    path = Path(directory)
    if resume is not None and os.path.lexists(path) and os.path.lexists(resume) \
            and os.path.samefile(path, resume):
        return
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is an existing file, not a folder: name a new or empty "
                              "folder for the checkpoint")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not _is_zoo_folder(path, entries):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise CheckpointError(f"{path} is not empty ({shown}) and is not a zoo checkpoint: zoo "
                              "only writes into a new or empty folder or over its own "
                              "checkpoint, so choose another folder")
    if STAGING in entries:  # an interrupted save: finished now (a hostile one refused)
        recover(path)
    if not overwrite and {CONFIG_FILE, MODEL_FILE, RESUME_FILE} & set(entries):
        raise CheckpointError(f"{path} already holds a zoo checkpoint: pass --overwrite "
                              f"(overwrite=True) to replace it, or --resume {path} "
                              "(resume=...) to continue its run")


def claim_output_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (if needed) and mark it as a folder zoo writes to (``LOCK_FILE``),
    so a later run recognises it as zoo's."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path, LOCK_FILE, create=True)
    if fd is not None:
        os.close(fd)
    return path


def _is_zoo_folder(path: Path, entries: Collection[str]) -> bool:
    """Whether zoo wrote into ``path``: it holds zoo's lock file or a valid config.json."""
    if LOCK_FILE in entries and stat.S_ISREG(os.lstat(path / LOCK_FILE).st_mode):
        return True
    if CONFIG_FILE not in entries:
        return False
    try:
        read_config(path)
    except (ZooError, OSError):
        return False
    return True


def _listed_files(directory: Path) -> set[str] | None:
    """The files the folder's current config.json says zoo wrote; None when it does not say
    (no config, or one written before zoo listed every file)."""
    try:
        files = read_config(directory).get("files") or {}
    except (ZooError, OSError):
        return None
    return set(files) | {CONFIG_FILE} if METRICS_FILE in files else None


def _check_save_target(directory: Path, names: Collection[str]) -> None:
    """Refuse a save that would replace a file zoo did not write, or write through a link."""
    check_output_dir(directory, overwrite=True)
    listed = _listed_files(directory) if directory.is_dir() else None
    for name in names:
        path = directory / name
        if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
            raise CheckpointError(f"{path} is a symbolic link or not a regular file: zoo never "
                                  "writes through links; remove it or save elsewhere")
        if listed is not None and name not in listed and path.exists():
            raise CheckpointError(f"{path} was not written by zoo (its config.json does not list "
                                  "it): move it away or save elsewhere; zoo never replaces "
                                  "files it did not create")


# --------------------------------------------------------------------------- locks

_held = threading.local()  # the folders whose writer lock this thread holds


def _held_keys() -> set[tuple[int, int]]:
    if not hasattr(_held, "keys"):
        _held.keys = set()
    return _held.keys


def _folder_key(directory: Path) -> tuple[int, int]:
    info = os.stat(directory)
    return info.st_dev, info.st_ino


def _open_lock_file(directory: Path, name: str, *, create: bool) -> int | None:
    """A descriptor on a lock file, never through a link; None where it does not exist (and
    ``create`` is False) or cannot be created (a read-only folder)."""
    path = directory / name
    modes = [os.O_RDWR | os.O_CREAT] if create else []
    for mode in (*modes, os.O_RDONLY):
        try:
            fd = os.open(path, mode | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{path} is a symbolic link: zoo never follows links in "
                                      "a checkpoint folder; remove it") from None
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"{path} is not a regular file: remove it")
        return fd
    return None


@contextlib.contextmanager
def _writer_lock(directory: Path, *, required: bool) -> Iterator[bool]:
    """Hold the folder's writer lock; yields False when it cannot be taken (another writer
    holds it, or the folder is read-only) unless ``required``, which raises instead."""
    fd = _open_lock_file(directory, LOCK_FILE, create=True)
    if fd is None:
        if required:
            raise CheckpointError(f"cannot create {directory / LOCK_FILE}: zoo needs to write "
                                  "into the checkpoint folder to save")
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if required:
                raise CheckpointError(f"another zoo process is saving to {directory}: wait "
                                      "for it to finish, or save elsewhere") from None
            yield False
            return
        key = _folder_key(directory)
        _held_keys().add(key)
        try:
            yield True
        finally:
            _held_keys().discard(key)
    finally:
        os.close(fd)


def _writer_alive(directory: Path) -> bool:
    """Whether another thread or process holds the folder's writer lock right now."""
    fd = _open_lock_file(directory, LOCK_FILE, create=False)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _read_lock(directory: Path, *, exclusive: bool) -> Iterator[bool]:
    """Hold ``READ_LOCK_FILE`` (shared for readers, exclusive for a save's moves), waiting up
    to ``LOCK_TIMEOUT_S``. A reader yields False where the file does not exist."""
    fd = _open_lock_file(directory, READ_LOCK_FILE, create=exclusive)
    if fd is None:
        if exclusive:
            raise CheckpointError(f"cannot create {directory / READ_LOCK_FILE}: zoo needs to "
                                  "write into the checkpoint folder to save")
        yield False
        return
    try:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline, delay = time.monotonic() + LOCK_TIMEOUT_S, 0.001
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for "
                                          f"another zoo process using {directory}") from None
                time.sleep(delay)
                delay = min(2 * delay, 0.05)
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_fd(directory: Path) -> Iterator[int]:
    """A descriptor on the checkpoint folder (the path the user named may be a link)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"checkpoint directory {directory} does not exist") from None
    try:
        yield fd
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- saving


def _tensors_for_save(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, with tensors that share storage made independent."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ident is not None and ident in seen:
            t = t.clone()
        elif ident is not None:
            seen[ident] = key
        out[key] = t.contiguous()
    return out


def delta_state(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that are new or differ (in shape or value) from ``base``."""
    delta = {}
    for key, value in model.state_dict().items():
        ref = base.get(key)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype \
                or not torch.equal(ref.to(value.device), value):
            delta[key] = value
    return delta


def _delta_tensors(exported: nn.Module, config: Mapping[str, Any], strategy: Any,
                   prepared: bool) -> dict[str, torch.Tensor]:
    """What a delta stores: what differs from the rebuilt base, plus every tensor the base
    does not get from its weights (a new head, adapters), even if it happens to match."""
    fresh: set[str] = set()
    base = _build_base(config, strategy if prepared else None, fresh=fresh).state_dict()
    tensors = delta_state(exported, base)
    state = exported.state_dict()
    tensors.update({key: state[key] for key in fresh if key in state and key not in tensors})
    return tensors


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    kind: str = "auto",
    metrics: Mapping[str, Any] | None = None,
    strategy: Any = None,
    history: Any = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a checkpoint directory and return its path.

    ``kind="delta"`` stores only what differs from the pretrained base; ``"full"`` stores
    every tensor; ``"auto"`` is a delta when the base can be rebuilt from the registry (a
    registered weights tag), else full. An explicit ``"delta"`` that cannot be one is saved
    full with a warning. The model must come from ``zoo.create_model``/``zoo.finetune`` (it
    carries its zoo config), or ``config`` must say which backbone it is. ``directory`` must
    be new, empty or a zoo checkpoint (which is replaced); a folder holding other files is
    refused, and so is a second save to the same folder while one runs.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ZooError(f"checkpoint kind must be 'auto', 'delta' or 'full', got {kind!r}")
    directory = Path(directory)
    _check_save_target(directory, [n for n in CHECKPOINT_FILES
                                   if n != HISTORY_FILE or history is not None])
    config = dict(config or getattr(model, "zoo_config", None) or _config_from_model(model))
    if strategy is not None:  # what loading needs to prepare the model the same way
        config["strategy"] = _strategy_record(strategy)
    elif config.get("strategy"):
        strategy = _strategy_from_config(config)
    exported = strategy.export(model) if strategy is not None else model
    names_base = set(_build_base(config, None, meta=True).state_dict())
    prepared = set(exported.state_dict()) != names_base
    if prepared:
        _check_rebuilds(exported, config, strategy)
    if kind != "full" and not base_is_registered(config):
        # Nobody could rebuild a random base or weights that are not a tag of the backbone
        # (a Backbone object's own weights, a local file): only a full checkpoint loads.
        if kind == "delta":
            base = config.get("weights") or {}
            warnings.warn(
                f"saving a full checkpoint, not the delta asked for: its base "
                f"({base.get('source') or base.get('tag') or 'random initialisation'}) is not "
                f"registered weights of backbone {config['backbone']!r}, so a delta could not "
                "be rebuilt elsewhere; register the weights in a plugin to get deltas",
                stacklevel=2)
        kind = "full"
    elif kind == "auto":
        kind = "delta"
    if kind == "delta":
        tensors = _delta_tensors(exported, config, strategy, prepared)
    else:
        tensors = exported.state_dict()
    config.update(kind=kind, prepared=prepared, format_version=FORMAT_VERSION)
    config["backbone_plugin"] = _plugin_record(config["backbone"])
    _add_export_config(config)
    config.setdefault("architecture", _not_for_timm(config))
    _write_checkpoint(directory, _tensors_for_save(tensors), config, dict(metrics or {}),
                      history)
    return directory


def _strategy_record(strategy: Any) -> dict[str, Any]:
    """``{"name", "options"}`` for config.json: the registered name of ``strategy`` (also for
    an instance made directly from a registered class) and its options."""
    from zoo.core.spec import resolve_callable
    from zoo.plugins.registry import current

    name = getattr(strategy, "name", "")
    for spec in current().strategies.values() if not name else ():
        with contextlib.suppress(Exception):  # a plugin whose factory does not import
            if resolve_callable(spec.factory) is type(strategy):
                name = spec.name
                break
    if not name:
        raise ZooError(f"strategy {type(strategy).__name__} is not a registered strategy, so a "
                       "checkpoint could not name it: register it in a plugin, or make it with "
                       "zoo.models.strategy.make_strategy(NAME, options)")
    return {"name": name, "options": strategy.options()}


def _check_rebuilds(model: nn.Module, config: Mapping[str, Any], strategy: Any) -> None:
    """Refuse to save a prepared model (adapters added) that loading could not rebuild: no
    strategy recorded, or one whose ``prepare`` makes other tensors than the model has."""
    if strategy is None:
        raise ZooError("the model has tensors its backbone lacks (adapters?) but no strategy "
                       "is recorded: pass strategy= (e.g. make_strategy('lora', {'rank': 4})), "
                       "the one that prepared it")
    from zoo.plugins.registry import get_backbone

    try:
        rebuilt = _build_base(config, None, meta=True)
        rebuilt = strategy.prepare(rebuilt, get_backbone(config["backbone"]).layer_groups(rebuilt))
    except Exception:  # a strategy whose prepare needs real tensors: checked at load time
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    again = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if own != again:
        odd = sorted(set(own) ^ set(again)) or [k for k in own if own[k] != again[k]]
        record = config.get("strategy") or {}
        raise ZooError(f"strategy {record.get('name')!r} with options {record.get('options')} "
                       f"does not rebuild this model's tensors (e.g. {odd[0]}): pass the strategy, "
                       "with the options, that prepared the model")


def base_is_registered(config: Mapping[str, Any]) -> bool:
    """Whether the config's base weights are a registered tag of its backbone: only then
    can a delta checkpoint be rebuilt on another machine."""
    from zoo.plugins.registry import get_backbone

    weights = config.get("weights")
    if not weights:
        return False
    return weights.get("tag") in {w.tag for w in get_backbone(config["backbone"]).weights}


def _add_export_config(config: dict[str, Any]) -> None:
    """Let the backbone add keys other tools' loaders need (full checkpoints only)."""
    from zoo.core.spec import resolve_callable
    from zoo.plugins.registry import get_backbone

    spec = get_backbone(config["backbone"])
    if config["kind"] == "full" and spec.export_config is not None:
        extra = resolve_callable(spec.export_config)(dict(config))
        clash = set(extra) & {"backbone", "weights", "num_classes", "kind", "strategy"}
        config.update({k: v for k, v in extra.items() if k not in clash or k == "num_classes"})


def _plugin_record(backbone: str) -> dict[str, str | None]:
    """The plugin that registers ``backbone`` and the distribution that ships it, so that
    loading the checkpoint where it is missing can say what to ``pip install``."""
    from zoo.plugins.manager import plugin_distribution
    from zoo.plugins.registry import get_backbone

    plugin = get_backbone(backbone).plugin
    return {"name": plugin, "distribution": plugin_distribution(plugin) if plugin else None}


def _not_for_timm(config: Mapping[str, Any]) -> str:
    """config.json's ``architecture`` for a checkpoint timm cannot load: timm's Hub loader
    reads it as a model name, so ``timm.create_model("hf-hub:...")`` fails saying this
    (``Unknown model (...)``) instead of raising ``KeyError: 'architecture'``."""
    what = "a delta (only the changed tensors)" if config["kind"] == "delta" else \
        "a model timm cannot load as it is"
    return (f"zoo checkpoint of {config['backbone']}, {what}: it needs zoo, not timm; "
            "pip install zoo, then zoo.from_pretrained('hf-hub:REPO')")


def _config_from_model(model: nn.Module) -> dict[str, Any]:
    name = getattr(model, "zoo_backbone", None)
    if name is None:
        raise ZooError("this model was not built by zoo: pass config= naming its backbone "
                       "(or build it with zoo.create_model)")
    from zoo.core import __version__
    from zoo.models.build import num_outputs
    from zoo.plugins.registry import get_backbone

    spec = get_backbone(name)
    weights = getattr(model, "zoo_weights", None)
    pre = {"input_size": list(spec.input_size), "mean": list(spec.mean), "std": list(spec.std)}
    if weights:
        w = spec.get_weights(weights["tag"]) if weights["tag"] in {x.tag for x in spec.weights} \
            else None
        if w is not None:
            pre = {"input_size": list(w.input_size), "mean": list(w.mean), "std": list(w.std)}
    return {"zoo_version": __version__, "backbone": name, "weights": weights,
            "num_classes": num_outputs(model, spec), "class_names": None, "strategy": None,
            "preprocessing": pre, "builder_kwargs": {}}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                      metadata: dict[str, str]) -> None:
    """``safetensors.save_file`` with its header's metadata in sorted order.

    safetensors keeps the metadata in a hash map, so its order (and the file's bytes and
    sha256) would change from process to process; sorting it in place makes the same
    tensors give the same file, so a repeated run gives a bitwise identical checkpoint.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # the same JSON in another order: it always fits
            handle.seek(8)
            handle.write(text.ljust(length))


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      metrics: dict[str, Any], history: Any) -> None:
    """Write the files into the staging folder, then move them into place (see ``recover``)."""
    directory.mkdir(parents=True, exist_ok=True)
    with _writer_lock(directory, required=True):
        recover(directory)  # a save that died before: finish or discard it
        staging = directory / STAGING
        staging.mkdir()
        _save_safetensors(tensors, staging / MODEL_FILE,
                          {"format": "pt", "zoo_kind": config["kind"]})
        texts = {METRICS_FILE: json.dumps(metrics, indent=2, default=str) + "\n",
                 CARD_FILE: model_card(config, metrics)}
        if history is not None:
            texts[HISTORY_FILE] = json.dumps(history, indent=2, default=str) + "\n"
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        config["files"] = {name: file_sha256(staging / name) for name in (MODEL_FILE, *texts)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n",
                                           encoding="utf-8")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        # Only files the previous save listed are removed (never one zoo did not write).
        remove = sorted(set(CHECKPOINT_FILES) & (_listed_files(directory) or set())
                        - set(config["files"]) - {CONFIG_FILE})
        moves = sorted(p.name for p in staging.iterdir())
        write_text_atomic(staging / _MARKER, json.dumps({"files": moves, "remove": remove}))
        recover(directory)


def recover(directory: str | os.PathLike[str]) -> None:
    """Finish an interrupted save: move its files into place if its ``COMPLETE`` marker was
    written, else discard it. Does nothing while another writer is alive or where the folder
    cannot be written to; refuses a staging folder that zoo did not leave."""
    directory = Path(directory)
    if not os.path.lexists(directory / STAGING):
        return
    if _folder_key(directory) in _held_keys():  # this thread is the writer
        _finish_staging(directory)
        return
    with _writer_lock(directory, required=False) as taken:
        if not taken:
            return
        try:
            _finish_staging(directory)
        except OSError as exc:  # a read-only folder: leave it to a reader that can write
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise


def _finish_staging(directory: Path) -> None:
    """Roll the staging folder forward (if complete) and remove it; the writer lock is held."""
    where = directory / STAGING
    with _folder_fd(directory) as folder:
        try:
            staging = os.open(STAGING, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=folder)
        except FileNotFoundError:
            return
        except OSError:
            raise CheckpointError(f"{where} is a symbolic link or not a folder, so zoo did not "
                                  f"leave it: refusing to use {directory}; remove it") from None
        try:
            names = os.listdir(staging)
            unknown = [n for n in names if n not in (*CHECKPOINT_FILES, _MARKER)
                       and not _MARKER_TEMP.fullmatch(n)]
            if unknown:
                raise CheckpointError(f"{where} holds {unknown[0]!r}, which zoo does not write: "
                                      f"refusing to use {directory}; remove {where}")
            for name in names:
                _regular_or_absent(staging, name, where / name)
            plan = _staged_plan(staging, where)
            if plan is not None:
                moves = [n for n in plan[0] if n in names]  # the rest were moved already
                for name in (*moves, *plan[1]):
                    _regular_or_absent(folder, name, directory / name)
                with _read_lock(directory, exclusive=True):
                    for name in moves:
                        os.replace(name, name, src_dir_fd=staging, dst_dir_fd=folder)
                    for name in plan[1]:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=folder)
                    os.fsync(folder)
            for name in os.listdir(staging):
                os.unlink(name, dir_fd=staging)
        finally:
            os.close(staging)
        os.rmdir(STAGING, dir_fd=folder)
        os.fsync(folder)


def _regular_or_absent(folder: int, name: str, path: Path) -> None:
    """Refuse a link, folder or device where zoo expects one of its own files."""
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is a symbolic link or not a regular file: zoo never "
                              "moves or writes through links; remove it")


def _staged_plan(staging: int, where: Path) -> tuple[list[str], list[str]] | None:
    """The COMPLETE marker's (files to move, files to remove), checked against
    ``CHECKPOINT_FILES``; None when the save did not finish writing."""
    try:
        fd = os.open(_MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        text = handle.read(64 * 1024).decode("utf-8", "replace")
    try:
        plan = json.loads(text) if text.lstrip().startswith("{") else {"files": text.split()}
        moves, removes = list(plan["files"]), list(plan.get("remove", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{where / _MARKER} is damaged, so zoo cannot finish the save it "
                              f"marks: remove {where}") from None
    for name in (*moves, *removes):
        if not isinstance(name, str) or name not in CHECKPOINT_FILES:
            raise CheckpointError(f"{where / _MARKER} names {str(name)[:60]!r}, which is not a "
                                  "checkpoint file, so zoo did not write it: refusing to use "
                                  f"{where.parent}; remove {where}")
    return list(moves), list(removes)


# --------------------------------------------------------------------------- loading


def _open_inside(directory: Path, folder: int, name: str) -> BinaryIO | None:
    """Open ``directory/name`` for reading, never through a link that leaves the folder;
    None when it does not exist."""
    path = directory / name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
        fd = _open_link(directory, name)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file: a checkpoint holds plain files")
    return os.fdopen(fd, "rb")


def _open_link(directory: Path, name: str) -> int:
    """Open what the link ``directory/name`` points to, if it stays inside the folder (or, in
    a Hugging Face cache snapshot ``.../snapshots/<commit>/``, inside that repo's blobs)."""
    target = Path(os.path.realpath(directory / name))
    roots = [Path(os.path.realpath(directory))]
    if directory.parent.name == "snapshots":
        roots.append(Path(os.path.realpath(directory.parent.parent / "blobs")))
    if not any(target.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{directory / name} is a symbolic link that leaves the checkpoint "
                              "folder: zoo never follows such links (copy the file in instead)")
    try:
        return os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"cannot read {directory / name}: {exc.strerror}") from None


def _parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    from zoo.persist.validate import validate_config

    if len(raw) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"checkpoint is corrupt: {path} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} is not valid JSON ({exc})") from None
    return validate_config(config, path)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's config.json, validated."""
    directory = Path(directory)
    with _folder_fd(directory) as folder:
        handle = _open_inside(directory, folder, CONFIG_FILE)
    if handle is None:
        raise CheckpointError(f"{directory} is not a zoo checkpoint: it has no {CONFIG_FILE}")
    with handle:
        return _parse_config(handle.read(_MAX_CONFIG_BYTES + 1), directory / CONFIG_FILE)


def _open_files(directory: Path, names: Collection[str], stack: contextlib.ExitStack
                ) -> tuple[bool, dict[str, Any], dict[str, BinaryIO]]:
    """Open config.json, model.safetensors and those of ``names`` that config.json lists,
    holding the shared read lock; return (locked, config, handles)."""
    with _folder_fd(directory) as folder, _read_lock(directory, exclusive=False) as locked:
        handles: dict[str, BinaryIO] = {}
        for name in (CONFIG_FILE, MODEL_FILE):
            handle = _open_inside(directory, folder, name)
            if handle is None and name == CONFIG_FILE \
                    and os.path.lexists(directory / "adapter_config.json"):
                raise CheckpointError(f"{directory} is a PEFT adapter, not a zoo checkpoint: "
                                      "load it with zoo.load_peft_adapter(DIR, BACKBONE)")
            if handle is None:
                raise CheckpointError(
                    f"checkpoint is corrupt: {directory} has no {name}" if name == MODEL_FILE
                    else f"{directory} is not a zoo checkpoint: it has no {name}")
            handles[name] = stack.enter_context(handle)
        config = _parse_config(handles[CONFIG_FILE].read(_MAX_CONFIG_BYTES + 1),
                               directory / CONFIG_FILE)
        listed = set(config.get("files") or {})
        for name in names:
            if name in CHECKPOINT_FILES and name not in handles \
                    and (name in listed or METRICS_FILE not in listed):
                handle = _open_inside(directory, folder, name)
                if handle is not None:
                    handles[name] = stack.enter_context(handle)
    return locked, config, handles


def _matches(config: Mapping[str, Any], model: BinaryIO) -> bool:
    """Whether the weights file has the sha256 config.json records (True if none is)."""
    expected = (config.get("files") or {}).get(MODEL_FILE)
    if not expected:
        return True
    digest = hashlib.file_digest(model, "sha256").hexdigest()
    model.seek(0)
    return digest == expected


@contextlib.contextmanager
def open_checkpoint(directory: str | os.PathLike[str],
                    names: Collection[str] = (CONFIG_FILE, MODEL_FILE)
                    ) -> Iterator[tuple[dict[str, Any], dict[str, BinaryIO]]]:
    """Open a checkpoint's files: yields (validated config, name -> binary file at offset 0).

    Always config.json and model.safetensors, and those of ``names`` that config.json lists
    (files of an older save left beside it are not part of it). The files are opened
    together under the shared read lock, so they all belong to one save, and the weights
    match config.json's sha256; a reader racing a save retries. Never follows a link out of
    the folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with contextlib.ExitStack() as stack:
        for attempt in range(1, _READ_ATTEMPTS + 1):
            recover(directory)
            with contextlib.ExitStack() as files:
                locked, config, handles = _open_files(directory, names, files)
                handles[CONFIG_FILE].seek(0)
                if _matches(config, handles[MODEL_FILE]):
                    stack.enter_context(files.pop_all())
                    break
            racing = _writer_alive(directory) or os.path.lexists(directory / STAGING) \
                or (attempt == 1 and not locked)
            if not racing or attempt == _READ_ATTEMPTS:
                raise CheckpointError(f"checkpoint is corrupt: {directory / MODEL_FILE} does "
                                      "not match the sha256 recorded in config.json (modified "
                                      "or partly written)")
            time.sleep(0.05)
        yield config, handles


def _fd_path(handle: BinaryIO) -> str:
    """A path naming the already open file itself (not whatever the name points to now)."""
    fd = handle.fileno()
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def _read_open_tensors(handle: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    """Load the open safetensors file after validating its header."""
    from safetensors.torch import load_file

    from zoo.persist.validate import validate_safetensors

    alias = _fd_path(handle)
    try:
        validate_safetensors(alias)
        return load_file(alias)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(alias, str(path))) from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path}: "
                              f"{str(exc).replace(alias, str(path))}") from None


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file after validating its header; corrupt files load nothing."""
    from zoo.persist.validate import validate_safetensors

    validate_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path}: {exc}") from None


def _strategy_from_config(config: Mapping[str, Any]) -> Any:
    from zoo.models.strategy import make_strategy

    strategy = config.get("strategy") or {}
    if not strategy.get("name"):
        return None
    return make_strategy(strategy["name"], strategy.get("options") or {})


def check_checkpoint_kwargs(spec: Backbone, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse builder arguments the backbone does not declare safe to take from a checkpoint
    (``Backbone.checkpoint_kwargs``): timm's ``checkpoint_path`` would load any local file."""
    refused = sorted(set(kwargs) - set(spec.checkpoint_kwargs))
    if refused:
        accepted = ", ".join(spec.checkpoint_kwargs) or "none"
        raise CheckpointError(f"{where}: builder_kwargs {', '.join(map(repr, refused))} are not "
                              f"arguments backbone {spec.name!r} takes from a checkpoint "
                              f"(accepted: {accepted})")


def _build_base(config: Mapping[str, Any], strategy: Any, *, meta: bool = False,
                allow_untrusted_base: bool = False, fresh: set[str] | None = None
                ) -> nn.Module:
    """The model a checkpoint starts from: its backbone with the base weights (and adapters).

    ``fresh``, if given, receives the names of the tensors that do not come from the
    weights (a new head, adapters): random at every build, so a delta must hold them.
    """
    from zoo.models.build import create_model, replace_head
    from zoo.plugins.registry import get_backbone

    spec = get_backbone(config["backbone"])
    kwargs = dict(config.get("builder_kwargs") or {})
    weights = config.get("weights")
    if meta:
        with torch.device("meta"):
            model = spec.build(config["num_classes"] if not weights else None)
        replace_head(model, spec.head, config["num_classes"])
        return model
    if weights:
        tag = weights.get("tag")
        if tag not in {w.tag for w in spec.weights}:
            source = weights.get("source", "")
            if not allow_untrusted_base:
                raise CheckpointError(
                    f"the checkpoint's base weights ({source or tag!r}) are not a registered "
                    f"weights tag of {spec.name!r}; pass allow_untrusted_base=True only if "
                    "you trust where it points"
                )
            target = source.removeprefix("file:") if source.startswith("file:") else source
        else:
            target = tag
        try:
            model = create_model(spec, weights=target, **kwargs)
        except WeightsError as exc:
            raise CheckpointError(
                f"cannot rebuild the base weights {tag!r} of {spec.name!r} that this delta "
                f"checkpoint applies to: {exc}"
            ) from exc
        actual = (model.zoo_weights or {}).get("sha256")
        if weights.get("sha256") and actual != weights["sha256"]:
            raise CheckpointError(
                f"base weights {tag!r} of {spec.name!r} have sha256 {actual[:12]}..., but the "
                f"checkpoint was trained from {weights['sha256'][:12]}...; it needs the exact "
                "base weights it was made from"
            )
        loaded = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
        replace_head(model, spec.head, config["num_classes"])
    else:
        model = create_model(spec, num_classes=config["num_classes"], **kwargs)
        loaded = set()
    if strategy is not None:
        model = strategy.prepare(model, spec.layer_groups(model))
    if fresh is not None:
        fresh.update(k for k, t in model.state_dict().items()
                     if t.numel() and t.data_ptr() not in loaded)
    return model


def load_checkpoint(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    allow_untrusted_base: bool = False) -> nn.Module:
    """Load a checkpoint directory (full or delta) as an ``nn.Module`` in eval mode.

    A delta rebuilds its base from the registry and refuses a base whose weights file has
    a different sha256 than the one the checkpoint was trained from, and a delta that lacks
    a tensor the base does not provide. Tensors whose dtype the model does not use, and
    builder arguments the backbone does not declare safe, are refused; non-finite tensors
    load with a warning.
    """
    directory = Path(directory)
    with open_checkpoint(directory) as (config, handles):
        tensors = _read_open_tensors(handles[MODEL_FILE], directory / MODEL_FILE)
    spec = _checkpoint_backbone(config, directory)
    check_checkpoint_kwargs(spec, config.get("builder_kwargs") or {}, str(directory))
    try:
        strategy = _strategy_from_config(config) if config.get("prepared") else None
    except UnknownNameError as exc:
        raise CheckpointError(f"checkpoint needs strategy plugin: {exc}") from None
    if config["kind"] == "full":
        model = _load_full(spec, config, strategy, tensors, directory)
    else:
        fresh: set[str] = set()
        model = _build_base(config, strategy, allow_untrusted_base=allow_untrusted_base,
                            fresh=fresh)
        _check_delta(tensors, fresh, directory)
        _load_strict(model, tensors, directory, partial=True)
    _warn_non_finite(tensors, directory)
    model.zoo_config = config  # type: ignore[assignment]
    model.zoo_weights = config.get("weights")  # type: ignore[assignment]
    return model.to(device).eval()


def _checkpoint_backbone(config: Mapping[str, Any], directory: Path) -> Backbone:
    """The checkpoint's backbone; if no loaded plugin registers it, an error naming the
    plugin config.json records and the distribution to ``pip install``."""
    from zoo.plugins.registry import get_backbone

    try:
        return get_backbone(config["backbone"])
    except UnknownNameError:
        plugin = config.get("backbone_plugin")
        if not isinstance(plugin, dict) or not isinstance(plugin.get("name"), str):
            raise
        dist = plugin.get("distribution")
        fix = f"pip install {dist}" if isinstance(dist, str) and _DIST_NAME.fullmatch(dist) \
            else "install the plugin that registers it"
        raise CheckpointError(
            f"checkpoint {directory} needs backbone {config['backbone']!r} from plugin "
            f"{plugin['name']!r}, which is not loaded: {fix} (or allow it in "
            "ZOO_LOAD_PLUGINS)") from None


def _load_full(spec: Backbone, config: Mapping[str, Any], strategy: Any,
               tensors: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    from zoo.models.build import build_loaded, create_model

    kwargs = dict(config.get("builder_kwargs") or {})
    if strategy is None:
        try:
            with torch.device("meta"):
                reference = create_model(spec, num_classes=config["num_classes"], **kwargs)
        except Exception:  # a builder that computes with real tensors: checked after the build
            reference = None
        if reference is not None:
            _check_fit(reference.state_dict(), tensors, directory, partial=False)
        loaded = build_loaded(spec, config["num_classes"], tensors, kwargs)
        if loaded is not None:
            return loaded
    model = create_model(spec, num_classes=config["num_classes"], **kwargs)
    if strategy is not None:
        model = strategy.prepare(model, spec.layer_groups(model))
    _load_strict(model, tensors, directory, partial=False)
    return model


def _check_delta(tensors: Mapping[str, torch.Tensor], fresh: set[str], directory: Path) -> None:
    """Refuse an empty delta, or one missing tensors the base would fill with random values."""
    if not tensors:
        raise CheckpointError(f"checkpoint {directory} is an empty delta: it holds no tensors, "
                              "so it is not a trained model; save it again from the model")
    missing = sorted(fresh - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {directory} is a partial delta: it lacks "
                              f"{len(missing)} tensors its base does not provide (e.g. "
                              f"{missing[:3]}), which would load random; save it again")


def _dtype_fits(tensor: torch.Tensor, own: torch.Tensor) -> bool:
    """The same dtype, or a narrower float (F16/BF16 weights load into F32 without loss)."""
    return tensor.dtype == own.dtype or (
        tensor.is_floating_point() and own.is_floating_point()
        and tensor.element_size() < own.element_size())


def _check_fit(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
               directory: Path, partial: bool) -> None:
    """Refuse tensors the model does not have, or has with another shape or dtype."""
    unknown = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and own[k].shape != tensors[k].shape]
    dtypes = [f"{k} is {tensors[k].dtype}, not {own[k].dtype}" for k in tensors
              if k in own and not _dtype_fits(tensors[k], own[k])]
    missing = [] if partial else [k for k in own if k not in tensors]
    if unknown or wrong or dtypes or missing:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its backbone: "
            + "; ".join(part for part in (
                f"unknown tensors {unknown[:3]}" if unknown else "",
                f"wrong shapes {wrong[:3]}" if wrong else "",
                f"wrong dtypes {dtypes[:3]}" if dtypes else "",
                f"missing tensors {missing[:3]}" if missing else "") if part)
        )


def _load_strict(model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path,
                 partial: bool) -> None:
    _check_fit(model.state_dict(), tensors, directory, partial)
    model.load_state_dict(tensors, strict=False)


def _warn_non_finite(tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Warn that a checkpoint holds NaN or infinite values: its predictions are not numbers."""
    bad = sum(1 for t in tensors.values()
              if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()))
    if bad:
        warnings.warn(f"checkpoint {directory} has {bad} tensors with NaN or infinite values: "
                      "its outputs will not be numbers (it was saved from a diverged run?)",
                      RuntimeWarning, stacklevel=3)
