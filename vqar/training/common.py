"""What every vqar trainer shares: recipes, the accelerator, schedules, EMA, checkpoints.

A recipe is a YAML file read into dataclasses by `transformers.HfArgumentParser`; any field
can be overridden on the command line (`--max_steps 10`). Checkpoints are written by
`accelerator.save_state` into a temporary folder that is renamed into place only once it is
complete, so a crash mid-write never leaves a checkpoint that looks whole. Resume restores
models, optimizers, schedulers and RNG states (accelerate), plus our own `trainer_state.json`
(step, data position) and `ema.safetensors` — nothing of ours is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import yaml
from tqdm.auto import tqdm
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging, the same for every trainer."""

    output_dir: str = "outputs/run"
    max_steps: int = 1000
    batch_size: int = 16  # per process
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95  # LlamaGen's betas for both stages
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to learning_rate * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.0  # EMA of the weights (e.g. 0.999); 0 turns it off
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    save_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    eval_every: int = 500  # steps between held-out evaluations; 0: only at the end
    log_every: int = 10
    resume: str | None = None  # "latest", or a checkpoint folder
    log_with: str = "tensorboard"  # an accelerate tracker, or "none"
    num_workers: int = 0  # DataLoader workers
    max_bad_steps: int = 10  # consecutive steps with a NaN/inf loss or gradient skipped before training stops

    def __post_init__(self):
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {self.max_bad_steps}")


# -- recipes --------------------------------------------------------------------------------


def parse_recipe(argv: list[str], dataclass_types: tuple[type, ...]) -> tuple:
    """`RECIPE.yaml [--field value ...]` -> one instance per dataclass type.

    The YAML's values become the defaults of an HfArgumentParser, so the command line overrides
    any of them. Dict-valued fields take JSON on the command line.
    """
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:  # HfArgumentParser would call dict("...") on a dict field
        if action.type is dict:
            action.type = json.loads
    recipe_args, overrides = _split_recipe(argv)
    if recipe_args is not None:
        recipe = yaml.safe_load(Path(recipe_args).read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"recipe {recipe_args} has unknown field(s) {unknown}; known fields: {sorted(known - {'help'})}")
        parser.set_defaults(**recipe)
    return parser.parse_args_into_dataclasses(args=overrides)


def _split_recipe(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and not argv[0].startswith("-"):
        if not Path(argv[0]).is_file():
            raise FileNotFoundError(f"recipe {argv[0]} does not exist")
        return argv[0], argv[1:]
    return None, argv


def resolved_recipe(*configs) -> dict:
    """All fields of the recipe dataclasses, merged: what a run actually used."""
    merged = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged


def save_resolved_recipe(path: Path, *configs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_recipe(*configs), sort_keys=False))


# -- accelerator, optimiser, schedule -------------------------------------------------------


def make_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator for this run; trackers are started by `begin_run`."""
    log_with = None if train.log_with in ("none", "") else train.log_with
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=train.output_dir, logging_dir=f"{train.output_dir}/logs"),
    )
    set_seed(train.seed)  # same on every process: models start identical, data shards differ by rank
    return accelerator


def start_trackers(accelerator: Accelerator, project_name: str, recipe: dict) -> None:
    if accelerator.log_with:
        # Trackers take scalars only: lists and dicts are logged as their JSON text.
        flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in recipe.items()}
        accelerator.init_trackers(project_name, config=flat)


def make_optimizer(params, train: TrainConfig, learning_rate: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params,
        lr=learning_rate or train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.weight_decay,
    )


def warmup_cosine(train: TrainConfig):
    """LR multiplier: linear warm-up, then cosine decay to min_lr_ratio at max_steps."""

    def multiplier(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train))


# -- EMA of the weights ---------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in names], [state[k].detach() for k in names], 1 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            raise ValueError(f"EMA weights in {path} do not match the model: {sorted(loaded.keys() ^ self.shadow.keys())[:5]}")
        for k, v in loaded.items():
            self.shadow[k].copy_(v)


# -- numerics -------------------------------------------------------------------------------


class NonFiniteStep(Exception):
    """A step whose loss or gradient norm was NaN or inf; `run_loop` skips and counts it."""


def backward_and_check(accelerator: Accelerator, loss: torch.Tensor, parameters, optimizer, max_norm: float) -> None:
    """Backward, clip to `max_norm` (0: no clipping), and raise NonFiniteStep (gradients
    cleared, nothing updated) when the loss or the gradient norm is not finite on any rank.

    One host sync per step: whether to step must be decided on the host, and on every rank
    alike, as AMP's GradScaler does.
    """
    accelerator.backward(loss)
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
    finite = (torch.isfinite(loss.detach()) & torch.isfinite(norm)).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "sum") / accelerator.num_processes
    if finite.item() < 1:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(f"loss {loss.item():.4g}, gradient norm {norm.item():.4g}")


# -- checkpoints ----------------------------------------------------------------------------


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


def save_checkpoint(accelerator: Accelerator, train: TrainConfig, state: dict, ema: EMA | None) -> Path:
    """Write OUTPUT/checkpoints/step-XXXXXX atomically and keep the newest `keep_checkpoints`."""
    root = checkpoints_dir(train.output_dir)
    final = root / f"step-{state['step']:06d}"
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
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
    except OSError as error:  # disk full, quota, a vanished mount: keep what is already safe
        shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(train.output_dir)
        raise OSError(error.errno, f"could not write checkpoint {final.name} ({error.strerror or error}); "
                      f"the newest complete checkpoint, {previous[-1] if previous else 'none'}, is untouched") from error  # fmt: skip
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(train.output_dir)[: -train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None) -> dict:
    """Restore everything accelerate prepared, the EMA weights, and return trainer_state.json.

    accelerate reads optimizer, scheduler and RNG files with `torch.load(weights_only=True)`;
    a file that would need arbitrary unpickling is refused here with its checkpoint named.
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise ValueError(f"checkpoint {path} holds a file that needs unpickling arbitrary Python objects, which "
                         f"vqar refuses (it could run code); only plain tensors and numbers load: {error}") from error  # fmt: skip
    if ema is not None:
        if not (path / EMA_WEIGHTS).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {EMA_WEIGHTS}, but this run keeps an EMA")
        ema.load(path / EMA_WEIGHTS)
    return json.loads((path / TRAINER_STATE).read_text())


# -- data order -----------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, from (seed, epoch) alone: resuming needs only the epoch."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class Throughput:
    """Images (or tokens) per second over the steps since the last read."""

    def __init__(self):
        self.start, self.count = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.count += n

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.count / max(now - self.start, 1e-9)
        self.start, self.count = now, 0
        return rate


# -- the loop -------------------------------------------------------------------------------


@dataclass
class LoopHooks:
    """What a trainer plugs into `run_loop`.

    step(batch, step) -> logs (detached scalar tensors), or None when the batch held nothing.
    count(batch) -> items the batch trained on (images or tokens), for the speed readout.
    evaluate(step) -> a one-line summary; called on the main process every `eval_every` steps.
    """

    step: Callable[[dict, int], dict | None]
    count: Callable[[dict], int]
    evaluate: Callable[[int], str] | None = None
    speed_unit: str = "img_s"


def start_state() -> dict:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_images": 0, "skipped_steps": 0}


def begin_run(accelerator: Accelerator, train: TrainConfig, project: str, configs: tuple, ema: EMA | None) -> dict:
    """Save the resolved recipe, start the trackers, and return the state to start from:
    fresh, or restored from the checkpoint `train.resume` names."""
    if accelerator.is_main_process:
        save_resolved_recipe(Path(train.output_dir) / "recipe.yaml", *configs)
    start_trackers(accelerator, project, resolved_recipe(*configs))
    checkpoint = resolve_resume(train.resume, train.output_dir)
    if checkpoint is None:
        return start_state()
    state = load_checkpoint(accelerator, checkpoint, ema)
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return state


def run_loop(accelerator: Accelerator, train: TrainConfig, data: dict, state: dict, hooks: LoopHooks, ema: EMA | None) -> dict:
    """Epochs of batches until `max_steps`, with logging, evaluation and checkpoints.

    `data` holds the prepared `loader`, its `sampler` (or None for a stream) and the
    `dataset` (for `set_epoch`, or None). The data position lives in `state`, so a resumed run skips
    exactly the batches it had already trained on. Ends with a checkpoint of the final state.
    """
    progress = tqdm(total=train.max_steps, initial=state["step"], disable=not accelerator.is_main_process)
    state.setdefault("skipped_steps", 0)  # checkpoints from before step skipping existed
    stop = StopSignals()
    try:
        _epochs(accelerator, train, data, state, hooks, ema, stop, progress)
    finally:  # also when a bad-step limit, a signal or an error ends the run early
        stop.restore()
        progress.close()
    save_checkpoint(accelerator, train, state, ema)
    return state


def _epochs(accelerator, train: TrainConfig, data: dict, state: dict, hooks: LoopHooks, ema, stop, progress) -> None:
    speed, bad_in_a_row = Throughput(), 0
    while state["step"] < train.max_steps:
        if data["sampler"] is not None:
            data["sampler"].set_epoch(state["epoch"])
        if data.get("dataset") is not None:  # random crops change with the epoch
            data["dataset"].set_epoch(state["epoch"])
        skip = state["batch_in_epoch"]
        for batch in accelerator.skip_first_batches(data["loader"], skip) if skip else data["loader"]:
            state["batch_in_epoch"] += 1
            state["skipped_images"] += batch.get("skipped", 0)
            try:
                logs = hooks.step(batch, state["step"])
            except NonFiniteStep as bad:
                state["skipped_steps"] += 1
                bad_in_a_row += 1
                _after_bad_step(train, state, bad, bad_in_a_row, progress)
                continue
            if logs is None:
                continue
            bad_in_a_row = 0
            state["step"] += 1
            speed.add(hooks.count(batch) * accelerator.num_processes)
            _after_step(accelerator, train, state, logs, hooks, speed, progress, ema)
            if stop.requested(accelerator):
                stop.exit(accelerator, save_checkpoint(accelerator, train, state, ema))
            if state["step"] >= train.max_steps:
                return
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def _after_bad_step(train: TrainConfig, state: dict, bad: NonFiniteStep, in_a_row: int, progress) -> None:
    progress.write(f"step {state['step'] + 1}: skipped, non-finite ({bad}); {in_a_row} in a row")
    if in_a_row > train.max_bad_steps:
        found = complete_checkpoints(train.output_dir)
        raise RuntimeError(
            f"training stopped: {in_a_row} consecutive steps had a non-finite loss or gradient (max_bad_steps="
            f"{train.max_bad_steps}), the last at step {state['step'] + 1}. The newest good checkpoint is "
            f"{found[-1] if found else 'none'}; lower the learning rate or clip gradients, then resume from it."
        )


class StopSignals:
    """SIGTERM and SIGINT (pre-emption, Ctrl-C) finish the current step, save a checkpoint and exit.

    Every rank must stop at the same step, or the checkpoint's collectives would hang, so with
    several processes the flag is reduced across ranks each step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.restore()  # a second signal acts as usual: the way out if the step itself hangs

    def requested(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def exit(self, accelerator: Accelerator, checkpoint: Path) -> None:
        self.restore()
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        accelerator.print(f"received {name}: saved {checkpoint}; continue with --resume latest")
        accelerator.end_training()
        raise SystemExit(128 + (self.received or signal.SIGTERM))


def _after_step(accelerator, train: TrainConfig, state: dict, logs: dict, hooks: LoopHooks, speed, progress, ema) -> None:
    step, last = state["step"], state["step"] == train.max_steps
    if step % train.log_every == 0 or last:
        values = {k: v.item() for k, v in logs.items()}  # one host sync per log, not per step
        values[hooks.speed_unit] = speed.read()
        accelerator.log(values, step=step)
        progress.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}", **{hooks.speed_unit: f"{values[hooks.speed_unit]:.1f}"})
    progress.update(1)
    if hooks.evaluate and train.eval_every and step % train.eval_every == 0 and not last and accelerator.is_main_process:
        progress.write(f"step {step}: {hooks.evaluate(step)}")
    if train.save_every and step % train.save_every == 0 and not last:
        save_checkpoint(accelerator, train, state, ema)
