"""`vqar evaluate-generation`: sample N images from a prior at each CFG scale and score them against a
reference set (FID, IS, precision/recall), writing the ADM evaluator's `.npz` beside the report.

Runs on one device or under `accelerate launch` with any number of processes: the images are cut
into fixed batches, batch b sampled with seed `seed + b` whichever process takes it, so two
processes sample the very images one does. Each process scores its own batches; the features
are gathered on the main process, which writes `samples_cfg{scale}.npz`, `reference_stats.npz`,
`report.json`, `report.md` and `fid_vs_cfg.png` (`vqar.generation_metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

from ..data import ImageDataset, collate_images, load_source, make_loader, share
from ..devices import resolve_device, resolve_dtype
from ..fid import ReferenceStats, feature_network
from ..generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for, read_prompts_file
from ..generation_metrics import (
    PR_REFERENCE_LIMIT,
    FeatureSet,
    SampleArchive,
    batches_of,
    class_balanced,
    read_adm_images,
    scores,
    split_half_fid,
    to_uint8_hwc,
    write_report,
)
from ..text import load_text_tokenizer
from .launch import check_launch

logger = logging.getLogger(__name__)


@dataclass
class EvaluateGenerationArgs:
    """Sample N images per CFG scale from a prior and score them: FID, IS, precision/recall."""

    prior: str = HfArg(help="a prior: the OUTPUT/prior folder of `vqar train-prior`, or a Hub id")
    reference: str = HfArg(
        help="real images as --data takes them, or an ADM reference batch .npz (images `arr_0` and/or `mu`, `sigma`)"
    )
    output: str = HfArg(default="outputs/evaluate-generation", help="folder for the samples .npz files and the report")
    tokenizer: str | None = HfArg(default=None, help="default: the tokenizer the prior was trained on")
    num_images: int = HfArg(default=50_000, help="images per CFG scale (class-balanced for class priors)")
    cfg_scales: str = HfArg(default="1.5,2,4", help="the CFG scales of the sweep, comma-separated (1: none)")
    features: str = HfArg(
        default="inception",
        help="inception (FID's standard), dinov2, or a TorchScript file [B,3,H,W] in [0,1] -> [B,D]",
    )
    reference_images: int = HfArg(default=50_000, help="real images read from --reference (a source) at most")
    batch_size: int = HfArg(default=64, help="images sampled per batch (the same in every run: it fixes the seeds)")
    device: str | None = HfArg(default=None, help="cpu, cuda, cuda:N, mps (default: the best present)")
    dtype: str = HfArg(default="fp32", help="fp32, bf16 or fp16 (GPU) for the prior and the tokenizer")
    allow_other_tokenizer: bool = HfArg(default=False, help="decode with a tokenizer the prior was not trained on")
    prompts: str | None = HfArg(
        default=None, help="a text prior's prompts, a UTF-8 file of one per line, cycled over the images"
    )

    def __post_init__(self):
        if self.num_images < 2 or self.batch_size < 1:
            raise ValueError(f"num_images must be >= 2 and batch_size >= 1, got {self.num_images}, {self.batch_size}")
        self.scales  # noqa: B018 - checked here, with the other arguments

    @property
    def scales(self) -> list[float]:
        try:
            scales = [float(s) for s in str(self.cfg_scales).split(",") if s.strip()]
        except ValueError as error:
            raise ValueError(f"--cfg-scales takes numbers separated by commas, got {self.cfg_scales!r}") from error
        if not scales:
            raise ValueError("--cfg-scales names no scale")
        return scales


@dataclass
class Evaluation:
    """Everything the sampling needs, on this process."""

    args: EvaluateGenerationArgs
    sampling: SamplingConfig
    state: PartialState
    prior: torch.nn.Module
    layout: object
    tokenizer: torch.nn.Module
    bpe: object
    network: torch.nn.Module
    text: object = None  # a text prior's text tokenizer
    prompts: list[str] | None = None  # and the prompts its images are drawn from
    floor: float | None = None  # FID between the reference's two halves (when it has images)


def setup(args: EvaluateGenerationArgs, sampling: SamplingConfig) -> Evaluation:
    from ..ar import load_prior, load_prior_bpe

    check_launch()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = resolve_device(args.device) if args.device else state.device
    dtype = resolve_dtype(args.dtype, device)
    prior, layout = load_prior(args.prior)
    prior.to(device=device, dtype=dtype)
    if layout.ids.num_classes == 0 and not layout.ids.uses_text and any(s != 1 for s in args.scales):
        raise ValueError(f"the prior {args.prior} is unconditional: CFG needs classes; use --cfg-scales 1")
    text, prompts = load_text_tokenizer(args.prior, layout), _read_prompts(args, layout)
    tokenizer = load_tokenizer_for(args.prior, layout, args.tokenizer, allow_other=args.allow_other_tokenizer)
    tokenizer.for_inference(device, dtype)
    network = feature_network(args.features).to(device).eval()
    bpe = load_prior_bpe(args.prior, layout)
    return Evaluation(args, sampling, state, prior, layout, tokenizer, bpe, network, text, prompts)


def _read_prompts(args: EvaluateGenerationArgs, layout) -> list[str] | None:
    """A text prior's prompts from --prompts; an error for a text prior without them, or prompts for another."""
    if not layout.ids.uses_text:
        if args.prompts:
            raise ValueError(f"the prior {args.prior} is not text-conditional: drop --prompts")
        return None
    if not args.prompts:
        raise ValueError(f"the prior {args.prior} takes text prompts: give --prompts FILE (one per line)")
    return read_prompts_file(args.prompts)


# -- the reference -------------------------------------------------------------------------------


def generated_side(run: Evaluation) -> int:
    """The side of the images the prior generates (its grid's, or the tokenizer's resolution)."""
    return run.layout.tokens.image_side(run.tokenizer.downsample_factor) or run.tokenizer.config.resolution


def reference_features(run: Evaluation) -> tuple[ReferenceStats, np.ndarray | None]:
    """The reference's statistics (and up to 10,000 of its features, for precision/recall): from an ADM
    `.npz` (its `mu`/`sigma` as they are; its images through the feature network), or from a source."""
    args, state = run.args, run.state
    path = Path(args.reference)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            keys = set(data)
        if "arr_0" not in keys:
            return ReferenceStats.load(path), None  # statistics only: FID, no precision/recall
        images = torch.from_numpy(read_adm_images(path)).permute(0, 3, 1, 2).float() / 127.5 - 1
        mine = images[list(share(len(images), state.process_index, state.num_processes))]
        batches = mine.split(args.batch_size)
    else:
        source = load_source(args.reference)
        if len(source) > args.reference_images:
            source = source.select(range(args.reference_images))
        dataset = ImageDataset(source, run.tokenizer.image_transform(generated_side(run)))
        mine = torch.utils.data.Subset(dataset, share(len(dataset), state.process_index, state.num_processes))
        batches = (b["pixels"] for b in make_loader(mine, args.batch_size, collate_fn=collate_images))
    local = FeatureSet()
    for batch in tqdm(batches, desc="reference features", disable=not state.is_main_process):
        local.add(run.network, batch.to(run.tokenizer.device))
    merged = _gather(state, local)
    if merged is None:
        return None, None
    run.floor = split_half_fid(merged)
    return merged.reference(args.features), merged.all_features()[:PR_REFERENCE_LIMIT]


def _gather(state: PartialState, local: FeatureSet) -> FeatureSet | None:
    """Every process's features, on the main process (None elsewhere)."""
    if state.num_processes == 1:
        return local
    parts = gather_object([local])
    if not state.is_main_process:
        return None
    merged = FeatureSet()
    for part in parts:
        merged.merge(part)
    return merged


# -- sampling at one scale -----------------------------------------------------------------------


@torch.inference_mode()
def sample_and_score(run: Evaluation, scale: float, archive: SampleArchive) -> FeatureSet | None:
    """This process's batches at one CFG scale: sampled (batch b with seed `seed + b`), written into the
    archive at their rows, and their features; all of them on the main process."""
    args, state, layout = run.args, run.state, run.layout
    classes = class_balanced(args.num_images, layout.ids.num_classes) if layout.ids.num_classes else None
    batches = batches_of(args.num_images, args.batch_size)
    mine = [batches[b] for b in share(len(batches), state.process_index, state.num_processes)]
    local = FeatureSet()
    base_seed = run.sampling.seed or 0
    for rows in tqdm(mine, desc=f"CFG {scale:g}", disable=not state.is_main_process):
        batch_index = rows.start // args.batch_size
        sampling = dataclasses.replace(run.sampling, cfg_scale=scale, seed=base_seed + batch_index)
        texts = [run.prompts[i % len(run.prompts)] for i in rows] if run.prompts else None
        prompts = build_prompts(
            layout,
            classes=[classes[i] for i in rows] if classes else None,
            texts=texts,
            text=run.text,
            num_images=None if classes or texts else len(rows),
            bpe=run.bpe,
        )
        images = generate_images(
            run.prior, run.tokenizer, layout, prompts, sampling, run.bpe, args.allow_other_tokenizer
        )
        archive.write(rows.start, to_uint8_hwc(images))
        local.add(run.network, images)
    return _gather(state, local)


def evaluate_generation(args: EvaluateGenerationArgs, sampling: SamplingConfig | None = None) -> dict | None:
    """Sample, score and write the report (main process); returns the report (None on other processes)."""
    run = setup(args, sampling or SamplingConfig())
    state, output = run.state, Path(args.output)
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    reference, real_features = reference_features(run)
    if state.is_main_process:
        reference.save(output / "reference_stats.npz")
    side, rows = generated_side(run), []
    for scale in args.scales:
        path = output / f"samples_cfg{scale:g}.npz"
        if state.is_main_process:
            archive = SampleArchive(path, args.num_images, side, create=True)
        state.wait_for_everyone()
        if not state.is_main_process:
            archive = SampleArchive(path, args.num_images, side, create=False)
        generated = sample_and_score(run, scale, archive)
        state.wait_for_everyone()
        if state.is_main_process:
            archive.finish()
            rows.append({"cfg_scale": scale, **scores(generated, reference, real_features), "samples": path.name})
    if not state.is_main_process:
        return None
    settings = {
        "prior": args.prior,
        "reference": args.reference,
        "features": args.features,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "sampling": {k: v for k, v in dataclasses.asdict(run.sampling).items() if k != "cfg_scale"},
        "processes": state.num_processes,
        "device": str(run.tokenizer.device),
        "reference_images": reference.count,
        # the floor: a generator of the reference's own distribution, with half its images, scores this
        "reference_split_half_fid": run.floor,
    }
    write_report(output, rows, settings)
    return {"rows": rows, "settings": settings}
