"""GPU check: vqar's path to real scale, timed on one CUDA device.

    python benchmarks/gpu_check.py [--steps 200] [--batch 16] [--prior-batch 32]
    python benchmarks/gpu_check.py --smoke      # the same plumbing on the CPU, tiny and quick

Trains the `imagenet-vq16` tokenizer recipe (f16, 16,384 l2-normalised codes, LPIPS, a PatchGAN
from half way, EMA) at 256 px, and a B-size Llama prior on its 256-token sequences, each for
`--steps` steps through vqar's own `setup` and `train_step`, in fp32, bf16 and fp16, each with
and without `torch.compile`. Every configuration runs in a fresh process. The images are
synthetic but structured (gradients, shapes, stripes): speed, memory and finiteness do not
depend on their content, and the check needs no data set and no network (LPIPS runs on a random
backbone: its cost is LPIPS's, its value is not).

Prints one table: tokenizer images/s before and after the discriminator starts, prior tokens/s,
peak GPU memory, and whether every loss stayed finite (with fp16, overflow steps the loss scaler
absorbed are counted apart); a second: `vqar tokenize`, `evaluate` and `generate` on the GPU in
each precision (images/s); and whether a B prior trains, evaluates and saves through accelerate's
FSDP2 config on every GPU present. Without a GPU (and without --smoke) it says so and exits: it is part
of `make bench`, which runs on CPUs too.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from summary import recorded

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("no", "bf16", "fp16")


def structured_images(folder: Path, count: int, size: int) -> Path:
    """`count` PNGs of gradients, filled shapes and stripes, deterministic by index, in two class
    subfolders (the recipe reads a label column)."""
    for name in ("even", "odd"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(i)
        angle, (start, end) = rng.uniform(0, np.pi), rng.uniform(0, 255, (2, 3))
        ramp = np.cos(angle) * x + np.sin(angle) * y
        ramp = (ramp - ramp.min()) / np.ptp(ramp)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 24) * (x + rng.uniform(0.2, 1) * y))
        pixels = start + (end - start) * ramp[..., None] + 30 * (stripes[..., None] - 0.5)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 8)):
            box = sorted(rng.uniform(0, size, 2)) + sorted(rng.uniform(0, size, 2))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((box[0], box[2], box[1], box[3]), fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
        image.save(folder / ("even", "odd")[i % 2] / f"{i:05d}.png")
    return folder


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """Seconds and items of the steps after the warm-up, per phase."""

    def __init__(self, warmup: int):
        self.warmup, self.seen, self.seconds, self.items = warmup, {}, {}, {}

    def add(self, phase: str, seconds: float, items: int) -> None:
        self.seen[phase] = self.seen.get(phase, 0) + 1
        if self.seen[phase] > self.warmup:  # the first steps of a phase compile, allocate, autotune
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
            self.items[phase] = self.items.get(phase, 0) + items

    def rate(self, phase: str) -> float | None:
        return self.items[phase] / self.seconds[phase] if self.seconds.get(phase) else None


def timed_steps(batches, steps: int, step_fn, phase_of, count, warmup: int) -> dict:
    """Run `steps` training steps; returns rates per phase, non-finite steps and the last loss."""
    from vqar.training.optim import NonFiniteStep

    timer, bad, overflows, losses = Timer(warmup), 0, 0, []
    for step in range(steps):
        batch = next(batches)
        synchronize()
        start = time.perf_counter()
        try:
            logs = step_fn(batch, step)
            losses.append(logs["loss/total"].item())  # a host sync, as the loop's logging does
        except NonFiniteStep as skipped:
            bad, overflows = bad + skipped.persistent, overflows + (not skipped.persistent)
        synchronize()
        timer.add(phase_of(step), time.perf_counter() - start, count(batch))
    finite = bad == 0 and all(math.isfinite(v) for v in losses)
    return {
        "rates": {p: timer.rate(p) for p in timer.seen},
        "finite": finite,
        "overflows": overflows,
        "last_loss": losses[-1] if losses else None,
    }


def endless(loader):
    while True:
        yield from loader


def check_tokenizer(args, precision: str, compile: bool, workdir: Path) -> dict:
    from vqar.losses import LossConfig
    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, setup, train_step

    images = structured_images(workdir / "images", 64 if args.smoke else 512, 32 if args.smoke else 256)
    overrides = [
        "--data",
        str(images),
        "--output_dir",
        str(workdir / "tokenizer"),
        "--max_steps",
        str(args.steps),
        "--batch_size",
        str(args.batch),
        "--disc_start",
        str(args.steps // 2),
        "--mixed_precision",
        precision,
        "--compile",
        str(compile),
        "--perceptual_random_backbone",
        "true",
        "--log_with",
        "none",
        "--eval_fraction",
        "0.05",
        "--num_workers",
        "0" if args.smoke else "8",
    ]
    if args.smoke:  # a CPU-sized net and AlexNet's LPIPS (it needs 32 px; VGG's needs more)
        tiny = {"channels": 8, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": []}
        overrides += [
            "--tokenizer",
            json.dumps(tiny),
            "--resolution",
            "32",
            "--resize_to",
            "32",
            "--perceptual_net",
            "alex",
            "--disc_layers",
            "2",
        ]
    recipe = [str(REPO / "recipes" / "imagenet-vq16.yaml"), *overrides]
    run = setup(*parse_recipe(recipe, (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)))
    device = run.accelerator.device

    def step(batch, step):
        return train_step(run, batch["pixels"].to(device), step)

    result = timed_steps(
        endless(run.data.loader),
        args.steps,
        step,
        phase_of=lambda s: "gan" if run.loss_fn.gan_active(s) else "before_gan",
        count=lambda batch: len(batch["pixels"]),
        warmup=args.warmup,
    )
    return result | {"parameters": sum(p.numel() for p in run.unwrapped.parameters())}


def synthetic_tokens(folder: Path, side: int, codes: int, count: int) -> Path:
    """A tokens folder of random-walk code grids in ten classes, written as `vqar tokenize` writes one."""
    from vqar.tokens import SPLITS, ShardWriter, TokensManifest, finish_split, finish_tokens, token_features

    rng = np.random.default_rng(0)
    rows = np.stack([np.cumsum(rng.integers(-3, 4, side * side)) % codes for _ in range(count)])
    features = token_features(side * side, codes, captions=False)
    manifest = TokensManifest(
        tokenizer="synthetic",
        codebook_size=codes,
        tokens_per_image=side * side,
        grid=[side, side],
        class_names=[str(c) for c in range(10)],
    )
    for name in SPLITS:
        writer = ShardWriter(folder / name / "data-0.arrow", features)
        writer.write({"tokens": rows.astype(features["tokens"].feature.dtype), "label": np.arange(count) % 10})
        finish_split(folder / name, [writer.close()], features)
        manifest.num_images[name] = count
    finish_tokens(folder, SPLITS, manifest)
    return folder


def check_prior(args, precision: str, compile: bool, workdir: Path) -> dict:
    from vqar.training.recipes import TrainConfig
    from vqar.training.train_prior import PriorArgs, setup, train_step

    side, codes = (4, 64) if args.smoke else (16, 16384)
    synthetic_tokens(workdir / "tokens", side, codes, 64 if args.smoke else 4096)
    train = TrainConfig(
        output_dir=str(workdir / "prior"),
        max_steps=args.steps,
        batch_size=args.prior_batch,
        learning_rate=3e-4,
        mixed_precision=precision,
        compile=compile,
        log_with="none",
    )
    run = setup(PriorArgs(tokens=str(workdir / "tokens"), size="tiny" if args.smoke else "B"), train)
    device = run.accelerator.device

    def step(batch, step):
        return train_step(run, {k: v.to(device) for k, v in batch.items()})

    result = timed_steps(
        endless(run.data.loader),
        args.steps,
        step,
        phase_of=lambda s: "prior",
        count=lambda batch: batch["tokens"].numel(),
        warmup=args.warmup,
    )
    return result | {"parameters": sum(p.numel() for p in run.unwrapped.parameters())}


def check_inference(args, precision: str, workdir: Path) -> dict:
    """`vqar tokenize`, `vqar evaluate` and `vqar generate` on the device in `precision`: images/s each."""
    from vqar import TokenizerConfig, VQTokenizer
    from vqar.ar import CONFIG_KEY, VocabLayout, build_prior
    from vqar.evaluation import EvaluateArgs, evaluate_tokenizer
    from vqar.generation import GenerateArgs, SamplingConfig, generate_to_folder
    from vqar.tokenizer import load_preset
    from vqar.tokens import load_tokens
    from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset

    side = 32 if args.smoke else 256
    count = 32 if args.smoke else 512
    images = structured_images(workdir / "images", count, side)
    config = {**load_preset("vqgan-f16-16k"), "resolution": side}
    if args.smoke:
        config |= {"channels": 8, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": []}
    VQTokenizer(TokenizerConfig(**config)).save_pretrained(workdir / "tokenizer")
    dtype = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision]
    common = dict(tokenizer=str(workdir / "tokenizer"), data=str(images), dtype=dtype, batch_size=args.batch)
    timings = {}
    start = time.perf_counter()
    tokenize_dataset(TokenizeArgs(**common, output=str(workdir / "tokens"), num_workers=0 if args.smoke else 8))
    timings["tokenize"] = count / (time.perf_counter() - start)
    start = time.perf_counter()
    evaluate_tokenizer(EvaluateArgs(**common, output=str(workdir / "report"), num_workers=0 if args.smoke else 8))
    timings["evaluate"] = count / (time.perf_counter() - start)
    _, manifest = load_tokens(workdir / "tokens")
    layout = VocabLayout.from_manifest(manifest, conditional=True)
    prior = build_prior(layout, size="tiny" if args.smoke else "B")
    setattr(prior.config, CONFIG_KEY, layout.saved_in(workdir / "prior").to_dict())
    prior.save_pretrained(workdir / "prior")
    generate = GenerateArgs(prior=str(workdir / "prior"), output=str(workdir / "samples"), dtype=dtype)
    generate.classes, generate.num_images = ["even"], 8
    generate_to_folder(generate, SamplingConfig(cfg_scale=4.0, seed=0))  # warm-up
    start = time.perf_counter()
    generate_to_folder(generate, SamplingConfig(cfg_scale=4.0, seed=0))
    timings["generate"] = 8 / (time.perf_counter() - start)
    return {"rates": timings, "finite": True, "overflows": 0, "parameters": sum(p.numel() for p in prior.parameters())}


def check_fsdp_prior(args, workdir: Path) -> str:
    """A B prior through accelerate's FSDP2 config on every GPU here: does it train, evaluate and save?"""
    tokens = synthetic_tokens(workdir / "tokens", 16, 16384, 2048)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"),
        "--num_processes", str(torch.cuda.device_count()), "-m", "vqar", "train-prior", "--tokens", str(tokens),
        "--size", "B", "--max_steps", str(args.steps), "--batch_size", str(args.prior_batch), "--eval_every", "0",
        "--log_with", "none", "--output_dir", str(workdir / "fsdp"), "--ema_decay", "0.999", "--save_every", str(args.steps // 2),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    metrics = json.loads((workdir / "fsdp" / "metrics.json").read_text())
    return f"{metrics['steps']} steps, held-out {metrics['bits_per_token']:.2f} bits/token, {metrics['seconds']:.0f} s"


def one(args) -> None:
    """A single configuration (a fresh process: accelerate's state and CUDA's memory are per process)."""
    kind, precision, compile = args.one[0], args.one[1], args.one[2] == "compile"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as workdir:
        if kind == "inference":
            result = check_inference(args, precision, Path(workdir))
        else:
            check = check_tokenizer if kind == "tokenizer" else check_prior
            result = check(args, precision, compile, Path(workdir))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps(result | {"kind": kind, "precision": precision, "compile": compile, "peak_gib": peak}))


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each phase left out of the timing")
    parser.add_argument("--batch", type=int, default=16, help="tokenizer images per step (the recipe's)")
    parser.add_argument("--prior-batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the plumbing only")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch, args.prior_batch = min(args.steps, 6), 1, 4, 8
    if args.one:
        return one(args)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device here; nothing to check (`--smoke` runs the plumbing on the CPU)")
        return
    precisions = ("no", "bf16") if args.smoke else PRECISIONS  # fp16 needs a GPU's GradScaler
    compiles = ("eager",) if args.smoke else ("eager", "compile")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    print(f"{device}, torch {torch.__version__}, {args.steps} steps per configuration\n")
    print(
        "| model | precision | compile | images/s before GAN | images/s with GAN | tokens/s | peak GiB | finite | "
        "fp16 overflows |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("tokenizer", "prior"):
        for precision in precisions:
            for compile in compiles:
                command = [
                    sys.executable,
                    __file__,
                    "--one",
                    kind,
                    precision,
                    compile,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch",
                    str(args.batch),
                    "--prior-batch",
                    str(args.prior_batch),
                    *(["--smoke"] if args.smoke else []),
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(f"| {kind} | {precision} | {compile} | failed: {done.stderr.strip().splitlines()[-1]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rates = r["rates"]
                print(
                    f"| {kind} ({r['parameters'] / 1e6:.1f}M) | {precision} | {compile} | "
                    f"{fmt(rates.get('before_gan'), '.1f')} | {fmt(rates.get('gan'), '.1f')} | "
                    f"{fmt(rates.get('prior'), '.0f')} | {fmt(r['peak_gib'], '.1f')} | {r['finite']} | "
                    f"{r['overflows']} |"
                )
    print(
        "\n| inference (vqar commands) | dtype | tokenize images/s | evaluate images/s | generate images/s (CFG 4) | peak GiB |"
    )
    print("|---|---|---|---|---|---|")
    for precision in precisions:
        command = [sys.executable, __file__, "--one", "inference", precision, "eager", "--batch", str(args.batch)]
        done = subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        if done.returncode:
            print(f"| inference | {precision} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rates = r["rates"]
        print(
            f"| prior {r['parameters'] / 1e6:.0f}M, tokenizer vqgan-f16-16k | {precision} | "
            f"{rates['tokenize']:.1f} | {rates['evaluate']:.1f} | {rates['generate']:.2f} | {fmt(r['peak_gib'], '.1f')} |"
        )
    if torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as workdir:
            print(f"\nFSDP2 prior (B) on {torch.cuda.device_count()} GPU(s): {check_fsdp_prior(args, Path(workdir))}")
    else:
        print(
            "\nFSDP2 prior: needs a GPU (accelerate runs FSDP on GPUs only); tests/test_sharded.py covers the code paths"
        )


if __name__ == "__main__":
    with recorded("gpu_check"):
        main()
