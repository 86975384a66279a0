"""What the benchmark scripts share: `best_seconds`, `interleaved_best_seconds`, and `record` for the one table `make bench` prints.

When VQAR_BENCH_SUMMARY names a file (run_all.py sets it), each row is appended to it as a JSON
line; run on its own, a script only prints its own table.
"""

from __future__ import annotations

import json
import os
import time


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
