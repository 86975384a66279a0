"""Where a benchmark's figures come from: the commit, the machine, the date, and whether measured now.

Every script prints `header(...)` above its table and stores the same fields with each row it
records (`summary.record`), so that `run_all.py` can write `benchmarks/RESULTS.md` with every row's
provenance, and a row reused from an earlier run says so and from which commit.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The short commit hash of the working tree, with `+changes` when it differs from that commit."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "vqar", "benchmarks", "recipes", "tokenizers")
    return head + ("+changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model and threads, and the GPU when there is one."""
    text = f"{cpu_model()}, {os.cpu_count()} CPU threads (torch uses {torch.get_num_threads()})"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        text += ", no GPU"
    return text


def provenance(measured: bool = True, reused_from: str | None = None) -> dict:
    """The fields every recorded row carries."""
    return {
        "commit": commit() if measured else reused_from,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "measured": measured,
        "reused_from": None if measured else reused_from,
    }


def header(benchmark: str, measured: bool = True, reused_from: str | None = None) -> str:
    """One line above a script's table."""
    where = provenance(measured, reused_from)
    how = "measured now" if measured else f"reused from commit {reused_from}"
    return f"{benchmark}: {how}, commit {where['commit']}, {where['machine']}, {where['date']}"


RUN_RECORD = "provenance.json"


def reusable_run(folder: Path, reuse: bool) -> str | None:
    """The commit a cached training run in `folder` was made at, when its figures may be shown: made at the
    present commit, or at any with `reuse`. Otherwise the folder is cleared (its run is done again) and
    None returned; a folder without a record (made before records were kept) is cleared too."""
    import json
    import shutil

    record = Path(folder) / RUN_RECORD
    made_at = json.loads(record.read_text())["commit"] if record.is_file() else None
    if made_at is not None and (made_at == commit() or reuse):
        return made_at
    shutil.rmtree(folder, ignore_errors=True)
    return None


def mark_run(folder: Path) -> None:
    """Record where a training run was made, beside its outputs."""
    import json

    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / RUN_RECORD).write_text(json.dumps(provenance(measured=True)))


def reused_from(made_at: str | None) -> str | None:
    """For `Table.add`: None when the run was made at the present commit (measured now), else its commit."""
    return None if made_at in (None, commit()) else made_at
