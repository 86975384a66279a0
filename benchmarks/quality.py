"""Rate–distortion–modelability on photographs: tokenizer variants, each with its prior, against JPEG and WebP.

    python benchmarks/quality.py [--variants recipe|all|NAME,NAME] [--output outputs/bench-quality]

For each variant: train the tokenizer on the bundled photos (recipes/photos-cpu.yaml with the
variant's overrides; 64 px crops of the six training photographs), tokenize the training
photographs as random 64 px crops (`vqar tokenize --crops`), train an unconditional prior on
those tokens (recipes/photos-prior-cpu.yaml), then `vqar evaluate` the two held-out photographs
whole at 256 px. The prior codes their 64x64 token grids tile by tile (16x16 tokens, the grid it
was trained on), so "prior bits" is what an entropy coder driven by the prior would spend on the
whole image. Every row is one variant:

- PSNR, SSIM and the worst flat-colour error (8-bit levels) of the reconstructions;
- raw bits (tokens x log2 K) and the prior's bits per image, and the prior's share of raw;
- JPEG and WebP PSNR at the raw rate and at the prior's rate (Pillow, the quality whose mean
  file size is closest);
- minutes of training (tokenizer + prior) on this machine.

Runs already in --output are reused (delete a variant's folder to retrain it). `--variants
recipe` (the default, what `make bench` runs) is the shipped recipe alone: about 20 minutes on
2 CPU cores; `all` is every variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provenance import header, mark_run, reusable_run, reused_from
from summary import Table, record

from vqar.evaluation import EvaluateArgs, evaluate_tokenizer
from vqar.losses import LossConfig
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior
from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CROPS = 128  # random 64 px crops of each training photograph for the prior
# the recipe keeps the GAN phase's settings at weight 0; these runs are the 1,500 steps it had before
GAN = ["--adversarial_weight", "0.1", "--max_steps", "1500", "--disc_start", "750"]
VARIANTS = {  # name: (what it tries, overrides of recipes/photos-cpu.yaml), most telling first
    "recipe": (
        "the shipped recipe: VQ, 1,024 l2-normalised 8-dim codes (LlamaGen's), EMA codebook, rotation trick "
        "(preset vq-cpu), GroupNorm groups of 8 channels, L2, no GAN",
        [],
    ),
    "fsq": ("FSQ 8,5,5,5 (1,000 codes; preset fsq-cpu), otherwise the recipe", ["--preset", "fsq-cpu"]),
    "before": (
        "photos-cpu as it was: FSQ, one channel per GroupNorm group (instance norm at width 32), L1, 1,500 steps "
        "with a GAN from step 750",
        ["--preset", "fsq-cpu", "--tokenizer", '{"norm_group_size": 1}', "--regression", "l1", *GAN],
    ),
    "gan": (
        "FSQ with the GAN phase on: 1,500 steps, PatchGAN from step 750, LeCAM, adaptive weight",
        ["--preset", "fsq-cpu", *GAN],
    ),
    "fsq-6x5": (
        "a wider FSQ latent: six dimensions of 5 levels (15,625 codes, 13.9 bits a token)",
        [
            "--preset",
            "fsq-cpu",
            "--tokenizer",
            '{"latent_channels": 6, "quantizer": {"kind": "fsq", "levels": [5, 5, 5, 5, 5, 5]}}',
        ],
    ),
    "lfq-entropy": ("LFQ: 10 bits, MAGVIT-v2's entropy penalty (preset lfq-cpu)", ["--preset", "lfq-cpu"]),
    "l1": ("L1 in place of L2", ["--regression", "l1"]),
    "deeper": (
        "two residual blocks a level, in the same minutes (850 steps)",
        ["--tokenizer", '{"num_res_blocks": 2}', "--max_steps", "850"],
    ),
    "cheaper": (
        "a cheaper net for more steps in the same minutes: width 24 (1,750 steps)",
        ["--tokenizer", '{"channels": 24}', "--max_steps", "1750"],
    ),
}


def run_variant(name: str, overrides: list[str], output: Path, reuse: bool = False) -> dict:
    """Train (or reuse: made at this commit, or any with --reuse) one variant's tokenizer and prior, evaluate
    at 256 px; returns the report, with the commit the run was made at."""
    runs, quiet = output / name, ["--log_with", "none"]
    made_at = reusable_run(runs, reuse)
    if not (runs / "tokenizer" / "metrics.json").is_file():
        recipe = [str(RECIPES / "photos-cpu.yaml"), "--output_dir", str(runs / "tokenizer"), *quiet, *overrides]
        train_tokenizer(*parse_recipe(recipe, (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)))
    tokenizer = str(runs / "tokenizer" / "tokenizer")
    if not (runs / "prior" / "metrics.json").is_file():
        tokens = str(runs / "tokens")
        tokenize_dataset(
            TokenizeArgs(tokenizer=tokenizer, data="photos", eval_fraction=0.25, crops=CROPS, output=tokens)
        )
        recipe = [str(RECIPES / "photos-prior-cpu.yaml"), "--tokens", tokens, "--output_dir", str(runs / "prior")]
        train_prior(*parse_recipe([*recipe, *quiet], (PriorArgs, TrainConfig)))
    if not (runs / "report" / "report.json").is_file():
        args = EvaluateArgs(
            tokenizer=tokenizer,
            data="photos",
            holdout=0.25,
            resolution=256,
            resize_to=256,
            prior=str(runs / "prior" / "prior"),
            output=str(runs / "report"),
        )
        evaluate_tokenizer(args)
    if made_at is None:
        mark_run(runs)
    report = json.loads((runs / "report" / "report.json").read_text())
    seconds = sum(
        json.loads((runs / stage / "metrics.json").read_text())["seconds"] for stage in ("tokenizer", "prior")
    )
    return report | {"training_minutes": seconds / 60, "made_at": made_at}


COLUMNS = [
    "variant", "PSNR dB", "SSIM", "flat colour error", "raw bits", "prior bits", "prior / raw", "JPEG dB at raw",
    "WebP dB at raw", "JPEG dB at prior", "WebP dB at prior", "training min",
]  # fmt: skip


def row(name: str, report: dict) -> list[str]:
    raw, coded = report["bits_per_image"], report["prior_bits_per_image"]
    codecs = [report[k]["psnr"] for k in ("jpeg", "webp", "jpeg_at_prior_rate", "webp_at_prior_rate")]
    return [
        name, f"{report['psnr']:.2f}", f"{report['ssim']:.3f}", f"{report['flat_colour_error']:.0f}", f"{raw:,.0f}",
        f"{coded:,.0f}", f"{coded / raw:.0%}", *(f"{c:.2f}" for c in codecs), f"{report['training_minutes']:.1f}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="recipe", help="recipe | all | comma-separated names")
    parser.add_argument("--output", default="outputs/bench-quality")
    parser.add_argument("--reuse", action="store_true", help="show runs made at another commit instead of redoing them")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
    print(header("quality"))
    title = "two held-out photographs at 256 px; the prior codes each 64x64 token grid as 16 tiles of 16x16"
    table = Table("quality", title, COLUMNS)
    for name in names:
        report = run_variant(name, VARIANTS[name][1], Path(args.output), args.reuse)
        table.add(row(name, report), reused_from=reused_from(report["made_at"]))
        jpeg = report["jpeg_at_prior_rate"]["psnr"]
        record("photo quality", f"{name} PSNR at the prior's rate", report["psnr"], "dB", "JPEG at that rate", jpeg)
    print(title + "\n")
    table.print()
    table.save()
    print("\nvariants:")
    for name in names:
        print(f"- {name}: {VARIANTS[name][0]}")


if __name__ == "__main__":
    main()
