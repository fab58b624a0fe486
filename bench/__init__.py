"""zoo's benchmarks: the runner against hand-written PyTorch loops, in the same process.

Run everything with ``python -m bench`` (``--quick`` for a short pass, ``--only NAME`` for
one part); see ``bench/README.md`` for what is measured, the sizes chosen and the results.
Benchmarks print ratios, never assert on time; ``tests/test_bench.py`` only smoke-tests the
harness on a tiny configuration.
"""

from __future__ import annotations

SECTIONS = ("training", "augment", "memory", "cache", "checkpoints", "startup")
