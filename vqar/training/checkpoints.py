"""Checkpoints: written atomically, resumed exactly.

`accelerator.save_state` writes models, optimizers, schedulers and RNG states into a temporary
`.partial-step-XXXXXX` folder, which is renamed into place only once `trainer_state.json` (our
step and data position) and `ema.safetensors` are in it, so a crash mid-write never leaves a
checkpoint that looks whole. Nothing of ours is pickled.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from accelerate import Accelerator

from .optim import EMA
from .recipes import TrainConfig

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class TrainerState:
    """Where a run is: saved in every checkpoint as trainer_state.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on: a resumed run skips them
    unreadable: list[int | str] = field(default_factory=list)  # this rank's unreadable images, each once
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss or gradient

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)  # checkpoints from before a field existed lack it: it keeps its default
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


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
        if accelerator.is_main_process:
            if ema is not None:
                ema.save(partial / EMA_WEIGHTS)
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


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None) -> TrainerState:
    """Restore everything accelerate prepared and the EMA weights; return the trainer state.

    accelerate reads optimizer, scheduler and RNG files with `torch.load(weights_only=True)`;
    a file that would need arbitrary unpickling is refused here with its checkpoint named.
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {path} holds a file that needs unpickling arbitrary Python objects, which "
            f"vqar refuses (it could run code); only plain tensors and numbers load: {error}"
        ) from error
    if ema is not None:
        if not (path / EMA_WEIGHTS).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {EMA_WEIGHTS}, but this run keeps an EMA")
        ema.load(path / EMA_WEIGHTS)
    return TrainerState.from_json((path / TRAINER_STATE).read_text())
