#!/usr/bin/env bash
# The GPU table of issue 17 in one run: zoo against hand-written loops on one card.
#
#   bash bench/gpu.sh                       # on a CUDA machine: under 8 minutes on one H100
#   bash bench/gpu.sh --device cpu --tiny   # CPU smoke run of the same script (< 1 minute)
#   bash bench/gpu.sh --data DIR --out results.json
#
# Python: the project's .venv when there is one that imports torch, else python3 with the
# checkout on PYTHONPATH (zoo and its built-in plugins import from the source tree; nothing
# is installed or downloaded). Data: --data, $ZOO_BENCH_DATA, ../shared/data/cifar10-small or
# shared/data/cifar10-small; the script upsamples it into a temporary ImageFolder (removed at
# the end). Every other argument goes to `python -m bench.gpu` (see its --help).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python=""
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    python=.venv/bin/python
elif command -v python3 >/dev/null 2>&1 && python3 -c "import torch" >/dev/null 2>&1; then
    python="$(command -v python3)"
else
    echo "bench/gpu.sh: no Python with torch found (.venv/bin/python or python3); run 'make test' once to create .venv" >&2
    exit 2
fi
export PYTHONPATH="$root:$root/plugins${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Nothing may be fetched: every weight is made locally.
export HF_HUB_OFFLINE=1

work="$(mktemp -d "${TMPDIR:-/tmp}/zoo-gpu-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export ZOO_HOME="$work/zoo-home"

echo "bench/gpu.sh: $python ($("$python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
"$python" -m bench.gpu --workdir "$work" "$@"
