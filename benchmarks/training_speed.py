"""Tokenizer training step speed: vqar's trainer step against a bare PyTorch loop.

    python benchmarks/training_speed.py [--preset fsq-cpu] [--batch 16] [--resolution 64] [--steps 20]

Both update the same tokenizer on the same batch with L1 + the bottleneck loss, gradient
clipping and AdamW. vqar's step (`vqar.training.train_tokenizer.train_step`, inside accelerate) adds
the finiteness check, loss bookkeeping, EMA and scheduler; the ratio is what that costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from summary import record, recorded

from vqar import VQTokenizer
from vqar.losses import LossConfig
from vqar.training.recipes import TrainConfig
from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, setup, train_step


def images_per_second(step, batch: int, steps: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return batch * steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fsq-cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1

    with tempfile.TemporaryDirectory() as output:
        train = TrainConfig(
            output_dir=output, batch_size=args.batch, learning_rate=1e-4, ema_decay=0.999, log_with="none"
        )
        run = setup(
            TokenizerModelArgs(preset=args.preset),
            DataArgs(data="digits", resolution=args.resolution),
            LossConfig(perceptual_weight=0, adversarial_weight=0),
            train,
        )
        ours = images_per_second(lambda: train_step(run, pixels, 0), args.batch, args.steps)

    model = VQTokenizer.from_preset(args.preset, resolution=args.resolution).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def bare_step():
        out = model(pixels)
        loss = (out.reconstruction - pixels).abs().mean() + out.bottleneck_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bare = images_per_second(bare_step, args.batch, args.steps)
    print(
        f"{args.preset}, batch {args.batch}, {args.resolution}x{args.resolution}, {torch.get_num_threads()} threads\n"
    )
    print("| training step | images/s | vs bare loop |")
    print("|---|---|---|")
    print(f"| vqar train_step (accelerate, EMA, checks) | {ours:.1f} | {ours / bare:.2f}x |")
    print(f"| bare PyTorch loop | {bare:.1f} | baseline |")
    record("tokenizer training", f"{args.preset} step", ours, "img/s", "bare PyTorch loop", bare)


if __name__ == "__main__":
    with recorded("training_speed"):
        main()
