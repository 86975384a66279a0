"""What the benchmark scripts share: `best_seconds`, `interleaved_best_seconds`, and `record` for the one table `make bench` prints.

When VQAR_BENCH_SUMMARY names a file (run_all.py sets it), each row is appended to it as a JSON
line; run on its own, a script only prints its own table.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from provenance import provenance


def best_seconds(fn, repeats: int, warm_up: bool = True) -> float:
    """The fastest of `repeats` timed calls of fn (after one untimed call with `warm_up`): the least
    disturbed run on a noisy shared machine."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best_seconds(fns: dict, repeats: int) -> dict:
    """{name: the fastest of `repeats` timed calls} for several callables timed in turn, the order
    reversed every round (after one untimed call of each): what drifts on a shared machine, and
    the allocator's state that one call leaves to the next, fall on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        for name in list(fns) if round_ % 2 == 0 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def record(
    benchmark: str, measure: str, value: float, unit: str, baseline: str, baseline_value: float, reused_from=None
) -> None:
    """One figure next to its baseline from the same run (the ratio is value / baseline_value), with where
    it was measured."""
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
        **provenance(not reused_from, reused_from),
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# -- tables with their provenance, for RESULTS.md -------------------------------------------------

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # one JSON record per script: what RESULTS.md is made of


class Table:
    """A benchmark's table: rows with where each was measured, printed as Markdown and saved as
    `benchmarks/results/<benchmark>.json` (each run replaces the script's record), from which
    `run_all.py` writes `benchmarks/RESULTS.md`."""

    def __init__(self, benchmark: str, title: str, columns: list[str], notes: str = ""):
        self.benchmark, self.title, self.columns, self.notes = benchmark, title, list(columns), notes
        self.rows: list[dict] = []

    def add(self, cells: list, *, reused_from: str | None = None) -> None:
        """One row; `reused_from`: the commit of an earlier run whose figures these are (None: measured now)."""
        self.rows.append({"cells": [str(c) for c in cells], **provenance(not reused_from, reused_from)})

    def markdown(self) -> str:
        lines = ["| " + " | ".join([*self.columns, "measured"]) + " |", "|---" * (len(self.columns) + 1) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join([*row["cells"], where(row)]) + " |")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.markdown(), flush=True)

    def save(self, key: str | None = None) -> Path:
        """Store the table (under `key` when a script writes several); returns the record's path."""
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{self.benchmark}.json"
        record_tables = json.loads(path.read_text()) if path.is_file() else {}
        record_tables[key or self.title] = {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "command": " ".join(["python", *sys.argv]) if sys.argv[0].endswith(".py") else "",
        }
        path.write_text(json.dumps(record_tables, indent=1) + "\n")
        return path


def where(row: dict) -> str:
    """A row's provenance in a cell: "now, abc1234, date" or "reused from abc1234"."""
    if row.get("measured"):
        return f"{row['date']}, {row['commit']}, {row['machine']}"
    return f"reused from {row['reused_from']} ({row['machine']})"


class _Tee(io.TextIOBase):
    """stdout, also kept: what a script prints is both shown and read back for its record."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, text: str) -> int:
        self.text.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def tables_in(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """The Markdown tables of printed text: (the line above the table, columns, rows)."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            # the nearest line of prose above (a table printed right after another has none of its own)
            above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            title = "" if above.startswith("|") else above
            columns = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            found.append((title, columns, rows))
        else:
            i += 1
    return found


def record_log(benchmark: str, text: str, measured_at: str) -> int:
    """Record the tables of a script's saved output (what it printed, a log kept from an earlier run) as
    reused from the commit it ran at; returns how many. For runs too long to repeat for a record."""
    found = tables_in(text)
    for n, (title, columns, rows) in enumerate(found):
        table = Table(benchmark, title or f"table {n + 1}", columns)
        for cells in rows:
            table.add(cells, reused_from=measured_at)
        table.save(key=f"{n + 1}: {title}")
    return len(found)


@contextlib.contextmanager
def recorded(benchmark: str):
    """Run a script's main inside: its provenance is printed first, and every Markdown table it prints is
    saved, each row measured now, as the script's record (`Table.save`). Scripts that reuse earlier runs
    record their tables themselves, with `Table.add(..., reused_from=...)`."""
    from provenance import header

    print(header(benchmark), flush=True)
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    if not any(arg in ("-h", "--help") for arg in sys.argv):
        for n, (title, columns, rows) in enumerate(tables_in("".join(tee.text))):
            table = Table(benchmark, title or f"table {n + 1}", columns)
            for cells in rows:
                table.add(cells)
            table.save(key=f"{n + 1}: {title}")
