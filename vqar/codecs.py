"""Reference codecs for the rate–distortion report: JPEG and WebP (Pillow) at a target rate.

`CodecAtRate` finds the quality in [1, 100] whose mean file size is closest to a number of bits
per image, on the first `PROBE` images it is shown, then encodes and decodes every image at that
quality as batches stream by: running sums of bits, PSNR and SSIM, so memory stays flat.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import to_pil
from .metrics import psnr, ssim

CODEC_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}
PROBE = 64  # images the quality search reads


def encode_with(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def decode_bytes(data: bytes) -> Tensor:
    """An encoded image -> [3, H, W] in [-1, 1]."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1


def quality_at_rate(images: list[Image.Image], fmt: str, target_bits: float) -> int:
    """The quality whose mean file size over `images` is closest to `target_bits` (file size grows with
    quality: bisect for the crossing, then take the closer side)."""

    def mean_bits(quality: int) -> float:
        return 8 * float(np.mean([len(encode_with(im, fmt, quality)) for im in images]))

    low, high = 1, 100
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if mean_bits(middle) < target_bits else (low, middle)
    return min((low, high), key=lambda q: abs(mean_bits(q) - target_bits))


class CodecAtRate:
    """One codec at one target rate, fed batches of originals [B, 3, H, W] in [-1, 1]."""

    def __init__(self, fmt: str, target_bits: float, keep: int = 8):
        self.fmt, self.target_bits, self.keep = fmt, target_bits, keep
        self.quality: int | None = None
        self.pending: list[Tensor] = []  # originals shown before the quality was chosen
        self.n, self.bits, self.psnr, self.ssim = 0, 0.0, 0.0, 0.0
        self.decoded: list[Tensor] = []  # the first `keep` decoded images, for the sample grid

    def add(self, originals: Tensor) -> None:
        originals = originals.detach().float().cpu()
        if self.quality is None:
            self.pending.append(originals)
            if sum(len(p) for p in self.pending) < PROBE:
                return
            self._choose()
        self._measure(originals)

    def _choose(self) -> None:
        probe = torch.cat(self.pending)
        self.quality = quality_at_rate(to_pil(probe[:PROBE]), self.fmt, self.target_bits)
        pending, self.pending = self.pending[:-1], []
        for batch in pending:  # the last one is measured by the caller
            self._measure(batch)

    def _measure(self, originals: Tensor) -> None:
        encoded = [encode_with(im, self.fmt, self.quality) for im in to_pil(originals)]
        decoded = torch.stack([decode_bytes(data) for data in encoded])
        self.n += len(encoded)
        self.bits += 8.0 * sum(len(data) for data in encoded)
        self.psnr += psnr(originals, decoded).sum().item()
        self.ssim += ssim(originals, decoded).sum().item()
        room = self.keep - sum(len(d) for d in self.decoded)
        if room > 0:
            self.decoded.append(decoded[:room].clone())

    def summary(self) -> dict:
        """{quality, bits_per_image, psnr, ssim} over every image shown."""
        if self.quality is None and self.pending:
            last = self.pending[-1]
            self._choose()
            self._measure(last)
        if not self.n:
            raise ValueError("no images were shown to the codec")
        return {
            "quality": self.quality,
            "bits_per_image": self.bits / self.n,
            "psnr": self.psnr / self.n,
            "ssim": self.ssim / self.n,
        }

    def samples(self) -> Tensor:
        return torch.cat(self.decoded) if self.decoded else torch.empty(0)
