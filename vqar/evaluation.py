"""`vqar evaluate`: the rate–distortion–modelability report of a tokenizer (and its prior).

- rate: tokens per image, raw bits per image (tokens x log2 K), bits per pixel, tensor-size
  reduction (input floats / latent floats) and, with a prior, the prior's bits per image: the
  rate an entropy coder driven by the prior would reach (token grids larger than the prior's,
  from images above the training resolution, are coded tile by tile);
- distortion: PSNR, SSIM, LPIPS (real backbone weights only) and rFID (torch-fidelity's
  Inception, `vqar.fid`), each null with the reason when it cannot be computed; their weights are
  fetched once into torch's hub cache unless offline (vqar.weights);
- codebook health over the whole set: usage, perplexity, dead codes;
- for a 1d tokenizer trained with nested dropout, `psnr_at_tokens`: PSNR decoding only the
  leading k = L/4, L/2, L tokens (the rate then is k x log2 K bits);
- a reference: the same images through JPEG and WebP (Pillow) at the quality whose file size
  is closest to the tokenizer's raw rate, and with a prior, to the prior's rate (`vqar.codecs`).

Every figure is a running sum over batches, on `--device` in `--dtype`: memory does not grow with
the number of images.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

from .codecs import CODEC_FORMATS, CodecAtRate
from .data import (
    SOURCE_HELP,
    ImageDataset,
    collate_images,
    image_grid,
    load_source,
    make_loader,
    report_unreadable,
    split_holdout,
)
from .devices import resolve_device, resolve_dtype
from .fid import FeatureStats, InceptionFeatures, fid
from .losses import PerceptualLoss, lpips_missing_reason
from .metrics import code_histogram, code_perplexity, codebook_usage, psnr, ssim
from .weights import MissingWeights

# -- reconstruction metrics: the one evaluator, also the trainer's held-out evaluation ----------


@dataclass
class Reconstructions:
    """What `reconstruction_metrics` measured, and the first images it kept."""

    # psnr, ssim, lpips (+ lpips_missing_reason), codebook_usage, code_perplexity, dead_codes,
    # flat_colour_error[, psnr_at_tokens]
    metrics: dict
    images: int  # how many images were measured (on every process together)
    originals: Tensor  # [n, 3, H, W] in [-1, 1]: the first `keep` images of this process
    reconstructions: Tensor  # [n, 3, H, W], clamped to [-1, 1]


@torch.inference_mode()
def reconstruction_metrics(
    tokenizer,
    batches: Iterable[Tensor],
    *,
    lpips: PerceptualLoss | None = None,
    keep: int = 8,
    on_batch: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    lpips_reason: str = "not measured",
) -> Reconstructions:
    """Mean PSNR, SSIM and LPIPS (real backbone weights only) of batches [B, 3, H, W] in [-1, 1]
    through the tokenizer, and codebook health (usage, perplexity, dead codes) over all of them.

    Streams: every figure is a running sum, so memory does not grow with the number of images.
    A tokenizer that decodes prefixes (1D, nested dropout) also gets `psnr_at_tokens`: the PSNR
    decoding only its leading k tokens, for k in `tokenizer.prefix_lengths`.
    `keep`: how many originals and reconstructions to return; `on_batch(pixels, reconstructions,
    indices)` sees every batch (what else a caller measures); `reduce` sums a tensor over processes
    when each evaluates its own share of the images; `lpips_reason` is reported without LPIPS.
    """
    was_training = tokenizer.training
    tokenizer.eval()
    names = ("psnr", "ssim", "lpips", *(f"psnr@{k}" for k in tokenizer.prefix_lengths))
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=tokenizer.device)  # the figures, then n
    counts = torch.zeros(tokenizer.codebook_size, device=tokenizer.device, dtype=torch.float64)
    kept = {"originals": [], "reconstructions": []}
    for pixels in batches:
        if not len(pixels):
            continue
        pixels = pixels.to(tokenizer.device, tokenizer.dtype)
        out = tokenizer(pixels)
        reconstruction = out.reconstruction.clamp(-1, 1)
        counts += code_histogram(out.indices, tokenizer.codebook_size)
        sums += torch.stack([*_batch_sums(tokenizer, pixels, reconstruction, out.indices, lpips, names), _n(pixels)])
        room = keep - sum(len(k) for k in kept["originals"])
        if room > 0:  # cloned: a slice would keep the whole batch alive
            kept["originals"].append(pixels[:room].float().cpu().clone())
            kept["reconstructions"].append(reconstruction[:room].float().cpu().clone())
        if on_batch is not None:
            on_batch(pixels, reconstruction, out.indices)
    tokenizer.train(was_training)
    if reduce is not None:
        sums, counts = reduce(sums), reduce(counts)
    totals, n = dict(zip(names, sums[:-1].tolist())), int(sums[-1].item())
    if n == 0:
        raise ValueError("no readable images to evaluate")
    metrics = {name: totals[name] / n for name in names if not name.startswith("psnr@")}
    metrics |= {
        "codebook_usage": codebook_usage(counts).item(),
        "code_perplexity": code_perplexity(counts).item(),
        "dead_codes": int((counts == 0).sum().item()),
        "flat_colour_error": flat_colour_error(tokenizer),
    }
    if tokenizer.prefix_lengths:
        metrics["psnr_at_tokens"] = {str(k): totals[f"psnr@{k}"] / n for k in tokenizer.prefix_lengths}
    if lpips is None:
        metrics["lpips"] = None
        metrics["lpips_missing_reason"] = lpips_reason
    empty = torch.empty(0, 3, tokenizer.config.resolution, tokenizer.config.resolution)
    return Reconstructions(
        metrics, n, torch.cat(kept["originals"] or [empty]), torch.cat(kept["reconstructions"] or [empty])
    )


def _n(pixels: Tensor) -> Tensor:
    return torch.tensor(float(len(pixels)), dtype=torch.float64, device=pixels.device)


FLAT_LEVELS = (-0.8, 0.0, 0.8)  # each channel at three levels: 27 flat colours, white and black among them


@torch.inference_mode()
def flat_colour_error(tokenizer) -> float:
    """The worst error, in 8-bit levels, of the mean colour a tokenizer gives back for flat colour
    patches (27 colours at its resolution, the border left out). Natural photographs hold few
    flat areas of pure colour, so this catches what PSNR averages away: a decoder that learned the
    palette of its training photographs instead of reading colour from the codes gives white back
    orange, and blue back grey."""
    was_training = tokenizer.training
    tokenizer.eval()
    colours = torch.tensor(list(itertools.product(FLAT_LEVELS, repeat=3)), device=tokenizer.device)
    size, border = tokenizer.config.resolution, tokenizer.config.resolution // 8
    means = []
    for chunk in colours.split(
        max(1, 2**19 // size**2)
    ):  # a few at a time: 27 patches at 256 px are 3 GiB of activations
        patches = chunk[:, :, None, None].expand(-1, -1, size, size).to(tokenizer.dtype).contiguous()
        reconstructed = tokenizer(patches).reconstruction.clamp(-1, 1)[
            ..., border : size - border, border : size - border
        ]
        means.append(reconstructed.float().mean((2, 3)))
    tokenizer.train(was_training)
    return (torch.cat(means) - colours).abs().max().item() * 127.5


def _batch_sums(tokenizer, pixels: Tensor, reconstruction: Tensor, indices: Tensor, lpips, names) -> list[Tensor]:
    """One batch's summed per-image PSNR, SSIM, LPIPS and prefix PSNRs, as tensors (no host sync)."""
    pixels, reconstruction = pixels.float(), reconstruction.float()
    sums = {"psnr": psnr(pixels, reconstruction).sum(), "ssim": ssim(pixels, reconstruction).sum()}
    sums["lpips"] = lpips(pixels, reconstruction).sum() if lpips is not None else torch.zeros((), device=pixels.device)
    for k in tokenizer.prefix_lengths:
        coarse = reconstruction if k == tokenizer.tokens_per_image else tokenizer.decode(indices[:, :k]).clamp(-1, 1)
        sums[f"psnr@{k}"] = psnr(pixels, coarse.float()).sum()
    return [sums[name].double() for name in names]


def real_lpips(device: torch.device | str = "cpu", *, download: bool = True) -> PerceptualLoss | None:
    """LPIPS with its real backbone weights (fetched once if `download` and online), or None."""
    return PerceptualLoss(download=download).to(device) if lpips_missing_reason(download=download) is None else None


# -- the report -------------------------------------------------------------------------------


@dataclass
class EvaluateArgs:
    """The rate-distortion-modelability report of a tokenizer (and its prior)."""

    tokenizer: str = HfArg(help="a trained tokenizer: folder or Hub id")
    data: str = HfArg(default="photos", help=SOURCE_HELP)
    output: str = HfArg(default="outputs/evaluate", help="folder for report.json, report.md and samples.png")
    prior: str | None = HfArg(default=None, help="a prior trained on this tokenizer: adds its bits per image")
    allow_other_tokenizer: bool = HfArg(default=False, help="evaluate the prior with a tokenizer it was not trained on")
    resolution: int | None = HfArg(default=None, help="crop size (default: the tokenizer's training resolution)")
    resize_to: int | None = HfArg(default=None, help="shorter side before the centre crop (default: the tokenizer's)")
    holdout: float | None = HfArg(default=None, help="evaluate only the hold-out that training used (e.g. 0.25)")
    split: str = HfArg(default="train", help="the split of a Hub dataset")
    image_column: str | None = HfArg(default=None, help="default: the first Image column (or 'image', 'img')")
    label_column: str | None = HfArg(default=None, help="default: the first ClassLabel column (or 'label')")
    batch_size: int | None = HfArg(
        default=None, help="images per batch (default: as many as hold 2^19 pixels, at most 64: 8 at 256 px)"
    )
    num_workers: int = HfArg(default=2, help="DataLoader processes decoding images while the tokenizer runs")
    device: str | None = HfArg(default=None, help="cpu, cuda, cuda:N, mps (default: the best present)")
    dtype: str = HfArg(default="fp32", help="fp32, bf16 or fp16 (GPU) for the tokenizer; the quantizer stays fp32")
    prompt_images: int = HfArg(
        default=96, help="a text prior on --data shapes: images per CFG scale for seen and for held-out prompts"
    )
    prompt_cfg_scales: str = HfArg(default="0,1,2,4", help="CFG scales of the prompt-following score (0: unprompted)")


class PriorRate:
    """Bits per image of token batches under a prior, unconditionally (null class), as they stream by.

    Grid tokens larger than the prior's grid (images evaluated above the training resolution) are
    cut into tiles of the prior's grid, each coded on its own: what an entropy coder that codes
    tile by tile with this prior would spend on the whole image."""

    def __init__(self, prior_path: str, tokenizer, batch_size: int, allow_other_tokenizer: bool = False):
        from .ar import load_prior

        self.prior, self.layout = load_prior(prior_path)
        self.prior.to(tokenizer.device)
        self.layout.check_tokenizer(tokenizer, allow_other=allow_other_tokenizer)
        if self.layout.ids.uses_bpe:
            raise ValueError(
                "prior_bits_per_image reads code sequences; this prior models visual-BPE ids "
                "(its held-out bits per image are in its metrics.json)"
            )
        self.batch_size, self.nats, self.images = batch_size, 0.0, 0

    @torch.inference_mode()
    def add(self, indices: Tensor) -> None:
        from .ar import image_nll

        codes = self.layout.tokens.tiles_of(indices)
        for chunk in codes.split(self.batch_size):
            self.nats += image_nll(self.prior, self.layout, self.layout.codec.to_sequence(None, chunk))[0]
        self.images += len(indices)

    @property
    def bits_per_image(self) -> float:
        return self.nats / math.log(2) / max(self.images, 1)


def prior_bits_per_image(
    prior_path: str, tokenizer, indices: torch.Tensor, batch_size: int, allow_other_tokenizer: bool = False
) -> float:
    """Bits per image of these tokens under the prior (`PriorRate` for one batch of indices)."""
    rate = PriorRate(prior_path, tokenizer, batch_size, allow_other_tokenizer)
    rate.add(indices.to(tokenizer.device))
    return rate.bits_per_image


class ReconstructionFID:
    """rFID as the images stream by: Inception statistics of the originals and of their reconstructions."""

    def __init__(self, features):
        self.features, self.real, self.fake = features, FeatureStats(), FeatureStats()

    @torch.inference_mode()
    def add(self, originals: Tensor, reconstructions: Tensor) -> None:
        self.real.add(self.features(originals.float())["features"])
        self.fake.add(self.features(reconstructions.float())["features"])

    def value(self) -> float:
        return fid(self.real, self.fake)


def reconstruction_fid(device) -> tuple[ReconstructionFID | None, str | None]:
    """The rFID accumulator, or (None, why it cannot be computed here)."""
    try:
        return ReconstructionFID(InceptionFeatures().to(device)), None
    except (ImportError, MissingWeights) as error:
        return None, str(error)


def evaluate_tokenizer(args: EvaluateArgs) -> dict:
    """Run the report; write OUTPUT/report.json, report.md and samples.png. Returns the report.

    One pass over the images (two with a prior: JPEG and WebP at the prior's rate need that rate
    first); every figure is a running sum, so memory does not grow with the number of images."""
    from .tokenizer import VQTokenizer

    device = resolve_device(args.device)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).for_inference(device, resolve_dtype(args.dtype, device))
    transform = tokenizer.image_transform(args.resolution, args.resize_to)  # as its training evaluation did
    resolution = transform.resolution
    args.batch_size = args.batch_size or max(1, min(64, 2**19 // resolution**2))  # memory flat at any resolution
    source = load_source(args.data, split=args.split, image_column=args.image_column, label_column=args.label_column)
    if args.holdout:
        source = split_holdout(source, args.holdout, seed=0)[1]
    dataset = ImageDataset(source, transform)
    dataset.require_readable(args.data)
    report = _rate(tokenizer, resolution)
    codecs = {name: CodecAtRate(fmt, report["bits_per_image"]) for name, fmt in CODEC_FORMATS.items()}
    rate = PriorRate(args.prior, tokenizer, args.batch_size, args.allow_other_tokenizer) if args.prior else None
    rfid, reason = reconstruction_fid(device)

    def measure(pixels: Tensor, reconstructions: Tensor, indices: Tensor) -> None:
        for codec in codecs.values():
            codec.add(pixels)
        if rfid is not None:
            rfid.add(pixels, reconstructions)
        if rate is not None:
            rate.add(indices)

    batches = _pixels(dataset, args, "reconstructing")
    lpips_reason = lpips_missing_reason(download=True)  # asked for: fetched once, or why not
    lpips = PerceptualLoss().to(device) if lpips_reason is None else None
    measured = reconstruction_metrics(
        tokenizer, batches, lpips=lpips, keep=8, on_batch=measure, lpips_reason=lpips_reason or ""
    )
    report |= measured.metrics
    report["rfid"] = rfid.value() if rfid is not None else None
    if reason:
        report["rfid_missing_reason"] = reason
    report |= {name: codec.summary() for name, codec in codecs.items()}
    report["prior_bits_per_image"] = rate.bits_per_image if rate is not None else None
    if rate is not None:  # the rate the prior really codes the tokens at: a second pass, images only
        at_prior = {name: CodecAtRate(fmt, rate.bits_per_image, keep=0) for name, fmt in CODEC_FORMATS.items()}
        for pixels in _pixels(dataset, args, "codecs at the prior's rate"):
            for codec in at_prior.values():
                codec.add(pixels)
        report |= {f"{name}_at_prior_rate": codec.summary() for name, codec in at_prior.items()}
    report |= {"images": measured.images, "resolution": resolution, "tokenizer": args.tokenizer, "data": args.data}
    if rate is not None and rate.layout.ids.uses_text:
        report |= _prompt_following(args, rate, tokenizer)
    _write(Path(args.output), report, measured.originals, measured.reconstructions, codecs["jpeg"].samples())
    return report


def _prompt_following(args: EvaluateArgs, rate: PriorRate, tokenizer) -> dict:
    """A text prior's prompt-following score on `shapes` (`vqar.shapes.prompt_following`), or why there is none."""
    if args.data != "shapes":
        return {"prompt_following_missing_reason": "prompt following is scored on --data shapes (its detector)"}
    from .shapes import prompt_following
    from .text import load_text_tokenizer

    try:
        scales = tuple(float(s) for s in args.prompt_cfg_scales.split(","))
    except ValueError as error:
        raise ValueError(
            f"--prompt-cfg-scales takes numbers such as 0,1,2,4, got {args.prompt_cfg_scales!r}"
        ) from error
    text = load_text_tokenizer(args.prior, rate.layout)
    rows = prompt_following(rate.prior, tokenizer, rate.layout, text, num_images=args.prompt_images, cfg_scales=scales)
    return {"prompt_following": rows}


def format_prompt_following(rows: list[dict]) -> str:
    """The prompt-following rows as a Markdown table: accuracy per attribute by CFG scale, the ceiling, chance."""
    from .shapes import ATTRIBUTES

    lines = ["| prompts | CFG | " + " | ".join(ATTRIBUTES) + " | all four |", "|---" * (len(ATTRIBUTES) + 3) + "|"]
    for row in rows:
        scale = row.get("source") or f"{row['cfg_scale']:g}" + (" (unprompted)" if row["cfg_scale"] == 0 else "")
        cells = " | ".join(f"{row[a]:.2f}" for a in (*ATTRIBUTES, "all"))
        lines.append(f"| {row['combinations']} | {scale} | {cells} |")
    return "\n".join(lines)


def _pixels(dataset: ImageDataset, args: EvaluateArgs, what: str):
    """The readable images of every batch, decoded in DataLoader workers; each unreadable one reported once."""
    loader = make_loader(dataset, args.batch_size, collate_fn=collate_images, num_workers=args.num_workers)
    unreadable = set()
    for batch in tqdm(loader, desc=what):
        report_unreadable(batch, unreadable)
        yield batch["pixels"]


def _rate(tokenizer, resolution: int) -> dict:
    tokens = tokenizer.token_layout.at_resolution(resolution, tokenizer.downsample_factor).tokens_per_image
    bits = tokens * math.log2(tokenizer.codebook_size)
    latent_floats = tokens * tokenizer.config.latent_channels
    return {
        "tokens_per_image": tokens,
        "bits_per_image": bits,
        "bits_per_pixel": bits / resolution**2,
        "tsr": 3 * resolution**2 / latent_floats,
    }


# -- output -----------------------------------------------------------------------------------

COLUMNS = [
    ("tokens_per_image", "tokens/image", "{:.0f}"),
    ("bits_per_image", "bits/image", "{:.0f}"),
    ("bits_per_pixel", "bits/pixel", "{:.3f}"),
    ("tsr", "TSR", "{:.1f}"),
    ("prior_bits_per_image", "prior bits/image", "{:.0f}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("lpips", "LPIPS", "{:.3f}"),
    ("rfid", "rFID", "{:.2f}"),
    ("codebook_usage", "usage", "{:.1%}"),
    ("code_perplexity", "perplexity", "{:.0f}"),
    ("dead_codes", "dead codes", "{}"),
    ("flat_colour_error", "flat colour error", "{:.0f}"),
]


def format_table(report: dict) -> str:
    """The report as a Markdown table: the tokenizer's row, then JPEG and WebP at its raw rate (and,
    with a prior, at the rate the prior codes the tokens to)."""
    cell = lambda key, fmt, r: "n/a" if r.get(key) is None else fmt.format(r[key])  # noqa: E731
    lines = ["| | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines.append("| tokenizer | " + " | ".join(cell(k, f, report) for k, _, f in COLUMNS) + " |")
    rows = [(name, name) for name in CODEC_FORMATS]
    rows += [(f"{name}_at_prior_rate", f"{name} at the prior's rate") for name in CODEC_FORMATS]
    for key, label in rows:
        if key not in report:
            continue
        codec = {**report[key], "bits_per_pixel": report[key]["bits_per_image"] / report["resolution"] ** 2}
        lines.append(
            f"| {label} q={codec['quality']} | "
            + " | ".join(
                cell(k, f, codec) if k in ("bits_per_image", "bits_per_pixel", "psnr", "ssim") else ""
                for k, _, f in COLUMNS
            )
            + " |"
        )
    return "\n".join(lines)


def _write(output: Path, report: dict, originals, reconstructions, jpeg) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2))
    reasons = ("lpips_missing_reason", "rfid_missing_reason", "prompt_following_missing_reason")
    notes = [f"- {key}: {report[key]}" for key in reasons if key in report]
    if "psnr_at_tokens" in report:
        notes.insert(
            0,
            "- PSNR from the leading k tokens: "
            + ", ".join(f"k={k}: {value:.2f} dB" for k, value in report["psnr_at_tokens"].items()),
        )
    text = (
        f"# Tokenizer evaluation\n\n{report['images']} images of `{report['data']}` at "
        f"{report['resolution']} px, tokenizer `{report['tokenizer']}`.\n\n{format_table(report)}\n\n"
        "Rows of samples.png: originals, reconstructions, JPEG at the matched rate.\n"
    )
    if "prompt_following" in report:
        text += "\n## Prompt following\n\n" + format_prompt_following(report["prompt_following"]) + "\n"
    (output / "report.md").write_text(text + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    n = min(8, len(originals))
    image_grid([originals[:n], reconstructions[:n], jpeg[:n]]).save(output / "samples.png")
