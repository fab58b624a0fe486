"""Checkpoints: a directory with model.safetensors, config.json, metrics.json and README.md.

Two kinds. **full** holds every tensor. **delta** holds only the tensors that differ from
the pretrained base (trained parameters, BN statistics of trained groups, the head,
adapters); loading rebuilds the base from the registry and checks the sha256 of its
weights file before applying the delta.

Saving never leaves a half-written checkpoint: every file is first written into a staging
folder and fsynced, a ``COMPLETE`` marker is written, then the files are moved into place.
A save killed before the marker leaves the previous checkpoint untouched; one killed
after it is rolled forward by the next load or save.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from zoo.errors import CheckpointError, UnknownNameError, WeightsError, ZooError
from zoo.weights import file_sha256

CHECKPOINT_KINDS = ("auto", "delta", "full")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
HISTORY_FILE = "history.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE, HISTORY_FILE)
STAGING = ".zoo-staging"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` through a temp file in the same folder, fsync it, then rename it over.

    Readers see the old file or the new one, never a mix; a crash leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (see ``atomic_write``)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically, pretty-printed."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
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


def _base_state(config: Mapping[str, Any], strategy: Any, prepared: bool
                ) -> dict[str, torch.Tensor]:
    """The state dict of the checkpoint's base: pretrained weights (+ untrained adapters)."""
    model = _build_base(config, strategy if prepared else None)
    return model.state_dict()


def delta_state(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that are new or differ (in shape or value) from ``base``."""
    delta = {}
    for key, value in model.state_dict().items():
        ref = base.get(key)
        if ref is None or ref.shape != value.shape or ref.dtype != value.dtype \
                or not torch.equal(ref.to(value.device), value):
            delta[key] = value
    return delta


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
    carries its zoo config), or ``config`` must say which backbone it is.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ZooError(f"checkpoint kind must be 'auto', 'delta' or 'full', got {kind!r}")
    directory = Path(directory)
    config = dict(config or getattr(model, "zoo_config", None) or _config_from_model(model))
    if strategy is None and config.get("strategy"):
        strategy = _strategy_from_config(config)
    exported = strategy.export(model) if strategy is not None else model
    names_base = set(_build_base(config, None, meta=True).state_dict())
    prepared = set(exported.state_dict()) != names_base
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
        tensors = delta_state(exported, _base_state(config, strategy, prepared))
    else:
        tensors = exported.state_dict()
    config.update(kind=kind, prepared=prepared, format_version=FORMAT_VERSION)
    _add_export_config(config)
    _write_checkpoint(directory, _tensors_for_save(tensors), config, dict(metrics or {}),
                      history)
    return directory


def base_is_registered(config: Mapping[str, Any]) -> bool:
    """Whether the config's base weights are a registered tag of its backbone: only then
    can a delta checkpoint be rebuilt on another machine."""
    from zoo.registry import get_backbone

    weights = config.get("weights")
    if not weights:
        return False
    return weights.get("tag") in {w.tag for w in get_backbone(config["backbone"]).weights}


def _add_export_config(config: dict[str, Any]) -> None:
    """Let the backbone add keys other tools' loaders need (full checkpoints only)."""
    from zoo.registry import get_backbone
    from zoo.spec import resolve_callable

    spec = get_backbone(config["backbone"])
    if config["kind"] == "full" and spec.export_config is not None:
        extra = resolve_callable(spec.export_config)(dict(config))
        clash = set(extra) & {"backbone", "weights", "num_classes", "kind", "strategy"}
        config.update({k: v for k, v in extra.items() if k not in clash or k == "num_classes"})


def _config_from_model(model: nn.Module) -> dict[str, Any]:
    name = getattr(model, "zoo_backbone", None)
    if name is None:
        raise ZooError("this model was not built by zoo: pass config= naming its backbone "
                       "(or build it with zoo.create_model)")
    from zoo import __version__
    from zoo.models import num_outputs
    from zoo.registry import get_backbone

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


def _write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                      metrics: dict[str, Any], history: Any) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    staging = directory / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / MODEL_FILE),
              metadata={"format": "pt", "zoo_kind": config["kind"]})
    config["files"] = {MODEL_FILE: file_sha256(staging / MODEL_FILE)}
    files = {CONFIG_FILE: json.dumps(config, indent=2, default=str) + "\n",
             METRICS_FILE: json.dumps(metrics, indent=2, default=str) + "\n",
             CARD_FILE: model_card(config, metrics)}
    if history is not None:
        files[HISTORY_FILE] = json.dumps(history, indent=2, default=str) + "\n"
    for name, text in files.items():
        (staging / name).write_text(text, encoding="utf-8")
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    write_text_atomic(staging / "COMPLETE", "\n".join(sorted(p.name for p in staging.iterdir()
                                                            if p.name != "COMPLETE")))
    recover(directory)


def recover(directory: str | os.PathLike[str]) -> None:
    """Finish an interrupted save (roll forward if it was complete, else discard it)."""
    staging = Path(directory) / STAGING
    if not staging.is_dir():
        return
    marker = staging / "COMPLETE"
    if marker.is_file():
        for name in marker.read_text().split():
            source = staging / name
            if source.exists():
                os.replace(source, Path(directory) / name)
        stale = set(CHECKPOINT_FILES) - set(marker.read_text().split())
        for name in stale & {HISTORY_FILE}:
            (Path(directory) / name).unlink(missing_ok=True)
        _fsync_dir(Path(directory))
    shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's config.json, validated."""
    from zoo.validate import validate_config

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a zoo checkpoint: it has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path} is not valid JSON ({exc})") from None
    return validate_config(config, path)


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file after validating its header; corrupt files load nothing."""
    from zoo.validate import validate_safetensors

    validate_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"checkpoint is corrupt: {path}: {exc}") from None


def _strategy_from_config(config: Mapping[str, Any]) -> Any:
    from zoo.strategies import make_strategy

    strategy = config.get("strategy") or {}
    if not strategy.get("name"):
        return None
    return make_strategy(strategy["name"], strategy.get("options") or {})


def _build_base(config: Mapping[str, Any], strategy: Any, *, meta: bool = False,
                allow_untrusted_base: bool = False
                ) -> nn.Module:
    """The model a checkpoint starts from: its backbone with the base weights (and adapters)."""
    from zoo.models import create_model, replace_head
    from zoo.registry import get_backbone

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
        replace_head(model, spec.head, config["num_classes"])
    else:
        model = create_model(spec, num_classes=config["num_classes"], **kwargs)
    if strategy is not None:
        model = strategy.prepare(model, spec.layer_groups(model))
    return model


def load_checkpoint(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    allow_untrusted_base: bool = False) -> nn.Module:
    """Load a checkpoint directory (full or delta) as an ``nn.Module`` in eval mode.

    A delta rebuilds its base from the registry and refuses a base whose weights file has
    a different sha256 than the one the checkpoint was trained from.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    recover(directory)
    config = read_config(directory)
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise CheckpointError(f"checkpoint is corrupt: {directory} has no {MODEL_FILE}")
    expected = (config.get("files") or {}).get(MODEL_FILE)
    if expected and file_sha256(model_path) != expected:
        raise CheckpointError(f"checkpoint is corrupt: {model_path} does not match the sha256 "
                              "recorded in config.json (modified or partly written)")
    tensors = read_tensors(model_path)
    try:
        strategy = _strategy_from_config(config) if config.get("prepared") else None
    except UnknownNameError as exc:
        raise CheckpointError(f"checkpoint needs strategy plugin: {exc}") from None
    if config["kind"] == "full":
        from zoo.models import build_loaded, create_model
        from zoo.registry import get_backbone

        builder_kwargs = dict(config.get("builder_kwargs") or {})
        loaded = None if strategy is not None else build_loaded(
            get_backbone(config["backbone"]), config["num_classes"], tensors, builder_kwargs)
        if loaded is not None:
            model = loaded
        else:
            model = create_model(config["backbone"], num_classes=config["num_classes"],
                                 **builder_kwargs)
            if strategy is not None:
                model = strategy.prepare(
                    model, get_backbone(config["backbone"]).layer_groups(model))
            _load_strict(model, tensors, directory, partial=False)
    else:
        model = _build_base(config, strategy, allow_untrusted_base=allow_untrusted_base)
        _load_strict(model, tensors, directory, partial=True)
    model.zoo_config = config  # type: ignore[assignment]
    model.zoo_weights = config.get("weights")  # type: ignore[assignment]
    return model.to(device).eval()


def _load_strict(model: nn.Module, tensors: Mapping[str, torch.Tensor], directory: Path,
                 partial: bool) -> None:
    own = model.state_dict()
    unknown = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and own[k].shape != tensors[k].shape]
    missing = [] if partial else [k for k in own if k not in tensors]
    if unknown or wrong or missing:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its backbone: "
            + "; ".join(part for part in (
                f"unknown tensors {unknown[:3]}" if unknown else "",
                f"wrong shapes {wrong[:3]}" if wrong else "",
                f"missing tensors {missing[:3]}" if missing else "") if part)
        )
    model.load_state_dict(tensors, strict=False)


# --------------------------------------------------------------------------- model card


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """A Hugging Face model card (README.md): Hub YAML metadata, results, usage, training setup.

    The metadata follows the Hub's conventions (``library_name``, ``pipeline_tag``,
    ``license``, ``base_model``, ``tags``, ``datasets``, ``metrics`` and a ``model-index``
    with the validation accuracy). The load snippet names ``hf-hub:<namespace>/<name>``,
    which ``zoo.push_to_hub`` replaces with the repo pushed to. Built from the config and
    metrics only, so nothing secret (such as a token) can end up in it.
    """
    import re

    from zoo.registry import get_backbone

    hub_licenses = {  # licence identifiers the Hub accepts in card metadata (common ones)
        "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc",
        "zlib", "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
        "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
        "cc-by-nc-nd-4.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "gpl-2.0", "gpl-3.0",
        "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0", "openrail", "other"}
    q = json.dumps  # a JSON string is a valid YAML scalar, whatever characters it holds
    backbone = config["backbone"]
    strategy = (config.get("strategy") or {}).get("name") or "none"
    options = (config.get("strategy") or {}).get("options") or {}
    weights = config.get("weights") or {}
    license_, base_model = None, None
    with contextlib.suppress(ZooError):
        spec = get_backbone(backbone)
        w = next((x for x in spec.weights if x.tag == weights.get("tag")), None)
        if w is not None:
            license_ = w.license
            if w.source.startswith("hf-hub:"):
                base_model = w.source.removeprefix("hf-hub:").split("@")[0]
    timm_ready = "architecture" in config and "pretrained_cfg" in config
    dataset = config.get("dataset")
    if not (isinstance(dataset, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset)
            and dataset != "tensors"):
        dataset = None
    accuracy = metrics.get("val_accuracy")
    title = f"{backbone} fine-tuned with {strategy}"

    lines = ["---", "library_name: zoo", "pipeline_tag: image-classification"]
    if license_:
        hub_license = license_.lower()
        if hub_license in hub_licenses:
            lines.append(f"license: {hub_license}")
        else:  # the Hub refuses unknown identifiers: "other" with a name
            slug = re.sub(r"[^a-z0-9.-]+", "-", hub_license).strip("-")
            lines += ["license: other", f"license_name: {q(slug)}"]
    if base_model:
        lines.append(f"base_model: {q(base_model)}")
    tags = ["zoo", "image-classification", "transfer-learning", backbone.replace("/", "-"),
            strategy, f"{config['kind']}-checkpoint"] + (["timm"] if timm_ready else [])
    lines += ["tags:"] + [f"- {q(t)}" for t in dict.fromkeys(tags)]
    if dataset:
        lines += ["datasets:", f"- {q(dataset)}"]
    lines += ["metrics:", "- accuracy"]
    if dataset and isinstance(accuracy, int | float):
        lines += ["model-index:", f"- name: {q(title)}", "  results:",
                  "  - task:", "      type: image-classification",
                  "    dataset:", f"      name: {q(dataset)}", f"      type: {q(dataset)}",
                  "    metrics:", "    - type: accuracy", f"      value: {float(accuracy):.4f}",
                  "      name: validation accuracy"]
    lines += ["---", ""]

    base = f"`{weights['tag']}` weights" if weights.get("tag") else "random initialisation"
    lines += [f"# {title}", "",
              f"A `{backbone}` image classifier ({config['num_classes']} classes) adapted from "
              f"{base} with the `{strategy}` strategy by zoo, a plugin-based model zoo for "
              f"transfer learning. This is a **{config['kind']}** checkpoint"
              + (": it stores only the tensors that differ from the base weights, which zoo "
                 "rebuilds from its registry and checks by sha256 (the plugin that declares "
                 f"`{backbone}` must be installed)." if config["kind"] == "delta"
                 else ": it stores every tensor."), ""]
    rows = [(k, v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]
    if rows:
        lines += ["## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in rows]
        lines.append("")
    pre = config.get("preprocessing") or {}
    lines += ["## How to load it", "", "```python", "import zoo",
              'model = zoo.from_pretrained("hf-hub:<namespace>/<name>")  # or a local directory',
              "```", ""]
    if timm_ready:
        lines += ["Or with timm alone:", "", "```python", "import timm",
                  'model = timm.create_model("hf-hub:<namespace>/<name>", pretrained=True)',
                  "```", ""]
    if pre:
        size = "x".join(map(str, pre.get("input_size", [])))
        lines += [f"Inputs are {size} images scaled to [0, 1], then normalised with mean "
                  f"{pre.get('mean')} and std {pre.get('std')}.", ""]
    lines += ["## Training configuration", "",
              f"- backbone: `{backbone}`, base weights: `{weights.get('tag') or 'random'}`"
              + (f" (sha256 `{weights['sha256'][:16]}...`)" if weights.get("sha256") else ""),
              f"- strategy: `{strategy}`" + (f" with {json.dumps(options)}" if options else ""),
              f"- classes: {config['num_classes']}"
              + (f" ({', '.join(map(str, config['class_names'][:20]))}"
                 + (", ..." if len(config["class_names"]) > 20 else "") + ")"
                 if config.get("class_names") else "")]
    if config.get("dataset"):
        lines.append(f"- dataset: `{config['dataset']}`")
    if pre:
        lines.append(f"- preprocessing: {json.dumps(pre)}")
    if config.get("builder_kwargs"):
        lines.append(f"- builder arguments: {json.dumps(config['builder_kwargs'])}")
    training = config.get("training") or {}
    if training:
        lines.append("- training: " + ", ".join(f"{k}={v}" for k, v in training.items()))
    if config.get("zoo_version"):
        lines.append(f"- zoo version: {config['zoo_version']}")
    return "\n".join(lines) + "\n"

