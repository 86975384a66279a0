"""Train the stage-1 tokenizer with accelerate: `vqar train-tokenizer RECIPE.yaml [--field value]`.

The same code runs on one CPU, several CPU processes (gloo), or GPUs; see recipes/accelerate/.
Three pieces, as in accelerate's examples: build everything (`setup`), one optimisation step
(`train_step`), and the held-out evaluation (`evaluate`); `training.loop` does the rest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers.hf_argparser import HfArg

from ..data import (
    SOURCE_HELP,
    ImageDataset,
    ImageTransform,
    StreamingImageDataset,
    collate_images,
    describe_source,
    image_grid,
    load_source,
    make_loader,
    share,
    split_holdout,
    split_stream,
)
from ..evaluation import real_lpips, reconstruction_metrics
from ..hub import PROVENANCE
from ..losses import LossConfig, PerceptualLoss, TokenizerLoss, discriminator_accuracy
from ..metrics import psnr
from ..tokenizer import TokenizerConfig, VQTokenizer, load_preset
from ..tokenizer import fingerprint as fingerprints
from ..tokenizer.modeling import TRAINABLE_PARTS
from .loop import EpochSampler, LoopHooks, Run, TrainData, begin_run, finish_run, log_image, run_loop, step_optimizer
from .optim import NonFiniteStep, backward_and_check, make_accelerator, make_ema, make_optimizer, make_scheduler
from .recipes import JSONDict, Share, TrainConfig, parse_recipe

logger = logging.getLogger(__name__)


@dataclass
class TokenizerModelArgs:
    """Which tokenizer to train."""

    preset: str = HfArg(default="fsq-cpu", help="a tokenizer preset (see `vqar presets`)")
    tokenizer: JSONDict = HfArg(
        default_factory=JSONDict, help="overrides of the preset's fields, JSON: '{\"channels\": 64}'"
    )
    init_from: str | None = HfArg(default=None, help="a trained tokenizer (folder or Hub id) to fine-tune instead")
    train: str = HfArg(
        default="encoder,quantizer,decoder",
        help="the parts to train, comma-separated; `decoder` alone keeps every code's meaning (and every prior "
        "trained on the codes) while the pixels improve",
    )
    min_codebook_usage: float = HfArg(
        default=0.1, help="warn when held-out images use less than this share of the codes they could use"
    )


@dataclass
class DataArgs:
    """The images, and how they are cut to the training resolution."""

    data: str = HfArg(default="digits", help=SOURCE_HELP)
    split: str = HfArg(default="train", help="the split of a Hub dataset")
    image_column: str | None = HfArg(default=None, help="default: the first Image column (or 'image', 'img')")
    label_column: str | None = HfArg(default=None, help="default: the first ClassLabel column (or 'label')")
    resolution: int = HfArg(default=64, help="training crops are resolution x resolution pixels")
    resize_to: int | None = HfArg(default=None, help="shorter side before cropping (default: resolution)")
    random_crop: bool = HfArg(default=False, help="random crops (default: centre crops)")
    random_flip: bool = HfArg(default=False, help="random horizontal flips")
    random_channels: Share = HfArg(
        default=0.0,
        help="share of crops (0-1; true = all) given a random RGB channel order: colours the training photos lack "
        "(greens and blues from their reds), so that the codes learn colour rather than the decoder a palette",
    )
    repeats: int = HfArg(default=1, help="times each training image appears per epoch (with fresh crops)")
    streaming: bool = HfArg(default=False, help="read the source as a stream (large Hub or parquet data sets)")
    eval_fraction: float = HfArg(default=0.1, help="share of the images held out, deterministically")
    eval_size: int = HfArg(default=256, help="images held out from a stream (its length is unknown)")
    eval_crops: int = HfArg(default=1, help="crops per held-out image (>1 takes fixed random crops)")
    eval_batch_size: int = HfArg(default=64, help="images per held-out batch")


# -- setup ----------------------------------------------------------------------------------


def build_tokenizer(model: TokenizerModelArgs, data: DataArgs) -> VQTokenizer:
    parts = {p.strip() for p in model.train.split(",") if p.strip()}
    if model.init_from:
        tokenizer = VQTokenizer.from_pretrained(model.init_from, resolution=data.resolution)
        if not parts & {"encoder", "quantizer"}:  # the codes keep their meaning: so does every prior trained on them
            tokenizer.config.same_codes_as = _fingerprints_of(model.init_from, tokenizer)
    else:
        config = {**load_preset(model.preset), "resolution": data.resolution, **model.tokenizer}
        tokenizer = VQTokenizer(TokenizerConfig(**config))
    if parts != set(TRAINABLE_PARTS):
        if not model.init_from:
            raise ValueError(f"--train {model.train} fine-tunes a trained tokenizer: give it with --init_from DIR")
        tokenizer.freeze(parts)
    return tokenizer


def _fingerprints_of(folder: str, tokenizer: VQTokenizer) -> list[str]:
    """Every fingerprint a prior of the tokenizer in `folder` may have recorded: its own of either scheme (with
    the config it was saved with: a fine-tune at another resolution is still its codes), and those it inherited."""
    saved, state = TokenizerConfig.from_pretrained(folder), tokenizer.state_dict()
    own = (fingerprints.code_fingerprint(saved, state), fingerprints.legacy_fingerprint(saved, state))
    return list(dict.fromkeys([*own, *(saved.same_codes_as or [])]))


def build_datasets(
    data: DataArgs, seed: int, rank: int = 0, world_size: int = 1, say=print
) -> tuple[ImageDataset | StreamingImageDataset, ImageDataset]:
    """(training images, held-out images); a stream is split among the `world_size` processes."""
    source = load_source(
        data.data,
        split=data.split,
        image_column=data.image_column,
        label_column=data.label_column,
        streaming=data.streaming,
    )
    say(describe_source(source, data.data))
    train_transform = ImageTransform(
        data.resolution, data.resize_to, data.random_crop, data.random_flip, data.random_channels
    )
    eval_transform = ImageTransform(data.resolution, data.resize_to, random_crop=data.eval_crops > 1)
    if isinstance(source, datasets.IterableDataset):
        train_split, eval_split = split_stream(source, data.eval_size)
        train = StreamingImageDataset(train_split, train_transform, seed=seed, rank=rank, world_size=world_size)
    else:
        train_split, eval_split = split_holdout(source, data.eval_fraction, seed=0)
        train = ImageDataset(train_split, train_transform, repeats=data.repeats, seed=seed)
        train.require_readable(f"{data.data} (training split)")
    held_out = ImageDataset(eval_split, eval_transform, repeats=data.eval_crops, seed=12345)
    held_out.require_readable(f"{data.data} (held-out split)")
    return train, held_out


@dataclass
class TokenizerRun(Run):
    """A `Run` with the tokenizer's losses, discriminator and held-out images."""

    loss_fn: TokenizerLoss = None
    discriminator: torch.nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    d_scheduler: object = None
    eval_data: ImageDataset = None
    eval_batch_size: int = 64
    lpips: PerceptualLoss | None = None  # the LPIPS held-out figures report (real weights only)
    lpips_reason: str = ""  # why held-out figures have no LPIPS: one short line in metrics.json
    min_codebook_usage: float = 0.1
    psnr_before_gan: float | None = None  # the last held-out PSNR before disc_start, to watch the GAN phase by

    @property
    def models(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,) if self.discriminator is None else (self.model, self.discriminator)


def _training_loader(train_data, train: TrainConfig, num_processes: int) -> TrainData:
    sampler = None
    if isinstance(train_data, ImageDataset):
        if len(train_data) < train.batch_size * num_processes:
            raise ValueError(
                f"{len(train_data)} training images cannot fill one batch of {train.batch_size} x "
                f"{num_processes} processes; raise `repeats` or lower `batch_size`"
            )
        sampler = EpochSampler(len(train_data), train.seed)
    loader = make_loader(
        train_data,
        train.batch_size,
        sampler=sampler,
        collate_fn=collate_images,
        drop_last=True,
        num_workers=train.num_workers,
    )
    return TrainData(loader, sampler, train_data)


def setup(
    model_args: TokenizerModelArgs, data_args: DataArgs, loss_config: LossConfig, train: TrainConfig
) -> TokenizerRun:
    accelerator = make_accelerator(train)
    tokenizer = build_tokenizer(model_args, data_args)  # after the accelerator: VQ syncs EMA codebooks in DDP
    tokenizer.config.resize_to = data_args.resize_to  # saved: `vqar tokenize` / `evaluate` prepare images alike
    if train.gradient_checkpointing:
        tokenizer.gradient_checkpointing_enable()
    loss_fn = TokenizerLoss(loss_config).to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_data, eval_data = build_datasets(data_args, train.seed, rank, world, say=accelerator.print)
    data = _training_loader(train_data, train, accelerator.num_processes)
    optimizer = make_optimizer([p for p in tokenizer.parameters() if p.requires_grad], train)
    scheduler = make_scheduler(optimizer, train)
    tokenizer, optimizer, scheduler = accelerator.prepare(tokenizer, optimizer, scheduler)
    if data.sampler is not None:  # a stream is split among the processes already: accelerate must not shard it again
        data.loader = accelerator.prepare(data.loader)
    run = TokenizerRun(
        accelerator,
        train,
        tokenizer,
        optimizer,
        scheduler,
        data,
        make_ema(accelerator, tokenizer, train),
        loss_fn=loss_fn,
        eval_data=eval_data,
        eval_batch_size=data_args.eval_batch_size,
        min_codebook_usage=model_args.min_codebook_usage,
    )
    if loss_fn.discriminator is not None:
        d_optimizer = make_optimizer(loss_fn.discriminator.parameters(), train, loss_config.disc_learning_rate)
        prepared = accelerator.prepare(loss_fn.discriminator, d_optimizer, make_scheduler(d_optimizer, train))
        run.discriminator, run.d_optimizer, run.d_scheduler = prepared
        loss_fn.discriminator = run.discriminator
    real = loss_fn.perceptual is not None and not loss_fn.perceptual.random_backbone
    # LPIPS for the held-out figures (every process measures its share): the training term's, or one whose
    # weights are already cached (a run without LPIPS does not fetch 500 MB to report it; `vqar evaluate` does)
    run.lpips = loss_fn.perceptual if real else real_lpips(accelerator.device, download=False)
    run.lpips_reason = (
        "LPIPS off: its weights are not cached (`vqar evaluate` fetches them; --perceptual_weight 1 trains with it)"
        if run.lpips is None
        else ""
    )
    return run


# -- one step -------------------------------------------------------------------------------


def train_step(run: TokenizerRun, pixels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One update of the tokenizer and, once the GAN is on, one of the discriminator."""
    out = run.model(pixels)
    last_layer = run.unwrapped.decoder.last_layer
    loss, logs = run.loss_fn.generator_loss(pixels, out.reconstruction, out.bottleneck_loss, step, last_layer)
    backward_and_check(run.accelerator, loss, run.model.parameters(), run.optimizer, run.train.grad_clip)
    step_optimizer(run)
    if run.loss_fn.gan_active(step):
        logs |= _discriminator_step(run, pixels, out.reconstruction)
    stats = out.code_stats
    with torch.no_grad():  # in the held-out figure's unit, to read the two side by side
        train_psnr = psnr(pixels, out.reconstruction.detach()).mean()
    return logs | {
        "codes/batch_usage": stats.usage,
        "codes/batch_perplexity": stats.perplexity,
        "train/psnr": train_psnr,
    }


def _discriminator_step(run: TokenizerRun, pixels: torch.Tensor, reconstruction: torch.Tensor) -> dict:
    run.d_optimizer.zero_grad(set_to_none=True)  # drop what the generator's loss left in D
    d_loss, d_logs = run.loss_fn.discriminator_loss(pixels, reconstruction)
    try:
        backward_and_check(
            run.accelerator, d_loss, run.discriminator.parameters(), run.d_optimizer, run.train.grad_clip
        )
        run.d_optimizer.step()
        d_logs["loss/discriminator_skipped"] = torch.zeros(())
    except NonFiniteStep:  # the generator has already stepped: skip only D's update, and log it
        d_logs = {"loss/discriminator_skipped": torch.ones(())}
    run.d_scheduler.step()
    run.d_optimizer.zero_grad(set_to_none=True)
    return d_logs


# -- evaluation -----------------------------------------------------------------------------


def evaluate(run: TokenizerRun, step: int) -> dict:
    """Held-out reconstruction metrics (`vqar.evaluation.reconstruction_metrics`), logged as
    eval/*, with OUTPUT/samples/step-XXXXXX.png: held-out originals above their reconstructions.

    Once the GAN is on, also how well D tells held-out images from their reconstructions and the
    latest adaptive weight; warns when the codebook collapses or the GAN phase costs PSNR.
    """
    accelerator = run.accelerator
    mine = torch.utils.data.Subset(
        run.eval_data, share(len(run.eval_data), accelerator.process_index, accelerator.num_processes)
    )
    loader = make_loader(mine, run.eval_batch_size, collate_fn=collate_images)
    measured = reconstruction_metrics(
        run.unwrapped,
        (b["pixels"] for b in loader),
        lpips=run.lpips,
        keep=8,
        reduce=lambda totals: accelerator.reduce(totals, "sum"),
        lpips_reason=run.lpips_reason,
    )
    metrics = measured.metrics | {"eval_images": measured.images}
    if not accelerator.is_main_process:
        return metrics
    if run.loss_fn.gan_active(step):
        metrics |= _discriminator_metrics(run, measured.originals, measured.reconstructions)
    samples = Path(run.train.output_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    grid = image_grid([measured.originals, measured.reconstructions])
    grid.save(samples / f"step-{step:06d}.png")
    log_image(run.accelerator, "eval/originals_over_reconstructions", grid, step)
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    _warn_about_health(run, metrics, step)
    return metrics


@torch.inference_mode()
def _discriminator_metrics(run: TokenizerRun, originals: torch.Tensor, reconstructions: torch.Tensor) -> dict:
    discriminator = run.accelerator.unwrap_model(run.discriminator, keep_torch_compile=False)
    device = next(discriminator.parameters()).device
    logits = [discriminator(images.to(device)) for images in (originals, reconstructions)]
    metrics = {k.replace("disc/", "disc_"): v.item() for k, v in discriminator_accuracy(*logits).items()}
    adaptive = run.latest_logs.get("loss/adaptive_weight")
    return metrics | ({"adaptive_weight": adaptive} if adaptive is not None else {})


def _warn_about_health(run: TokenizerRun, metrics: dict, step: int) -> None:
    """The two ways a tokenizer run goes wrong without a NaN: a collapsed codebook, a GAN that costs PSNR."""
    tokenizer = run.unwrapped
    reachable = min(1.0, metrics["eval_images"] * tokenizer.tokens_per_image / tokenizer.codebook_size)
    if metrics["codebook_usage"] < run.min_codebook_usage * reachable:
        logger.warning(
            "step %d: the codebook collapsed: the held-out images use %.2f%% of the codes (perplexity %.0f), "
            "where they could use %.0f%%",
            step,
            100 * metrics["codebook_usage"],
            metrics["code_perplexity"],
            100 * reachable,
        )
    if not run.loss_fn.gan_active(step):
        run.psnr_before_gan = metrics["psnr"]
    elif run.psnr_before_gan is not None and metrics["psnr"] < run.psnr_before_gan - 1:
        logger.warning(
            "step %d: held-out PSNR fell from %.2f to %.2f dB since the discriminator started (step %d); D tells "
            "real from reconstructed %.0f%% / %.0f%% of the time: if D is winning, lower adversarial_weight or "
            "disc_learning_rate, start it later, or raise disc_warmup_steps",
            step,
            run.psnr_before_gan,
            metrics["psnr"],
            run.loss_fn.config.disc_start,
            100 * metrics.get("disc_accuracy_real", float("nan")),
            100 * metrics.get("disc_accuracy_fake", float("nan")),
        )


def summary(metrics: dict) -> str:
    line = f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, codebook usage {metrics['codebook_usage']:.1%}"
    if "disc_accuracy_real" in metrics:
        line += (
            f"; D right on {metrics['disc_accuracy_real']:.0%} real / {metrics['disc_accuracy_fake']:.0%} reconstructed"
        )
    by_prefix = ", ".join(f"{k} tokens {v:.2f}" for k, v in metrics.get("psnr_at_tokens", {}).items())
    return line + (f"; PSNR from the first {by_prefix} dB" if by_prefix else "")


def _save(tokenizer: VQTokenizer, output: Path, init_from: str | None, state_dict: dict | None = None) -> dict:
    tokenizer.save_pretrained(output / "tokenizer", state_dict=state_dict)
    if init_from:  # a model card names what the weights were fine-tuned from
        (output / "tokenizer" / PROVENANCE).write_text(json.dumps({"base_model": init_from}))
    return {}


# -- the run --------------------------------------------------------------------------------


def train_tokenizer(model_args, data_args, loss_config: LossConfig, train: TrainConfig) -> dict | None:
    """Train, checkpoint, evaluate; save OUTPUT/tokenizer and OUTPUT/metrics.json. Returns the metrics."""
    started = time.time()
    run = setup(model_args, data_args, loss_config, train)
    state = begin_run(run, "tokenizer", (model_args, data_args, loss_config, train))
    hooks = LoopHooks(
        step=lambda batch, step: train_step(run, batch["pixels"], step),
        count=lambda batch: len(batch["pixels"]),
        evaluate=lambda step: evaluate(run, step),
        summary=summary,
        save=lambda tokenizer, output, state_dict: _save(tokenizer, output, model_args.init_from, state_dict),
        progress={"d_real": "disc/accuracy_real", "d_fake": "disc/accuracy_fake", "ada": "loss/adaptive_weight"},
        best=("psnr", "max"),
    )
    state = run_loop(run, state, hooks)
    return finish_run(run, state, hooks, started)


def main(argv: list[str]) -> dict | None:
    model_args, data_args, loss_config, train = parse_recipe(
        argv, (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)
    )
    return train_tokenizer(model_args, data_args, loss_config, train)
