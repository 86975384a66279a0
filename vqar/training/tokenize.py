"""Encode a dataset with a frozen tokenizer: `vqar tokenize --tokenizer DIR --data SOURCE --output DIR`.

Writes a `datasets.DatasetDict` with `train` and `eval` splits (the same deterministic hold-out
as the tokenizer trainer), each with `tokens` (int32, N per image) and `label` (-1 without
labels), plus `vqar_tokens.json` describing the tokenizer and the source. Runs on any
accelerate setup: each process encodes its shard and the main process writes. A re-run with
the same tokenizer weights, source and options finds the fingerprint and reuses the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data import ImageDataset, ImageTransform, class_names, collate_images, load_source, make_loader, split_holdout
from ..tokenizer import VQTokenizer

logger = logging.getLogger(__name__)
MANIFEST = "vqar_tokens.json"


@dataclass
class TokenizeArgs:
    tokenizer: str  # folder or Hub id of a trained tokenizer
    data: str  # a data source (see vqar.data)
    output: str
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    eval_fraction: float = 0.1
    batch_size: int = 64


def _fingerprint(args: TokenizeArgs, tokenizer: VQTokenizer) -> str:
    digest = hashlib.sha256()
    options = {k: v for k, v in asdict(args).items() if k not in ("output", "batch_size")}
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(tokenizer.config.to_json_string().encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_manifest(output: str | Path) -> dict | None:
    path = Path(output) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


@torch.inference_mode()
def _encode(accelerator: Accelerator, tokenizer: VQTokenizer, dataset: ImageDataset, batch_size: int, name: str):
    loader = accelerator.prepare(make_loader(dataset, batch_size, collate_fn=collate_images))
    rows = []
    for batch in tqdm(loader, desc=f"tokenize {name}", disable=not accelerator.is_main_process):
        if len(batch["pixels"]):
            codes = tokenizer.encode(batch["pixels"]).flatten(1).to(torch.int32).cpu().numpy()
            rows += zip(batch["indices"].tolist(), codes, batch["labels"].tolist())
    rows = {index: (codes, label) for index, codes, label in gather_object(rows)}  # drops padding repeats
    ordered = [rows[i] for i in sorted(rows)]
    return {"tokens": [c for c, _ in ordered], "label": [l for _, l in ordered]}, len(dataset) - len(ordered)


def tokenize_dataset(args: TokenizeArgs) -> dict:
    """Encode `args.data` into `args.output`; returns the manifest (reused when up to date)."""
    accelerator = Accelerator()
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).to(accelerator.device).eval()
    fingerprint = _fingerprint(args, tokenizer)
    manifest = read_manifest(args.output)
    if manifest and manifest.get("fingerprint") == fingerprint:
        accelerator.print(f"{args.output} is up to date with this tokenizer and source; reusing it")
        return manifest

    source = load_source(args.data, split=args.split, image_column=args.image_column, label_column=args.label_column)
    train_split, eval_split = split_holdout(source, args.eval_fraction, seed=0)
    transform = ImageTransform(tokenizer.config.resolution)
    splits, skipped = {}, 0
    for name, split in (("train", train_split), ("eval", eval_split)):
        columns, bad = _encode(accelerator, tokenizer, ImageDataset(split, transform), args.batch_size, name)
        splits[name], skipped = columns, skipped + bad
    manifest = {
        "fingerprint": fingerprint,
        "tokenizer": args.tokenizer,
        "codebook_size": tokenizer.codebook_size,
        "tokens_per_image": tokenizer.tokens_per_image,
        "grid": None if tokenizer.is_1d else list(tokenizer.token_shape),
        "class_names": class_names(source) or [],
        "data": args.data,
        "num_images": {name: len(columns["tokens"]) for name, columns in splits.items()},
        "skipped_images": skipped,
    }
    if accelerator.is_main_process:
        _write(Path(args.output), splits, manifest)
    accelerator.wait_for_everyone()
    return manifest


def _write(output: Path, splits: dict, manifest: dict) -> None:
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("int32")), "label": datasets.Value("int64")})
    dataset = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"tokens": np.stack(c["tokens"]) if c["tokens"] else [],
                                           "label": c["label"]}, features=features)  # fmt: skip
         for name, c in splits.items()}
    )
    (output / MANIFEST).unlink(missing_ok=True)  # an interrupted rewrite must not look up to date
    dataset.save_to_disk(str(output))
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if manifest["skipped_images"]:
        logger.warning("skipped %d unreadable images", manifest["skipped_images"])


def load_tokens(path: str | Path) -> tuple[datasets.DatasetDict, dict]:
    """A tokenized dataset and its manifest, as written by `tokenize_dataset`."""
    manifest = read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"{path} holds no tokenized dataset ({MANIFEST} missing); run `vqar tokenize` first")
    return datasets.load_from_disk(str(path)), manifest


def train_bpe(tokens: str | Path, vocab_size: int, output: str | Path) -> dict:
    """Learn visual-BPE merges on a tokenized dataset's train split; save `visual_bpe.json` in
    `output` and return the mean tokens per image before and after, on both splits."""
    from ..bpe import VisualBPE

    dataset, manifest = load_tokens(tokens)
    grid = manifest.get("grid")
    codes = {name: np.asarray(dataset[name]["tokens"], dtype=np.int64) for name in ("train", "eval")}
    if grid:
        codes = {name: c.reshape(len(c), *grid) for name, c in codes.items()}
    bpe = VisualBPE.train(codes["train"], vocab_size=vocab_size, codebook_size=manifest["codebook_size"])
    Path(output).mkdir(parents=True, exist_ok=True)
    bpe.save(output)
    stats = {"tokens_per_image": manifest["tokens_per_image"], "merges": bpe.num_merges}
    for name, c in codes.items():
        stats[f"{name}_mean_tokens_after"] = float(np.mean([len(ids) for ids in bpe.encode(c)]))
    return stats
