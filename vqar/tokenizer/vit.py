"""ViT encoder and decoder of the 1D tokenizer (TiTok: Yu et al. 2024, "An Image is Worth 32
Tokens for Reconstruction and Generation").

The encoder reads the image's patches together with L learnable latent tokens and keeps only
the latents: the image becomes a sequence of L tokens with no spatial layout. The decoder reads
the L quantized tokens together with one mask token per patch and turns the patch outputs back
into pixels. Optional small conv stem and head (`conv_channels`) help at low resolution.

Variable length: the decoder accepts any leading k <= L tokens; the missing L - k are replaced
by one learned "dropped token". Trained with nested dropout (One-D-Piece, FlexTok), every
prefix decodes to a coarser image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .configuration import TokenizerConfig

EMBEDDING_INIT_STD = 0.02  # ViT / TiTok initialise positional and special tokens like this


def _embedding(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * EMBEDDING_INIT_STD)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1, self.attention = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _transformer(config: TokenizerConfig) -> nn.Sequential:
    return nn.Sequential(
        *(TransformerBlock(config.vit_width, config.vit_heads, config.vit_mlp_ratio) for _ in range(config.vit_depth))
    )


def _conv_pair(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, out_channels, 3, padding=1)
    )


class ViTEncoder(nn.Module):
    """Pixels [B, 3, R, R] -> latents [B, L, latent_channels] (R = the config's resolution)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        width, c = config.vit_width, config.conv_channels
        self.stem = _conv_pair(3, c, c) if c else nn.Identity()
        self.patch_embed = nn.Conv2d(c or 3, width, config.patch_size, stride=config.patch_size)
        self.patch_positions = _embedding(1, config.num_patches, width)
        self.latent_tokens = _embedding(1, config.num_latent_tokens, width)  # learned queries, positions included
        self.blocks = _transformer(config)
        self.norm = nn.LayerNorm(width)
        self.to_latents = nn.Linear(width, config.latent_channels)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = rearrange(self.patch_embed(self.stem(pixels)), "b d h w -> b (h w) d") + self.patch_positions
        latents = self.latent_tokens.expand(len(pixels), -1, -1)
        x = self.blocks(torch.cat([patches, latents], dim=1))
        return self.to_latents(self.norm(x[:, patches.shape[1] :]))


class ViTDecoder(nn.Module):
    """Quantized latents [B, k, latent_channels], 1 <= k <= L -> pixels [B, 3, R, R] (~[-1, 1])."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        width, c, p = config.vit_width, config.conv_channels, config.patch_size
        self.num_latent_tokens, self.patch_size, self.side = config.num_latent_tokens, p, config.resolution // p
        self.from_latents = nn.Linear(config.latent_channels, width)
        self.latent_positions = _embedding(1, config.num_latent_tokens, width)
        self.dropped_token = _embedding(1, 1, width)  # stands in for every latent past the kept prefix
        self.mask_token = _embedding(1, 1, width)
        self.patch_positions = _embedding(1, config.num_patches, width)
        self.blocks = _transformer(config)
        self.norm = nn.LayerNorm(width)
        self.to_patches = nn.Linear(width, p * p * (c or 3))
        self.head = _conv_pair(c, c, 3) if c else nn.Identity()

    def forward(self, latents: Tensor, keep: Tensor | None = None) -> Tensor:
        """keep: optional bool [B, L], True for the latents to use (nested dropout in training)."""
        B, k, _ = latents.shape
        tokens = self.from_latents(latents)
        if k < self.num_latent_tokens:
            tokens = torch.cat([tokens, self.dropped_token.expand(B, self.num_latent_tokens - k, -1)], dim=1)
        if keep is not None:
            tokens = torch.where(keep[..., None], tokens, self.dropped_token.to(tokens.dtype))
        masks = (self.mask_token + self.patch_positions).expand(B, -1, -1)
        x = self.blocks(torch.cat([masks, tokens + self.latent_positions], dim=1))
        patches = self.to_patches(self.norm(x[:, : masks.shape[1]]))
        image = rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=self.side, p=self.patch_size, q=self.patch_size)
        return self.head(image)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight VQGAN's adaptive GAN weight differentiates against."""
        return self.head[-1].weight if isinstance(self.head, nn.Sequential) else self.to_patches.weight
