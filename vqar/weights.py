"""Published weights that a loss or metric needs: LPIPS's VGG16 / AlexNet backbone, FID's Inception.

Fetched once into torch's hub cache (`$TORCH_HOME/hub/checkpoints`, where torchvision, `lpips`,
taming-transformers and torch-fidelity look), with a progress bar, and checked against the SHA-256
prefix in the file name (torchvision's convention; a mismatch leaves nothing in the cache).
Offline — `HF_HUB_OFFLINE=1` or `VQAR_OFFLINE=1` — or when the download fails, `MissingWeights`
names the file, where to put it, and how to do without the term. Tests and the demo run offline.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

OFFLINE_VARIABLES = ("VQAR_OFFLINE", "HF_HUB_OFFLINE")


class MissingWeights(FileNotFoundError):
    """Published weights that are not in the cache and cannot be fetched now."""


@dataclass(frozen=True)
class PublishedWeights:
    what: str  # what needs them, for the messages
    url: str
    without: str  # how to do without them

    @property
    def path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.url)

    @property
    def hash_prefix(self) -> str | None:
        found = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(self.url))
        return found.group(1) if found else None


LPIPS_BACKBONES = {
    "vgg": PublishedWeights(
        "LPIPS (VGG16 backbone)", "https://download.pytorch.org/models/vgg16-397923af.pth", "set perceptual_weight to 0"
    ),
    "alex": PublishedWeights(
        "LPIPS (AlexNet backbone)",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "set perceptual_weight to 0",
    ),
}
FID_INCEPTION = PublishedWeights(
    "rFID (torch-fidelity's Inception)",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "it is then reported as null",
)


def is_offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def fetch(weights: PublishedWeights, *, download: bool = True) -> Path:
    """The weights' path in torch's hub cache, downloading them first if needed (and allowed)."""
    path = weights.path
    if path.is_file():
        return path
    if is_offline():
        raise MissingWeights(_explain(weights, "offline (HF_HUB_OFFLINE or VQAR_OFFLINE is set)"))
    if not download:
        raise MissingWeights(_explain(weights, "this command does not fetch them (`vqar evaluate` does)"))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # writes to a temporary file and moves it into place only once the hash matched
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=weights.hash_prefix, progress=True)
    except Exception as error:  # no route, HTTP error, wrong hash: all mean the same to the user
        raise MissingWeights(_explain(weights, f"the download failed ({type(error).__name__}: {error})")) from error
    return path


def missing_reason(weights: PublishedWeights, *, download: bool = True) -> str | None:
    """None when the weights are (or could just be made) available, else why not and the fix."""
    try:
        fetch(weights, download=download)
    except MissingWeights as error:
        return str(error)
    return None


class DamagedWeights(ValueError):
    """A weights file that is not whole: truncated, overwritten, or not safetensors at all."""


def damaged_file(folder: str | Path, error: Exception, what: str, fix: str) -> DamagedWeights:
    """The error to raise when loading `folder` failed inside safetensors: which file, what is wrong, what to do."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else [Path(folder)]
    damaged = [f for f in files if safetensors_problem(f)] or files
    names = ", ".join(str(f) for f in damaged) or str(folder)
    return DamagedWeights(f"{what} {names} is damaged ({' '.join(str(error).split())}): {fix}")


def safetensors_problem(path: Path) -> str | None:
    """Why a file is not a whole safetensors file (its header's length and declared tensors against its
    size), or None when it looks whole; reads the header only."""
    import json
    import struct

    try:
        with open(path, "rb") as file:
            size = path.stat().st_size
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > size - 8:
                return f"its header says {header_length} bytes, the file holds {size}"
            header = json.loads(file.read(header_length))
    except (OSError, struct.error, ValueError) as error:
        return f"unreadable header ({error})"
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    if 8 + header_length + max(ends, default=0) > size:
        return f"truncated: its tensors need {8 + header_length + max(ends)} bytes, the file holds {size}"
    return None


def _explain(weights: PublishedWeights, why: str) -> str:
    return (
        f"{weights.what} needs the weights file {weights.path.name}, which is not in torch's hub cache: {why}. Download "
        f"{weights.url} to {weights.path} (TORCH_HOME moves the cache), or do without: {weights.without}"
    )
