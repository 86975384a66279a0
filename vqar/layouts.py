"""Token layouts: the shape of one image's tokens, and everything that depends on that shape.

A tokenizer gives one of three layouts (`TokenizerConfig.layout`):

| kind | tokens of one image | prefixes that decode | prior |
|---|---|---|---|
| `grid` (VQGAN) | a grid [h, w], row by row | whole rows | next token |
| `1d` (TiTok) | a sequence [L] | any k (trained with nested dropout) | next token |
| `multiscale` (VAR) | maps at scales s_1 < ... < s_n, [sum s_k^2] | whole scales | next scale |

This module is the only place that tells the kinds apart: the tokenizer, the tokens manifest and
the prior's vocabulary hold a `TokenLayout` and ask it — for the token shape, the index checks,
the prefixes, how latents become tokens and back, its JSON form — so that a fourth layout is one
more class here (and `tests/test_structure.py` fails on a branch on the kind anywhere else).

A layout's JSON form is the fields the manifest (`vqar_tokens.json`) and the prior's config
(`vqar_vocab`) have always held: `tokens_per_image`, `grid` ([h, w] or null) and `scales` (or null).
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

NEXT_TOKEN, NEXT_SCALE = "next-token", "next-scale"  # how a prior over a layout predicts
PER_TOKEN, RESIDUAL_SCALES = "per-token", "residual-scales"  # how a tokenizer of a layout quantizes


def scale_boundaries(scales: list[int]) -> list[int]:
    """Tokens before each scale and in all: [0, s_1^2, s_1^2 + s_2^2, ..., sum(s_k^2)]."""
    return [0, *itertools.accumulate(s * s for s in scales)]


def check_scales(scales: list[int], latent_side: int) -> None:
    """Scales must be positive sides, strictly increasing, the last one the latent's side."""
    if not scales or not all(isinstance(s, int) and s >= 1 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive ints, got {scales!r}")
    if any(b <= a for a, b in itertools.pairwise(scales)):
        raise ValueError(f"scales must increase strictly (coarse to fine), got {scales}")
    if scales[-1] != latent_side:
        raise ValueError(
            f"the last scale must be the latent's side, {latent_side} (resolution / downsampling factor), "
            f"got scales {scales}"
        )


def nearest_multiples(value: int, factor: int) -> str:
    """The multiples of `factor` either side of `value`, for a message: "60 or 64"."""
    below = value // factor * factor
    return f"{below} or {below + factor}" if below else str(factor)


def check_integer_ids(ids: Tensor, what: str) -> None:
    """Refuse a tensor of ids that is not of an integer dtype."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {ids.dtype}")


def check_id_range(ids: Tensor, limit: int, what: str) -> None:
    """Refuse ids outside [0, limit), naming the values found."""
    if not ids.numel():
        return
    low, high = (v.item() for v in torch.aminmax(ids))  # Python ints: uint8 would wrap the bound
    if low < 0 or high >= limit:
        raise ValueError(f"{what} must lie in [0, {limit}), got values in [{low}, {high}]")


class TokenLayout(ABC):
    """The tokens of one image: their shape, and what depends on it (see the module docstring)."""

    kind: ClassVar[str]
    prior_order: ClassVar[str] = NEXT_TOKEN
    bottleneck: ClassVar[str] = PER_TOKEN  # how latents are quantized (`tokenizer.modeling.BOTTLENECKS`)
    backbone_is_vit: ClassVar[bool] = False  # a ViT encoder/decoder (no conv fields in its config)
    # the fields a saved tokenizer config of this kind must hold (besides the shared ones)
    config_fields: ClassVar[tuple[str, ...]] = ()

    # -- the tokenizer config of this kind --------------------------------------------------

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> TokenLayout:
        """The layout a tokenizer config gives at its training resolution."""

    @classmethod
    def downsample_factor(cls, config) -> int:
        """Pixels per token side for a conv encoder: 2 per level after the first."""
        return 2 ** (len(config.channel_multipliers) - 1)

    @classmethod
    def backbone(cls, config) -> str:
        """Which encoder/decoder pair builds the tokenizer (a key of `tokenizer.modeling.BACKBONES`)."""
        return "vit" if cls.backbone_is_vit else config.conv_backbone

    @classmethod
    def validate_config(cls, config) -> None:
        """Checks of the fields only this kind reads (the shared ones are the config's)."""
        factor = cls.downsample_factor(config)
        if config.resolution % factor:
            raise ValueError(
                f"resolution {config.resolution} is not divisible by the downsampling factor {factor}: "
                f"use {nearest_multiples(config.resolution, factor)}"
            )

    # -- shape ------------------------------------------------------------------------------

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """One image's tokens: (h, w), (L,) or (sum s^2,)."""

    @property
    def tokens_per_image(self) -> int:
        return math.prod(self.shape)

    @property
    def decodes_prefixes(self) -> bool:
        """Whether any leading k tokens decode (1d tokens trained with nested dropout)."""
        return False

    @property
    def decode_steps(self) -> int:
        """Forward passes a prior over this layout takes to sample one image (with the KV cache)."""
        return self.tokens_per_image

    @property
    def row_length(self) -> int | None:
        """The units visual-BPE merges stay inside: grid rows (their length), else whole sequences (None)."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """For messages and model cards: "an 8 x 8 grid", "a sequence of 32 tokens", ..."""

    def flatten(self, indices: Tensor) -> Tensor:
        """One image's tokens in any shape [B, ...] -> [B, N]."""
        return indices.reshape(indices.shape[0], -1)

    def unflatten(self, ids: Tensor) -> Tensor:
        """[B, N] ids of whole images -> [B, *shape]."""
        return ids

    # -- JSON form --------------------------------------------------------------------------

    def to_fields(self) -> dict:
        """The layout as the manifest and the prior's config record it."""
        return {"tokens_per_image": self.tokens_per_image, "grid": None, "scales": None}

    @staticmethod
    def from_fields(
        tokens_per_image: int, grid: list[int] | None = None, scales: list[int] | None = None, decodes_prefixes=False
    ) -> TokenLayout:
        """The layout a manifest or a prior's config describes."""
        if grid is not None and scales is not None:
            raise ValueError(f"tokens have a grid {grid} or scales {scales}, not both")
        if grid is not None:
            layout = GridLayout(*grid)
        elif scales is not None:
            layout = MultiscaleLayout(tuple(scales))
        else:
            layout = SequenceLayout(tokens_per_image, decodes_prefixes)
        if layout.tokens_per_image != tokens_per_image:
            raise ValueError(f"{layout.describe()} does not hold tokens_per_image={tokens_per_image}")
        return layout

    # -- checks -----------------------------------------------------------------------------

    @abstractmethod
    def expected_indices(self) -> str:
        """The index shapes `check_indices` takes, for its messages."""

    def check_indices(self, indices: Tensor, codebook_size: int) -> None:
        """Refuse indices a tokenizer of this layout cannot decode: dtype, shape, range."""
        check_integer_ids(indices, f"indices {self.expected_indices()}")
        if not self._decodable_shape(tuple(indices.shape)):
            raise ValueError(f"indices must have shape {self.expected_indices()}, got {tuple(indices.shape)}")
        if indices.numel() == 0:
            raise ValueError(f"indices must not be empty, got shape {tuple(indices.shape)}")
        check_id_range(indices, codebook_size, "indices")

    @abstractmethod
    def _decodable_shape(self, shape: tuple[int, ...]) -> bool: ...

    def check_image_size(self, height: int, width: int, resolution: int, factor: int) -> None:
        """Refuse pixels this tokenizer cannot encode (sizes must be multiples of its factor)."""
        if height % factor or width % factor:
            raise ValueError(
                f"pixel_values height and width must be multiples of the downsampling factor {factor}, got "
                f"{height}x{width} (use {nearest_multiples(height, factor)})"
            )

    def at_resolution(self, resolution: int, factor: int) -> TokenLayout:
        """The layout of images of `resolution` px (a grid grows with the image; others are fixed)."""
        return self

    def accepts(self, tokenizer_layout: TokenLayout, tokenizer_decodes_prefixes: bool) -> str | None:
        """Whether a prior over this layout can decode through a tokenizer of `tokenizer_layout`:
        None, or why not."""
        if type(tokenizer_layout) is not type(self):
            return f"the prior models {self.describe()}, the tokenizer gives {tokenizer_layout.describe()}"
        if tokenizer_layout.shape != self.shape:
            return f"the prior models {self.describe()}, the tokenizer gives {tokenizer_layout.describe()}"
        return None

    def leading(self, count: int) -> TokenLayout:
        """A prior over only the first `count` tokens of each image (1d with nested dropout)."""
        raise ValueError(
            f"num_tokens={count} needs a 1d tokenizer and 1 <= k <= its tokens (these tokens are {self.describe()})"
        )

    # -- prefixes ---------------------------------------------------------------------------

    @property
    def prefix_lengths(self) -> list[int]:
        """The prefix lengths an evaluation decodes from (PSNR from the first k tokens); [] for none."""
        return []

    @abstractmethod
    def prefix_units(self) -> str:
        """What a prefix counts, for messages: "token rows of a grid", ..."""

    def split(self, indices: Tensor) -> list[Tensor]:
        """Multiscale tokens -> one map per scale; other layouts have no scales."""
        raise ValueError(f"split_scales needs a multiscale tokenizer; this one gives {self.describe()}")

    def prefix_of(self, tokens: Tensor, count: int) -> Tensor:
        """The first `count` units (rows, tokens, scales) of one image's tokens [B, *shape]."""
        units = self.shape[0]
        if not 1 <= count < units:
            raise ValueError(f"the prefix must lie in [1, {units}) for {units} {self.prefix_units()}, got {count}")
        return tokens[:, :count]

    def prefix_pixel_row(self, count: int, factor: int) -> int | None:
        """Where, in pixels, a prefix of `count` units ends (a line across the image), or None."""
        return None

    def image_side(self, factor: int) -> int | None:
        """The side, in pixels, of images that give these tokens; None: the tokenizer's own resolution."""
        return None

    def tiles_of(self, indices: Tensor) -> Tensor:
        """A tokenizer's indices of whole images -> the sequences [n, N] a prior over this layout codes:
        the images' own tokens (the leading N, for a prior over a 1d prefix), or for a grid larger than
        this one its tiles, image by image in raster order (each coded on its own)."""
        return self.flatten(indices)[:, : self.tokens_per_image]

    def check_prompt_prefix(self, prefix: Tensor, batch: int) -> Tensor:
        """Image ids [B or 1, P] a prior completes (grids also take rows [B, r, w]) -> [B or 1, P]."""
        if prefix.ndim != 2 or prefix.shape[0] not in (1, batch):
            raise ValueError(f"prefix must be [{batch} or 1, P] image ids, got {tuple(prefix.shape)}")
        return prefix

    # -- latents <-> tokens (the tokenizer's bottleneck) ------------------------------------

    @abstractmethod
    def quantize(self, quantizer, latents: Tensor):
        """The encoder's latents -> the quantizer's output, `indices` in this layout's shape
        [B, *shape] and `quantized` in the form the decoder reads."""

    @abstractmethod
    def dequantize(self, quantizer, indices: Tensor) -> Tensor:
        """Indices (whole images, or a prefix that decodes) -> the decoder's input (float32)."""

    def decode_with(self, decoder, quantized: Tensor, num_tokens: int | None = None, keep: Tensor | None = None):
        """Run the decoder on what `quantize` or `dequantize` gave."""
        if num_tokens is not None:
            raise ValueError(f"num_tokens decodes a prefix of 1d tokens; this tokenizer gives {self.describe()}")
        return decoder(quantized)


# -- the three kinds --------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout(TokenLayout):
    """A VQGAN-style grid of h x w tokens, flattened row by row. A conv tokenizer reads any image
    whose sides are multiples of its factor, so the grid grows with the image."""

    height: int
    width: int
    kind: ClassVar[str] = "grid"
    config_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"a token grid needs positive sides, got {self.height} x {self.width}")

    @classmethod
    def from_config(cls, config) -> GridLayout:
        side = config.resolution // cls.downsample_factor(config)
        return cls(side, side)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def row_length(self) -> int:
        return self.width

    def describe(self) -> str:
        return f"a {self.height} x {self.width} grid of tokens"

    def unflatten(self, ids: Tensor) -> Tensor:
        return ids.reshape(ids.shape[0], self.height, self.width)

    def to_fields(self) -> dict:
        return {"tokens_per_image": self.tokens_per_image, "grid": [self.height, self.width], "scales": None}

    def expected_indices(self) -> str:
        return "[B, h, w]"

    def _decodable_shape(self, shape) -> bool:
        return len(shape) == 3  # a conv decoder decodes any grid

    def at_resolution(self, resolution: int, factor: int) -> GridLayout:
        return GridLayout(resolution // factor, resolution // factor)

    def accepts(self, tokenizer_layout: TokenLayout, tokenizer_decodes_prefixes: bool) -> str | None:
        if type(tokenizer_layout) is not GridLayout:
            return f"the prior models {self.describe()}, the tokenizer gives {tokenizer_layout.describe()}"
        return None  # a conv decoder decodes the prior's grid whatever the size it was trained at

    def prefix_units(self) -> str:
        return "token rows of a grid"

    def tiles_of(self, indices: Tensor) -> Tensor:
        (_, H, W), (h, w) = indices.shape, self.shape
        if H % h or W % w:
            raise ValueError(
                f"the prior models {h}x{w} token grids; {H}x{W} tokens do not cut into whole tiles of that size "
                f"(evaluate at a resolution whose token grid is a multiple of {h}x{w})"
            )
        return rearrange(indices, "b (i h) (j w) -> (b i j) (h w)", h=h, w=w)

    def prefix_pixel_row(self, count: int, factor: int) -> int:
        return count * factor

    def image_side(self, factor: int) -> int:
        return self.height * factor

    def check_prompt_prefix(self, prefix: Tensor, batch: int) -> Tensor:
        if prefix.ndim == 3:
            if prefix.shape[2] != self.width:
                raise ValueError(f"prefix rows must be [B, r, {self.width}], got {tuple(prefix.shape)}")
            prefix = prefix.reshape(prefix.shape[0], -1)
        return super().check_prompt_prefix(prefix, batch)

    def quantize(self, quantizer, latents: Tensor):
        B, _, h, w = latents.shape
        out = quantizer(rearrange(latents, "b d h w -> b (h w) d"), grid=(h, w))  # [B, N, D]
        return replace(
            out,
            quantized=rearrange(out.quantized, "b (h w) d -> b d h w", h=h, w=w),
            indices=out.indices.reshape(B, h, w),
        )

    def dequantize(self, quantizer, indices: Tensor) -> Tensor:
        h, w = indices.shape[1:]
        codes = quantizer.indices_to_codes(indices.long().flatten(1), (h, w))  # [B, N, D]
        return rearrange(codes, "b (h w) d -> b d h w", h=h, w=w)


@dataclass(frozen=True)
class SequenceLayout(TokenLayout):
    """TiTok's 1D sequence of L latent tokens, for images of exactly the training resolution;
    with nested dropout (`decodes_prefixes`) any leading k tokens decode to a coarser image."""

    length: int
    decodes_prefixes: bool = False
    kind: ClassVar[str] = "1d"
    backbone_is_vit: ClassVar[bool] = True
    config_fields: ClassVar[tuple[str, ...]] = (
        "layout",
        "num_latent_tokens",
        "patch_size",
        "vit_width",
        "vit_depth",
        "vit_heads",
        "vit_mlp_ratio",
        "conv_channels",
        "nested_dropout",
    )

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"a token sequence needs at least one token, got {self.length}")

    @classmethod
    def from_config(cls, config) -> SequenceLayout:
        return cls(config.num_latent_tokens, bool(config.nested_dropout))

    @classmethod
    def downsample_factor(cls, config) -> int:
        return config.patch_size  # what input sizes must divide

    @classmethod
    def validate_config(cls, config) -> None:
        for name in ("num_latent_tokens", "patch_size", "vit_width", "vit_depth", "vit_heads"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)!r}")
        if config.resolution % config.patch_size:
            raise ValueError(
                f"resolution {config.resolution} is not divisible by patch_size {config.patch_size}: "
                f"use {nearest_multiples(config.resolution, config.patch_size)}"
            )
        if config.vit_width % config.vit_heads:
            raise ValueError(f"vit_width {config.vit_width} is not divisible by vit_heads {config.vit_heads}")
        if not 0 < config.nested_dropout_share <= 1:
            raise ValueError(
                f"nested_dropout_share must lie in (0, 1] (a share of the images: 0.5 for half), "
                f"got {config.nested_dropout_share}"
            )
        if config.vit_mlp_ratio <= 0 or config.conv_channels < 0:
            raise ValueError(
                f"vit_mlp_ratio must be > 0 and conv_channels >= 0, got {config.vit_mlp_ratio}, {config.conv_channels}"
            )

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def describe(self) -> str:
        return f"a sequence of {self.length} tokens"

    def expected_indices(self) -> str:
        return f"[B, k] with 1 <= k <= {self.length}" if self.decodes_prefixes else f"[B, {self.length}]"

    def _decodable_shape(self, shape) -> bool:
        return len(shape) == 2 and (shape[1] <= self.length if self.decodes_prefixes else shape[1] == self.length)

    def check_image_size(self, height: int, width: int, resolution: int, factor: int) -> None:
        if (height, width) != (resolution, resolution):
            raise ValueError(
                f"a 1d tokenizer reads images of exactly its resolution, {resolution}x{resolution} (its positions "
                f"are learned), got {height}x{width}"
            )

    def accepts(self, tokenizer_layout: TokenLayout, tokenizer_decodes_prefixes: bool) -> str | None:
        if type(tokenizer_layout) is not SequenceLayout:
            return f"the prior models {self.describe()}, the tokenizer gives {tokenizer_layout.describe()}"
        if self.length < tokenizer_layout.length and not tokenizer_decodes_prefixes:
            return (
                f"the prior models the first {self.length} of {tokenizer_layout.length} tokens, but the tokenizer "
                "was not trained with nested_dropout, so it cannot decode a prefix"
            )
        if self.length > tokenizer_layout.length:
            return f"the prior models {self.describe()}, the tokenizer gives {tokenizer_layout.describe()}"
        return None

    def leading(self, count: int) -> SequenceLayout:
        if not 1 <= count <= self.length:
            raise ValueError(f"num_tokens={count} needs 1 <= k <= {self.length} (these tokens are {self.describe()})")
        return SequenceLayout(count, self.decodes_prefixes)

    @property
    def prefix_lengths(self) -> list[int]:
        if not self.decodes_prefixes:
            return []
        L = self.length
        return sorted({max(1, L // 4), max(1, L // 2), L})

    def prefix_units(self) -> str:
        return "tokens of a 1d sequence"

    def quantize(self, quantizer, latents: Tensor):
        return quantizer(latents, grid=None)  # latents are [B, L, D] already

    def dequantize(self, quantizer, indices: Tensor) -> Tensor:
        return quantizer.indices_to_codes(indices.long(), None)

    def decode_with(self, decoder, quantized: Tensor, num_tokens: int | None = None, keep: Tensor | None = None):
        return decoder(quantized[:, :num_tokens], keep=keep)


@dataclass(frozen=True)
class MultiscaleLayout(TokenLayout):
    """VAR's residual token maps at `scales` (sides, coarse to fine), concatenated:
    [B, sum s_k^2]; the first whole scales decode to a coarser image. Images are exactly the
    training resolution (the last scale is the latent's side)."""

    scales: tuple[int, ...]
    kind: ClassVar[str] = "multiscale"
    prior_order: ClassVar[str] = NEXT_SCALE
    bottleneck: ClassVar[str] = RESIDUAL_SCALES
    config_fields: ClassVar[tuple[str, ...]] = ("layout", "scales", "phi_count")

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(self.scales))

    @classmethod
    def from_config(cls, config) -> MultiscaleLayout:
        if config.scales is None:
            raise ValueError("a multiscale tokenizer needs scales, e.g. [1, 2, 3, 4, 6, 8] for an 8x8 latent")
        return cls(tuple(config.scales))

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        layout = cls.from_config(config)
        check_scales(list(layout.scales), config.resolution // cls.downsample_factor(config))
        if not 1 <= config.phi_count <= len(layout.scales):
            raise ValueError(
                f"phi_count must lie in [1, {len(layout.scales)}] (one per scale at most), got {config.phi_count}"
            )

    @property
    def shape(self) -> tuple[int]:
        return (sum(s * s for s in self.scales),)

    @property
    def boundaries(self) -> list[int]:
        return scale_boundaries(list(self.scales))

    def describe(self) -> str:
        return f"multiscale tokens at scales {list(self.scales)}"

    @property
    def decode_steps(self) -> int:
        return len(self.scales)  # a scale per forward pass

    def to_fields(self) -> dict:
        return {"tokens_per_image": self.tokens_per_image, "grid": None, "scales": list(self.scales)}

    def expected_indices(self) -> str:
        return f"[B, k] with k in {self.boundaries[1:]} (whole scales {list(self.scales)})"

    def _decodable_shape(self, shape) -> bool:
        return len(shape) == 2 and shape[1] in self.boundaries[1:]

    def check_image_size(self, height: int, width: int, resolution: int, factor: int) -> None:
        if (height, width) != (resolution, resolution):
            raise ValueError(
                f"a multiscale tokenizer reads images of exactly its resolution, {resolution}x{resolution} (its "
                f"scales end at the latent's side), got {height}x{width}"
            )

    @property
    def prefix_lengths(self) -> list[int]:
        ends, n = self.boundaries, len(self.scales)
        return sorted({ends[max(1, n // 3)], ends[max(1, 2 * n // 3)], ends[n]})

    def prefix_units(self) -> str:
        return "scales"

    def prefix_of(self, tokens: Tensor, count: int) -> Tensor:
        n = len(self.scales)
        if not 1 <= count < n:
            raise ValueError(f"the prefix must lie in [1, {n}) for {n} scales {list(self.scales)}, got {count}")
        return tokens[:, : self.boundaries[count]]

    def check_prompt_prefix(self, prefix: Tensor, batch: int) -> Tensor:
        if prefix.ndim != 2 or prefix.shape[1] not in self.boundaries[:-1]:
            raise ValueError(
                f"a next-scale prior completes whole scales: prefix must be [B, P] with P in "
                f"{self.boundaries[:-1]} (scales {list(self.scales)}), got {tuple(prefix.shape)}"
            )
        return super().check_prompt_prefix(prefix, batch)

    def scales_in(self, length: int) -> int:
        """How many whole scales `length` leading tokens hold; anything else is refused by name."""
        if length not in self.boundaries[1:]:
            raise ValueError(
                f"multiscale tokens decode whole scales: a length in {self.boundaries[1:]} (scales "
                f"{list(self.scales)}), got {length}"
            )
        return self.boundaries.index(length)

    def split(self, indices: Tensor) -> list[Tensor]:
        """Tokens [B, sum s_k^2] (or leading whole scales) -> one [B, s_k, s_k] map per scale."""
        ends = self.boundaries
        return [
            indices[:, ends[k] : ends[k + 1]].reshape(-1, self.scales[k], self.scales[k])
            for k in range(self.scales_in(indices.shape[1]))
        ]

    def merge(self, maps: list[Tensor]) -> Tensor:
        """One [B, s_k, s_k] map per scale (the first whole scales) -> tokens [B, sum s_k^2]."""
        for k, token_map in enumerate(maps):
            if tuple(token_map.shape[1:]) != (self.scales[k],) * 2:
                raise ValueError(
                    f"scale {k} must be [B, {self.scales[k]}, {self.scales[k]}], got {tuple(token_map.shape)}"
                )
        return torch.cat([m.flatten(1) for m in maps], dim=1)

    def quantize(self, quantizer, latents: Tensor):
        return quantizer(latents)  # the residual quantizer runs over the scales itself

    def dequantize(self, quantizer, indices: Tensor) -> Tensor:
        return quantizer.indices_to_latents(indices.long())


LAYOUT_KINDS: dict[str, type[TokenLayout]] = {cls.kind: cls for cls in (GridLayout, SequenceLayout, MultiscaleLayout)}


def layout_kind(config) -> type[TokenLayout]:
    """The layout class a tokenizer config names (`config.layout`)."""
    kind = LAYOUT_KINDS.get(config.layout)
    if kind is None:
        raise ValueError(f"layout must be one of {tuple(LAYOUT_KINDS)}, got {config.layout!r}")
    return kind


def layout_of_config(config) -> TokenLayout:
    """A tokenizer config's token layout at its training resolution."""
    return layout_kind(config).from_config(config)
