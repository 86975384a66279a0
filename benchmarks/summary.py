"""Rows for the one table `make bench` prints: each script records its figures with `record`.

When VQAR_BENCH_SUMMARY names a file (run_all.py sets it), each row is appended to it as a JSON
line; run on its own, a script only prints its own table.
"""

from __future__ import annotations

import json
import os


def record(benchmark: str, measure: str, value: float, unit: str, baseline: str, baseline_value: float) -> None:
    """One figure next to its baseline from the same run (the ratio is value / baseline_value)."""
    path = os.environ.get("VQAR_BENCH_SUMMARY")
    if not path:
        return
    row = {
        "benchmark": benchmark,
        "measure": measure,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
