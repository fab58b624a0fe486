"""Hugging Face model cards (README.md) for zoo checkpoints.

The metadata is built with ``huggingface_hub.ModelCardData`` and ``EvalResult``, so the Hub
reads it as it reads its own: ``library_name`` (``timm`` for a full timm checkpoint, which
then gets the Hub's timm snippet; else ``zoo``), ``base_model`` with
``base_model_relation`` (``adapter`` for a delta holding LoRA adapters, else ``finetune``),
``datasets`` (Hub ids only: a local folder's name means nothing there) and a
``model-index`` with the split the accuracy was measured on. Built from the config and
metrics only, so nothing secret (such as a token) can end up in it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zoo.core.errors import ZooError
from zoo.plugins.registry import get_backbone

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

    from zoo.core.spec import Weights

# Licence identifiers the Hub accepts in card metadata (the common ones); any other licence
# is written as "other" with a license_name.
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "isc",
    "zlib", "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "gpl-2.0", "gpl-3.0",
    "lgpl-2.1", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "epl-2.0", "openrail", "other"})

# Built-in datasets that are a copy of (part of) a Hub dataset: name -> (Hub id, what it is).
KNOWN_DATASETS = {"mnist5k": ("ylecun/mnist", "MNIST (5,000 of its images)")}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# The load snippets name this repo; zoo.push_to_hub replaces it with the repo pushed to.
PLACEHOLDER = "<namespace>/<name>"


def hub_dataset(name: Any) -> tuple[str, str | None, str] | None:
    """The Hub dataset behind a checkpoint's ``dataset`` name as (id, config, display name):
    ``hf:OWNER/NAME[:CONFIG]``, ``OWNER/NAME`` or a built-in copy of one; None for local
    data (an ImageFolder's name, tensors, a Python object), which the Hub cannot link to."""
    if not isinstance(name, str):
        return None
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name][0], None, KNOWN_DATASETS[name][1]
    repo, _, config = name.removeprefix("hf:").partition(":")
    if not _HUB_ID.fullmatch(repo) or ".." in repo:
        return None
    return repo, config or None, repo + (f" ({config})" if config else "")


def base_model_of(weights: Weights) -> str | None:
    """The Hub repo of the weights a model starts from: declared by the plugin in
    ``meta["base_model"]``, else the repo of an ``hf-hub:`` source; None if neither."""
    declared = weights.meta.get("base_model")
    if isinstance(declared, str) and _HUB_ID.fullmatch(declared):
        return declared
    if weights.source.startswith("hf-hub:"):
        return weights.source.removeprefix("hf-hub:").split("@")[0]
    return None


def _registered_weights(config: Mapping[str, Any]) -> Weights | None:
    tag = (config.get("weights") or {}).get("tag")
    with contextlib.suppress(ZooError):
        return next((w for w in get_backbone(config["backbone"]).weights if w.tag == tag), None)
    return None


def _license_fields(license_: str | None) -> dict[str, str]:
    if not license_:
        return {}
    hub_license = license_.lower()
    if hub_license in HUB_LICENSES:
        return {"license": hub_license}
    slug = re.sub(r"[^a-z0-9.-]+", "-", hub_license).strip("-")
    return {"license": "other", "license_name": slug}


def timm_ready(config: Mapping[str, Any]) -> bool:
    """Whether plain timm loads the checkpoint (a full one with timm's config keys)."""
    return config.get("kind") == "full" and isinstance(config.get("pretrained_cfg"), dict) \
        and "architecture" in config


def title(config: Mapping[str, Any]) -> str:
    """The card's heading, and the model's name in the model-index."""
    strategy = (config.get("strategy") or {}).get("name") or "none"
    return f"{config['backbone']} fine-tuned with {strategy}"


def card_data(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> ModelCardData:
    """The card's metadata as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import EvalResult, ModelCardData  # lazy: only to write a card

    weights = _registered_weights(config)
    base_model = base_model_of(weights) if weights is not None else None
    relation = "adapter" if config.get("kind") == "delta" and config.get("prepared") \
        else "finetune"
    strategy = (config.get("strategy") or {}).get("name") or "none"
    ready = timm_ready(config)
    tags = ["zoo", "image-classification", "transfer-learning",
            config["backbone"].replace("/", "-"), strategy, f"{config['kind']}-checkpoint"]
    if ready or config["backbone"].startswith("timm/"):
        tags.append("timm")
    dataset = hub_dataset(config.get("dataset"))
    accuracy = metrics.get("val_accuracy")
    results = None
    if dataset is not None and isinstance(accuracy, int | float) \
            and not isinstance(accuracy, bool):
        results = [EvalResult(
            task_type="image-classification", dataset_type=dataset[0],
            dataset_name=dataset[2], dataset_config=dataset[1],
            dataset_split=str(config.get("val_split") or "validation"),
            metric_type="accuracy", metric_value=round(float(accuracy), 4),
            metric_name="validation accuracy")]
    extra = {"base_model_relation": relation} if base_model else {}
    return ModelCardData(
        library_name="timm" if ready else "zoo",
        pipeline_tag="image-classification",
        base_model=base_model,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset[0]] if dataset else None,
        metrics=["accuracy"],
        model_name=title(config) if results else None,
        eval_results=results,
        **_license_fields(weights.license if weights is not None else None),
        **extra,
    )


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The checkpoint's README.md: Hub metadata, then results, how to load it, and the
    training setup. The load snippets name ``hf-hub:<namespace>/<name>``, which
    ``zoo.push_to_hub`` replaces with the repo pushed to."""
    data = card_data(config, metrics)
    return f"---\n{data.to_yaml()}\n---\n\n" + _body(config, metrics)


def _kind_text(config: Mapping[str, Any]) -> str:
    """What kind of checkpoint this is, and what it needs."""
    plugin = config.get("backbone_plugin") or {}
    install = "pip install zoo" + (
        f" {plugin['distribution']}" if plugin.get("distribution") not in (None, "zoo") else "")
    if config["kind"] == "delta":
        return ("This is a **delta** checkpoint: it stores only the tensors that differ from "
                "the base weights, so **it needs zoo to load** (`" + install + "`): zoo "
                "rebuilds the base from its registry, checks it by sha256 and applies the "
                "delta. timm, transformers and other tools cannot load it on their own.")
    return "This is a **full** checkpoint: it stores every tensor."


def _body(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    backbone = config["backbone"]
    strategy = (config.get("strategy") or {}).get("name") or "none"
    weights = config.get("weights") or {}
    base = f"`{weights['tag']}` weights" if weights.get("tag") else "random initialisation"
    lines = [f"# {title(config)}", "",
             f"A `{backbone}` image classifier ({config['num_classes']} classes) adapted from "
             f"{base} with the `{strategy}` strategy by zoo, a plugin-based model zoo for "
             f"transfer learning. {_kind_text(config)}", ""]
    rows = [(k, v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]
    if rows:
        lines += ["## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in rows]
        lines.append("")
    lines += ["## How to load it", "", "```python", "import zoo",
              f'model = zoo.from_pretrained("hf-hub:{PLACEHOLDER}")  # or a local directory',
              "```", ""]
    if timm_ready(config):
        lines += ["Or with timm alone:", "", "```python", "import timm",
                  f'model = timm.create_model("hf-hub:{PLACEHOLDER}", pretrained=True)',
                  "```", ""]
    pre = config.get("preprocessing") or {}
    if pre:
        size = "x".join(map(str, pre.get("input_size", [])))
        lines += [f"Inputs are {size} images scaled to [0, 1], then normalised with mean "
                  f"{pre.get('mean')} and std {pre.get('std')}.", ""]
    return "\n".join(lines + _training_lines(config)) + "\n"


def _training_lines(config: Mapping[str, Any]) -> list[str]:
    weights = config.get("weights") or {}
    strategy = config.get("strategy") or {}
    options = strategy.get("options") or {}
    names = config.get("class_names") or []
    lines = ["## Training configuration", "",
             f"- backbone: `{config['backbone']}`, base weights: "
             f"`{weights.get('tag') or 'random'}`"
             + (f" (sha256 `{weights['sha256'][:16]}...`)" if weights.get("sha256") else ""),
             f"- strategy: `{strategy.get('name') or 'none'}`"
             + (f" with {json.dumps(options)}" if options else ""),
             f"- classes: {config['num_classes']}"
             + (f" ({', '.join(map(str, names[:20]))}" + (", ..." if len(names) > 20 else "")
                + ")" if names else "")]
    if config.get("dataset"):
        lines.append(f"- dataset: `{config['dataset']}`")
    if config.get("preprocessing"):
        lines.append(f"- preprocessing: {json.dumps(config['preprocessing'])}")
    if config.get("builder_kwargs"):
        lines.append(f"- builder arguments: {json.dumps(config['builder_kwargs'])}")
    if config.get("training"):
        lines.append("- training: " + ", ".join(f"{k}={v}"
                                                for k, v in config["training"].items()))
    plugin = config.get("backbone_plugin") or {}
    if plugin.get("name"):
        lines.append(f"- backbone plugin: `{plugin['name']}`"
                     + (f" (`pip install {plugin['distribution']}`)"
                        if plugin.get("distribution") else ""))
    if config.get("zoo_version"):
        lines.append(f"- zoo version: {config['zoo_version']}")
    return lines
