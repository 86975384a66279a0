"""Prior sampling speed: the decode loops against transformers' generate() and the memory-bandwidth ceiling.

    python benchmarks/generation_speed.py [--batch 8] [--tokens 256] [--threads 2] [--digits-prior DIR]

A 29M-parameter Llama prior (randomly initialised: the speed of "generate" and "static" does
not depend on the weights) samples `--tokens` tokens per image from a 1,024-code tokenizer,
10 classes, on the CPU. Tables:

1. Per-step time of each sampler, without and with CFG 2.0 (batched: one forward pass for the
   conditional and unconditional rows), against `generate` (transformers' `generate()` driven
   by vqar's logits processor: the reference, and what vqar used before). The ceiling is
   the time to read the weights once from memory (their bytes / the streaming-read bandwidth
   measured here); "of ceiling" = ceiling / step time. The header also gives the time of the
   step's weight matmuls alone (PyTorch's GEMM at batch-size M): the floor no loop around
   the same kernels goes below.
2. The static sampler at 64, 256 and 1,024 tokens per image: how step time grows with the KV cache.
3. Jacobi decoding where drafts can be right: a trained digits prior (`--digits-prior`, e.g.
   `outputs/demo/prior-run/prior` from `make demo`) at CFG 2.0, batch 1 and `--batch`: mean
   accepted tokens per forward pass and wall clock against "static".
"""

from __future__ import annotations

import argparse
import functools

import torch
from summary import best_seconds, record, recorded

from vqar.ar import VocabLayout, build_prior, load_prior
from vqar.generation import JacobiStats, SamplingConfig, build_prompts, generate_ids

PRIOR_29M = dict(hidden_size=512, num_hidden_layers=9, num_attention_heads=8, intermediate_size=1376)


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: summing a buffer far larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    return buffer.numel() * 4 / best_seconds(buffer.sum, repeats)


def matmul_floor(prior, rows: int, repeats: int = 5) -> float:
    """Seconds per step spent in the weight matmuls alone: every Linear of the prior applied once to
    [rows, in] activations, as one decode step does (PyTorch's CPU GEMM at small M)."""
    weights = [m.weight for m in prior.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.shape[1]) for w in weights]

    def run():
        for x, w in zip(inputs, weights):
            x @ w.T

    return best_seconds(run, repeats)


def digits_layout(tokens: int) -> VocabLayout:
    side = int(tokens**0.5)
    return VocabLayout.create(
        codebook_size=1024, tokens_per_image=side * side, grid=[side, side], class_names=list("0123456789")
    )


def step_seconds(prior, layout, prompts, sampling: SamplingConfig, repeats: int) -> float:
    return (
        best_seconds(lambda: generate_ids(prior, layout, prompts, sampling), repeats, warm_up=False)
        / layout.tokens.tokens_per_image
    )


def sampler_table(prior, layout, prompts, repeats: int, ceiling: float) -> None:
    samplers = {"generate": {}, "static": {}, "static + compile": {"compile": True}, "jacobi": {}}
    seconds = {}
    for cfg in (1.0, 2.0):
        for name, extra in samplers.items():
            sampling = SamplingConfig(sampler=name.split()[0], seed=0, top_k=100, cfg_scale=cfg, **extra)
            if extra:
                generate_ids(prior, layout, prompts, sampling)  # compiles once, outside the timing
            if name == "jacobi":
                sampling = SamplingConfig(sampler="jacobi", seed=0, top_k=100, cfg_scale=cfg)
            seconds[name, cfg] = step_seconds(prior, layout, prompts, sampling, repeats)
    print("| sampler | CFG | ms/step | tokens/s | vs generate | of ceiling | CFG / no CFG |")
    print("|---|---|---|---|---|---|---|")
    for (name, cfg), step in seconds.items():
        base, rate = seconds["generate", cfg], len(prompts) / step
        print(
            f"| {name} | {cfg:g} | {step * 1e3:.1f} | {rate:.0f} | {base / step:.2f}x | "
            f"{ceiling / step:.2f} | {step / seconds[name, 1.0]:.2f}x |"
        )
        if name != "generate":
            record("prior sampling", f"{name}, CFG {cfg:g}", rate, "tok/s", "generate()", len(prompts) / base)


def scaling_table(batch: int, repeats: int, ceiling: float) -> None:
    print("\n| tokens per image | static ms/step | of ceiling |\n|---|---|---|")
    for tokens in (64, 256, 1024):
        torch.manual_seed(0)
        layout = digits_layout(tokens)
        prior = build_prior(layout, size="S", **PRIOR_29M).eval()
        prompts = build_prompts(layout, classes=[i % 10 for i in range(batch)])
        seconds = step_seconds(prior, layout, prompts, SamplingConfig(seed=0, top_k=100), repeats)
        print(f"| {tokens} | {seconds * 1e3:.1f} | {ceiling / seconds:.2f} |")


def jacobi_table(folder: str, batch: int, repeats: int) -> None:
    prior, layout = load_prior(folder)
    prior.eval()
    print(f"\nJacobi on {folder} ({layout.tokens.tokens_per_image} tokens per image), CFG 2.0, top-k 100:\n")
    print(
        "| batch | window | tokens / forward | static s | jacobi s | wall-clock speed-up |\n|---|---|---|---|---|---|"
    )
    for rows in (1, batch):
        prompts = build_prompts(layout, classes=[i % max(1, layout.ids.num_classes) for i in range(rows)])
        static = SamplingConfig(seed=0, top_k=100, cfg_scale=2.0)
        static_s = best_seconds(functools.partial(generate_ids, prior, layout, prompts, static), repeats, warm_up=False)
        for window in (8, 16):
            jacobi = SamplingConfig(sampler="jacobi", seed=0, top_k=100, cfg_scale=2.0, jacobi_window=window)
            stats = JacobiStats()
            generate_ids(prior, layout, prompts, jacobi, stats=stats)
            jacobi_s = best_seconds(
                functools.partial(generate_ids, prior, layout, prompts, jacobi), repeats, warm_up=False
            )
            print(
                f"| {rows} | {window} | {stats.tokens_per_forward:.2f} | {static_s:.2f} | {jacobi_s:.2f} | "
                f"{static_s / jacobi_s:.2f}x |"
            )
            record("jacobi decoding", f"batch {rows}, window {window}", static_s / jacobi_s, "x", "static", 1.0)


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--digits-prior", help="a trained prior folder for the Jacobi table (make demo writes one)")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layout = digits_layout(args.tokens)
    prior = build_prior(layout, size="S", **PRIOR_29M).eval()
    prompts = build_prompts(layout, classes=[i % 10 for i in range(args.batch)])
    weight_bytes = sum(p.numel() * p.element_size() for p in prior.parameters())
    bandwidth = read_bandwidth()
    ceiling = weight_bytes / bandwidth
    floor = {rows: matmul_floor(prior, rows) for rows in (args.batch, 2 * args.batch)}
    print(
        f"prior: Llama {weight_bytes / 4e6:.1f}M parameters, {layout.tokens.tokens_per_image} tokens per image, "
        f"batch {args.batch}, {torch.get_num_threads()} CPU threads; streaming read {bandwidth / 1e9:.1f} GB/s, "
        f"so reading the weights once takes {ceiling * 1e3:.1f} ms (the ceiling per step); the weight matmuls "
        f"alone take {floor[args.batch] * 1e3:.1f} ms per step at {args.batch} rows, "
        f"{floor[2 * args.batch] * 1e3:.1f} ms at {2 * args.batch} (CFG)\n"
    )
    generate_ids(prior, layout, prompts[:1], SamplingConfig(sampler="generate"))  # warm-up
    sampler_table(prior, layout, prompts, args.repeats, ceiling)
    if not args.skip_scaling:
        scaling_table(args.batch, args.repeats, ceiling)
    if args.digits_prior:
        jacobi_table(args.digits_prior, args.batch, args.repeats)


if __name__ == "__main__":
    with recorded("generation_speed"):
        main()
