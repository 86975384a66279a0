"""Raster vs next-scale (VAR) AR on digits: held-out bits per image, class agreement, sampling speed.

    python benchmarks/next_scale.py [--output outputs/bench-next-scale] [--images 100] [--threads 2]

Two pipelines on scikit-learn's digits, each prior trained with the same recipe budget (size
"cpu", 400 steps of 64 sequences) on the tokens of its own tokenizer:
- raster: recipes/quickstart-digits.yaml (an 8x8 FSQ grid, 64 tokens, 125 codes) and
  recipes/digits-prior-cpu.yaml: one forward pass per token;
- next-scale: recipes/multiscale-digits.yaml (VQ residual maps at scales 1, 2, 3, 4, 6, 8: 130
  tokens, 256 codes) and recipes/multiscale-digits-prior.yaml: one forward pass per scale.
Runs already in --output are reused when they were made at the present commit (any, with --reuse). Both then sample --images digits
(equal numbers per class, CFG 2.0, temperature 1) in one batch; a logistic regression trained on
real digits (the demo's) says how many show the class asked for. Sampling speed is the best of
two timings of that batch, and of one digit per class sampled one at a time, in images/s
(decoding included); "vs raster" is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from provenance import header, mark_run, reusable_run, reused_from
from summary import Table, best_seconds, record

from vqar.ar import load_prior
from vqar.data import save_images
from vqar.demo import digit_features, fit_digit_classifier
from vqar.generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for
from vqar.losses import LossConfig
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior
from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PIPELINES = {
    "raster": ("quickstart-digits.yaml", "digits-prior-cpu.yaml"),
    "next-scale": ("multiscale-digits.yaml", "multiscale-digits-prior.yaml"),
}
SAMPLING = SamplingConfig(temperature=1.0, cfg_scale=2.0, seed=0)


def trained(name: str, output: Path) -> tuple[dict, dict, str]:
    """(tokenizer metrics, prior metrics, prior folder) of a pipeline, trained unless already in `output`."""
    tokenizer_recipe, prior_recipe = PIPELINES[name]
    runs = output / name
    quiet = ["--log_with", "none"]
    if not (runs / "tokenizer" / "metrics.json").is_file():
        train_tokenizer(
            *parse_recipe(
                [str(RECIPES / tokenizer_recipe), "--output_dir", str(runs / "tokenizer"), *quiet],
                (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig),
            )
        )
    if not (runs / "prior" / "metrics.json").is_file():
        tokens = runs / "tokens"
        tokenize_dataset(
            TokenizeArgs(tokenizer=str(runs / "tokenizer" / "tokenizer"), data="digits", output=str(tokens))
        )
        train_prior(
            *parse_recipe(
                [str(RECIPES / prior_recipe), "--tokens", str(tokens), "--output_dir", str(runs / "prior"), *quiet],
                (PriorArgs, TrainConfig),
            )
        )
    metrics = [json.loads((runs / stage / "metrics.json").read_text()) for stage in ("tokenizer", "prior")]
    return *metrics, str(runs / "prior" / "prior")


def measure(name: str, output: Path, images: int, classifier) -> dict:
    tokenizer_metrics, prior_metrics, folder = trained(name, output)
    prior, layout = load_prior(folder)
    tokenizer = load_tokenizer_for(folder, layout)
    classes = [i % layout.ids.num_classes for i in range(images)]
    prompts = build_prompts(layout, classes=classes)
    samples = generate_images(prior, tokenizer, layout, prompts, SAMPLING)
    seconds = best_seconds(lambda: generate_images(prior, tokenizer, layout, prompts, SAMPLING), 2, warm_up=False)
    singles = [build_prompts(layout, classes=[c]) for c in range(layout.ids.num_classes)]
    one_at_a_time = best_seconds(
        lambda: [generate_images(prior, tokenizer, layout, p, SAMPLING) for p in singles], 2, warm_up=False
    )
    agreement = float(np.mean(classifier.predict(digit_features(samples)) == np.array(classes)))
    save_images(samples[: 10 * layout.ids.num_classes], output / name / "samples", rows=10)
    return {
        "tokens": layout.tokens.tokens_per_image,
        "passes": layout.tokens.decode_steps,
        "recon_psnr": tokenizer_metrics["psnr"],
        "parameters": sum(p.numel() for p in prior.parameters()),
        "bits_per_image": prior_metrics["bits_per_image"],
        "agreement": agreement,
        "images_per_s": images / seconds,
        "single_images_per_s": len(singles) / one_at_a_time,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/bench-next-scale")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reuse", action="store_true", help="show runs made at another commit instead of redoing them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    made_at = {name: reusable_run(output / name, args.reuse) for name in PIPELINES}
    print(header("next_scale"))
    classifier, real_accuracy = fit_digit_classifier(16)
    rows = {name: measure(name, output, args.images, classifier) for name in PIPELINES}
    print(
        f"\n{args.images} digits per prior, CFG 2.0, {torch.get_num_threads()} CPU threads; the classifier "
        f"recognises {real_accuracy:.1%} of real held-out digits\n"
    )
    columns = ["prior", "tokens/image", "forward passes/image", "tokenizer PSNR", "prior parameters"]
    columns += ["held-out bits/image", "class agreement", f"images/s, {args.images} at once", "vs raster"]
    columns += ["images/s, one at a time", "vs raster"]
    table = Table("next_scale", "raster vs next-scale digits priors", columns)
    base, single = rows["raster"]["images_per_s"], rows["raster"]["single_images_per_s"]
    for name, r in rows.items():
        trained_fresh = made_at[name] is None
        if trained_fresh:
            mark_run(output / name)
        cells = [name, r["tokens"], r["passes"], f"{r['recon_psnr']:.2f} dB", f"{r['parameters'] / 1e6:.2f}M"]
        cells += [f"{r['bits_per_image']:.1f}", f"{r['agreement']:.0%}", f"{r['images_per_s']:.1f}"]
        cells += [f"{r['images_per_s'] / base:.1f}x", f"{r['single_images_per_s']:.1f}"]
        cells += [f"{r['single_images_per_s'] / single:.1f}x"]
        # the speed is measured now either way; the training-dependent figures come from the run's commit
        table.add(cells, reused_from=reused_from(made_at[name]))
    table.print()
    table.save()
    scaled = rows["next-scale"]
    record("next-scale sampling", f"{args.images} digits at once", scaled["images_per_s"], "img/s", "raster", base)
    record("next-scale sampling", "one digit at a time", scaled["single_images_per_s"], "img/s", "raster", single)
    print(f"\nsample grids: {output}/<prior>/samples/grid.png")


if __name__ == "__main__":
    main()
