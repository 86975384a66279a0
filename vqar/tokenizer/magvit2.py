"""The MAGVIT-v2 convolutional encoder and decoder (`conv_backbone: "magvit2"`), as Open-MAGVIT2
publishes them (Luo et al. 2024, arXiv 2409.04410; SEED-Voken's `improved_model`), after
MAGVIT-v2 (Yu et al. 2023, arXiv 2310.05737).

Against the taming backbone of `blocks.py`: bias-free residual convolutions and no attention;
strided 3x3 convolutions down, and a 3x3 convolution to four times the channels followed by
depth-to-space up; a decoder whose every level starts with an adaptive group norm, scaled and
shifted by the per-channel spread and mean of the quantized latent it decodes; `num_res_blocks`
blocks in the middle and per decoder level.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .blocks import group_norm, norm_swish, residual
from .configuration import TokenizerConfig


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, group_size: int = 1):
        super().__init__()
        self.norm1, self.norm2 = group_norm(in_channels, group_size), group_norm(out_channels, group_size)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_swish(self.norm1, x))
        return residual(self.shortcut(x), self.conv2(norm_swish(self.norm2, h)))


def _blocks(in_channels: int, out_channels: int, count: int, group_size: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResBlock(in_channels if i == 0 else out_channels, out_channels, group_size) for i in range(count)
    )


class AdaptiveGroupNorm(nn.Module):
    """Group norm (no affine) of features [B, C, H, W], scaled and shifted per image by linear maps
    of the latent's per-channel standard deviation and mean: the decoder's style input."""

    def __init__(self, latent_channels: int, channels: int, eps: float = 1e-6, group_size: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(group_norm(channels, group_size).num_groups, channels, eps=eps, affine=False)
        self.gamma, self.beta, self.eps = (
            nn.Linear(latent_channels, channels),
            nn.Linear(latent_channels, channels),
            eps,
        )

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        flat = latents.flatten(2)  # [B, Z, h*w]
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())  # var: unbiased, as Open-MAGVIT2 trained it
        shift = self.beta(flat.mean(dim=-1))
        scale, shift, normed = scale[..., None, None], shift[..., None, None], self.norm(x)
        if torch.is_grad_enabled() or normed.dtype != torch.result_type(normed, scale):
            return scale * normed + shift
        return normed.mul_(scale).add_(shift)  # in place, bit for bit the same (see blocks.norm_swish)


class Upsample(nn.Module):
    """x2: a 3x3 convolution to four times the channels, then depth-to-space (DCR order)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.conv(x), "b (p q c) h w -> b c (h p) (w q)", p=2, q=2)


class Encoder(nn.Module):
    """Pixels [B, 3, H, W] -> latents [B, latent_channels, H/f, W/f]."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(3, config.channels, 3, padding=1, bias=False)
        inputs = [config.channels, *widths[:-1]]
        group = config.norm_group_size
        self.levels = nn.ModuleList(_blocks(i, w, config.num_res_blocks, group) for i, w in zip(inputs, widths))
        self.downsamples = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.mid = _blocks(widths[-1], widths[-1], config.num_res_blocks, group)
        self.norm_out = group_norm(widths[-1], group)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.conv_in(pixels)
        for i, level in enumerate(self.levels):
            for block in level:
                h = block(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] -> pixels [B, 3, h*f, w*f]; levels from the coarsest."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        widths = [config.channels * m for m in reversed(config.channel_multipliers)]  # coarsest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        group = config.norm_group_size
        self.mid = _blocks(widths[0], widths[0], config.num_res_blocks, group)
        inputs = [widths[0], *widths[:-1]]
        self.adaptive_norms = nn.ModuleList(
            AdaptiveGroupNorm(config.latent_channels, i, group_size=group) for i in inputs
        )
        self.levels = nn.ModuleList(_blocks(i, w, config.num_res_blocks, group) for i, w in zip(inputs, widths))
        self.upsamples = nn.ModuleList(Upsample(w) for w in widths[:-1])
        self.norm_out = group_norm(widths[-1], group)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, latents: Tensor) -> Tensor:
        h = self.conv_in(latents)
        for block in self.mid:
            h = block(h)
        for i, (norm, level) in enumerate(zip(self.adaptive_norms, self.levels)):
            h = norm(h, latents)
            for block in level:
                h = block(h)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(norm_swish(self.norm_out, h))

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight VQGAN's adaptive GAN weight differentiates against."""
        return self.conv_out.weight
