"""How many GPUs each model needs, and the memory per GPU under DDP, ZeRO-2 and FSDP / ZeRO-3.

    python benchmarks/scale_plan.py [--gpu-gib 80] [--check]

For LlamaGen's prior sizes (B 111M, L 343M, XL 775M, XXL 1.4B, 3B) on ImageNet's c2i tokens (16x16
codes of 16,384, 1,000 classes) at 32 sequences per GPU, and the shipped ImageNet tokenizer recipes
at their batch size: the forward and backward of one step are traced under torch's MemTracker —
on fake tensors for the priors (no memory, no compute: torch's FakeTensorMode, bf16 autocast with
fp32 master weights as accelerate trains), for real on this CPU for the tokenizers (their
quantizers branch on values) — with and without gradient checkpointing; gradients and AdamW's
moments are 12 bytes a parameter. Per GPU:

- DDP: weights + gradients + optimizer + activations (every GPU holds everything);
- ZeRO-2: weights + (gradients + optimizer) / N + activations;
- FSDP / ZeRO-3: (weights + gradients + optimizer) / N + two layers gathered + activations;

and the fewest GPUs (a power of two) whose per-GPU figure fits in `--gpu-gib` less 10 %.
`--check` trains the small sizes for a step on this CPU in a child process and compares its peak
resident memory with the plan's fp32 figure for it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from summary import recorded

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
PRIORS = ("B", "L", "XL", "XXL", "3B")
PRIOR_BATCH = 32  # LlamaGen: a global batch of 256 on 8 GPUs
TOKENIZER_RECIPES = ("imagenet-vq16.yaml", "imagenet-fsq-64k.yaml", "imagenet-lfq-256k.yaml", "imagenet-bsq-18bit.yaml")


@dataclass
class Footprint:
    """Bytes of one training step on one device, by kind."""

    name: str
    batch: int  # per GPU
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # the peak of everything else: activations, temporaries
    activations_checkpointed: int
    largest_layer: int  # bytes of the largest block's weights (FSDP gathers it whole)

    def per_gpu(self, strategy: str, gpus: int, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        state = self.weights + self.gradients + self.optimizer
        if strategy == "DDP":
            return state + acts
        if strategy == "ZeRO-2":
            return self.weights + (self.gradients + self.optimizer) // gpus + acts
        return state // gpus + 2 * self.largest_layer + acts  # FSDP / ZeRO-3

    def gpus_needed(self, strategy: str, checkpointing: bool, budget: int) -> int | None:
        for gpus in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            if strategy == "DDP" and gpus > 1:
                return None  # DDP does not spread the memory
            if self.per_gpu(strategy, gpus, checkpointing) <= budget:
                return gpus
        return None


def _traced_step(build, make_batch, loss_of, checkpointing: bool, autocast: bool, fake: bool = True) -> dict:
    """One forward and backward under torch's MemTracker (on fake tensors unless `fake` is False):
    the parameters, and the peak of everything but weights and gradients (activations, temporaries).
    Gradients and AdamW's moments are counted from the parameters (fp32: 4 and 8 bytes each)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = build()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        batch = make_batch()
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model, batch)
            loss.backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    state = sum(peak[kind] for kind in (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT))
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "parameters": parameters,
        "weights": peak[_MemRefType.PARAM] + peak[_MemRefType.BUFFER],
        "gradients": 4 * parameters,
        "optimizer": 8 * parameters,
        "rest": peak["Total"] - state,
    }


def prior_footprint(size: str, batch: int = PRIOR_BATCH, autocast: bool = True) -> Footprint:
    from vqar.ar import PRIOR_SIZES, VocabLayout, build_prior

    layout = VocabLayout.create(
        codebook_size=16384, tokens_per_image=256, grid=[16, 16], class_names=[str(i) for i in range(1000)]
    )
    build = lambda: build_prior(layout, size=size)  # noqa: E731
    make_batch = lambda: torch.randint(0, layout.ids.vocab_size, (batch, layout.codec.sequence_length))  # noqa: E731
    loss_of = lambda model, ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    plain = _traced_step(build, make_batch, loss_of, False, autocast)
    checkpointed = _traced_step(build, make_batch, loss_of, True, autocast)
    shape = PRIOR_SIZES[size]
    h, m = shape["hidden_size"], shape["intermediate_size"]
    layer = 4 * (4 * h * h + 3 * h * m)  # attention and MLP weights of one decoder layer, fp32
    return Footprint(
        f"prior {size}", batch, plain["parameters"], plain["weights"], plain["gradients"], plain["optimizer"],
        plain["rest"], checkpointed["rest"], layer,
    )  # fmt: skip


def tokenizer_footprint(recipe: str) -> Footprint:
    """A tokenizer recipe's generator step. Its quantizers branch on values (fake tensors cannot trace
    them), so it runs for real on this CPU at one and two images, in fp32, and the activations are
    extrapolated linearly to the recipe's batch: an upper bound for bf16 on a GPU."""
    from vqar import TokenizerConfig, VQTokenizer
    from vqar.tokenizer import load_preset

    fields = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    config = {**load_preset(fields["preset"]), "resolution": fields["resolution"], **fields.get("tokenizer", {})}
    batch, side = fields["batch_size"], fields["resolution"]
    build = lambda: VQTokenizer(TokenizerConfig(**config))  # noqa: E731

    def loss_of(model, pixels):
        out = model(pixels)
        return (out.reconstruction - pixels).pow(2).mean() + out.bottleneck_loss

    def step(images: int, checkpointing: bool) -> dict:
        torch.manual_seed(0)
        make_batch = lambda: torch.rand(images, 3, side, side) * 2 - 1  # noqa: E731
        return _traced_step(build, make_batch, loss_of, checkpointing, autocast=False, fake=False)

    one, two = step(1, False), step(2, False)
    one_ckpt, two_ckpt = step(1, True), step(2, True)
    per_image, per_image_ckpt = two["rest"] - one["rest"], two_ckpt["rest"] - one_ckpt["rest"]
    return Footprint(
        f"tokenizer {recipe.removesuffix('.yaml')} (G step, fp32)", batch, one["parameters"], one["weights"],
        one["gradients"], one["optimizer"], one["rest"] + (batch - 1) * per_image,
        one_ckpt["rest"] + (batch - 1) * per_image_ckpt, one["weights"],
    )  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def plan_table(footprints: list[Footprint], budget: int) -> str:
    lines = [
        "| model | parameters | batch/GPU | weights | grads | Adam | activations (ckpt) | DDP GiB/GPU | ZeRO-2 GiB/GPU at 8 | "
        "FSDP GiB/GPU at 8 | GPUs: DDP | ZeRO-2 | FSDP | FSDP + ckpt |",
        "|---" * 14 + "|",
    ]
    for f in footprints:
        need = {(s, c): f.gpus_needed(s, c, budget) for s in ("DDP", "ZeRO-2", "FSDP") for c in (False, True)}
        shown = lambda n: str(n) if n else "> 512"  # noqa: E731
        ddp = shown(need["DDP", False]) if need["DDP", False] else ("1 (ckpt)" if need["DDP", True] else "no")
        lines.append(
            f"| {f.name} | {f.parameters / 1e6:,.0f}M | {f.batch} | {_gib(f.weights)} | "
            f"{_gib(f.gradients)} | {_gib(f.optimizer)} | {_gib(f.activations)} ({_gib(f.activations_checkpointed)}) | "
            f"{_gib(f.per_gpu('DDP', 1, False))} | {_gib(f.per_gpu('ZeRO-2', 8, False))} | "
            f"{_gib(f.per_gpu('FSDP', 8, False))} | {ddp} | {shown(need['ZeRO-2', False])} | "
            f"{shown(need['FSDP', False])} | {shown(need['FSDP', True])} |"
        )
    return "\n".join(lines)


def measured_peak(size: str, batch: int) -> int:
    """Peak resident bytes of one real fp32 training step (forward, backward) on this CPU in a child
    process, above what it held before the model was built (Linux's VmHWM, reset just before)."""
    code = f"""
import json, torch
from pathlib import Path
from vqar.ar import VocabLayout, build_prior
def kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1])
layout = VocabLayout.create(codebook_size=16384, tokens_per_image=256, grid=[16, 16], class_names=[str(i) for i in range(1000)])
torch.set_num_threads(2)
ids = torch.randint(0, layout.ids.vocab_size, ({batch}, layout.codec.sequence_length))
before = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the present
model = build_prior(layout, size={size!r}).train()
model(input_ids=ids, labels=ids).loss.backward()
print(json.dumps((kib("VmHWM") - before) * 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    parser.add_argument("--check", action="store_true", help="only compare the plan with real steps on this CPU")
    args = parser.parse_args()
    budget = int(args.gpu_gib * GiB * 0.9)
    if args.check:
        print("\nThe fake-tensor plan of a forward and backward (weights, gradients, activations; fp32) against the")
        print("peak resident memory of the same step for real on this CPU:\n")
        print("| model | batch | planned MiB | measured MiB | measured / planned |\n|---|---|---|---|---|")
        for size, batch in (("tiny", 8), ("cpu", 8), ("S", 4), ("B", 2)):
            f = prior_footprint(size, batch=batch, autocast=False)
            planned = f.weights + f.gradients + f.activations
            peak = measured_peak(size, batch)
            print(f"| prior {size} | {batch} | {planned / 2**20:,.0f} | {peak / 2**20:,.0f} | {peak / planned:.2f} |")
        return
    priors = [prior_footprint(size) for size in PRIORS]
    tokenizers = [tokenizer_footprint(recipe) for recipe in TOKENIZER_RECIPES]
    print(f"\nbf16 autocast, fp32 master weights, AdamW; a GPU of {args.gpu_gib:g} GiB, 90 % usable:\n")
    print(plan_table(priors + tokenizers, budget))


if __name__ == "__main__":
    with recorded("scale_plan"):
        main()
