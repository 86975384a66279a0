"""Encode a dataset with a frozen tokenizer: `vqar tokenize --tokenizer DIR --data SOURCE --output DIR`.

Writes a tokens folder (`vqar.tokens`): `train` and `eval` splits, with the same deterministic
hold-out as the tokenizer trainer, and the `TokensManifest`. Sized for data sets that do not fit
in memory, on any accelerate setup (`accelerate launch -m vqar tokenize ...`):

- each process encodes a contiguous share of each split and writes its own Arrow shards as it
  goes; nothing is gathered, and the shards in order are the rows one process would write;
- images are decoded in DataLoader workers (`--num_workers`) while the tokenizer runs, on
  `--device` (default: the best present) in `--dtype` (the quantizer stays fp32);
- a re-run after a crash keeps the shards already finished; a re-run with the same tokenizer,
  options and source *content* (file sizes and times, or the dataset's own fingerprint) reuses the
  folder, and adding an image to a folder makes it encode again.

Three pieces, as in the trainers: `plan` (what to encode, and whether it is done), `encode_share`
(one process's share of a split), `finish` (the main process ties the shards together).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

from ..data import (
    SOURCE_HELP,
    ImageDataset,
    ImageTransform,
    class_names,
    collate_images,
    describe_source,
    load_source,
    make_loader,
    report_unreadable,
    share,
    split_holdout,
)
from ..devices import resolve_device, resolve_dtype
from ..tokenizer import VQTokenizer
from ..tokens import SPLITS, ShardWriter, TokensManifest, finish_split, finish_tokens, token_features
from .launch import check_launch

logger = logging.getLogger(__name__)
PROGRESS = ".vqar_tokenize.json"  # the run the finished shards belong to: kept only by the same run


@dataclass
class TokenizeArgs:
    """Encode a data source with a trained tokenizer into a tokens folder."""

    tokenizer: str = HfArg(help="a trained tokenizer: folder or Hub id")
    data: str = HfArg(help=SOURCE_HELP)
    output: str = HfArg(help="the tokens folder to write")
    split: str = HfArg(default="train", help="the split of a Hub dataset")
    image_column: str | None = HfArg(default=None, help="default: the first Image column (or 'image', 'img')")
    label_column: str | None = HfArg(default=None, help="default: the first ClassLabel column (or 'label')")
    caption_column: str | None = HfArg(default=None, help="default: the first string column text, caption or prompt")
    resolution: int | None = HfArg(default=None, help="crop size (default: the tokenizer's training resolution)")
    resize_to: int | None = HfArg(default=None, help="shorter side before the centre crop (default: the tokenizer's)")
    eval_fraction: float = HfArg(default=0.1, help="share held out, deterministically (as the tokenizer trainer does)")
    crops: int = HfArg(
        default=1,
        help="crops per image: 1 is the centre crop; more are fixed random crops (and flips), so that a few "
        "large photographs give a prior many sequences",
    )
    batch_size: int = HfArg(default=64, help="images per batch")
    num_workers: int = HfArg(default=2, help="DataLoader processes decoding images while the tokenizer runs")
    shard_size: int = HfArg(default=100_000, help="rows per Arrow shard (a crash loses at most one shard per process)")
    device: str | None = HfArg(default=None, help="cpu, cuda, cuda:N, mps (default: the best present)")
    dtype: str = HfArg(default="fp32", help="fp32, bf16 or fp16 (GPU) for the encoder; the quantizer stays fp32")

    def __post_init__(self):
        if self.crops < 1:
            raise ValueError(f"crops must be >= 1, got {self.crops}")
        if self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"batch_size and shard_size must be >= 1 and num_workers >= 0, got {self.batch_size}, "
                f"{self.shard_size}, {self.num_workers}"
            )


# -- what to encode -------------------------------------------------------------------------------


def source_fingerprint(source: datasets.Dataset) -> str:
    """Of the source's content: the dataset's own fingerprint (its rows; for files `datasets` read, their
    sizes and times), and for image files named by path, each file's size and modification time."""
    digest = hashlib.sha256(source._fingerprint.encode())
    column = source.data.column("image")
    if column.type == "string":
        for path in column.to_pylist():
            stat = os.stat(path) if os.path.exists(path) else None
            digest.update(f"{path}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class TokenizePlan:
    """What `tokenize_dataset` encodes, into where, and what the result will be called."""

    args: TokenizeArgs
    tokenizer: VQTokenizer
    transform: ImageTransform
    splits: dict[str, datasets.Dataset]
    manifest: TokensManifest  # as it will be written (num_images and skipped filled in at the end)
    features: datasets.Features
    state: PartialState


def plan(args: TokenizeArgs, state: PartialState) -> TokenizePlan:
    device = resolve_device(args.device) if args.device else state.device
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer)
    tokenizer.for_inference(device, resolve_dtype(args.dtype, device))
    transform = tokenizer.image_transform(args.resolution, args.resize_to)
    if args.crops > 1:
        transform = replace(transform, random_crop=True, random_flip=True)
    source = load_source(
        args.data,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
    )
    state.print(describe_source(source, args.data))
    train_split, eval_split = split_holdout(source, args.eval_fraction, seed=0)
    # what this preprocessing gives: a grid tokenizer is fully convolutional, --resolution changes its grid
    layout = tokenizer.token_layout.at_resolution(transform.resolution, tokenizer.downsample_factor)
    captions = "caption" in source.column_names
    options = {k: v for k, v in asdict(args).items() if k in _MEANINGFUL_OPTIONS}
    text = json.dumps([options, asdict(transform), tokenizer.fingerprint, source_fingerprint(source)], sort_keys=True)
    local = Path(args.tokenizer).exists()
    manifest = TokensManifest(
        tokenizer=str(Path(args.tokenizer).resolve()) if local else args.tokenizer,
        tokenizer_fingerprint=tokenizer.fingerprint,
        codebook_size=tokenizer.codebook_size,
        **layout.to_fields(),
        fingerprint=hashlib.sha256(text.encode()).hexdigest(),
        decodes_prefixes=tokenizer.decodes_prefixes,
        class_names=class_names(source) or [],
        data=args.data,
        resolution=transform.resolution,
    )
    features = token_features(layout.tokens_per_image, tokenizer.codebook_size, captions)
    return TokenizePlan(
        args, tokenizer, transform, {"train": train_split, "eval": eval_split}, manifest, features, state
    )


# the options the tokens depend on (not where they go, nor how fast they are made)
_MEANINGFUL_OPTIONS = ("split", "image_column", "label_column", "caption_column", "eval_fraction", "crops")


# -- one process's share of a split ---------------------------------------------------------------


def shard_ranges(rows: range, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, rows.stop)) for start in range(rows.start, rows.stop, shard_size)]


def shard_path(output: Path, split: str, rows: range) -> Path:
    """A shard is named by the rows it holds, so the names sort into the split's order."""
    return output / split / f"data-{rows.start:012d}-{rows.stop:012d}.arrow"


def say_if_upsampled(plan: TokenizePlan, size: tuple[int, int]) -> None:
    """One line when the source's images are smaller than what they are cut to (they would be upsampled,
    a cost and a change a user should choose), with the --resolution that encodes them at their size."""
    transform, tokenizer = plan.transform, plan.tokenizer
    target = transform.resize_to or transform.resolution
    if min(size) >= target:
        return
    factor = tokenizer.downsample_factor
    native = min(size) // factor * factor
    advice = "it reads only its own resolution"
    try:
        if native < factor:
            raise ValueError("smaller than one token")
        tokenizer.token_layout.check_image_size(native, native, tokenizer.config.resolution, factor)
        grid = tokenizer.token_layout.at_resolution(native, factor).describe()
        advice = f"--resolution {native} encodes them at their size ({grid}; the prior then decodes at that size)"
    except ValueError:
        pass
    plan.state.print(
        f"{plan.args.data}: images are {size[0]}x{size[1]} (the first one), smaller than the {target} px they are "
        f"cut to: they are upsampled; {advice}"
    )


class ShardedOutput:
    """The shards of one process's share, in order: rows (by their index in the split) go to the shard
    that holds them, each shard renamed into place once the rows after it arrive."""

    def __init__(self, plan: TokenizePlan, name: str, todo: list[range]):
        self.plan, self.name, self.todo = plan, name, list(todo)
        self.writer: ShardWriter | None = None

    def _advance_to(self, index: int) -> None:
        while self.todo and index >= self.todo[0].stop:
            self._open().close()  # finished (or all of its images unreadable: an empty shard)
            self.writer = None
            self.todo.pop(0)

    def _open(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(
                shard_path(Path(self.plan.args.output), self.name, self.todo[0]), self.plan.features
            )
        return self.writer

    def write(self, indices: np.ndarray, rows: dict) -> None:
        """Rows {"tokens", "label"[, "caption"]} of the split's examples `indices` (increasing)."""
        start = 0
        while start < len(indices):
            self._advance_to(int(indices[start]))
            stop = start + int(np.searchsorted(indices[start:], self.todo[0].stop))
            self._open().write({key: values[start:stop] for key, values in rows.items()})
            start = stop

    def close(self) -> None:
        self._advance_to(2**62)


@torch.inference_mode()
def encode_share(plan: TokenizePlan, name: str) -> tuple[int, int, float]:
    """Encode this process's share of split `name` into shards (finished ones are kept), one DataLoader
    for all of it; returns (unreadable images met, images encoded, seconds spent on them)."""
    args, state = plan.args, plan.state
    dataset = ImageDataset(plan.splits[name], plan.transform, repeats=args.crops, seed=0 if name == "train" else 1)
    if state.is_main_process:
        size = dataset.require_readable(f"{args.data} ({name} split)")
        if name == "train":
            say_if_upsampled(plan, size)
    rows = share(len(dataset), state.process_index, state.num_processes)  # in order, the shares are the split
    todo = [r for r in shard_ranges(rows, args.shard_size) if not shard_path(Path(args.output), name, r).is_file()]
    indices = np.concatenate([np.arange(r.start, r.stop) for r in todo]) if todo else np.zeros(0, dtype=np.int64)
    loader = make_loader(
        torch.utils.data.Subset(dataset, indices),
        args.batch_size,
        collate_fn=collate_images,
        num_workers=args.num_workers,
    )
    output, unreadable, encoded = ShardedOutput(plan, name, todo), set(), 0
    progress = tqdm(total=len(indices), desc=f"tokenize {name}", disable=not state.is_main_process)
    started = time.perf_counter()
    for batch in loader:
        report_unreadable(batch, unreadable)
        progress.update(len(batch["indices"]) + batch["skipped"])
        if len(batch["pixels"]):
            output.write(batch["indices"].numpy(), _encoded(plan, dataset, batch))
            encoded += len(batch["pixels"])
    output.close()
    progress.close()
    return len(unreadable), encoded, time.perf_counter() - started


def _encoded(plan: TokenizePlan, dataset: ImageDataset, batch: dict) -> dict:
    tokenizer = plan.tokenizer
    pixels = batch["pixels"].to(tokenizer.device, tokenizer.dtype)
    codes = tokenizer.encode(pixels).flatten(1).cpu().numpy().astype(plan.features["tokens"].feature.dtype)
    rows = {"tokens": codes, "label": batch["labels"].numpy()}
    if "caption" in plan.features:
        rows["caption"] = [dataset.caption(int(i)) for i in batch["indices"]]
    return rows


# -- the run --------------------------------------------------------------------------------------


def _prepare_output(plan: TokenizePlan) -> bool:
    """Main process: True when the folder is already up to date. Otherwise mark it incomplete (the
    manifest goes first) and keep the finished shards only if they belong to this very run."""
    output, manifest = Path(plan.args.output), plan.manifest
    existing = TokensManifest.load(output)
    if existing is not None and existing.fingerprint == manifest.fingerprint:
        return True
    output.mkdir(parents=True, exist_ok=True)
    (output / "vqar_tokens.json").unlink(missing_ok=True)
    run = {"fingerprint": manifest.fingerprint, "processes": plan.state.num_processes, "shard": plan.args.shard_size}
    progress = output / PROGRESS
    if not progress.is_file() or json.loads(progress.read_text()) != run:
        for name in SPLITS:
            shutil.rmtree(output / name, ignore_errors=True)
        (output / "dataset_dict.json").unlink(missing_ok=True)
        progress.write_text(json.dumps(run))
    return False


def finish(plan: TokenizePlan, skipped: int) -> TokensManifest:
    """Main process: tie each split's shards together and write the manifest last."""
    output, manifest = Path(plan.args.output), plan.manifest
    for name in SPLITS:
        shards = sorted((output / name).glob("data-*.arrow"))
        split = finish_split(output / name, shards, plan.features)
        manifest.num_images[name] = len(split)
        if "caption" in plan.features:
            manifest.num_captions[name] = sum(bool(c) for c in split.data.column("caption").to_pylist())
    manifest.skipped_images = skipped
    finish_tokens(output, SPLITS, manifest)
    (output / PROGRESS).unlink(missing_ok=True)
    if skipped:
        logger.warning("skipped %d unreadable images in all", skipped)
    return manifest


def tokenize_dataset(args: TokenizeArgs) -> TokensManifest:
    """Encode `args.data` into `args.output`; returns the manifest (reused when up to date)."""
    check_launch()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as an Accelerator reads it
    work = plan(args, state)
    done = torch.tensor([_prepare_output(work) if state.is_main_process else False])
    done = bool(_broadcast(state, done))
    if done:
        state.print(f"{args.output} is up to date with this tokenizer and source; reusing it")
        return TokensManifest.load(args.output)
    results = [encode_share(work, name) for name in SPLITS]
    skipped = _sum_over_processes(state, sum(r[0] for r in results))
    encoded, seconds = sum(r[1] for r in results), sum(r[2] for r in results)
    if encoded:
        state.print(f"encoded {encoded:,} images in {seconds:.1f} s ({encoded / seconds:,.0f} images/s on process 0)")
    state.wait_for_everyone()
    manifest = finish(work, skipped) if state.is_main_process else None
    state.wait_for_everyone()
    return manifest or TokensManifest.load(args.output)


def _broadcast(state: PartialState, flag: torch.Tensor) -> bool:
    if state.num_processes == 1:
        return bool(flag.item())
    from accelerate.utils import broadcast

    return bool(broadcast(flag.to(state.device)).item())


def _sum_over_processes(state: PartialState, count: int) -> int:
    if state.num_processes == 1:
        return count
    from accelerate.utils import reduce

    return int(reduce(torch.tensor([count], device=state.device), "sum").item())
