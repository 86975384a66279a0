"""Multi-scale residual tokens (VAR, Tian et al. 2024, arXiv 2404.02905): the "multiscale" layout.

The latent [B, C, h, w] is quantized as a sum of token maps at growing scales s_1 < ... < s_n = h
(= w), one shared codebook. At scale k the residual left by the coarser scales is
area-downsampled to s_k x s_k and quantized (through the quantizer adapter, so any kind works);
its codes are bicubic-upsampled to h x w and refined by a 3x3 convolution phi (VAR's
`quant_resi`: h (1 - r) + conv(h) r with r = 0.5) before the residual is taken. phi is shared
as in the paper: `phi_count` convolutions, scale k using the one whose tick in
linspace(1/3K, 1 - 1/3K, K) (K = 4; linspace(1/2K, 1 - 1/2K, K) otherwise) lies nearest to
k / (n - 1); 1 is fully shared, n one per scale.

Training follows VAR's quantizer: the residuals are taken from the latents without gradient; the
running sum f_hat is pulled towards the latents (which trains phi and the quantizer's own
parameters) and the latents towards f_hat (commitment, weight beta), both averaged over the
scales; the decoder sees f_hat, with the latents' gradient passed straight through. Tokens are
the scales' codes concatenated coarse to fine, [B, sum(s_k^2)]; any leading whole scales decode
(a coarser image).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layouts import MultiscaleLayout
from ..metrics import code_histogram, code_perplexity, codebook_usage
from ..quantizers import CodeStats, QuantizerOutput, build_quantizer

PHI_RATIO = 0.5  # VAR's quant_resi


class Phi(nn.Conv2d):
    """VAR's refinement of an upsampled code map: x (1 - r) + conv3x3(x) r."""

    def __init__(self, channels: int, ratio: float = PHI_RATIO):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = ratio

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


def _phi_ticks(count: int) -> np.ndarray:
    return (
        np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
        if count == 4
        else np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)
    )


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over `scales` with one shared quantizer (see the module docstring)."""

    def __init__(self, quantizer_config: dict, channels: int, scales: list[int], phi_count: int, beta: float = 0.25):
        super().__init__()
        self.scales, self.channels, self.beta = list(scales), channels, beta
        self.quantizer = build_quantizer(quantizer_config, dim=channels)
        self.phis = nn.ModuleList(Phi(channels) for _ in range(phi_count))
        ticks = _phi_ticks(phi_count)
        at = [k / max(1, len(scales) - 1) for k in range(len(scales))]
        self.phi_of_scale = [int(np.abs(ticks - a).argmin()) for a in at]
        self.layout = MultiscaleLayout(tuple(scales))

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def reset_derived_buffers(self) -> None:
        self.quantizer.reset_derived_buffers()

    def _refined(self, k: int, codes: Tensor) -> Tensor:
        """Scale k's codes [B, C, s_k, s_k] -> its contribution to f_hat [B, C, h, w]."""
        side = self.scales[-1]
        if codes.shape[-1] != side:
            codes = F.interpolate(codes, size=(side, side), mode="bicubic")
        return self.phis[self.phi_of_scale[k]](codes)

    def forward(self, latents: Tensor) -> QuantizerOutput:
        """Latents [B, C, h, w] -> quantized f_hat [B, C, h, w] (fp32), tokens [B, sum s_k^2], loss."""
        f = latents.float()
        B, C, H, W = f.shape
        if (H, W) != (self.scales[-1],) * 2:
            raise ValueError(
                f"multiscale latents must be [B, {C}, {self.scales[-1]}, {self.scales[-1]}], got {tuple(f.shape)}"
            )
        with torch.autocast(device_type=f.device.type, enabled=False):
            rest, f_hat = f.detach().clone(), torch.zeros_like(f)
            indices, loss = [], f.new_zeros(())
            for k, side in enumerate(self.scales):
                small = rest if side == H else F.adaptive_avg_pool2d(rest, side)  # "area" downsampling
                out = self.quantizer(small.flatten(2).transpose(1, 2))  # [B, s^2, C]
                codes = out.quantized.transpose(1, 2).reshape(B, C, side, side)
                h = self._refined(k, codes)
                f_hat = f_hat + h
                rest = rest - h.detach()
                indices.append(out.indices)
                loss = loss + out.loss + F.mse_loss(f_hat, f.detach()) + self.beta * F.mse_loss(f_hat.detach(), f)
            quantized = f_hat.detach() + (f - f.detach())  # the decoder sees f_hat; the encoder gets its gradient
        indices = torch.cat(indices, dim=1)
        return QuantizerOutput(quantized, indices, loss / len(self.scales), _code_stats(indices, self.codebook_size))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """Tokens of the first k whole scales [B, s_1^2 + ... + s_k^2] -> their partial sum f_hat [B, C, h, w]."""
        count, ends = self.layout.scales_in(indices.shape[1]), self.layout.boundaries
        B, side = indices.shape[0], self.scales[-1]
        f_hat = torch.zeros(B, self.channels, side, side, device=indices.device)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            for k in range(count):
                codes = self.quantizer.indices_to_codes(indices[:, ends[k] : ends[k + 1]]).float()  # [B, s^2, C]
                s = self.scales[k]
                f_hat = f_hat + self._refined(k, codes.transpose(1, 2).reshape(B, self.channels, s, s))
        return f_hat


def _code_stats(indices: Tensor, codebook_size: int) -> CodeStats:
    with torch.no_grad():
        counts = code_histogram(indices, codebook_size)
        return CodeStats(usage=codebook_usage(counts), perplexity=code_perplexity(counts))
