"""Image and code metrics: PSNR, SSIM, codebook usage and perplexity.

All functions are batched and stay on the device of their inputs (no host syncs), so they can
run inside training and evaluation loops. SSIM follows Wang et al. 2004 ("Image quality
assessment: from error visibility to structural similarity") with the usual 11-tap Gaussian
window, sigma 1.5, computed per channel and averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_unit_range(images: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1], clamped. [B, C, H, W] -> [B, C, H, W]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(reference: Tensor, estimate: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1].

    reference, estimate: [B, C, H, W] in [-1, 1]. Returns [B]. Both are first mapped to
    [0, 1] (peak 1), as in the published tokenizer evaluations.
    """
    mse = (to_unit_range(reference) - to_unit_range(estimate)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # [size, size]


def ssim(reference: Tensor, estimate: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image, for images in [-1, 1]. [B, C, H, W] x2 -> [B].

    Images smaller than the window use a window as large as the smaller side allows.
    """
    x, y = to_unit_range(reference), to_unit_range(estimate)
    B, C, H, W = x.shape
    size = min(window_size, H, W)
    window = _gaussian_window(size, sigma, x.device).expand(C, 1, size, size)
    c1, c2 = 0.01**2, 0.03**2

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Count how often each code occurs. indices: any shape of ints in [0, K) -> [K] float counts.

    Uses scatter_add rather than bincount, which would read the maximum back to the host.
    """
    flat = indices.reshape(-1).long()
    counts = torch.zeros(codebook_size, dtype=torch.float32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def codebook_usage(counts: Tensor) -> Tensor:
    """Fraction of codes used at least once, in [0, 1]. counts: [K] -> scalar."""
    return (counts > 0).float().mean()


def code_perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution: the effective number of codes used. [K] -> scalar."""
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return entropy.exp()
