"""Encode a dataset with a frozen tokenizer: `vqar tokenize --tokenizer DIR --data SOURCE --output DIR`.

Writes a tokens folder (`vqar.tokens`): `train` and `eval` splits, with the same deterministic
hold-out as the tokenizer trainer, and the `TokensManifest`. Runs on any accelerate setup: each
process encodes its shard and the main process writes. A re-run with the same tokenizer
weights, source and options finds the fingerprint and reuses the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

from ..data import (
    ImageDataset,
    ImageTransform,
    class_names,
    collate_images,
    load_source,
    make_loader,
    report_unreadable,
    split_holdout,
)
from ..tokenizer import VQTokenizer
from ..tokens import TokensManifest, write_tokens

logger = logging.getLogger(__name__)


@dataclass
class TokenizeArgs:
    """Encode a data source with a trained tokenizer into a tokens folder."""

    tokenizer: str = HfArg(help="a trained tokenizer: folder or Hub id")
    data: str = HfArg(help="digits | photos | image folder | *.parquet | saved dataset | Hub id")
    output: str = HfArg(help="the tokens folder to write")
    split: str = HfArg(default="train", help="the split of a Hub dataset")
    image_column: str | None = HfArg(default=None, help="default: the first Image column (or 'image', 'img')")
    label_column: str | None = HfArg(default=None, help="default: the first ClassLabel column (or 'label')")
    resolution: int | None = HfArg(default=None, help="crop size (default: the tokenizer's training resolution)")
    resize_to: int | None = HfArg(default=None, help="shorter side before the centre crop (default: the tokenizer's)")
    eval_fraction: float = HfArg(default=0.1, help="share held out, deterministically (as the tokenizer trainer does)")
    crops: int = HfArg(
        default=1,
        help="crops per image: 1 is the centre crop; more are fixed random crops (and flips), so that a few "
        "large photographs give a prior many sequences",
    )
    batch_size: int = HfArg(default=64, help="images per batch")


def _fingerprint(args: TokenizeArgs, tokenizer: VQTokenizer, transform: ImageTransform) -> str:
    """Of everything the tokens depend on: the tokenizer, the source and options, the preprocessing."""
    options = {k: v for k, v in asdict(args).items() if k not in ("output", "batch_size")}
    text = json.dumps([options, asdict(transform), tokenizer.fingerprint], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@torch.inference_mode()
def _encode(accelerator: Accelerator, tokenizer: VQTokenizer, dataset: ImageDataset, batch_size: int, name: str):
    loader = accelerator.prepare(make_loader(dataset, batch_size, collate_fn=collate_images))
    rows, unreadable = [], set()
    for batch in tqdm(loader, desc=f"tokenize {name}", disable=not accelerator.is_main_process):
        report_unreadable(batch, unreadable)
        if len(batch["pixels"]):
            codes = tokenizer.encode(batch["pixels"]).flatten(1).to(torch.int32).cpu().numpy()
            rows += zip(batch["indices"].tolist(), codes, batch["labels"].tolist())
    rows = {index: (codes, label) for index, codes, label in gather_object(rows)}  # drops padding repeats
    ordered = [rows[i] for i in sorted(rows)]
    return {"tokens": [c for c, _ in ordered], "label": [label for _, label in ordered]}, len(dataset) - len(ordered)


def tokenize_dataset(args: TokenizeArgs) -> TokensManifest:
    """Encode `args.data` into `args.output`; returns the manifest (reused when up to date)."""
    accelerator = Accelerator()
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).to(accelerator.device).eval()
    if args.crops < 1:
        raise ValueError(f"crops must be >= 1, got {args.crops}")
    transform = tokenizer.image_transform(args.resolution, args.resize_to)
    if args.crops > 1:
        transform = replace(transform, random_crop=True, random_flip=True)
    fingerprint = _fingerprint(args, tokenizer, transform)
    manifest = TokensManifest.load(args.output)
    if manifest and manifest.fingerprint == fingerprint:
        accelerator.print(f"{args.output} is up to date with this tokenizer and source; reusing it")
        return manifest

    source = load_source(args.data, split=args.split, image_column=args.image_column, label_column=args.label_column)
    train_split, eval_split = split_holdout(source, args.eval_fraction, seed=0)
    splits, skipped = {}, 0
    for name, split in (("train", train_split), ("eval", eval_split)):
        dataset = ImageDataset(split, transform, repeats=args.crops, seed=0 if name == "train" else 1)
        dataset.require_readable(f"{args.data} ({name} split)")
        columns, bad = _encode(accelerator, tokenizer, dataset, args.batch_size, name)
        splits[name], skipped = columns, skipped + bad
    # what this preprocessing gives: a grid tokenizer is fully convolutional, --resolution changes its grid
    layout = tokenizer.token_layout.at_resolution(transform.resolution, tokenizer.downsample_factor)
    local = Path(args.tokenizer).exists()
    manifest = TokensManifest(
        tokenizer=str(Path(args.tokenizer).resolve()) if local else args.tokenizer,
        tokenizer_fingerprint=tokenizer.fingerprint,
        codebook_size=tokenizer.codebook_size,
        **layout.to_fields(),
        fingerprint=fingerprint,
        decodes_prefixes=tokenizer.decodes_prefixes,
        class_names=class_names(source) or [],
        data=args.data,
        num_images={name: len(columns["tokens"]) for name, columns in splits.items()},
        skipped_images=skipped,
    )
    if accelerator.is_main_process:
        write_tokens(args.output, splits, manifest)
        if skipped:
            logger.warning("skipped %d unreadable images in all", skipped)
    accelerator.wait_for_everyone()
    return manifest
