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
``load_peft_adapter`` (``zoo.deploy.peft_load``) can rebuild the base by itself.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from zoo.deploy.export import ExportError, _move_into_place
from zoo.models.build import model_from_config
from zoo.persist.config import base_is_registered, config_from_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
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

