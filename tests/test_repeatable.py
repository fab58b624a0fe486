"""Issue 13.7: a CPU run repeats bit for bit in a fresh process.

Same code, data, seed and thread count give the same weights and the same metrics, so the
figures the README quotes from ``make demo`` are the ones a rerun prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = """
import json, sys, torch
torch.set_num_threads(2)
import zoo
result = zoo.finetune("cifar_resnet20", "full", "digits", epochs=2, limit_per_class=12,
                      batch_size=16, weights=None, output_dir=sys.argv[1], quiet=True)
print(json.dumps({k: result.metrics[k] for k in ("val_accuracy", "val_loss", "train_loss")}))
"""


def _run(out: Path) -> tuple[bytes, dict]:
    done = subprocess.run([sys.executable, "-c", RUN, str(out)], capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return (out / "model.safetensors").read_bytes(), json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_two_fresh_processes_train_bitwise_identical_models(tmp_path):
    weights_a, metrics_a = _run(tmp_path / "a")
    weights_b, metrics_b = _run(tmp_path / "b")
    assert metrics_a == metrics_b  # exact floats, not approximately
    assert weights_a == weights_b
