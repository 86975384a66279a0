"""Run the benchmark scripts, then write `benchmarks/RESULTS.md` from their records.

    python benchmarks/run_all.py                    (what `make bench` runs: every script)
    python benchmarks/run_all.py --only quality,scale_plan [--reuse]
    python benchmarks/run_all.py --results-only     (RESULTS.md from the records as they are)

Each script prints its own tables and saves them, every row with the commit, the machine and the
date it was measured at, or the commit of the earlier run it reuses, in `benchmarks/results/`
(`summary.Table`). Scripts that train models reuse a run only when it was made at the present
commit, unless `--reuse` is given. The summary at the end lists every figure next to the baseline
it was measured against in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"run_all.py", "summary.py", "provenance.py"}
REUSING = {
    "quality",
    "bpe_prior",
    "next_scale",
    "prompt_following",
}  # scripts that train, and may reuse a run with --reuse
ORDER = [  # RESULTS.md's order: what a reader looks for first
    "quality", "recipes_1d", "next_scale", "bpe_prior", "prompt_following", "steps", "convert_parity", "prior_parity", "generation_speed",
    "tokenizer_speed",
    "training_speed", "bpe_speed", "scale_plan", "scale_io", "gpu_check", "evaluate_generation",
]  # fmt: skip
INTRO = """# Measured results

Written by `python benchmarks/run_all.py` from the records in `benchmarks/results/`; every row
says where it was measured: the date, the commit and the machine, or "reused from" the commit of
an earlier run whose figures it shows. Re-run a script to measure afresh (`run_all.py --only NAME`).
"""


def write_results(path: Path = HERE / "RESULTS.md") -> Path:
    from summary import RESULTS_DIR, where

    records = {p.stem: json.loads(p.read_text()) for p in RESULTS_DIR.glob("*.json")}
    names = [n for n in ORDER if n in records] + sorted(set(records) - set(ORDER))
    parts = [INTRO]
    for name in names:
        for table in records[name].values():
            parts.append(f"## {table['title']}\n")
            if table.get("command"):
                parts.append(f"`{table['command']}`\n")
            if table.get("notes"):
                parts.append(table["notes"] + "\n")
            lines = ["| " + " | ".join([*table["columns"], "measured"]) + " |"]
            lines.append("|---" * (len(table["columns"]) + 1) + "|")
            lines += ["| " + " | ".join([*row["cells"], where(row)]) + " |" for row in table["rows"]]
            parts.append("\n".join(lines) + "\n")
    path.write_text("\n".join(parts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated script names (without .py)")
    parser.add_argument("--reuse", action="store_true", help="let training scripts show runs of another commit")
    parser.add_argument("--results-only", action="store_true", help="only write RESULTS.md from the records")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.results_only:
        print(f"wrote {write_results()}")
        return
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP)
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [p for p in scripts if p.stem in wanted]
    with tempfile.TemporaryDirectory() as folder:
        summary = Path(folder) / "rows.jsonl"
        env = {**os.environ, "VQAR_BENCH_SUMMARY": str(summary), "PYTHONPATH": str(HERE)}
        for script in scripts:
            print(f"== {script.name}", flush=True)
            extra = ["--reuse"] if args.reuse and script.stem in REUSING else []
            subprocess.run([sys.executable, str(script), *extra], env=env, check=True)
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
    print(f"\nwrote {write_results()}")


if __name__ == "__main__":
    main()
