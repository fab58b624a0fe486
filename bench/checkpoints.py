"""Checkpoint save/load time and size: zoo's full and delta checkpoints against a plain
``torch.save(model.state_dict())`` / ``torch.load`` + ``load_state_dict``.

The "pretrained" base is a seeded random ResNet-50 state dict saved locally and declared
as the backbone's default weights (no ImageNet weights are reachable offline). The model is
trained for one epoch on 64 images (32x32: training cost is not what is measured) with
``linear_probe`` (delta = the head) and ``partial`` (delta = layer3, layer4, the head).

The backbone is first passed to zoo as a ``Backbone`` object (``dataclasses.replace`` of
the registered one). zoo cannot rebuild a base whose weights are not a registered tag, so
a delta for it is refused or saved as full (depending on the zoo version); that is recorded
and the same base is then registered under its own name through a throwaway plugin, for
which zoo writes a real delta.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import zoo
from bench.common import MiB, ModelCase, dataset, local_base, median, table
from zoo.data.feature_cache import FeatureStore

CASE = ModelCase("resnet50", "resnet50", 32, partial={"freeze_to": "layer2"},
                 note="random ResNet-50 saved locally as the 'pretrained' base")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return median(times), value


class _BenchPlugin:
    """Registers the bench's base as a named backbone (unregistered when done)."""

    def __init__(self, backbone: zoo.Backbone) -> None:
        self.backbone = backbone

    @zoo.hookimpl
    def register_backbones(self, register: Callable[[zoo.Backbone], None]) -> None:
        register(self.backbone)


def run(workdir: Path, *, repeats: int = 3, case: ModelCase = CASE,
        strategies: tuple[str, ...] = ("linear_probe", "partial"),
        log: Any = print, device: str = "cpu") -> dict[str, Any]:
    """Save and load zoo checkpoints of a model trained on ``device`` (loads go to the CPU,
    where a checkpoint is opened), against torch.save / torch.load of the same model."""
    from zoo.persist.checkpoint import load_checkpoint, save_checkpoint
    from zoo.plugins.manager import get_plugin_manager

    base = local_base(case, workdir)
    data = dataset(64, case.image_size)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    registered = dataclasses.replace(base.backbone, name=f"bench_{case.key}")
    plugin = _BenchPlugin(registered)
    pm = get_plugin_manager()
    try:
        for strategy in strategies:
            options = dict(case.partial) if strategy == "partial" else {}
            for how, backbone in (("Backbone object", base.backbone),
                                  ("registered name", registered)):
                if how == "registered name" and not pm.is_registered(plugin):
                    pm.register(plugin, name="bench-backbones")
                model = zoo.finetune(backbone, strategy, (data.x, data.y), epochs=1,
                                     strategy_options=options, weights="default",
                                     num_classes=10, feature_store=FeatureStore(),
                                     quiet=True, scheduler=None, device=device).model
                for kind in ("full", "delta"):
                    target = workdir / f"ckpt-{strategy}-{kind}"
                    shutil.rmtree(target, ignore_errors=True)
                    try:
                        save_s, _ = _timed(lambda k=kind, t=target, m=model:
                                           save_checkpoint(m, t, kind=k), repeats)
                        load_s, loaded = _timed(lambda t=target: load_checkpoint(
                            t, allow_untrusted_base=True), repeats)
                    except zoo.ZooError as exc:
                        errors[f"{strategy}/{kind} via {how}"] = f"{type(exc).__name__}: {exc}"
                        log(f"  checkpoint {strategy} {kind} via {how}: {type(exc).__name__}")
                        continue
                    same = all(torch.equal(a.cpu(), b.cpu()) for a, b in
                               zip(model.state_dict().values(),
                                   loaded.state_dict().values(), strict=True))
                    saved = json.loads((target / "config.json").read_text())["kind"]
                    if saved != kind:
                        errors[f"{strategy}/{kind} via {how}"] = (
                            f"asked for a {kind} checkpoint, zoo saved a {saved} one")
                    rows.append({
                        "strategy": strategy, "kind": kind, "saved_as": saved, "via": how,
                        "save_s": save_s, "load_s": load_s,
                        "tensors_mib": (target / "model.safetensors").stat().st_size / MiB,
                        "dir_mib": _dir_size(target) / MiB, "roundtrip_equal": same,
                    })
                    log(f"  checkpoint {strategy} {kind} (saved {saved}) via {how}: save "
                        f"{save_s:.2f}s load {load_s:.2f}s {rows[-1]['tensors_mib']:.1f} MiB")
                if how == "Backbone object" and not any(
                        k.startswith(f"{strategy}/delta via Backbone") for k in errors):
                    break  # the direct route worked: no need for the fallback
            # The hand-written reference: torch.save / torch.load of the whole state dict.
            path = workdir / f"plain-{strategy}.pt"
            save_s, _ = _timed(lambda m=model, p=path: torch.save(m.state_dict(), p), repeats)

            def plain_load(p: Path = path) -> torch.nn.Module:
                fresh = zoo.create_model(case.backbone, num_classes=10)
                fresh.load_state_dict(torch.load(p, weights_only=True))
                return fresh

            load_s, _ = _timed(plain_load, repeats)
            rows.append({"strategy": strategy, "kind": "torch.save", "saved_as": "torch.save",
                         "via": "hand-written",
                         "save_s": save_s, "load_s": load_s,
                         "tensors_mib": path.stat().st_size / MiB,
                         "dir_mib": path.stat().st_size / MiB, "roundtrip_equal": True})
    finally:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
    return {"model": case.backbone, "base_mib": base.path.stat().st_size / MiB,
            "rows": rows, "errors": errors}


def tables(data: dict[str, Any]) -> str:
    rows = [[r["strategy"], r["kind"], r["saved_as"], r["via"], f"{r['save_s']:.3f}",
             f"{r['load_s']:.3f}",
             f"{r['tensors_mib']:.2f}", f"{r['dir_mib']:.2f}", r["roundtrip_equal"]]
            for r in data["rows"]]
    out = table(["strategy", "asked", "saved", "via", "save s", "load s", "tensors MiB",
                 "on disk MiB", "round trip exact"], rows,
                f"Checkpoints ({data['model']}, base weights {data['base_mib']:.0f} MiB; "
                "median of repeats)")
    if data["errors"]:
        out += "\n" + "\n".join(f"  NOTE {k}: {v}" for k, v in data["errors"].items())
    return out
