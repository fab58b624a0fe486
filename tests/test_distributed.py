"""The runner under ``torchrun``: two CPU processes (gloo) train one model with DDP.

Each rank trains on its half of the data; gradients are averaged, so both ranks end with
the same weights; only rank 0 writes the resumable state and the checkpoint. ``gradual``
is used so that the set of trained tensors changes mid-run, which DDP must be told about.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import torchrun

import zoo

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys

    import torch
    import torch.distributed as dist

    import zoo

    out = sys.argv[1]
    x, y = zoo.load_data("digits", limit_per_class=4).tensors
    result = zoo.finetune(
        "cifar_resnet20", "gradual", (x, y), epochs=2, batch_size=10, lr=1e-2,
        weights=None, image_size=16, output_dir=out, checkpoint_kind="full", quiet=True)
    def digest(tensors):
        h = hashlib.sha256()
        for key, value in sorted(tensors):
            h.update(key.encode() + value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    rank = dist.get_rank()
    report = {
        "rank": rank,
        "world": dist.get_world_size(),
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "params": digest(result.model.named_parameters()),
        "buffers": digest(result.model.named_buffers()),
        "trainable": [h["trainable_params"] for h in result.history],
    }
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()
""")


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_rank0_saves_one_checkpoint(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun(SCRIPT, tmp_path, out)

    reports = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["checkpoint"] == str(out) and reports[1]["checkpoint"] is None
    # DDP kept the replicas identical, through the unfreezing step too.
    assert reports[0]["params"] == reports[1]["params"]
    assert reports[0]["trainable"][0] < reports[0]["trainable"][1]

    # Exactly one checkpoint, complete, and it loads.
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".zoo-"))
    # (rank 0 alone writes the loggers' metrics.csv and the settings' run.yaml: issue 15)
    assert names == ["README.md", "config.json", "history.json", "metrics.csv",
                     "metrics.json", "model.safetensors", "resume.pt", "run.yaml"]
    model = zoo.load_checkpoint(out)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
