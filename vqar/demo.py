"""`vqar demo` (and `make demo`): the main job on bundled data, sized for 2 CPU cores.

Trains a tokenizer on scikit-image's photographs with recipes/photos-cpu.yaml, reloads the
saved tokenizer, round-trips the held-out photographs through it, writes a PNG of originals
above reconstructions and prints the PSNR.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import collate_images, image_grid
from .losses import LossConfig
from .metrics import psnr
from .tokenizer import VQTokenizer
from .training.common import TrainConfig, parse_recipe
from .training.tokenizer import DataArgs, TokenizerModelArgs, build_datasets, train_tokenizer

RECIPE_TYPES = (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)


@torch.inference_mode()
def round_trip(tokenizer: VQTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Encode and decode images [B, 3, H, W] in [-1, 1]; returns reconstructions and mean PSNR."""
    reconstructions = tokenizer.decode(tokenizer.encode(images)).clamp(-1, 1)
    return reconstructions, psnr(images, reconstructions).mean().item()


def run_demo(output: str, recipes: str = "recipes") -> dict:
    recipe = Path(recipes) / "photos-cpu.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"demo recipe {recipe} not found; run from the repository root or pass --recipes")
    output_dir = Path(output)
    run_dir = output_dir / "photos-tokenizer"
    args = parse_recipe([str(recipe), "--output_dir", str(run_dir), "--log_with", "none"], RECIPE_TYPES)
    train_tokenizer(*args)

    tokenizer = VQTokenizer.from_pretrained(run_dir / "tokenizer").eval()
    _, held_out = build_datasets(args[1], seed=args[3].seed)
    images = collate_images([held_out[i] for i in range(len(held_out))])["pixels"]
    reconstructions, mean_psnr = round_trip(tokenizer, images)
    image_grid([images[:8], reconstructions[:8]]).save(output_dir / "roundtrip.png")
    report = {
        "recon_psnr": mean_psnr,
        "held_out_images": len(images),
        "tokens_per_image": tokenizer.tokens_per_image,
        "bits_per_image": tokenizer.bits_per_image,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nheld-out photos: {len(images)} crops of {tokenizer.config.resolution} px")
    print(f"reconstruction PSNR: {mean_psnr:.2f} dB at {tokenizer.bits_per_image:.0f} bits per image")
    print(f"originals over reconstructions: {output_dir / 'roundtrip.png'}")
    return report
