"""Convolutional encoder and decoder of the VQGAN tokenizer.

The architecture of taming-transformers (Esser et al. 2021), itself the DDPM U-Net's halves
without skip connections: residual blocks with GroupNorm and SiLU, self-attention at chosen
resolutions, strided-conv downsampling and nearest-neighbour upsampling.

The activation and the attention are computed in taming's own order (x * sigmoid(x); q k^T,
scale, softmax, then v), not by the fused `F.silu` and SDPA kernels: those differ in the last bit,
and thirty layers of a decoder amplify a bit a hundredfold (with random weights, taming's own
decoder differs by 1.6e-5 of its output between 1 and 2 threads). In this order a converted
taming, LlamaGen or IBQ tokenizer gives its original's pixels exactly (benchmarks/convert_parity.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration import TokenizerConfig


def swish(x: Tensor) -> Tensor:
    """SiLU, as taming, LlamaGen and SEED-Voken compute it (bit for bit; see the module docstring)."""
    return x * torch.sigmoid(x)


# Without autograd (encode, decode, evaluation) the two helpers below write into the fresh tensor
# they are given instead of allocating others: at 256 px a feature map is 32-64 MiB, which glibc
# maps and zeroes afresh on every allocation, and that page-faulting costs more than the
# arithmetic. The sigmoid goes through 1 MiB slices, so its temporary stays in cache. The
# results are the same to the bit (elementwise, and x * s == s * x, x + h == h + x).
SWISH_SLICE = 1 << 18  # elements


def norm_swish(norm: nn.Module, x: Tensor) -> Tensor:
    """swish(norm(x)), in place on the normalised copy when no gradient is being recorded."""
    h = norm(x)
    if torch.is_grad_enabled() or not h.is_contiguous():
        return swish(h)
    # a GPU's caching allocator has no page faults to avoid, and would pay a launch per slice
    for part in h.view(-1).split(SWISH_SLICE if h.device.type == "cpu" else h.numel()):
        part.mul_(torch.sigmoid(part))
    return h


def residual(x: Tensor, h: Tensor) -> Tensor:
    """x + h, where h is a fresh branch output (added into in place when no gradient is recorded)."""
    if torch.is_grad_enabled() or h.dtype != torch.result_type(x, h) or h.shape != x.shape:
        return x + h  # (under autocast the two may differ in dtype: the sum takes the wider)
    return h.add_(x)


def group_norm(channels: int, group_size: int = 1) -> nn.GroupNorm:
    """Taming's 32 groups where the width allows; a narrower model gets fewer groups of at least
    `group_size` channels each (config `norm_group_size`). A group normalises away its mean and
    spread over the image: with one channel per group (32 groups at width 32, the old fallback)
    that erases each feature's image-wide level, and so the image's colours, at the encoder's and
    the decoder's last norm."""
    return nn.GroupNorm(num_groups=math.gcd(32, max(1, channels // group_size)), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, group_size: int = 1):
        super().__init__()
        self.norm1 = group_norm(in_channels, group_size)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, group_size)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_swish(self.norm1, x))
        h = self.conv2(self.dropout(norm_swish(self.norm2, h)))
        return residual(self.shortcut(x), h)


EXACT_ATTENTION_POSITIONS = 1024  # up to taming's 32 x 32: its own order of operations, to the bit


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map.

    Up to 32 x 32 positions (every published model's) it computes as taming does, so converted
    models give their pixels to the bit; beyond (a CPU tokenizer run at 256 px) through PyTorch's
    fused attention, which never holds the [N, N] weights: 4,096 positions would need 64 MiB an image.
    """

    def __init__(self, channels: int, group_size: int = 1):
        super().__init__()
        self.norm = group_norm(channels, group_size)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = (t.reshape(B, C, H * W) for t in self.qkv(self.norm(x)).chunk(3, dim=1))  # [B, C, N] each
        if H * W > EXACT_ATTENTION_POSITIONS:
            q, k, v = (
                t.transpose(1, 2).contiguous()[:, None] for t in (q, k, v)
            )  # [B, 1 head, N, C], as the fused kernel reads it
            h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [B, N, C]
            return residual(x, self.proj_out(h.transpose(1, 2).reshape(B, C, H, W)))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C**-0.5, dim=2)  # [B, N queries, N keys]
        h = torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W)
        return residual(x, self.proj_out(h))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in taming: exact halving


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(
    in_channels: int, out_channels: int, num_blocks: int, attention: bool, config: TokenizerConfig
) -> nn.ModuleList:
    layers = []
    for i in range(num_blocks):
        channels = in_channels if i == 0 else out_channels
        layers.append(ResnetBlock(channels, out_channels, config.dropout, config.norm_group_size))
        if attention:
            layers.append(AttnBlock(out_channels, config.norm_group_size))
    return nn.ModuleList(layers)


class MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool, dropout: float, group_size: int = 1):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout, group_size)
        self.attn = AttnBlock(channels, group_size) if attention else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, dropout, group_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    """Pixels [B, 3, H, W] -> latents [B, latent_channels, H/f, W/f]."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        in_width, resolution = widths[0], config.resolution
        for i, width in enumerate(widths):
            attention = resolution in config.attn_resolutions
            self.levels.append(_level(in_width, width, config.num_res_blocks, attention, config))
            last = i == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else Downsample(width))
            in_width, resolution = width, resolution if last else resolution // 2
        self.mid = MidBlock(in_width, config.mid_attention, config.dropout, config.norm_group_size)
        self.norm_out = group_norm(in_width, config.norm_group_size)
        self.conv_out = nn.Conv2d(in_width, config.latent_channels, 3, padding=1)

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.conv_in(pixels)
        for level, downsample in zip(self.levels, self.downsamples):
            for layer in level:
                h = layer(h)
            h = downsample(h)
        h = self.mid(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] -> pixels [B, 3, h*f, w*f] (unbounded; ~[-1, 1])."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        resolution = config.resolution // config.downsample_factor
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config.mid_attention, config.dropout, config.norm_group_size)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        in_width = widths[-1]
        for i, width in reversed(list(enumerate(widths))):
            attention = resolution in config.attn_resolutions
            # One block more than the encoder per level, as in taming's decoder.
            self.levels.append(_level(in_width, width, config.num_res_blocks + 1, attention, config))
            first = i == 0
            self.upsamples.append(nn.Identity() if first else Upsample(width))
            in_width, resolution = width, resolution if first else resolution * 2
        self.norm_out = group_norm(in_width, config.norm_group_size)
        self.conv_out = nn.Conv2d(in_width, 3, 3, padding=1)

    def forward(self, latents: Tensor) -> Tensor:
        h = self.mid(self.conv_in(latents))
        for level, upsample in zip(self.levels, self.upsamples):
            for layer in level:
                h = layer(h)
            h = upsample(h)
        return self.conv_out(norm_swish(self.norm_out, h))

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight VQGAN's adaptive GAN weight differentiates against."""
        return self.conv_out.weight
