"""Run every benchmark script in this folder, then print one table of all their figures.

    python benchmarks/run_all.py        (what `make bench` runs)

Each script prints its own detailed table first; the summary lists every figure next to the
baseline it was measured against in the same run, and their ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "summary.py"}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "rows.jsonl"
        env = {**os.environ, "VQAR_BENCH_SUMMARY": str(summary), "PYTHONPATH": str(HERE)}
        for script in sorted(p for p in HERE.glob("*.py") if p.name not in SKIP):
            print(f"== {script.name}", flush=True)
            subprocess.run([sys.executable, str(script)], env=env, check=True)
            print(flush=True)
        rows = [json.loads(line) for line in summary.read_text().splitlines()] if summary.is_file() else []
    print("== summary: every figure next to its baseline, measured in the same run\n")
    print("| benchmark | measure | value | baseline | baseline value | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['benchmark']} | {r['measure']} | {r['value']:.4g} {r['unit']} | {r['baseline']} | "
            f"{r['baseline_value']:.4g} {r['unit']} | {r['value'] / r['baseline_value']:.2f}x |"
        )


if __name__ == "__main__":
    main()
