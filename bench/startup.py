"""``zoo list`` start-up: subprocess wall time, median of several runs, against the cost of
starting Python and of importing torch. Also records which heavy modules ``zoo list``
imports (listing must not build models, so it should not need torch or timm)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import median, table

_PROBE = """
import sys
sys.argv = ["zoo", "list"]
from zoo.cli import main
try:
    main()
except SystemExit:
    pass
heavy = [m for m in ("torch", "timm", "torchvision", "huggingface_hub", "numpy", "safetensors")
         if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def _commands(python: str) -> list[tuple[str, list[str]]]:
    zoo_script = Path(python).with_name("zoo")
    cmds = [
        ("python -c pass", [python, "-c", "pass"]),
        ("python -c 'import torch'", [python, "-c", "import torch"]),
        ("python -m zoo.cli list", [python, "-m", "zoo.cli", "list"]),
    ]
    if zoo_script.is_file():
        cmds.append((f"{zoo_script.parent.name}/zoo list", [str(zoo_script), "list"]))
    return cmds


def run(repeats: int = 5, python: str | None = None, log: Any = print) -> dict[str, Any]:
    python = python or sys.executable
    env = dict(os.environ)
    rows = []
    for label, cmd in _commands(python):
        times = []
        ok = True
        subprocess.run(cmd, capture_output=True, env=env, check=False)  # warm the page cache
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
            times.append(time.perf_counter() - start)
            ok = ok and proc.returncode == 0
        rows.append({"command": label, "median_s": median(times), "min_s": min(times),
                     "max_s": max(times), "runs": repeats, "ok": ok})
        log(f"  startup {label}: median {median(times):.2f}s")
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, env=env,
                           check=False)
    heavy = next((line.split("=", 1)[1] for line in probe.stderr.splitlines()
                  if line.startswith("HEAVY=")), "?")
    return {"rows": rows, "heavy_imports_in_zoo_list": heavy.split(",") if heavy else []}


def tables(data: dict[str, Any]) -> str:
    rows = []
    for r in data["rows"]:
        is_list = r["command"].endswith(" list")
        rows.append([r["command"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}",
                     f"{r['max_s']:.2f}", r["runs"], r["ok"],
                     ("met" if r["median_s"] < 1.5 else "MISSED") if is_list else "-"])
    out = table(["command", "median s", "min s", "max s", "runs", "exit 0", "< 1.5 s"], rows,
                "Start-up time (subprocess wall time)")
    heavy = data["heavy_imports_in_zoo_list"]
    return out + f"\n  heavy modules imported by `zoo list`: {', '.join(heavy) or 'none'}"
