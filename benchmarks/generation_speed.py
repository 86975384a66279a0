"""Prior sampling speed: generated tokens/s with the KV cache, without it, and with CFG.

    python benchmarks/generation_speed.py [--batch 8] [--tokens 256] [--repeats 2]

A ~20M-parameter Llama prior (randomly initialised: speed does not depend on the weights)
over 256 tokens per image from a 1,024-code tokenizer, 10 classes, on the CPU. The rows:
- KV cache: vqar's `generate_ids` (transformers' `generate()` with its cache);
- no cache: the same with `use_cache=False` — the baseline the cache is measured against;
- CFG, batched: vqar's guidance, conditional and unconditional rows in one forward pass;
- CFG, transformers: `generate(guidance_scale=...)`, which runs a second, sequential forward
  pass per step for the unconditional prompt — the baseline batched CFG is measured against.
"""

from __future__ import annotations

import argparse
import time

import torch
from summary import record
from transformers import LogitsProcessorList

from vqar.ar import VocabLayout, build_prior
from vqar.generation import ImageTokenSampler, SamplingConfig, build_prompts, generate_ids

PRIOR_20M = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1376)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def transformers_cfg(prior, layout: VocabLayout, prompts: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG through transformers' own guidance_scale: a second forward pass per step."""
    unconditional = prompts.clone()
    unconditional[:, 0] = layout.null_class
    greedy_legal = ImageTokenSampler(layout.image_vocab_size, SamplingConfig(temperature=0), None)
    return prior.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        negative_prompt_ids=unconditional,
        guidance_scale=scale,
        max_new_tokens=layout.tokens_per_image,
        min_new_tokens=layout.tokens_per_image,
        do_sample=False,
        logits_processor=LogitsProcessorList([greedy_legal]),
        pad_token_id=layout.pad,
        eos_token_id=None,
    )


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    side = int(args.tokens**0.5)
    layout = VocabLayout(
        codebook_size=1024, tokens_per_image=side * side, grid=[side, side], class_names=list("0123456789")
    )
    prior = build_prior(layout, size="S", **PRIOR_20M).eval()
    prompts = build_prompts(layout, classes=[i % 10 for i in range(args.batch)])
    new_tokens = args.batch * layout.tokens_per_image
    sampling = SamplingConfig(seed=0, top_k=100)
    rows = [
        ("KV cache", lambda: generate_ids(prior, layout, prompts, sampling)),
        ("no cache", lambda: generate_ids(prior, layout, prompts, sampling, use_cache=False)),
        (
            "CFG 2.0, batched (vqar)",
            lambda: generate_ids(prior, layout, prompts, SamplingConfig(seed=0, cfg_scale=2.0)),
        ),
        ("CFG 2.0, transformers guidance_scale", lambda: transformers_cfg(prior, layout, prompts, 2.0)),
    ]
    generate_ids(prior, layout, prompts[:1], sampling)  # warm-up
    rates = {}
    for name, fn in rows:
        repeats = 1 if name == "no cache" else args.repeats
        rates[name] = new_tokens / best_seconds(fn, repeats)

    params = sum(p.numel() for p in prior.parameters()) / 1e6
    print(
        f"prior: Llama {params:.1f}M parameters, {layout.tokens_per_image} tokens per image, batch {args.batch}, "
        f"{torch.get_num_threads()} CPU threads\n"
    )
    print("| sampling | tokens/s | vs baseline |")
    print("|---|---|---|")
    baselines = {"KV cache": "no cache", "CFG 2.0, batched (vqar)": "CFG 2.0, transformers guidance_scale"}
    for name, rate in rates.items():
        ratio = f"{rate / rates[baselines[name]]:.1f}x {baselines[name]}" if name in baselines else "baseline"
        print(f"| {name} | {rate:.0f} | {ratio} |")
        if name in baselines:
            record("prior sampling", name, rate, "tok/s", baselines[name], rates[baselines[name]])


if __name__ == "__main__":
    main()
