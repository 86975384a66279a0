"""`vqar evaluate`: the rate–distortion–modelability report of a tokenizer (and its prior).

- rate: tokens per image, raw bits per image (tokens x log2 K), bits per pixel, tensor-size
  reduction (input floats / latent floats) and, with a prior, the prior's bits per image: the
  rate an entropy coder driven by the prior would reach (token grids larger than the prior's,
  from images above the training resolution, are coded tile by tile);
- distortion: PSNR, SSIM, LPIPS (real backbone weights only) and rFID (torch-fidelity's
  Inception), each null with the reason when it cannot be computed; their weights are fetched
  once into torch's hub cache unless offline (vqar.weights);
- codebook health over the whole set: usage, perplexity, dead codes;
- for a 1d tokenizer trained with nested dropout, `psnr_at_tokens`: PSNR decoding only the
  leading k = L/4, L/2, L tokens (the rate then is k x log2 K bits);
- a reference: the same images through JPEG and WebP (Pillow) at the quality whose file size
  is closest to the tokenizer's raw rate, and with a prior, to the prior's rate.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers.hf_argparser import HfArg

from .data import (
    ImageDataset,
    collate_images,
    image_grid,
    load_source,
    make_loader,
    report_unreadable,
    split_holdout,
    to_pil,
)
from .losses import PerceptualLoss, lpips_missing_reason
from .metrics import code_histogram, code_perplexity, codebook_usage, psnr, ssim
from .weights import FID_INCEPTION, missing_reason

CODEC_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


# -- reconstruction metrics: the one evaluator, also the trainer's held-out evaluation ----------


@dataclass
class Reconstructions:
    """What `reconstruction_metrics` measured, and the images it kept."""

    # psnr, ssim, lpips (+ lpips_missing_reason), codebook_usage, code_perplexity, dead_codes,
    # flat_colour_error[, psnr_at_tokens]
    metrics: dict
    images: int  # how many images were measured
    originals: Tensor  # [n, 3, H, W] in [-1, 1]: the first `keep` images (all with keep=None)
    reconstructions: Tensor  # [n, 3, H, W], clamped to [-1, 1]
    indices: Tensor | None  # every image's indices, with keep=None


@torch.inference_mode()
def reconstruction_metrics(
    tokenizer, batches: Iterable[Tensor], *, lpips: PerceptualLoss | None = None, keep: int | None = 8
) -> Reconstructions:
    """Mean PSNR, SSIM and LPIPS (real backbone weights only) of batches [B, 3, H, W] in [-1, 1]
    through the tokenizer, and codebook health (usage, perplexity, dead codes) over all of them.

    A tokenizer that decodes prefixes (1D, nested dropout) also gets `psnr_at_tokens`: the PSNR
    decoding only its leading k tokens, for k in `tokenizer.prefix_lengths`.
    `keep`: how many originals and reconstructions to return (None: all, with every image's indices).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    counts = torch.zeros(tokenizer.codebook_size, device=tokenizer.device)
    sums = dict.fromkeys(("psnr", "ssim", "lpips", *(f"psnr@{k}" for k in tokenizer.prefix_lengths)), 0.0)
    kept, n = {"originals": [], "reconstructions": [], "indices": []}, 0
    for pixels in batches:
        if not len(pixels):
            continue
        pixels = pixels.to(tokenizer.device)
        out = tokenizer(pixels)
        reconstruction = out.reconstruction.clamp(-1, 1)
        counts += code_histogram(out.indices, tokenizer.codebook_size)
        _accumulate(sums, tokenizer, pixels, reconstruction, out.indices, lpips)
        room = len(pixels) if keep is None else max(0, keep - n)
        kept["originals"].append(pixels[:room].cpu())
        kept["reconstructions"].append(reconstruction[:room].cpu())
        if keep is None:
            kept["indices"].append(out.indices.cpu())
        n += len(pixels)
    tokenizer.train(was_training)
    if n == 0:
        raise ValueError("no readable images to evaluate")
    metrics = {name: total / n for name, total in sums.items() if not name.startswith("psnr@")}
    metrics |= {
        "codebook_usage": codebook_usage(counts).item(),
        "code_perplexity": code_perplexity(counts).item(),
        "dead_codes": int((counts == 0).sum().item()),
        "flat_colour_error": flat_colour_error(tokenizer),
    }
    if tokenizer.prefix_lengths:
        metrics["psnr_at_tokens"] = {str(k): sums[f"psnr@{k}"] / n for k in tokenizer.prefix_lengths}
    if lpips is None:
        metrics["lpips"] = None
        metrics["lpips_missing_reason"] = lpips_missing_reason(download=False) or "LPIPS not requested"
    indices = torch.cat(kept["indices"]) if keep is None else None
    return Reconstructions(metrics, n, torch.cat(kept["originals"]), torch.cat(kept["reconstructions"]), indices)


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
    patches = colours[:, :, None, None].expand(-1, -1, size, size).contiguous()
    reconstructed = tokenizer(patches).reconstruction.clamp(-1, 1)[..., border : size - border, border : size - border]
    tokenizer.train(was_training)
    return (reconstructed.float().mean((2, 3)) - colours).abs().max().item() * 127.5


def _accumulate(sums: dict, tokenizer, pixels: Tensor, reconstruction: Tensor, indices: Tensor, lpips) -> None:
    """Add one batch's per-image PSNR, SSIM, LPIPS and prefix PSNRs to the running sums (one sync each)."""
    sums["psnr"] += psnr(pixels, reconstruction).sum().item()
    sums["ssim"] += ssim(pixels, reconstruction).sum().item()
    if lpips is not None:
        sums["lpips"] += lpips(pixels, reconstruction).sum().item()
    for k in tokenizer.prefix_lengths:
        coarse = reconstruction if k == tokenizer.tokens_per_image else tokenizer.decode(indices[:, :k]).clamp(-1, 1)
        sums[f"psnr@{k}"] += psnr(pixels, coarse).sum().item()


def real_lpips(device: torch.device | str = "cpu", *, download: bool = True) -> PerceptualLoss | None:
    """LPIPS with its real backbone weights (fetched once if `download` and online), or None."""
    return PerceptualLoss(download=download).to(device) if lpips_missing_reason(download=download) is None else None


# -- the report -------------------------------------------------------------------------------


@dataclass
class EvaluateArgs:
    """The rate-distortion-modelability report of a tokenizer (and its prior)."""

    tokenizer: str = HfArg(help="a trained tokenizer: folder or Hub id")
    data: str = HfArg(default="photos", help="digits | photos | image folder | *.parquet | saved dataset | Hub id")
    output: str = HfArg(default="outputs/evaluate", help="folder for report.json, report.md and samples.png")
    prior: str | None = HfArg(default=None, help="a prior trained on this tokenizer: adds its bits per image")
    allow_other_tokenizer: bool = HfArg(default=False, help="evaluate the prior with a tokenizer it was not trained on")
    resolution: int | None = HfArg(default=None, help="crop size (default: the tokenizer's training resolution)")
    resize_to: int | None = HfArg(default=None, help="shorter side before the centre crop (default: the tokenizer's)")
    holdout: float | None = HfArg(default=None, help="evaluate only the hold-out that training used (e.g. 0.25)")
    split: str = HfArg(default="train", help="the split of a Hub dataset")
    image_column: str | None = HfArg(default=None, help="default: the first Image column (or 'image', 'img')")
    label_column: str | None = HfArg(default=None, help="default: the first ClassLabel column (or 'label')")
    batch_size: int = HfArg(default=32, help="images per batch")


def evaluate_tokenizer(args: EvaluateArgs) -> dict:
    """Run the report; write OUTPUT/report.json, report.md and samples.png. Returns the report."""
    from .tokenizer import VQTokenizer

    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).eval()
    transform = tokenizer.image_transform(args.resolution, args.resize_to)  # as its training evaluation did
    resolution = transform.resolution
    source = load_source(args.data, split=args.split, image_column=args.image_column, label_column=args.label_column)
    if args.holdout:
        source = split_holdout(source, args.holdout, seed=0)[1]
    dataset = ImageDataset(source, transform)
    dataset.require_readable(args.data)
    loader = make_loader(dataset, args.batch_size, collate_fn=collate_images)
    unreadable = set()
    batches = (_readable(batch, unreadable) for batch in tqdm(loader, desc="reconstructing"))
    measured = reconstruction_metrics(tokenizer, batches, lpips=real_lpips(tokenizer.device), keep=None)
    originals, reconstructions = measured.originals, measured.reconstructions
    report = _rate(tokenizer, resolution) | measured.metrics
    report["rfid"], reason = rfid(originals, reconstructions)
    if reason:
        report["rfid_missing_reason"] = reason
    report["prior_bits_per_image"] = None
    if args.prior:
        report["prior_bits_per_image"] = prior_bits_per_image(
            args.prior, tokenizer, measured.indices, args.batch_size, args.allow_other_tokenizer
        )
    codecs = {name: codec_at_rate(originals, fmt, report["bits_per_image"]) for name, fmt in CODEC_FORMATS.items()}
    report |= {name: summary for name, (summary, _) in codecs.items()}
    if report["prior_bits_per_image"] is not None:  # the rate the prior really codes the tokens at
        for name, fmt in CODEC_FORMATS.items():
            report[f"{name}_at_prior_rate"] = codec_at_rate(originals, fmt, report["prior_bits_per_image"])[0]
    report |= {"images": measured.images, "resolution": resolution, "tokenizer": args.tokenizer, "data": args.data}
    _write(Path(args.output), report, originals, reconstructions, codecs["jpeg"][1])
    return report


def _readable(batch: dict, unreadable: set) -> Tensor:
    report_unreadable(batch, unreadable)
    return batch["pixels"]


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


def rfid_missing_reason(*, download: bool = True) -> str | None:
    """None when torch-fidelity and its Inception weights are here (fetched once if allowed), else why not."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "rFID needs torch-fidelity and its Inception weights: pip install 'vqar[metrics]' (the weights follow)"
    return missing_reason(FID_INCEPTION, download=download)


def rfid(originals: torch.Tensor, reconstructions: torch.Tensor) -> tuple[float | None, str | None]:
    """FID between originals and reconstructions with torch-fidelity's Inception, or (None, reason)."""
    reason = rfid_missing_reason()
    if reason:
        return None, reason
    import torch_fidelity

    def as_uint8(images):
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = as_uint8(images)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    metrics = torch_fidelity.calculate_metrics(
        input1=Images(originals),
        input2=Images(reconstructions),
        fid=True,
        verbose=False,
        cuda=torch.cuda.is_available(),
    )
    return float(metrics["frechet_inception_distance"]), None


def encode_with(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def codec_at_rate(originals: torch.Tensor, fmt: str, target_bits: float) -> tuple[dict, torch.Tensor]:
    """The quality in [1, 100] whose mean file size is closest to target_bits, and its results.

    Returns ({quality, bits_per_image, psnr, ssim}, decoded images [B, 3, H, W] in [-1, 1]).
    """
    images = to_pil(originals)
    probe = images[:64]  # the quality search reads a sample; the figures use every image

    def mean_bits(quality: int) -> float:
        return 8 * float(np.mean([len(encode_with(im, fmt, quality)) for im in probe]))

    low, high = 1, 100  # file size grows with quality: bisect for the crossing, then take the closer side
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if mean_bits(middle) < target_bits else (low, middle)
    quality = min((low, high), key=lambda q: abs(mean_bits(q) - target_bits))
    encoded = [encode_with(im, fmt, quality) for im in images]
    decoded = (
        torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
                for data in encoded
            ]
        ).float()
        / 127.5
        - 1
    )
    summary = {
        "quality": quality,
        "bits_per_image": 8 * float(np.mean([len(d) for d in encoded])),
        "psnr": psnr(originals, decoded).mean().item(),
        "ssim": ssim(originals, decoded).mean().item(),
    }
    return summary, decoded


@torch.inference_mode()
def prior_bits_per_image(
    prior_path: str, tokenizer, indices: torch.Tensor, batch_size: int, allow_other_tokenizer: bool = False
) -> float:
    """Held-out bits per image of these tokens under the prior, unconditionally (null class).

    Grid tokens larger than the prior's grid (images evaluated above the training resolution) are
    cut into tiles of the prior's grid, each coded on its own: what an entropy coder that codes
    tile by tile with this prior would spend on the whole image."""
    from .ar import image_nll, load_prior

    prior, layout = load_prior(prior_path)
    layout.check_tokenizer(tokenizer, allow_other=allow_other_tokenizer)
    if layout.ids.uses_bpe:
        raise ValueError(
            "prior_bits_per_image reads code sequences; this prior models visual-BPE ids "
            "(its held-out bits per image are in its metrics.json)"
        )
    codes = layout.tokens.tiles_of(indices)
    sequences = (layout.codec.to_sequence(None, chunk).to(prior.device) for chunk in codes.split(batch_size))
    nats = sum(image_nll(prior, layout, ids)[0] for ids in sequences)
    return nats / math.log(2) / len(indices)


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
    notes = [f"- {key}: {report[key]}" for key in ("lpips_missing_reason", "rfid_missing_reason") if key in report]
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
    (output / "report.md").write_text(text + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    n = min(8, len(originals))
    image_grid([originals[:n], reconstructions[:n], jpeg[:n]]).save(output / "samples.png")
