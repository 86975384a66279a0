"""Run the benchmark scripts, then write `benchmarks/RESULTS.md` from their records.

    python benchmarks/run_all.py                    (what `make bench` runs: every script)
    python benchmarks/run_all.py --only quality,scale_plan [--reuse]
    python benchmarks/run_all.py --results-only     (RESULTS.md from the records as they are)
    python benchmarks/run_all.py --record-log NAME LOG COMMIT   (the tables of a kept log of an earlier run)

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
SECTIONS = {  # a heading per script: what the docs link to
    "quality": "Quality per bit",
    "recipes_1d": "1D tokens",
    "next_scale": "Next-scale priors",
    "bpe_prior": "Visual BPE on the digits",
    "prompt_following": "Text prompts on shapes",
    "steps": "How many steps",
    "convert_parity": "Converted tokenizers",
    "prior_parity": "Converted LlamaGen priors",
    "generation_speed": "Sampling speed",
    "tokenizer_speed": "Tokenizer speed",
    "training_speed": "Training speed",
    "bpe_speed": "Visual BPE speed",
    "scale_plan": "Scale plan",
    "scale_io": "Data at scale",
    "gpu_check": "GPU check",
    "evaluate_generation": "Generation metrics",
}
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
        parts.append(f"## {SECTIONS.get(name, name)}\n")
        for table in records[name].values():
            title = "" if table["title"].startswith("|") else table["title"]  # records kept before titles were fixed
            parts.append(f"### {title or name}\n")
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
    parser.add_argument(
        "--record-log",
        nargs=3,
        metavar=("NAME", "LOG", "COMMIT"),
        help="record the tables script NAME printed into LOG in an earlier run at COMMIT (shown as reused from it)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.record_log:
        from summary import record_log

        name, log, commit = args.record_log
        print(f"recorded {record_log(name, Path(log).read_text(), commit)} table(s) of {name} from {log}")
    if args.results_only or args.record_log:
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
