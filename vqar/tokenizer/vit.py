"""ViT encoder and decoder of the 1D tokenizer (TiTok: Yu et al. 2024, "An Image is Worth 32
Tokens for Reconstruction and Generation").

The encoder reads the image's patches together with L learnable latent tokens and keeps only
the latents: the image becomes a sequence of L tokens with no spatial layout. The decoder reads
the L quantized tokens together with one mask token per patch and turns the patch outputs back
into pixels. Optional small conv stem and head (`conv_channels`) help at low resolution.

Variable length: the decoder accepts any leading k <= L tokens; the missing L - k are replaced
by one learned "dropped token". Trained with nested dropout (One-D-Piece, FlexTok), every
prefix decodes to a coarser image.

Region mixing (vqar's addition): each latent token starts as its learned query plus the mean of
the patches of one region of a quadtree (token 0 the whole image, tokens 1-4 its quadrants,
then 16 cells, ..., repeated until L), and each decoder mask token starts with the mean of the
tokens whose regions contain its patch. Both mixings are learned matrices, initialised so.
Without them the L queries start as near-copies of each other, every token carries the same
global summary of the image, and on a CPU budget the tokenizer never leaves that state: all
tokens of an image quantize to the same saturated code and only the mean colour is
reconstructed (photos-1d-cpu with 160 tokens of FSQ 8,8,8,5,5,5, held-out crops: 15.9 dB
without, 24.2 dB with). The coarse-to-fine order also suits nested dropout: a short prefix covers
the whole image.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .configuration import TokenizerConfig

EMBEDDING_INIT_STD = 0.02  # ViT / TiTok initialise positional and special tokens like this
# The latent queries and the decoder's latent positions start at unit scale instead: with L larger
# than the quadtree, later tokens share a region with earlier ones, and at 0.02 such tokens start
# as copies that never come apart (photos-1d-cpu: the second 80 tokens added nothing, 23.2 dB
# from 80 tokens vs 23.0 dB from 160; at 1.0 every token adds detail).
LATENT_INIT_STD = 1.0


def _embedding(*shape: int, std: float = EMBEDDING_INIT_STD) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


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


def quadtree_regions(num_tokens: int, side: int) -> Tensor:
    """[num_tokens, side * side] 0/1 membership of patches in the regions of a quadtree.

    Row 0 is the whole side x side patch grid, rows 1-4 its quadrants, then the 4x4 cells and so
    on down to single patches; the sequence starts again from the whole grid until there are
    `num_tokens` rows. Sides that are not powers of two split as evenly as integers allow.
    """
    cells_per_side = [2**i for i in range(side.bit_length()) if 2**i <= side]
    rows = []
    for level in itertools.count():
        n = cells_per_side[level % len(cells_per_side)]
        edges = [side * i // n for i in range(n + 1)]
        for r in range(n):
            for c in range(n):
                region = torch.zeros(side, side)
                region[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = 1
                rows.append(region.flatten())
        if len(rows) >= num_tokens:
            return torch.stack(rows[:num_tokens])


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
        self.latent_tokens = _embedding(
            1, config.num_latent_tokens, width, std=LATENT_INIT_STD
        )  # queries and positions
        regions = quadtree_regions(config.num_latent_tokens, config.resolution // config.patch_size)
        self.region_pool = nn.Parameter(regions / regions.sum(1, keepdim=True))  # [L, P]: region means
        self.blocks = _transformer(config)
        self.norm = nn.LayerNorm(width)
        self.to_latents = nn.Linear(width, config.latent_channels)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = rearrange(self.patch_embed(self.stem(pixels)), "b d h w -> b (h w) d") + self.patch_positions
        latents = self.latent_tokens + self.region_pool @ patches
        x = self.blocks(torch.cat([patches, latents], dim=1))
        return self.to_latents(self.norm(x[:, patches.shape[1] :]))


class ViTDecoder(nn.Module):
    """Quantized latents [B, k, latent_channels], 1 <= k <= L -> pixels [B, 3, R, R] (~[-1, 1])."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        width, c, p = config.vit_width, config.conv_channels, config.patch_size
        self.num_latent_tokens, self.patch_size, self.side = config.num_latent_tokens, p, config.resolution // p
        self.from_latents = nn.Linear(config.latent_channels, width)
        self.latent_positions = _embedding(1, config.num_latent_tokens, width, std=LATENT_INIT_STD)
        self.dropped_token = _embedding(1, 1, width)  # stands in for every latent past the kept prefix
        self.mask_token = _embedding(1, 1, width)
        self.patch_positions = _embedding(1, config.num_patches, width)
        regions = quadtree_regions(config.num_latent_tokens, self.side).t()  # [P, L]
        self.region_unpool = nn.Parameter(regions / regions.sum(1, keepdim=True))  # mean of the tokens covering a patch
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
        masks = self.mask_token + self.patch_positions + self.region_unpool @ tokens
        x = self.blocks(torch.cat([masks, tokens + self.latent_positions], dim=1))
        patches = self.to_patches(self.norm(x[:, : masks.shape[1]]))
        image = rearrange(
            patches, "b (h w) (p q c) -> b c (h p) (w q)", h=self.side, p=self.patch_size, q=self.patch_size
        )
        return self.head(image)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight VQGAN's adaptive GAN weight differentiates against."""
        return self.head[-1].weight if isinstance(self.head, nn.Sequential) else self.to_patches.weight
