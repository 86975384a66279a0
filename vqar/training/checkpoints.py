"""Checkpoints: written atomically, resumed exactly.

`accelerator.save_state` writes models, optimizers and schedulers into a temporary
`.partial-step-XXXXXX` folder, which is renamed into place only once `trainer_state.json` (our
step and data position) and `ema.safetensors` are in it, so a crash mid-write never leaves a
checkpoint that looks whole. Nothing of ours is pickled.

The random number generators' states are ours too (`rng_state_<rank>.safetensors`): accelerate
pickles them and, on load, takes any failure to read them — a missing, damaged or tampered file —
for a log line at INFO level, and the run goes on with other random numbers. vqar removes that
file, writes its own without pickle, and refuses to resume without it.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..weights import damaged_file
from .optim import EMA
from .recipes import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
EMA_SHARD = "ema_rank{rank}.safetensors"  # a sharded model's EMA: each process its shards
RNG_STATE = "rng_state_{rank}.safetensors"
ACCELERATE_RNG_STATE = "random_states_{rank}.pkl"


@dataclass
class TrainerState:
    """Where a run is: saved in every checkpoint as trainer_state.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on: a resumed run skips them
    unreadable: list[int | str] = field(default_factory=list)  # this rank's unreadable images, each once
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss or gradient
    best: float | None = None  # the best held-out figure so far (save_best), and its step
    best_step: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)  # checkpoints from before a field existed lack it: it keeps its default
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# -- random number generators ------------------------------------------------------------------


def save_rng_state(folder: Path, rank: int) -> None:
    """This process's Python, NumPy, torch (and CUDA) generator states, as tensors in safetensors."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    extra = {
        "python_version": version,
        "python_gauss": gauss,
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
    }
    save_file(tensors, str(folder / RNG_STATE.format(rank=rank)), metadata={"vqar": json.dumps(extra)})
    (folder / ACCELERATE_RNG_STATE.format(rank=rank)).unlink(missing_ok=True)  # ours is the one record


def load_rng_state(folder: Path, rank: int) -> None:
    """Restore what `save_rng_state` wrote, or refuse the resume naming the file."""
    path = folder / RNG_STATE.format(rank=rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {folder} has no {path.name}: without this process's random number generator states "
            "the run cannot resume exactly (a damaged checkpoint, or one written by an older vqar)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            tensors, extra = {name: f.get_tensor(name) for name in f.keys()}, json.loads(f.metadata()["vqar"])
        random.setstate((extra["python_version"], tuple(tensors["python"].tolist()), extra["python_gauss"]))
        numpy_state = ("MT19937", tensors["numpy"].numpy().astype(np.uint32), extra["numpy_pos"])
        np.random.set_state((*numpy_state, extra["numpy_has_gauss"], extra["numpy_cached_gaussian"]))
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"cannot restore the random number generators from {path} (damaged?): {error}") from error


# -- the checkpoint folders --------------------------------------------------------------------


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first. Temporary folders of interrupted writes are ignored."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one ("latest"), or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def ema_file(ema: EMA, rank: int) -> str:
    """The EMA weights' file: one for the whole model, or one per process for a sharded one."""
    return EMA_SHARD.format(rank=rank) if ema.sharded else EMA_WEIGHTS


def save_checkpoint(accelerator: Accelerator, train: TrainConfig, state: TrainerState, ema: EMA | None) -> Path:
    """Write OUTPUT/checkpoints/step-XXXXXX atomically and keep the newest `keep_checkpoints`."""
    root = checkpoints_dir(train.output_dir)
    final = root / f"step-{state.step:06d}"
    partial = root / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        save_rng_state(partial, accelerator.process_index)
        accelerator.wait_for_everyone()
        if ema is not None and (ema.sharded or accelerator.is_main_process):
            ema.save(partial / ema_file(ema, accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / TRAINER_STATE).write_text(state.to_json())  # written last: marks completeness
    except OSError as error:  # disk full, quota, a vanished mount: keep what is already safe
        shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(train.output_dir)
        raise OSError(
            error.errno,
            f"could not write checkpoint {final.name} ({error.strerror or error}); "
            f"the newest complete checkpoint, {previous[-1] if previous else 'none'}, is untouched",
        ) from error
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(train.output_dir)[: -train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


UNREADABLE = (
    ValueError,
    OSError,
    SafetensorError,
    RuntimeError,
    EOFError,
    KeyError,
)  # what a damaged checkpoint raises


def load_newest_readable(
    accelerator: Accelerator, output_dir: str, ema: EMA | None
) -> tuple[Path, TrainerState] | None:
    """`--resume latest`: the newest complete checkpoint that every process can read, falling back to
    older ones — each fall-back said — when a file in a newer one is damaged; None when there is none."""
    found, first_reason = complete_checkpoints(output_dir), None
    for path in reversed(found):
        try:
            state, why = load_checkpoint(accelerator, path, ema), None
        except UNREADABLE as error:
            state, why = None, " ".join(str(error).split())
        unreadable = torch.tensor(float(why is not None), device=accelerator.device)
        if accelerator.num_processes > 1:  # every process resumes from the same one
            unreadable = accelerator.reduce(unreadable, "sum")  # accelerate reduces by sum, mean or max only
        if unreadable.item() == 0:
            return path, state
        if accelerator.num_processes > 1:  # the main process says the reason whichever process met it
            why = _first_reason(accelerator, why)
        first_reason = first_reason or f"the newest, {path}: {why}"
        accelerator.print(f"checkpoint {path} cannot be read ({why}); trying the one before")
    if found:
        raise ValueError(
            f"none of the {len(found)} checkpoints in {checkpoints_dir(output_dir)} can be read ({first_reason})"
        )
    return None


def _first_reason(accelerator: Accelerator, why: str | None) -> str | None:
    """The first process's reason a checkpoint is unreadable, so the main process can name it."""
    reasons = gather_object([why])
    return next((f"on process {rank}: {reason}" for rank, reason in enumerate(reasons) if reason), None)


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None) -> TrainerState:
    """Restore everything accelerate prepared, the random number generators and the EMA
    weights; return the trainer state.

    accelerate reads optimizer and scheduler files with `torch.load(weights_only=True)`; a file
    that would need arbitrary unpickling is refused here with its checkpoint named.
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {path} holds a file that needs unpickling arbitrary Python objects, which "
            f"vqar refuses (it could run code); only plain tensors and numbers load: {error}"
        ) from error
    except (SafetensorError, RuntimeError, EOFError) as error:  # a truncated or overwritten file
        raise damaged_file(path, error, "checkpoint file", "resume from an earlier checkpoint") from error
    load_rng_state(path, accelerator.process_index)
    if ema is not None:
        name = ema_file(ema, accelerator.process_index)
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {name}, but this run keeps an EMA")
        ema.load(path / name)
    return TrainerState.from_json((path / TRAINER_STATE).read_text())
