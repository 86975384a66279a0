"""`vqar demo` (and `make demo`): the whole main job on bundled digits, sized for 2 CPU cores.

1. train a tokenizer on scikit-learn's digits (recipes/quickstart-digits.yaml);
2. tokenize the digits with it;
3. train a class-conditional prior on the tokens (recipes/digits-prior-cpu.yaml);
4. generate a grid with one row per digit class, with classifier-free guidance;
5. report: reconstruction PSNR, held-out bits per image, and how often a logistic regression
   trained on real digits recognises each generated digit as the class it was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.hf_argparser import HfArg

from .ar import load_prior
from .data import ImageDataset, ImageTransform, collate_images, load_source, save_images, split_holdout
from .generation import SamplingConfig, build_prompts, generate_images
from .losses import LossConfig
from .tokenizer import VQTokenizer
from .training.encode_dataset import TokenizeArgs, tokenize_dataset
from .training.recipes import TrainConfig, parse_recipe
from .training.train_prior import PriorArgs, train_prior
from .training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer


@dataclass
class DemoArgs:
    """The quickstart on bundled digits: tokenizer, tokens, prior, samples, report (~5 minutes on 2 cores)."""

    output: str = HfArg(default="outputs/demo", help="where everything is written")
    recipes: str = HfArg(default="recipes", help="the folder holding the demo's recipes")


TOKENIZER_RECIPE = "quickstart-digits.yaml"
PRIOR_RECIPE = "digits-prior-cpu.yaml"
SAMPLES_PER_CLASS = 20
DEMO_SAMPLING = SamplingConfig(temperature=1.0, cfg_scale=2.0, seed=0)


def digit_features(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, 64] in scikit-learn's digits scale (8x8, 0..16)."""
    gray = images.float().mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(gray, 8)
    return ((small + 1) * 8).clamp(0, 16).flatten(1).cpu().numpy()


def real_digits(resolution: int) -> tuple[dict, dict]:
    """The digits as the tokenizer saw them, split like every vqar stage: (train, held-out)."""
    train, held_out = split_holdout(load_source("digits"), eval_fraction=0.1, seed=0)
    transform = ImageTransform(resolution)
    return tuple(collate_images([ImageDataset(s, transform)[i] for i in range(len(s))]) for s in (train, held_out))


def fit_digit_classifier(resolution: int):
    """Logistic regression on real training digits; returns (classifier, accuracy on held-out real digits)."""
    from sklearn.linear_model import LogisticRegression

    train, held_out = real_digits(resolution)
    classifier = LogisticRegression(max_iter=2000).fit(digit_features(train["pixels"]), train["labels"].numpy())
    accuracy = classifier.score(digit_features(held_out["pixels"]), held_out["labels"].numpy())
    return classifier, float(accuracy)


class DigitFeatures(torch.nn.Module):
    """A small CNN for digits: [B, 3, H, W] in [0, 1] -> 64 features (its classifier head is trained on
    them, then dropped). The demo's FID is measured in this space: Inception's, learned on ImageNet photos
    at 299 px, says little about 16 px digits, and needs a download."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(), torch.nn.Linear(64 * 16, 64), torch.nn.ReLU(),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.mean(dim=1, keepdim=True))


def digit_feature_network(resolution: int, path: Path, epochs: int = 8) -> Path:
    """Train `DigitFeatures` (with a linear head) on the real training digits, offline, in seconds; save the
    feature part as a torch.export program at `path` (what `vqar evaluate-generation --features PATH` takes)."""
    train, _ = real_digits(resolution)
    torch.manual_seed(0)
    features, head = DigitFeatures(), torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=3e-3)
    pixels, labels = (train["pixels"] + 1) / 2, train["labels"]
    for _ in range(epochs):
        for order in torch.randperm(len(pixels)).split(64):
            loss = F.cross_entropy(head(features(pixels[order])), labels[order])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    example = torch.zeros(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(features.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def digits_fid(images: torch.Tensor, resolution: int, feature_path: Path, tokenizer) -> dict:
    """FID in the digit feature space: the generated images, real held-out digits (the floor: real images
    as many as the held-out set), and decoded random codes (the ceiling), each against the training digits."""
    from .fid import ScriptedFeatures
    from .generation_metrics import FeatureSet, fid_from

    network = ScriptedFeatures(feature_path)
    train, held_out = real_digits(resolution)

    def features_of(pixels: torch.Tensor) -> FeatureSet:
        out = FeatureSet()
        for chunk in pixels.split(256):
            out.add(network, chunk)
        return out

    reference = features_of(train["pixels"]).reference(str(feature_path))
    generator = torch.Generator().manual_seed(0)
    grid = tokenizer.token_layout
    random_codes = torch.randint(0, tokenizer.codebook_size, (len(images), *grid.shape), generator=generator)
    return {
        "fid": fid_from(features_of(images).stats, reference),
        "fid_floor_real_held_out": fid_from(features_of(held_out["pixels"]).stats, reference),
        "fid_ceiling_random_codes": fid_from(features_of(tokenizer.decode(random_codes).clamp(-1, 1)).stats, reference),
    }


def _recipe(recipes: Path, name: str, types: tuple, *overrides: str):
    path = recipes / name
    if not path.is_file():
        raise FileNotFoundError(f"demo recipe {path} not found; run from the repository root or pass --recipes")
    return parse_recipe([str(path), *overrides, "--log_with", "none"], types)


def run_demo(output: str, recipes: str = "recipes") -> dict:
    output_dir, recipes = Path(output), Path(recipes)
    tokenizer_run, tokens, prior_run = output_dir / "tokenizer-run", output_dir / "tokens", output_dir / "prior-run"

    tokenizer_metrics = train_tokenizer(
        *_recipe(
            recipes,
            TOKENIZER_RECIPE,
            (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig),
            "--output_dir",
            str(tokenizer_run),
        )
    )
    tokenize_dataset(TokenizeArgs(tokenizer=str(tokenizer_run / "tokenizer"), data="digits", output=str(tokens)))
    prior_metrics = train_prior(
        *_recipe(
            recipes, PRIOR_RECIPE, (PriorArgs, TrainConfig), "--tokens", str(tokens), "--output_dir", str(prior_run)
        )
    )

    tokenizer = VQTokenizer.from_pretrained(tokenizer_run / "tokenizer").eval()
    prior, layout = load_prior(str(prior_run / "prior"))
    classes = [c for c in range(layout.ids.num_classes) for _ in range(SAMPLES_PER_CLASS)]
    images = generate_images(prior, tokenizer, layout, build_prompts(layout, classes=classes), DEMO_SAMPLING)
    save_images(images, output_dir / "samples", rows=layout.ids.num_classes)

    classifier, accuracy_on_real = fit_digit_classifier(tokenizer.config.resolution)
    predicted = classifier.predict(digit_features(images))
    feature_path = digit_feature_network(tokenizer.config.resolution, output_dir / "digit_features.pt2")
    fids = digits_fid(images, tokenizer.config.resolution, feature_path, tokenizer)
    report = {
        "recon_psnr": tokenizer_metrics["psnr"],
        "bits_per_image": prior_metrics["bits_per_image"],
        "class_agreement": float(np.mean(predicted == np.array(classes))),
        "classifier_accuracy_on_real": accuracy_on_real,
        **fids,
        "fid_features": str(feature_path),
        "codebook_usage": tokenizer_metrics["codebook_usage"],
        "raw_bits_per_image": tokenizer.bits_per_image,
        "samples": str(output_dir / "samples" / "grid.png"),
        "reconstructions": str(sorted((tokenizer_run / "samples").glob("step-*.png"))[-1]),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print("\nvqar demo — digits")
    print(f"  reconstruction PSNR (held-out)      {report['recon_psnr']:.2f} dB")
    print(
        f"  prior, held-out bits per image       {report['bits_per_image']:.1f} (raw: {report['raw_bits_per_image']:.0f})"
    )
    print(f"  generated digits of the asked class  {report['class_agreement']:.1%}")
    print(f"  classifier accuracy on real digits   {report['classifier_accuracy_on_real']:.1%}")
    print(
        f"  FID, digit features (lower: better)  {report['fid']:.1f} (real held-out digits: "
        f"{report['fid_floor_real_held_out']:.1f}; decoded random codes: {report['fid_ceiling_random_codes']:.1f})"
    )
    print(f"  samples (one row per class)          {report['samples']}")
    print(f"  held-out digits over reconstructions {report['reconstructions']}")
    return report
