"""Tokenizer encode/decode throughput on CPU presets, against this machine's matmul speed.

    python benchmarks/tokenizer_speed.py [--batch 16] [--resolution 64] [--repeats 5]

For each preset: images/s for encode and decode, the model's GFLOP per image (counted by
torch.utils.flop_counter), the achieved GFLOP/s, and that as a fraction of the GFLOP/s a large
fp32 matmul reaches in the same run — how close the convs run to the hardware's limit.
"""

from __future__ import annotations

import argparse

import torch
from summary import best_seconds, record, recorded
from torch.utils.flop_counter import FlopCounterMode

from vqar import VQTokenizer

PRESETS = ["vq-cpu", "fsq-cpu", "lfq-cpu", "bsq-cpu"]


def matmul_gflops(repeats: int, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats * 4) / 1e9


def count_gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def measure(preset: str, batch: int, resolution: int, repeats: int) -> dict:
    tokenizer = VQTokenizer.from_preset(preset, resolution=resolution).eval()
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    indices = tokenizer.encode(pixels)
    row = {"preset": preset, "params_M": sum(p.numel() for p in tokenizer.parameters()) / 1e6}
    for name, fn in (("encode", lambda: tokenizer.encode(pixels)), ("decode", lambda: tokenizer.decode(indices))):
        seconds = best_seconds(fn, repeats)
        gflop = count_gflop(fn)
        row[f"{name}_img_s"] = batch / seconds
        row[f"{name}_gflop_img"] = gflop / batch
        row[f"{name}_gflop_s"] = gflop / seconds
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    args = parser.parse_args()

    peak = matmul_gflops(args.repeats)
    rows = [measure(p, args.batch, args.resolution, args.repeats) for p in args.presets]
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch}, {args.resolution}x{args.resolution}")
    print(f"baseline: fp32 1024x1024 matmul {peak:.1f} GFLOP/s (same run)\n")
    header = "| preset | params (M) | encode img/s | encode GFLOP/s | of matmul | decode img/s | decode GFLOP/s | of matmul |"
    print(header)
    print("|---" * 8 + "|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['params_M']:.2f} | {r['encode_img_s']:.1f} | {r['encode_gflop_s']:.1f} | "
            f"{r['encode_gflop_s'] / peak:.2f} | {r['decode_img_s']:.1f} | {r['decode_gflop_s']:.1f} | "
            f"{r['decode_gflop_s'] / peak:.2f} |"
        )
        for stage in ("encode", "decode"):
            record(
                "tokenizer",
                f"{r['preset']} {stage} ({r[f'{stage}_img_s']:.0f} img/s)",
                r[f"{stage}_gflop_s"],
                "GFLOP/s",
                "fp32 matmul",
                peak,
            )


if __name__ == "__main__":
    with recorded("tokenizer_speed"):
        main()
