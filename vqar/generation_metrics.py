"""Generated images scored the way the field scores them: FID, Inception Score, precision and recall
against a reference set, written as the ADM evaluator's files (`vqar evaluate-generation`).

LlamaGen, VAR and TiTok/RAR sample 50,000 images, pack them as an `.npz` (`arr_0`: uint8
[N, H, W, 3]) and run OpenAI's ADM evaluator on it against a reference batch. vqar writes that
same `.npz`, so any figure here can be checked with the official script, and computes the
statistics itself (`vqar.fid`) in the feature space asked for. The sampling loop, which runs on
every process under `accelerate launch`, is `vqar.training.evaluate_generation`; this module holds
what it is made of: the archive, the reference statistics, the scores, the report and the figure.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .fid import Features, FeatureStats, ReferenceStats, fid, frechet_distance, inception_score, precision_recall

PR_REFERENCE_LIMIT = 10_000  # real features kept for precision/recall (the ADM reference batch holds 10,000)


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as the ADM evaluator reads `arr_0`."""
    return (
        ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


# -- the ADM archive ---------------------------------------------------------------------------


class SampleArchive:
    """`samples_cfg{scale}.npz` with `arr_0` uint8 [N, H, W, 3], written without holding N images in memory:
    rows go into a memory-mapped `.npy` (any process, any order), which `finish` stores into the zip."""

    def __init__(self, path: Path, count: int, side: int, create: bool):
        self.path, self.count = Path(path), count
        self.array_path = self.path.with_name(f".partial-{self.path.stem}.npy")
        shape, mode = (count, side, side, 3), "w+" if create else "r+"
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.array = np.lib.format.open_memmap(self.array_path, mode=mode, dtype=np.uint8, shape=shape)
        else:
            self.array = np.load(self.array_path, mmap_mode="r+")

    def write(self, start: int, images: np.ndarray) -> None:
        self.array[start : start + len(images)] = images

    def finish(self) -> Path:
        """Store the array as `arr_0.npy` inside the `.npz` (uncompressed, as np.savez does), chunk by chunk."""
        self.array.flush()
        partial = self.path.with_name(f".partial-{self.path.name}")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member, open(self.array_path, "rb") as source:
                while chunk := source.read(1 << 24):
                    member.write(chunk)
        partial.replace(self.path)
        del self.array
        self.array_path.unlink()
        return self.path


def read_adm_images(path: str | Path) -> np.ndarray:
    """`arr_0` of an ADM-format `.npz`: uint8 [N, H, W, 3], checked."""
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} holds no images: an ADM batch keeps them as `arr_0` (keys: {list(data)})")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images


# -- features of one set -----------------------------------------------------------------------


@dataclass
class FeatureSet:
    """What one set of images gives in a feature space: running statistics, and the features and logits
    themselves (for precision/recall and the Inception Score) as float32."""

    stats: FeatureStats = field(default_factory=FeatureStats)
    features: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)

    @torch.inference_mode()
    def add(self, network: Features, images: Tensor) -> None:
        out = network(images)
        self.stats.add(out["features"])
        self.features.append(out["features"].float().cpu().numpy())
        if "logits" in out:
            self.logits.append(out["logits"].float().cpu().numpy())

    def merge(self, other: FeatureSet) -> FeatureSet:
        self.stats.merge(other.stats)
        self.features += other.features
        self.logits += other.logits
        return self

    def all_features(self) -> np.ndarray:
        return np.concatenate(self.features) if self.features else np.zeros((0, 0), np.float32)

    def reference(self, name: str) -> ReferenceStats:
        return ReferenceStats(self.stats.mu, self.stats.sigma, name, self.stats.n)


def scores(generated: FeatureSet, reference: ReferenceStats, reference_features: np.ndarray | None) -> dict:
    """FID (and IS with Inception logits, precision/recall with the reference's features) of a generated set."""
    row = {
        "fid": float(fid_from(generated.stats, reference)),
        "num_images": generated.stats.n,
        "inception_score": None,
        "precision": None,
        "recall": None,
    }
    if generated.logits:
        row["inception_score"], row["inception_score_std"] = inception_score(np.concatenate(generated.logits))
    if reference_features is not None and len(reference_features) > 3 and generated.stats.n > 3:
        row["precision"], row["recall"] = precision_recall(reference_features, generated.all_features(), k=3)
    return row


def fid_from(stats: FeatureStats, reference: ReferenceStats) -> float:
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def split_half_fid(features: FeatureSet) -> float:
    """FID between the two halves of one set: the floor a generator of that set's distribution would reach
    with as many images as a half holds."""
    all_features = features.all_features()
    halves = [FeatureStats(), FeatureStats()]
    halves[0].add(all_features[0::2])
    halves[1].add(all_features[1::2])
    return fid(*halves)


# -- the report --------------------------------------------------------------------------------


def write_report(output: Path, rows: list[dict], settings: dict) -> None:
    """report.json ({"rows": [...], "settings": ..., "versions": ...}), report.md and fid_vs_cfg.png."""
    import transformers

    from . import __version__

    versions = {"vqar": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    (output / "report.json").write_text(
        json.dumps({"rows": rows, "settings": settings, "versions": versions}, indent=2)
    )
    lines = ["| CFG scale | images | FID | IS | precision | recall |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['cfg_scale']:g} | {r['num_images']:,} | {r['fid']:.2f} | {_cell(r['inception_score'])} | "
            f"{_cell(r['precision'], '.3f')} | {_cell(r['recall'], '.3f')} |"
        )
    notes = [f"- {k}: {v}" for k, v in settings.items()]
    text = "# Generation evaluation\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    (output / "report.md").write_text(text)
    fid_vs_cfg_figure(rows).save(output / "fid_vs_cfg.png")


def _cell(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def fid_vs_cfg_figure(rows: list[dict], size: tuple[int, int] = (640, 400)) -> Image.Image:
    """FID (and IS, where measured) against the CFG scale: the figure that picks a scale."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, right, top, bottom = 60, width - 60, 30, height - 50
    scales = [r["cfg_scale"] for r in rows]
    x_of = _axis(min(scales), max(scales), left, right)
    draw.line([(left, bottom), (right, bottom)], fill="black")
    for scale in scales:
        draw.text((x_of(scale), bottom + 8), f"{scale:g}", fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, height - 15), "CFG scale", fill="black", font=font, anchor="mm")
    series = [("FID", [r["fid"] for r in rows], (200, 40, 40), left)]
    if all(r.get("inception_score") is not None for r in rows):
        series.append(("IS", [r["inception_score"] for r in rows], (40, 90, 200), right))
    for name, values, colour, axis_x in series:
        y_of = _axis(min(values), max(values), bottom, top)
        draw.line([(axis_x, top), (axis_x, bottom)], fill=colour)
        for value in (min(values), max(values)):
            anchor = "rm" if axis_x == left else "lm"
            draw.text(
                (axis_x + (-4 if axis_x == left else 4), y_of(value)),
                f"{value:.3g}",
                fill=colour,
                font=font,
                anchor=anchor,
            )
        points = [(x_of(s), y_of(v)) for s, v in zip(scales, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((axis_x, top - 14), name, fill=colour, font=font, anchor="mm")
    return image


def _axis(low: float, high: float, start: float, end: float):
    span = (high - low) or 1.0
    margin = 0.08 * (end - start)
    return lambda v: start + margin + (v - low) / span * (end - start - 2 * margin)


def class_balanced(num_images: int, num_classes: int) -> list[int]:
    """Class of every image: each class in turn (LlamaGen's 50 per class for 50,000 ImageNet samples)."""
    return [i % num_classes for i in range(num_images)]


def batches_of(num_images: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]
