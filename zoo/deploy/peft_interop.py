"""PEFT interop: zoo's LoRA adapters as a PEFT adapter folder, and back.

zoo's LoRA adds ``(B @ A) * alpha / rank`` to a layer's weight; PEFT's adds
``lora_B(lora_A(x)) * lora_alpha / r`` to its output, which is the same thing for Linear
layers and for plain convolutions (PEFT's ``lora_A`` is a conv with the layer's kernel,
stride and padding, ``lora_B`` a 1x1 conv). So the tensors map one to one, reshaped:

=============================  ======================================================
zoo (``model.state_dict()``)   PEFT (``adapter_model.safetensors``)
=============================  ======================================================
``P.parametrizations.weight    ``base_model.model.P.lora_A.weight``: (r, in) or
.0.lora_A``: (r, fan_in)       (r, in, *kernel)
``...lora_B``: (out, r)        ``base_model.model.P.lora_B.weight``: (out, r[, 1, 1])
a trained head ``fc.weight``   ``base_model.model.fc.weight`` (``modules_to_save``)
=============================  ======================================================

``adapter_config.json`` gets ``r``, ``lora_alpha``, ``target_modules`` (a regular expression
naming exactly the adapted module paths) and ``modules_to_save`` (whole modules whose
tensors differ from the base: the head). Layers PEFT cannot adapt the way zoo does are
refused rather than exported wrong: a MultiheadAttention's ``out_proj`` (the attention reads
its weight directly, so PEFT's adapter there has no effect), dilated convolutions and
padding modes other than zeros (PEFT's ``lora_A`` ignores them), and Linear/Conv
subclasses with their own ``forward``. The safetensors metadata ``zoo`` holds the zoo
config (backbone, base weights and their sha256, class names, preprocessing), so
``load_peft_adapter`` can rebuild the base by itself.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from zoo.core.errors import CheckpointError, ZooError
from zoo.deploy.export import ExportError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 1024 * 1024
MAX_RANK = 1024  # as zoo's LoRA: a rank from a stranger's file must not allocate gigabytes
_PLAIN = {nn.Linear: nn.Linear.forward, nn.Conv1d: nn.Conv1d.forward,
          nn.Conv2d: nn.Conv2d.forward, nn.Conv3d: nn.Conv3d.forward}


# --------------------------------------------------------------------------- zoo -> PEFT


def export_peft(model: nn.Module, out: str | os.PathLike[str], *, overwrite: bool = False
                ) -> Path:
    """Write ``model``'s LoRA adapters (and trained head) as a PEFT adapter folder ``out``.

    PEFT loads it with ``PeftModel.from_pretrained(base, out)``, where ``base`` is
    ``zoo.create_model(backbone, weights=TAG, num_classes=N)``: the same base weights, with
    a head of the checkpoint's size (PEFT replaces its values).
    """
    from zoo.persist.config import config_from_model

    out = Path(out)
    _check_output_folder(out, overwrite=overwrite)
    config = dict(getattr(model, "zoo_config", None) or config_from_model(model))
    adapters = lora_adapters(model)
    if not adapters:
        raise ExportError("the model has no LoRA adapters (not trained with lora, or saved with "
                          "merge=true): a PEFT adapter holds unmerged adapters")
    for path in adapters:
        check_peft_layer(model, path)
    ranks = {int(d.lora_A.shape[0]) for d in adapters.values()}
    scales = {float(d.scale) for d in adapters.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ExportError(f"the adapters have several ranks {sorted(ranks)} or scales "
                          f"{sorted(scales)}: zoo exports one rank and alpha")
    (rank,), (scale,) = ranks, scales
    saved = _modules_to_save(model, config, adapters)
    tensors = _adapter_tensors(model, adapters, saved)
    alpha = scale * rank
    adapter_config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": _base_name(config),
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": "^(" + "|".join(re.escape(p) for p in sorted(adapters)) + ")$",
        "modules_to_save": sorted(saved) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    zoo_config = {k: config.get(k) for k in (
        "zoo_version", "backbone", "weights", "num_classes", "class_names", "preprocessing",
        "builder_kwargs", "dataset")}
    zoo_config.update(kind="delta", prepared=True, strategy={
        "name": "lora", "options": {"rank": rank, "alpha": alpha,
                                    "modules": [glob.escape(p) for p in sorted(adapters)]}})
    _write_folder(out, tensors, adapter_config, zoo_config, overwrite=overwrite)
    return out


def lora_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> its LoRA parametrization (an object with ``lora_A``, ``lora_B`` and
    ``scale``), for every adapted weight; other parametrizations are refused."""
    found = {}
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        plist = module.parametrizations
        names = list(plist.keys())
        deltas = list(plist["weight"]) if "weight" in names else []
        if names != ["weight"] or len(deltas) != 1 or not all(
                hasattr(deltas[0], a) for a in ("lora_A", "lora_B", "scale")):
            raise ExportError(f"module {path!r} has parametrizations other than one LoRA "
                              f"adapter on its weight ({names}): PEFT cannot hold them")
        found[path] = deltas[0]
    return found


def check_peft_layer(model: nn.Module, path: str) -> None:
    """Refuse a layer on which PEFT's LoRA would compute something else than zoo's."""
    module = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    base = next((cls for cls in _PLAIN if isinstance(module, cls)), None)
    why = ""
    if base is None:
        why = f"it is a {type(module).__name__}, not a Linear or Conv layer"
    elif isinstance(parent, nn.MultiheadAttention):
        why = ("nn.MultiheadAttention reads this weight directly, so PEFT's adapter on it has "
               "no effect; train with the lora option modules=... leaving it out")
    elif type(module).forward is not _PLAIN[base]:
        why = f"{type(module).__name__} has its own forward, which PEFT's adapter would bypass"
    elif base is not nn.Linear and (module.groups != 1 or any(d != 1 for d in module.dilation)
                                    or module.padding_mode != "zeros"):
        why = "PEFT's conv adapter ignores groups, dilation and padding modes"
    if why:
        raise ExportError(f"cannot express the LoRA adapter on {path!r} for PEFT: {why}")


def _base_name(config: Mapping[str, Any]) -> str:
    """What ``base_model_name_or_path`` says: the Hub repo of the base weights, or
    ``zoo:BACKBONE@TAG``."""
    weights = config.get("weights") or {}
    source = weights.get("source") or ""
    if source.startswith("hf-hub:"):
        return source.removeprefix("hf-hub:")
    return f"zoo:{config['backbone']}@{weights.get('tag') or 'random'}"


def _modules_to_save(model: nn.Module, config: Mapping[str, Any],
                     adapters: Mapping[str, nn.Module]) -> set[str]:
    """The modules holding tensors that differ from the rebuilt base (the trained head);
    refused when PEFT could not save them exactly."""
    from zoo.models.build import model_from_config
    from zoo.persist.config import base_is_registered

    if not base_is_registered(config):
        raise ExportError("the model's base is not registered weights of its backbone (random "
                          "or a local file), so nobody could rebuild the base a PEFT adapter "
                          "applies to: fine-tune from registered weights")
    base = model_from_config(config).state_dict()
    own = {k: v.detach().cpu() for k, v in _base_view(model.state_dict()).items()}
    changed = {k.rpartition(".")[0] for k, v in own.items()
               if k not in base or base[k].shape != v.shape or not torch.equal(base[k], v)}
    paths = [p for p, _ in model.named_modules()]
    for name in sorted(changed):
        clash = [a for a in adapters if a == name or a.startswith(name + ".")] if name else [""]
        if clash or any(p != name and p.endswith(name) for p in paths) or any(
                re.match(rf"(^|.*\.){name}($|\..*)", a) for a in adapters):
            raise ExportError(f"tensors of module {name or 'the model itself'!r} differ from the "
                              "base, and PEFT cannot save that module apart from the adapters")
    return changed


def _base_view(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with adapters left out and adapted weights under their plain names."""
    view = {}
    for key, value in state.items():
        if ".parametrizations." not in key:
            view[key] = value
        elif key.endswith(".original"):
            module, _, rest = key.partition(".parametrizations.")
            view[f"{module}.{rest.removesuffix('.original')}"] = value
    return view


def _adapter_tensors(model: nn.Module, adapters: Mapping[str, nn.Module], saved: set[str]
                     ) -> dict[str, torch.Tensor]:
    """PEFT's tensors: A and B shaped as its Linear or conv layers, and saved modules'."""
    tensors = {}
    for path, delta in adapters.items():
        weight = model.get_submodule(path).parametrizations.weight.original
        rank = delta.lora_A.shape[0]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = delta.lora_A.detach().reshape(
            rank, *weight.shape[1:])
        tensors[f"{PREFIX}{path}.lora_B.weight"] = delta.lora_B.detach().reshape(
            weight.shape[0], rank, *[1] * (weight.dim() - 2))
    for key, value in _base_view(model.state_dict()).items():
        if key.rpartition(".")[0] in saved:
            tensors[PREFIX + key] = value.detach()
    return {k: v.cpu().contiguous().clone() for k, v in tensors.items()}


def _check_output_folder(out: Path, *, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} is a file or a symbolic link: --out names the adapter folder "
                          "to create")
    taken = [n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if os.path.lexists(out / n)]
    if taken and not overwrite:
        raise ExportError(f"{out} already holds a PEFT adapter ({taken[0]}): pass --overwrite "
                          "(overwrite=True) to replace it, or choose another --out")


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], adapter_config: dict[str, Any],
                  zoo_config: dict[str, Any], *, overwrite: bool) -> None:
    """Write both files into a temp folder beside ``out``, then move them into place (the
    weights first): a new ``out`` appears whole; other files in ``out`` are left alone."""
    from safetensors.torch import save_file

    from zoo.deploy.export import _move_into_place

    _check_output_folder(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "zoo": json.dumps(zoo_config)})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(staging / name, 0o644)
        if not os.path.lexists(out):
            with contextlib.suppress(OSError):  # lost a race: move file by file below
                os.chmod(staging, 0o755)
                os.rename(staging, out)
                return
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            _move_into_place(staging / name, out / name, overwrite=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --------------------------------------------------------------------------- PEFT -> zoo


def load_peft_adapter(folder: str | os.PathLike[str], base: str | nn.Module | None = None, *,
                      weights: str | None = None) -> nn.Module:
    """A zoo model with the PEFT LoRA adapter in ``folder`` applied to its base, in eval mode.

    ``base`` is a registered backbone name or a model built by zoo (adapted in place); by
    default the backbone zoo recorded in the adapter. The base weights are ``weights``, else
    those recorded, else the backbone's default. The result carries a zoo config, so
    ``zoo.save_checkpoint`` and ``zoo.export`` work on it.
    """
    folder = Path(folder)
    config, tensors, meta = _read_adapter(folder)
    rank, alpha = _lora_settings(config, folder)
    adapted = {k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors
               if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    if not adapted:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    plain = {k[len(PREFIX):]: v for k, v in tensors.items()
             if not k.endswith((".lora_A.weight", ".lora_B.weight"))}
    model, zoo_config = _base_model(base, weights, meta, plain, folder)
    for path in sorted(adapted):
        _require_module(model, path, folder)
        check_peft_layer(model, path)
    strategy = _prepare(model, zoo_config, rank, alpha, sorted(adapted), folder)
    _load_adapters(model, tensors, rank, folder)
    _load_plain(model, plain, folder)
    zoo_config.update(strategy={"name": strategy.name, "options": strategy.options()},
                      prepared=True)
    model.zoo_config = zoo_config  # type: ignore[assignment]
    return model.eval()


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """adapter_config.json, the tensors and zoo's metadata (empty if none), read without
    following links out of the folder and with the safetensors header checked first."""
    from safetensors import safe_open

    from zoo.persist.validate import validate_safetensors

    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder (a folder holding "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    with _open_plain(folder, ADAPTER_CONFIG) as handle:
        raw = handle.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is over {_MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not a JSON object")
    with _open_plain(folder, ADAPTER_WEIGHTS) as handle:
        alias = f"/proc/self/fd/{handle.fileno()}"
        where = str(folder / ADAPTER_WEIGHTS)
        try:
            validate_safetensors(alias)
            with safe_open(alias, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(alias, where)) from None
        except Exception as exc:
            raise CheckpointError(f"{where} is corrupt: {type(exc).__name__}") from None
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0][:80]!r} does not start with {PREFIX!r}, "
                              "so it is not a PEFT adapter saved by save_pretrained")
    return config, tensors, _zoo_metadata(metadata.get("zoo"), where)


@contextlib.contextmanager
def _open_plain(folder: Path, name: str) -> Any:
    """Open ``folder/name`` for reading, refusing a link or anything but a regular file."""
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: it has no {name}") \
            from None
    except OSError:
        raise CheckpointError(f"{folder / name} is a symbolic link or cannot be read: zoo reads "
                              "only plain files in an adapter folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{folder / name} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        yield handle


def _zoo_metadata(text: str | None, where: str) -> dict[str, Any]:
    """The zoo config recorded by ``export_peft``, validated like a config.json."""
    from zoo.persist.validate import validate_config

    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: its 'zoo' metadata is not valid JSON") from None
    return validate_config(meta, f"{where} (zoo metadata)")


def _lora_settings(config: Mapping[str, Any], folder: Path) -> tuple[int, float]:
    """``(rank, zoo alpha)`` from adapter_config.json; PEFT features zoo lacks are refused."""
    where = folder / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {str(config.get('peft_type'))[:40]!r}; "
                              "zoo reads LoRA adapters only")
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise CheckpointError(f"{where}: r must be a whole number from 1 to {MAX_RANK}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"{where}: lora_alpha must be a finite number above 0")
    unsupported = [key for key, ok in (
        ("use_dora", not config.get("use_dora")), ("bias", config.get("bias", "none") == "none"),
        ("lora_bias", not config.get("lora_bias")),
        ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("rank_pattern", not config.get("rank_pattern")),
        ("alpha_pattern", not config.get("alpha_pattern")),
        ("target_parameters", not config.get("target_parameters")),
        ("layer_replication", not config.get("layer_replication"))) if not ok]
    if unsupported:
        raise CheckpointError(f"{where}: {unsupported[0]} is set, which zoo's LoRA does not "
                              "support (one rank and alpha, adapters on weights only)")
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); zoo by alpha / r
        alpha = alpha * math.sqrt(rank)
    return rank, float(alpha)


def _base_model(base: str | nn.Module | None, weights: str | None, meta: Mapping[str, Any],
                plain: Mapping[str, torch.Tensor], folder: Path) -> tuple[nn.Module, dict]:
    """The base model the adapter applies to, and its zoo config (from the adapter's)."""
    from zoo.models.build import create_model, replace_head
    from zoo.persist.config import check_checkpoint_kwargs, config_from_model
    from zoo.plugins.registry import get_backbone

    if isinstance(base, nn.Module):
        model = base
        name = getattr(model, "zoo_backbone", None) or (
            getattr(model, "zoo_config", None) or {}).get("backbone")
        if name is None:
            raise ZooError("base= must be a model built by zoo (zoo.create_model), or a "
                           "registered backbone name")
    else:
        name = base or meta.get("backbone")
        if name is None:
            raise ZooError(f"{folder} was not written by zoo, so it does not say its base: pass "
                           "base='BACKBONE' (a registered name) and weights='TAG'")
    spec = get_backbone(name)
    recorded = meta.get("weights") or {}
    if not isinstance(base, nn.Module):
        kwargs = dict(meta.get("builder_kwargs") or {}) if name == meta.get("backbone") else {}
        check_checkpoint_kwargs(spec, kwargs, str(folder))
        tag = weights or (recorded.get("tag") if name == meta.get("backbone") else None) \
            or spec.default_weights
        if tag is None:
            raise ZooError(f"backbone {name!r} has no default weights: pass weights='TAG', the "
                           "base weights the adapter was trained on")
        model = create_model(spec, weights=tag, **kwargs)
    actual = (getattr(model, "zoo_weights", None) or {}).get("sha256")
    if recorded.get("sha256") and actual and actual != recorded["sha256"] \
            and name == meta.get("backbone"):
        raise CheckpointError(f"the base weights have sha256 {actual[:12]}..., but the adapter in "
                              f"{folder} was trained on {recorded['sha256'][:12]}...; it needs "
                              "the exact base weights it was made from")
    head = plain.get(f"{spec.head}.weight")
    if head is not None and head.dim() == 2 \
            and model.get_submodule(spec.head).weight.shape != head.shape:
        replace_head(model, spec.head, int(head.shape[0]))
    config = config_from_model(model)
    if getattr(model, "zoo_config", None):
        config.update({k: v for k, v in model.zoo_config.items()
                       if k in ("class_names", "preprocessing", "builder_kwargs", "dataset")})
    if meta and name == meta.get("backbone"):
        config.update({k: meta[k] for k in ("preprocessing", "builder_kwargs", "dataset")
                       if meta.get(k)})
        if meta.get("class_names") and len(meta["class_names"]) == config["num_classes"]:
            config["class_names"] = meta["class_names"]
    return model, config


def _require_module(model: nn.Module, path: str, folder: Path) -> None:
    try:
        model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} adapts {path[:80]!r}, which the base "
                              "model does not have: is it the adapter of another model?") \
            from None


def _prepare(model: nn.Module, config: Mapping[str, Any], rank: int, alpha: float,
             paths: list[str], folder: Path) -> Any:
    """Add zoo LoRA adapters to exactly ``paths`` (the ``modules`` option)."""
    from zoo.models.strategy import make_strategy
    from zoo.plugins.registry import get_backbone

    spec = get_backbone(config["backbone"])
    groups = spec.layer_groups(model)
    head = next(g for g in groups if g.name == "head")
    in_head = [p for p in paths if head.owns(p + ".weight")]
    if in_head:
        raise CheckpointError(f"{folder}: the adapter adapts {in_head[0]!r} in the head; zoo's "
                              "LoRA trains the head fully instead (PEFT: modules_to_save)")
    strategy = make_strategy("lora", {"rank": rank, "alpha": alpha,
                                      "modules": [glob.escape(p) for p in paths]})
    strategy.check([g.name for g in groups], model, groups)
    strategy.prepare(model, groups)
    missed = sorted(set(paths) - set(lora_adapters(model)))
    if missed:
        raise CheckpointError(f"{folder}: zoo's LoRA cannot adapt {missed[0]!r} (outside the "
                              "backbone's layer groups?)")
    return strategy


def _load_adapters(model: nn.Module, tensors: Mapping[str, torch.Tensor], rank: int,
                   folder: Path) -> None:
    """Copy PEFT's A and B into zoo's adapters, after checking their shapes."""
    for path, delta in lora_adapters(model).items():
        weight = model.get_submodule(path).parametrizations.weight.original
        shapes = {"lora_A": (rank, *weight.shape[1:]),
                  "lora_B": (weight.shape[0], rank, *[1] * (weight.dim() - 2))}
        for name, shape in shapes.items():
            key = f"{PREFIX}{path}.{name}.weight"
            tensor = tensors.get(key)
            if tensor is None or tuple(tensor.shape) != shape or not tensor.is_floating_point():
                got = "missing" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {key[:100]} should be a "
                                      f"float tensor of shape {shape}, got {got}")
            with torch.no_grad():
                getattr(delta, name).copy_(tensor.reshape(getattr(delta, name).shape))


def _load_plain(model: nn.Module, plain: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Load the modules_to_save tensors (the head), which must fit the model exactly."""
    own = model.state_dict()
    for key, tensor in plain.items():
        if key not in own or own[key].shape != tensor.shape or (
                own[key].dtype != tensor.dtype
                and not (own[key].is_floating_point() and tensor.is_floating_point())):
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensor {PREFIX}{key[:80]} does not "
                                  "fit the base model (unknown name, shape or dtype)")
    model.load_state_dict(dict(plain), strict=False)
