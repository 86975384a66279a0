"""Train the stage-1 tokenizer with accelerate: `vqar train-tokenizer RECIPE.yaml [--field value]`.

The same code runs on one CPU, several CPU processes (gloo), or GPUs; see recipes/accelerate/.
Three pieces, as in accelerate's examples: build everything (`setup`), one optimisation step
(`train_step`), and the held-out evaluation (`evaluate`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from ..data import (
    ImageDataset,
    ImageTransform,
    StreamingImageDataset,
    collate_images,
    image_grid,
    load_source,
    make_loader,
    split_holdout,
    split_stream,
)
from ..losses import LossConfig, PerceptualLoss, TokenizerLoss, lpips_missing_reason
from ..metrics import code_histogram, code_perplexity, codebook_usage, psnr, ssim
from ..tokenizer import TokenizerConfig, VQTokenizer, load_preset
from .common import (
    EMA,
    EpochSampler,
    LoopHooks,
    NonFiniteStep,
    TrainConfig,
    backward_and_check,
    begin_run,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    parse_recipe,
    run_loop,
)

logger = logging.getLogger(__name__)


@dataclass
class TokenizerModelArgs:
    preset: str = "fsq-cpu"  # a name from tokenizers/ (see `vqar presets`)
    tokenizer: dict = field(default_factory=dict)  # overrides of the preset's config fields
    init_from: str | None = None  # a trained tokenizer (folder or Hub id) to fine-tune instead


@dataclass
class DataArgs:
    data: str = "digits"  # digits | photos | image folder | *.parquet | Hub dataset id
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    resolution: int = 32
    resize_to: int | None = None  # shorter side before cropping (default: resolution)
    random_crop: bool = False
    random_flip: bool = False
    repeats: int = 1  # times each training image appears per epoch (with fresh crops)
    streaming: bool = False  # read the source as a stream (large Hub or parquet data sets)
    eval_fraction: float = 0.1  # held out, deterministically
    eval_size: int = 256  # images held out from a stream (its length is unknown)
    eval_crops: int = 1  # crops per held-out image (>1 takes fixed random crops)
    eval_batch_size: int = 64


# -- setup ----------------------------------------------------------------------------------


def build_tokenizer(model: TokenizerModelArgs, data: DataArgs) -> VQTokenizer:
    if model.init_from:
        return VQTokenizer.from_pretrained(model.init_from, resolution=data.resolution)
    config = {**load_preset(model.preset), "resolution": data.resolution, **model.tokenizer}
    return VQTokenizer(TokenizerConfig(**config))


def build_datasets(data: DataArgs, seed: int) -> tuple[ImageDataset | StreamingImageDataset, ImageDataset]:
    source = load_source(data.data, split=data.split, image_column=data.image_column,
                         label_column=data.label_column, streaming=data.streaming)  # fmt: skip
    train_transform = ImageTransform(data.resolution, data.resize_to, data.random_crop, data.random_flip)
    eval_transform = ImageTransform(data.resolution, data.resize_to, random_crop=data.eval_crops > 1)
    if isinstance(source, datasets.IterableDataset):
        train_split, eval_split = split_stream(source, data.eval_size)
        train = StreamingImageDataset(train_split, train_transform, seed=seed)
    else:
        train_split, eval_split = split_holdout(source, data.eval_fraction, seed=0)
        train = ImageDataset(train_split, train_transform, repeats=data.repeats, seed=seed)
    return train, ImageDataset(eval_split, eval_transform, repeats=data.eval_crops, seed=12345)


@dataclass
class Run:
    """Everything a tokenizer run holds; `setup` builds it."""

    accelerator: object
    tokenizer: torch.nn.Module
    loss_fn: TokenizerLoss
    discriminator: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    d_optimizer: torch.optim.Optimizer | None
    d_scheduler: object
    train_data: ImageDataset | StreamingImageDataset
    eval_data: ImageDataset
    sampler: EpochSampler | None  # None for a stream
    loader: torch.utils.data.DataLoader
    ema: EMA | None


def setup(model_args, data_args, loss_config: LossConfig, train: TrainConfig) -> Run:
    accelerator = make_accelerator(train)
    tokenizer = build_tokenizer(model_args, data_args)  # after the accelerator: VQ syncs EMA codebooks in DDP
    loss_fn = TokenizerLoss(loss_config).to(accelerator.device)
    train_data, eval_data = build_datasets(data_args, train.seed)
    sampler = None
    if isinstance(train_data, ImageDataset):
        if len(train_data) < train.batch_size * accelerator.num_processes:
            raise ValueError(
                f"{len(train_data)} training images cannot fill one batch of {train.batch_size} x "
                f"{accelerator.num_processes} processes; raise `repeats` or lower `batch_size`"
            )
        sampler = EpochSampler(len(train_data), train.seed)
    loader = make_loader(train_data, train.batch_size, sampler=sampler, collate_fn=collate_images,
                         drop_last=True, num_workers=train.num_workers)  # fmt: skip
    optimizer = make_optimizer(tokenizer.parameters(), train)
    scheduler = make_scheduler(optimizer, train)
    tokenizer, optimizer, scheduler, loader = accelerator.prepare(tokenizer, optimizer, scheduler, loader)
    discriminator = d_optimizer = d_scheduler = None
    if loss_fn.discriminator is not None:
        d_optimizer = make_optimizer(loss_fn.discriminator.parameters(), train, loss_config.disc_learning_rate)
        d_scheduler = make_scheduler(d_optimizer, train)
        discriminator, d_optimizer, d_scheduler = accelerator.prepare(loss_fn.discriminator, d_optimizer, d_scheduler)
        loss_fn.discriminator = discriminator
    ema = EMA(accelerator.unwrap_model(tokenizer), train.ema_decay) if train.ema_decay > 0 else None
    return Run(accelerator, tokenizer, loss_fn, discriminator, optimizer, scheduler, d_optimizer, d_scheduler,
               train_data, eval_data, sampler, loader, ema)  # fmt: skip


# -- one step -------------------------------------------------------------------------------


def train_step(run: Run, pixels: torch.Tensor, step: int, train: TrainConfig) -> dict[str, torch.Tensor]:
    """One update of the tokenizer and, once the GAN is on, one of the discriminator."""
    accelerator, tokenizer = run.accelerator, run.tokenizer
    out = tokenizer(pixels)
    last_layer = accelerator.unwrap_model(tokenizer).decoder.last_layer
    loss, logs = run.loss_fn.generator_loss(pixels, out.reconstruction, out.bottleneck_loss, step, last_layer)
    backward_and_check(accelerator, loss, tokenizer.parameters(), run.optimizer, train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.loss_fn.gan_active(step):
        run.d_optimizer.zero_grad(set_to_none=True)  # drop what the generator's loss left in D
        d_loss, d_logs = run.loss_fn.discriminator_loss(pixels, out.reconstruction)
        try:
            backward_and_check(accelerator, d_loss, run.discriminator.parameters(), run.d_optimizer, train.grad_clip)
            run.d_optimizer.step()
            d_logs["loss/discriminator_skipped"] = torch.zeros(())
        except NonFiniteStep:  # the generator has already stepped: skip only D's update, and log it
            d_logs = {"loss/discriminator_skipped": torch.ones(())}
        run.d_scheduler.step()
        run.d_optimizer.zero_grad(set_to_none=True)
        logs |= d_logs
    if run.ema is not None:
        run.ema.update(accelerator.unwrap_model(tokenizer))
    stats = out.code_stats
    return logs | {"codes/batch_usage": stats.usage, "codes/batch_perplexity": stats.perplexity,
                   "lr": torch.tensor(run.scheduler.get_last_lr()[0])}  # fmt: skip


# -- evaluation -----------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(tokenizer: VQTokenizer, data: ImageDataset, batch_size: int, lpips: PerceptualLoss | None) -> tuple:
    """Held-out PSNR, SSIM, LPIPS (real weights only), codebook usage, perplexity, dead codes.

    A 1d tokenizer trained with nested dropout also gets `psnr_at_tokens`: PSNR decoding only
    the leading k = L/4, L/2, L tokens.
    Returns (metrics, (originals [<=8, 3, H, W], reconstructions [<=8, 3, H, W])).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    loader = make_loader(data, batch_size, collate_fn=collate_images)
    counts = torch.zeros(tokenizer.codebook_size, device=device)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    prefixes = prefix_lengths(tokenizer)
    prefix_psnr = dict.fromkeys(prefixes, 0.0)
    n, first = 0, None
    for batch in loader:
        pixels = batch["pixels"].to(device)
        if not len(pixels):
            continue
        out = tokenizer(pixels)
        counts += code_histogram(out.indices, tokenizer.codebook_size)
        sums["psnr"] += psnr(pixels, out.reconstruction).sum().item()
        sums["ssim"] += ssim(pixels, out.reconstruction).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(pixels, out.reconstruction).sum().item()
        for k in prefixes:
            coarse = out.reconstruction if k == tokenizer.tokens_per_image else tokenizer.decode(out.indices[:, :k])
            prefix_psnr[k] += psnr(pixels, coarse).sum().item()
        n += len(pixels)
        first = first if first is not None else (pixels[:8].cpu(), out.reconstruction[:8].cpu())
    tokenizer.train(was_training)
    if n == 0:
        raise ValueError("no readable held-out images to evaluate on")
    metrics = {
        "psnr": sums["psnr"] / n,
        "ssim": sums["ssim"] / n,
        "lpips": sums["lpips"] / n if lpips is not None else None,
        "codebook_usage": codebook_usage(counts).item(),
        "code_perplexity": code_perplexity(counts).item(),
        "dead_codes": int((counts == 0).sum().item()),
        "eval_images": n,
    }
    if prefixes:
        metrics["psnr_at_tokens"] = {str(k): total / n for k, total in prefix_psnr.items()}
    if lpips is None:
        metrics["lpips_missing_reason"] = lpips_missing_reason() or "LPIPS disabled"
    return metrics, first


def prefix_lengths(tokenizer: VQTokenizer) -> list[int]:
    """The prefix lengths a variable-length (nested-dropout) 1d tokenizer is evaluated at."""
    if not (tokenizer.is_1d and tokenizer.config.nested_dropout):
        return []
    L = tokenizer.tokens_per_image
    return sorted({max(1, L // 4), max(1, L // 2), L})


def eval_lpips(loss_fn: TokenizerLoss, device) -> PerceptualLoss | None:
    """The LPIPS to report: the training one if it has real weights, else one built if possible."""
    if loss_fn.perceptual is not None and not loss_fn.perceptual.random_backbone:
        return loss_fn.perceptual
    return PerceptualLoss().to(device) if lpips_missing_reason() is None else None


def _evaluate_and_log(run: Run, data_args: DataArgs, train: TrainConfig, step: int, lpips) -> dict:
    tokenizer = run.accelerator.unwrap_model(run.tokenizer)
    metrics, (originals, reconstructions) = evaluate(tokenizer, run.eval_data, data_args.eval_batch_size, lpips)
    samples = Path(train.output_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    image_grid([originals, reconstructions]).save(samples / f"step-{step:06d}.png")
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    return metrics


# -- the loop -------------------------------------------------------------------------------


def train_tokenizer(model_args, data_args, loss_config: LossConfig, train: TrainConfig) -> dict:
    """Train, checkpoint, evaluate; save OUTPUT/tokenizer and OUTPUT/metrics.json. Returns the metrics."""
    started = time.time()
    run = setup(model_args, data_args, loss_config, train)
    accelerator = run.accelerator
    state = begin_run(accelerator, train, "tokenizer", (model_args, data_args, loss_config, train), run.ema)
    lpips = eval_lpips(run.loss_fn, accelerator.device) if accelerator.is_main_process else None

    def step(batch: dict, step: int) -> dict | None:
        return train_step(run, batch["pixels"], step, train) if len(batch["pixels"]) else None

    def evaluate_now(step: int) -> str:
        m = _evaluate_and_log(run, data_args, train, step, lpips)
        summary = f"held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, codebook usage {m['codebook_usage']:.1%}"
        by_prefix = ", ".join(f"{k} tokens {v:.2f}" for k, v in m.get("psnr_at_tokens", {}).items())
        return summary + (f"; PSNR from the first {by_prefix} dB" if by_prefix else "")

    hooks = LoopHooks(step=step, count=lambda batch: len(batch["pixels"]), evaluate=evaluate_now)
    data = {"loader": run.loader, "sampler": run.sampler, "dataset": run.train_data}
    state = run_loop(accelerator, train, data, state, hooks, run.ema)
    return _finish(run, data_args, train, state, lpips, started)


def _weights_agree_across_ranks(accelerator, model: torch.nn.Module) -> bool:
    """DDP keeps every rank's weights equal; compare a fingerprint of each rank's copy."""
    with torch.no_grad():
        params = [p.detach().double() for p in model.parameters()]
        fingerprint = torch.stack([sum(p.sum() for p in params), sum(p.pow(2).sum() for p in params)])
    gathered = accelerator.gather(fingerprint[None].to(accelerator.device))  # [processes, 2]
    return bool((gathered == gathered[0]).all())


def _finish(run: Run, data_args: DataArgs, train: TrainConfig, state: dict, lpips, started: float) -> dict | None:
    accelerator = run.accelerator
    skipped = accelerator.reduce(torch.tensor(state["skipped_images"], device=accelerator.device), "sum").item()
    agree = _weights_agree_across_ranks(accelerator, accelerator.unwrap_model(run.tokenizer))
    metrics = None
    if accelerator.is_main_process:
        tokenizer = accelerator.unwrap_model(run.tokenizer)
        if run.ema is not None:
            run.ema.copy_to(tokenizer)  # the EMA weights are the tokenizer we publish
        metrics = _evaluate_and_log(run, data_args, train, state["step"], lpips)
        metrics |= {"steps": state["step"], "seconds": time.time() - started, "skipped_images": int(skipped),
                    "skipped_steps": state["skipped_steps"],
                    "num_processes": accelerator.num_processes, "weights_identical_across_ranks": agree}  # fmt: skip
        tokenizer.save_pretrained(Path(train.output_dir) / "tokenizer")
        (Path(train.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if skipped:
            logger.warning("skipped %d unreadable images during training", skipped)
        accelerator.print(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: no collective after it
    return metrics


def main(argv: list[str]) -> dict | None:
    model_args, data_args, loss_config, train = parse_recipe(argv, (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig))
    return train_tokenizer(model_args, data_args, loss_config, train)
