"""Export a zoo model for other runtimes: ONNX, TorchScript, or a PEFT LoRA adapter.

ONNX and TorchScript files hold the whole network (LoRA adapters merged into the weights;
a delta checkpoint is loaded first, so it exports as the full model it is) and carry what
an application needs to feed it: the input size, mean, std, crop_pct, interpolation and
class names, as ONNX ``metadata_props`` or as the TorchScript extra file ``zoo.json``. The
graph takes images already scaled to [0, 1] and normalised, shaped ``(N, C, H, W)`` with
any batch size, and returns logits. Files are written atomically and never replace an
existing file unless asked to.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from zoo.core import __version__
from zoo.core.errors import ZooError
from zoo.models.build import transforms_for
from zoo.persist.config import config_from_model
from zoo.persist.hub import from_pretrained
from zoo.plugins.registry import get_backbone
from zoo.weights._hf import HUB_PREFIX

FORMATS = ("onnx", "torchscript", "peft")
METADATA_FILE = "zoo.json"  # the TorchScript extra file holding the metadata
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
EXPORT_VERSION = 1
_ONNX_LIMIT = 2 * 1024**3  # protobuf's limit for one ONNX file
_TOLERANCE = 1e-4  # largest |exported - eager| accepted by the check after export


class ExportError(ZooError):
    """A model that cannot be exported, or an output path zoo will not write."""


def export(model: nn.Module | str | os.PathLike[str], format: str = "onnx",
           out: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> Path:
    """Write ``model`` (a zoo model, or a checkpoint folder) as ``format`` to ``out``.

    ``format`` is ``"onnx"``, ``"torchscript"`` (files) or ``"peft"`` (a folder with
    ``adapter_model.safetensors`` and ``adapter_config.json``, for LoRA models). An existing
    ``out`` is replaced only with ``overwrite=True``. The exported program is run once on a
    random batch and must match the model within 1e-4. Returns the path written.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if out is None:
        raise ExportError("name the file to write: out=PATH (--out PATH)")
    out = Path(out)
    model = _as_model(model)
    if format == "peft":
        from zoo.deploy.peft_interop import export_peft  # late: peft_interop imports this module

        return export_peft(model, out, overwrite=overwrite)
    check_output_file(out, overwrite=overwrite)
    meta = export_metadata(model)
    program = merged_copy(model)
    data = _onnx_bytes(program, meta) if format == "onnx" else _torchscript_bytes(program, meta)
    write_new_file(out, data, overwrite=overwrite)
    return out


def _as_model(target: nn.Module | str | os.PathLike[str]) -> nn.Module:
    """The model itself, or the one a checkpoint folder (or ``hf-hub:`` repo) holds."""
    if isinstance(target, nn.Module):
        return target
    hub = isinstance(target, str) and target.startswith(HUB_PREFIX)
    if not hub and (not isinstance(target, str | os.PathLike) or not Path(target).is_dir()):
        raise ExportError(f"{str(target)[:200]!r} is neither a model nor a checkpoint folder: "
                          "pass an nn.Module built by zoo or a checkpoint directory")
    return from_pretrained(target)


def export_metadata(model: nn.Module) -> dict[str, Any]:
    """What an exported model needs beside its graph: preprocessing and class names."""
    config = getattr(model, "zoo_config", None) or config_from_model(model)
    pre = dict(config.get("preprocessing") or {})
    if "crop_pct" not in pre or "interpolation" not in pre:
        pre = {**_weights_preprocessing(config), **pre}
    num_classes = int(config["num_classes"])
    names = config.get("class_names") or _weights_categories(config, num_classes)
    weights = config.get("weights") or {}
    return {
        "format": "zoo-export", "version": EXPORT_VERSION, "zoo_version": __version__,
        "backbone": config["backbone"], "weights": weights.get("tag"),
        "strategy": (config.get("strategy") or {}).get("name"),
        "num_classes": num_classes,
        "class_names": list(names) if names else [str(i) for i in range(num_classes)],
        "input_size": list(pre["input_size"]), "mean": list(pre["mean"]),
        "std": list(pre["std"]), "crop_pct": float(pre.get("crop_pct", 1.0)),
        "interpolation": pre.get("interpolation", "bilinear"),
        "input": f"{INPUT_NAME}: float32 (N, C, H, W) images scaled to [0, 1], then "
                 "normalised: (x - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 (N, num_classes); softmax gives probabilities",
    }


def _weights_preprocessing(config: Mapping[str, Any]) -> dict[str, Any]:
    """crop_pct and interpolation of the checkpoint's registered weights (else a plain crop)."""
    spec = get_backbone(config["backbone"])
    tag = (config.get("weights") or {}).get("tag")
    if tag not in {w.tag for w in spec.weights}:
        return {"crop_pct": 1.0, "interpolation": "bilinear"}
    transform = transforms_for(spec, tag)
    return {"crop_pct": transform.crop_pct, "interpolation": transform.interpolation}


def _weights_categories(config: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """The class names of the registered weights, when the head still predicts them."""
    tag = (config.get("weights") or {}).get("tag")
    spec = get_backbone(config["backbone"])
    found = [w for w in spec.weights if w.tag == tag]
    categories = list(found[0].categories or ()) if found else []
    return categories if len(categories) == num_classes else None


def merged_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode with every parametrization (LoRA) merged in."""
    copied = copy.deepcopy(model).float().cpu().eval()
    for module in list(copied.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def _example(meta: Mapping[str, Any], batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *meta["input_size"], generator=generator)


def _check_close(exported: torch.Tensor, model: nn.Module, x: torch.Tensor, what: str) -> None:
    """Refuse an export whose output differs from the model's (a bad trace, say)."""
    with torch.no_grad():
        expected = model(x)
    diff = float((exported - expected).abs().max()) if exported.shape == expected.shape \
        else float("inf")
    if not diff <= _TOLERANCE * max(1.0, float(expected.abs().max())):
        raise ExportError(f"the {what} export of this model computes something else (largest "
                          f"difference {diff:.3g}): try the other format, and report it")


def _onnx_bytes(model: nn.Module, meta: Mapping[str, Any]) -> bytes:
    """The ONNX file (torch.onnx's dynamo exporter), batch size dynamic, metadata attached."""
    try:
        import onnx  # optional: zoo[export]
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'zoo[export]'") \
            from None
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= _ONNX_LIMIT:
        raise ExportError(f"the model has {size / 1024**3:.1f} GB of tensors, over the 2 GB an "
                          "ONNX file can hold: export it as torchscript")
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (_example(meta, 2),), dynamo=True, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"torch.onnx cannot export backbone {meta['backbone']!r} "
                          f"({type(exc).__name__}: {first}); try --format torchscript") from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, onnx_metadata(meta))
    proto.doc_string = f"{meta['backbone']} exported by zoo {meta['zoo_version']}"
    data = proto.SerializeToString()
    _check_onnx(data, model, meta)
    return data


def onnx_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """``metadata_props``: ``zoo`` holds all of it as JSON; each key is also its own entry
    (JSON-encoded unless it is a plain string), for runtimes that read single values."""
    props = {key: value if isinstance(value, str) else json.dumps(value)
             for key, value in meta.items() if value is not None}
    return {"zoo": json.dumps(dict(meta)), **props}


def _check_onnx(data: bytes, model: nn.Module, meta: Mapping[str, Any]) -> None:
    """Run the ONNX file in onnxruntime (when installed) on a batch of 3 and compare."""
    try:
        import onnxruntime  # optional: checked only when installed
    except ImportError:
        return
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _example(meta, 3, seed=1)
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    _check_close(torch.from_numpy(out), model, x, "ONNX")


def _torchscript_bytes(model: nn.Module, meta: Mapping[str, Any]) -> bytes:
    """The TorchScript file: scripted where the model allows it, else traced; ``zoo.json``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice, tracer warnings
        try:
            program, how = torch.jit.script(model), "script"
        except Exception:
            try:
                program, how = torch.jit.trace(model, _example(meta, 2), check_trace=False), \
                    "trace"
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise ExportError(f"TorchScript cannot script or trace backbone "
                                  f"{meta['backbone']!r} ({type(exc).__name__}: {first}); "
                                  "try --format onnx") from None
        x = _example(meta, 3, seed=1)
        with torch.no_grad():
            _check_close(program(x), model, x, "TorchScript")
        buffer = io.BytesIO()
        extra = {METADATA_FILE: json.dumps({**meta, "torchscript": how}, indent=2)}
        torch.jit.save(program, buffer, _extra_files=extra)
    return buffer.getvalue()


# --------------------------------------------------------------------------- writing


def check_output_file(path: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a link or a folder, or that exists."""
    if path.is_symlink():
        raise ExportError(f"{path} is a symbolic link: zoo never writes through links; remove "
                          "it or choose another --out")
    if path.is_dir():
        raise ExportError(f"{path} is a folder: --out names the file to write")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists: pass --overwrite (overwrite=True) to replace "
                          "it, or choose another --out")


def write_new_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then move it into place: with
    ``overwrite`` by rename, else by a hard link that fails if ``path`` appeared meanwhile."""
    check_output_file(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _move_into_place(tmp, path, overwrite=overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _move_into_place(tmp: str | Path, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ExportError(f"{path} already exists: pass --overwrite (overwrite=True) to replace "
                          "it, or choose another --out") from None
    except OSError as exc:  # a file system without hard links
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        check_output_file(path, overwrite=False)
        os.replace(tmp, path)
