"""The accelerator, the optimiser and its schedule, the EMA of the weights, and the checked backward.

Every trainer builds its optimiser, schedule and EMA here, and steps through `backward_and_check`,
which turns a NaN/inf loss or gradient on any rank into a `NonFiniteStep` the loop skips and counts.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .launch import check_launch
from .recipes import TrainConfig

logger = logging.getLogger(__name__)


def make_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator for this run; trackers are started by `start_trackers`."""
    check_launch()
    _fresh_accelerator_state()
    if train.compile:
        # VQGAN's adaptive weight differentiates twice through one graph (retain_graph=True), which
        # compiled backwards with donated buffers refuse; the error message names this switch.
        torch._functorch.config.donated_buffer = False
    log_with = None if train.log_with in ("none", "") else train.log_with
    processes = int(os.environ.get("WORLD_SIZE", 1))  # what the launcher started; the Accelerator is not made yet
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation_steps(train, processes),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.process_group_timeout))],
        # each process iterates its own loader (a sampler's shard, or its part of a stream): batches are
        # never gathered on one process and sent out, so they may hold the unreadable images' records
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
        mixed_precision=train.mixed_precision,
        dynamo_backend="inductor" if train.compile else None,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=train.output_dir, logging_dir=f"{train.output_dir}/logs"),
    )
    set_seed(train.seed)  # same on every process: models start identical, data shards differ by rank
    if train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("mixed_precision fp16 needs a GPU: on the CPU accelerate trains in fp32; use bf16 there")
    return accelerator


def accumulation_steps(train: TrainConfig, processes: int) -> int:
    """Micro-batches per optimizer step: `gradient_accumulation_steps`, or what `global_batch_size` asks for."""
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps
    per_step = train.batch_size * processes
    if train.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {train.global_batch_size} is not a multiple of batch_size {train.batch_size} x "
            f"{processes} processes = {per_step}; choose a batch_size that divides it"
        )
    return train.global_batch_size // per_step


def _fresh_accelerator_state() -> None:
    """Let this run choose its own mixed precision and compilation, whatever an earlier run in
    this process chose.

    accelerate keeps one AcceleratorState per process: it refuses an Accelerator with another
    `mixed_precision` ("restart your runtime") and silently keeps the first `dynamo_backend`.
    vqar's trainers are functions that a notebook, the demo or a test may call several times.
    Only that state is dropped; the process group (PartialState) stays. accelerate has no public
    call for this.
    """
    AcceleratorState._reset_state()


def make_optimizer(params, train: TrainConfig, learning_rate: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params,
        lr=learning_rate or train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then a cosine decay to learning_rate * min_lr_ratio at max_steps."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        min_lr_rate=train.min_lr_ratio,
    )


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the shard of a sharded one (FSDP2's DTensor), else itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    Sharded models (FSDP2) work alike: each process averages its own shards, and saves and loads
    them as its own file (`sharded`)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        state = model.state_dict()
        self.sharded = any(hasattr(v, "to_local") for v in state.values())
        self.shadow = {k: _local(v).detach().clone() for k, v in state.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        names = list(self.shadow)
        current = [_local(state[k]).detach() for k in names]
        torch._foreach_lerp_([self.shadow[k] for k in names], current, 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()  # views of the parameters and buffers: copying into them sets the model
        for name, average in self.shadow.items():
            _local(state[name]).copy_(average)

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            raise ValueError(
                f"EMA weights in {path} do not match the model: {sorted(loaded.keys() ^ self.shadow.keys())[:5]}"
            )
        for k, v in loaded.items():
            self.shadow[k].copy_(v)


def make_ema(accelerator: Accelerator, model: torch.nn.Module, train: TrainConfig) -> EMA | None:
    return (
        EMA(accelerator.unwrap_model(model, keep_torch_compile=False), train.ema_decay) if train.ema_decay > 0 else None
    )


MIN_LOSS_SCALE = 1.0  # fp16: overflows at a loss scale below this are not the scaler's to absorb (DeepSpeed's floor)


class NonFiniteStep(Exception):
    """A step whose loss or gradient norm was NaN or inf; the loop skips and counts it.

    `persistent` is False for an fp16 gradient overflow that the loss scaler absorbs (it lowers
    the scale and the next step usually succeeds); only persistent ones count towards `max_bad_steps`.
    """

    def __init__(self, message: str, persistent: bool = True):
        super().__init__(message)
        self.persistent = persistent


def backward_and_check(accelerator: Accelerator, loss: torch.Tensor, parameters, optimizer, max_norm: float) -> None:
    """Backward, clip to `max_norm` (0: no clipping), and raise NonFiniteStep (gradients
    cleared, nothing updated) when the loss or the gradient norm is not finite on any rank.

    One host sync per step: whether to step must be decided on the host, and on every rank
    alike, as AMP's GradScaler does. With fp16's GradScaler a non-finite step still goes through
    `optimizer.step()`: the scaler, which saw the inf while unscaling, skips the update and lowers
    the scale, as it expects to; skipping that call would leave it half-way and fail the next step.
    """
    accelerator.backward(loss)
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm > 0 and accelerator.sync_gradients:  # the sum of the micro-batches' gradients is clipped once
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
    loss_finite = torch.isfinite(loss.detach())
    finite = torch.stack([loss_finite, loss_finite & torch.isfinite(norm)]).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "sum") / accelerator.num_processes
    loss_ok, step_ok = (finite >= 1).tolist()
    if step_ok:
        return
    scaler = accelerator.scaler
    if scaler is not None and accelerator.sync_gradients:
        optimizer.step()  # GradScaler: no update, a lower scale
    for p in parameters:  # the micro-batches accumulated so far go too (accelerate's zero_grad waits for the sync)
        p.grad = None
    overflow = scaler is not None and loss_ok and scaler.get_scale() >= MIN_LOSS_SCALE
    detail = f", loss scale now {scaler.get_scale():g}" if scaler is not None else ""
    raise NonFiniteStep(f"loss {loss.item():.4g}, gradient norm {norm.item():.4g}{detail}", persistent=not overflow)
