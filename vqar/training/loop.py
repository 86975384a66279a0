"""The loop every vqar trainer runs: epochs of batches until `max_steps`, with logging, held-out
evaluation, checkpoints, NaN/inf steps skipped, stop signals honoured, and the shared finish.

A trainer builds a `Run` (its prepared model, optimiser, schedule, data and EMA) and plugs its
own step, evaluation and saving into the loop as `LoopHooks`; everything else is here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from PIL import Image
from tqdm.auto import tqdm

from ..data import report_unreadable
from . import TrainingStopped
from .checkpoints import (
    TrainerState,
    complete_checkpoints,
    load_checkpoint,
    load_newest_readable,
    resolve_resume,
    save_checkpoint,
)
from .optim import EMA, NonFiniteStep
from .recipes import TrainConfig, resolved_recipe, save_resolved_recipe

logger = logging.getLogger(__name__)

MAX_EMPTY_BATCHES = 8  # in a row, without one readable image: the source is broken, not unlucky


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


@dataclass
class TrainData:
    """The prepared training batches and what changes with the epoch."""

    loader: torch.utils.data.DataLoader
    sampler: EpochSampler | None  # None for a stream
    dataset: object | None = None  # has set_epoch (random crops change with the epoch), or None


@dataclass
class Run:
    """What every trainer's `setup` builds and the loop drives."""

    accelerator: Accelerator
    train: TrainConfig
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: TrainData
    ema: EMA | None
    latest_logs: dict = field(default_factory=dict)  # the training figures of the last logged step, as floats

    @property
    def models(self) -> tuple[torch.nn.Module, ...]:
        """What gradient accumulation must hold back the gradient sync of."""
        return (self.model,)

    @property
    def sharded(self) -> bool:
        """Whether no process holds the whole model (FSDP, DeepSpeed ZeRO-3): then only collective
        calls may run it (no sampling on the main process alone)."""
        return self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED") and (
            self.accelerator.distributed_type.value == "FSDP" or _zero_stage(self.accelerator) == 3
        )

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(
            self.model, keep_torch_compile=False
        )  # the module itself, not its compiled wrapper


@dataclass
class LoopHooks:
    """What a trainer plugs into `run_loop` and `finish_run`.

    step(batch, step) -> logs (detached scalar tensors); never called for an empty batch. With gradient
        accumulation it runs once per micro-batch, inside `accelerator.accumulate`.
    count(batch) -> items the batch holds to train on (images or tokens): 0 skips it.
    evaluate(step) -> held-out metrics (logged as eval/*); every process evaluates its share of
        the held-out data and gets the totals.
    summary(metrics) -> the one line the progress bar prints after an evaluation.
    save(model, output_dir, state_dict) -> writes the trained model's files (main process, the full
        state dict gathered from every process); returns entries for metrics.json.
    progress: {short name: log key} of the figures the progress bar shows beside the loss and speed.
    best: (held-out figure, "max" or "min"): what `save_best` keeps the weights of.
    """

    step: Callable[[dict, int], dict]
    count: Callable[[dict], int]
    evaluate: Callable[[int], dict]
    summary: Callable[[dict], str]
    save: Callable[[torch.nn.Module, Path, dict], dict]
    speed_unit: str = "img_s"
    progress: dict[str, str] = field(default_factory=dict)
    best: tuple[str, str] = ("loss", "min")


def start_trackers(accelerator: Accelerator, project: str, recipe: dict) -> None:
    """Start the run's trackers, with the resolved recipe: as text for TensorBoard (its hparams
    writer would add an empty timestamped sub-run beside the real one), as the config for others."""
    if not accelerator.log_with:
        return
    tensorboard = any(getattr(t, "value", t) == "tensorboard" for t in accelerator.log_with)
    # Trackers take scalars only: lists and dicts are logged as their JSON text.
    flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in recipe.items()}
    accelerator.init_trackers(project, config=None if tensorboard else flat)
    if tensorboard:
        accelerator.log({"recipe": "```\n" + yaml.safe_dump(recipe, sort_keys=False) + "```"}, step=0)


def log_image(accelerator: Accelerator, name: str, image: Image.Image, step: int) -> None:
    """A sample grid to the trackers that take images (TensorBoard)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image)[None]}, step=step, dataformats="NHWC")


def _zero_stage(accelerator: Accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0)


def step_optimizer(run: Run) -> None:
    """The tail of every training step, after a checked backward: update, schedule, clear, EMA.
    With gradient accumulation, accelerate's optimizer and schedule only act on the last micro-batch."""
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None and run.accelerator.sync_gradients:
        run.ema.update(run.unwrapped)


def begin_run(run: Run, project: str, configs: tuple) -> TrainerState:
    """Save the resolved recipe, start the trackers, and return the state to start from:
    fresh, or restored from the checkpoint `train.resume` names."""
    accelerator, train = run.accelerator, run.train
    if accelerator.is_main_process:
        save_resolved_recipe(Path(train.output_dir) / "recipe.yaml", *configs)
    start_trackers(accelerator, project, resolved_recipe(*configs))
    if train.resume == "latest":
        found = load_newest_readable(accelerator, train.output_dir, run.ema)
        if found is None:
            return TrainerState()
        checkpoint, state = found
    else:
        checkpoint = resolve_resume(train.resume, train.output_dir)
        if checkpoint is None:
            return TrainerState()
        state = load_checkpoint(accelerator, checkpoint, run.ema)
    accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    return state


def run_loop(run: Run, state: TrainerState, hooks: LoopHooks) -> TrainerState:
    """Epochs of batches until `max_steps`, with logging, evaluation and checkpoints.

    The data position lives in `state`, so a resumed run skips exactly the batches it had
    already trained on. Ends with a checkpoint of the final state.
    """
    loop = _Loop(run, state, hooks)
    try:
        loop.epochs()
    finally:  # also when a bad-step limit, a signal or an error ends the run early
        loop.stop.restore()
        loop.progress.close()
    save_checkpoint(run.accelerator, run.train, state, run.ema)
    return state


class _Loop:
    """One pass of `run_loop`: the state it advances and what it reports to."""

    def __init__(self, run: Run, state: TrainerState, hooks: LoopHooks):
        self.run, self.state, self.hooks, self.train = run, state, hooks, run.train
        main = run.accelerator.is_main_process
        self.progress = tqdm(total=self.train.max_steps, initial=state.step, disable=not main)
        self.speed, self.stop = Throughput(), StopSignals()
        self.bad_in_a_row = self.empty_in_a_row = 0
        self.unreadable = set(state.unreadable)

    def epochs(self) -> None:
        data, state = self.run.data, self.state
        while state.step < self.train.max_steps:
            for epoch_aware in (data.sampler, data.dataset):
                if epoch_aware is not None:
                    epoch_aware.set_epoch(state.epoch)
            for batch in self._batches(state.batch_in_epoch):
                self._train_on(send_to_device(batch, self.run.accelerator.device))
                if state.step >= self.train.max_steps:
                    return
            state.epoch += 1
            state.batch_in_epoch = 0

    def _batches(self, skip: int):
        """This epoch's batches after the first `skip` (trained on before a resume): a sampler's are
        skipped by index, a stream's rows are read without decoding their images."""
        data = self.run.data
        if not skip:
            return data.loader
        if data.sampler is None:
            data.dataset.skip_batches(skip, data.loader.batch_size)
            return data.loader
        return self.run.accelerator.skip_first_batches(data.loader, skip)

    def _train_on(self, batch: dict) -> None:
        """One batch: a step, or a skipped empty batch; then, either way, honour a stop signal."""
        accelerator, state = self.run.accelerator, self.state
        state.batch_in_epoch += 1
        if batch.get("unreadable"):
            report_unreadable(batch, self.unreadable)
            state.unreadable = sorted(self.unreadable, key=str)
        if self._empty_on_some_rank(batch):
            self._after_empty_batch()
        else:
            self.empty_in_a_row = 0
            self._step(batch)
        if self.stop.requested(accelerator):
            self.stop.exit(accelerator, save_checkpoint(accelerator, self.train, state, self.run.ema))

    def _empty_on_some_rank(self, batch: dict) -> bool:
        """Whether the batch held nothing to train on here or on another rank: all ranks skip it
        together (one rank stepping alone would wait forever in DDP's gradient all-reduce)."""
        count = self.hooks.count(batch)
        accelerator = self.run.accelerator
        if accelerator.num_processes == 1:
            return count == 0
        counts = accelerator.gather(torch.tensor([count], device=accelerator.device))
        return bool((counts == 0).any())

    def _after_empty_batch(self) -> None:
        self.empty_in_a_row += 1
        if self.empty_in_a_row >= MAX_EMPTY_BATCHES:
            raise TrainingStopped(
                f"{self.empty_in_a_row} batches in a row held no readable image ({len(self.unreadable)} unreadable "
                "images so far on this process); is the data source mostly broken files?"
            )

    def _step(self, batch: dict) -> None:
        accelerator = self.run.accelerator
        try:
            with accelerator.accumulate(*self.run.models):
                logs = self.hooks.step(batch, self.state.step)
        except NonFiniteStep as bad:
            self._after_bad_step(bad)
            return
        self.speed.add(self.hooks.count(batch) * accelerator.num_processes)
        if not accelerator.sync_gradients:  # a micro-batch: the step is not done yet
            return
        self.bad_in_a_row = 0
        self.state.step += 1
        self._after_step(logs)

    def _after_bad_step(self, bad: NonFiniteStep) -> None:
        self.state.skipped_steps += 1
        step = self.state.step + 1
        if not bad.persistent:  # an fp16 overflow the loss scaler absorbs: counted, never fatal
            self.progress.write(f"step {step}: skipped, fp16 gradient overflow ({bad})")
            return
        self.bad_in_a_row += 1
        self.progress.write(f"step {step}: skipped, non-finite ({bad}); {self.bad_in_a_row} in a row")
        if self.bad_in_a_row > self.train.max_bad_steps:
            found = complete_checkpoints(self.train.output_dir)
            raise TrainingStopped(
                f"training stopped: {self.bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                f"(max_bad_steps={self.train.max_bad_steps}), the last at step {step}. The newest good checkpoint "
                f"is {found[-1] if found else 'none'}; lower the learning rate or clip gradients, then resume from it."
            )

    def _after_step(self, logs: dict) -> None:
        accelerator, train, hooks = self.run.accelerator, self.train, self.hooks
        step, last = self.state.step, self.state.step == train.max_steps
        if step % train.log_every == 0 or last:
            values = {k: v.item() for k, v in logs.items()}  # one host sync per log, not per step
            values |= {"lr": self.run.scheduler.get_last_lr()[0], hooks.speed_unit: self.speed.read()}
            accelerator.log(values, step=step)
            self.run.latest_logs = values
            shown = {"loss": f"{values.get('loss/total', float('nan')):.4f}"}
            shown |= {short: f"{values[key]:.3g}" for short, key in hooks.progress.items() if key in values}
            self.progress.set_postfix(**shown, **{hooks.speed_unit: f"{values[hooks.speed_unit]:.1f}"})
        self.progress.update(1)
        if train.eval_every and step % train.eval_every == 0 and not last:
            metrics = hooks.evaluate(step)  # every process: its share of the held-out data
            if accelerator.is_main_process:
                self.progress.write(f"step {step}: {hooks.summary(metrics)}")
            keep_if_best(self.run, self.state, hooks, metrics)
        if train.save_every and step % train.save_every == 0 and not last:
            save_checkpoint(accelerator, train, self.state, self.run.ema)


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


# -- the finish -----------------------------------------------------------------------------


def keep_if_best(run: Run, state: TrainerState, hooks: LoopHooks, metrics: dict) -> None:
    """With `save_best`, write the model to OUTPUT/best when this held-out figure beats every earlier one."""
    name, mode = hooks.best
    value = metrics.get(name)
    if not run.train.save_best or value is None:
        return
    if state.best is not None and (value <= state.best if mode == "max" else value >= state.best):
        return
    state.best, state.best_step = value, state.step
    folder = Path(run.train.output_dir) / "best"
    full = run.accelerator.get_state_dict(run.model)  # collective: every process takes part
    if run.accelerator.is_main_process:
        hooks.save(run.unwrapped, folder, full)
        (folder / "metrics.json").write_text(json.dumps(metrics | {"step": state.step}, indent=2))


def state_digest(*states: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor of some state dicts (names, dtypes and bytes)."""
    digest = hashlib.sha256()
    for state in states:
        for name, tensor in sorted(state.items()):
            digest.update(name.encode() + str(tensor.dtype).encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_agree_across_ranks(accelerator: Accelerator, model: torch.nn.Module, ema: EMA | None = None) -> bool:
    """DDP keeps every rank's weights equal; compare a SHA-256 of each rank's parameters and buffers
    (a VQ codebook updated by EMA is a buffer: DDP does not average it) and of its EMA weights."""
    digest = state_digest(model.state_dict(), ema.shadow if ema is not None else {})
    return len(set(gather_object([digest]))) == 1


def finish_run(run: Run, state: TrainerState, hooks: LoopHooks, started: float) -> dict | None:
    """The end of every run: the EMA weights become the model, a final held-out evaluation, the
    model's files and OUTPUT/metrics.json are written. Returns the metrics (None off the main process)."""
    accelerator, output = run.accelerator, Path(run.train.output_dir)
    skipped = len(set().union(*gather_object([state.unreadable])))  # each broken file once, whichever rank met it
    agree = weights_agree_across_ranks(accelerator, run.unwrapped, run.ema)
    model = run.unwrapped
    if run.ema is not None:
        run.ema.copy_to(model)  # the EMA weights are the model we publish (each process its shard)
    metrics = hooks.evaluate(state.step)  # every process: its share
    metrics |= {
        "steps": state.step,
        "seconds": time.time() - started,
        "skipped_images": int(skipped),
        "skipped_steps": state.skipped_steps,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "weights_identical_across_ranks": agree,
    }
    full = accelerator.get_state_dict(run.model)  # collective: the whole model, on the main process
    keep_if_best(run, state, hooks, metrics)
    if accelerator.is_main_process:
        metrics |= hooks.save(model, output, full)
        if state.best_step is not None:
            metrics |= {"best": state.best, "best_step": state.best_step}
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if skipped:
            logger.warning("skipped %d unreadable images during training", skipped)
        accelerator.print(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: no collective after it
    return metrics if accelerator.is_main_process else None
