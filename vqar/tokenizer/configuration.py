"""Configuration of the stage-1 tokenizer, saved as `config.json` beside its weights."""

from __future__ import annotations

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from ..layouts import LAYOUT_KINDS, TokenLayout, layout_kind, layout_of_config
from ..quantizers import QuantizerConfig

CONV_BACKBONES = ("taming", "magvit2")
_SHARED = ("resolution", "latent_channels", "quantizer")
_CONV = ("channels", "channel_multipliers", "num_res_blocks", "attn_resolutions", "mid_attention")
# in every saved config.json of that layout (`layout` itself defaults to "grid"); a 1d tokenizer has no conv fields
REQUIRED_FIELDS = {
    name: _SHARED + (() if kind.backbone_is_vit else _CONV) + kind.config_fields for name, kind in LAYOUT_KINDS.items()
}


@strict
class TokenizerConfig(PretrainedConfig):
    """A discrete image tokenizer, in one of three layouts (`vqar.layouts`).

    layout "grid": a VQGAN-style conv tokenizer (Esser et al. 2021, "Taming Transformers"),
    tokens [B, h, w]. The encoder halves the resolution once per entry of
    `channel_multipliers` after the first, so the downsampling factor is
    2 ** (len(channel_multipliers) - 1). The defaults are the taming / LlamaGen VQGAN f16 at 256 px.

    layout "1d": a TiTok-style ViT tokenizer (Yu et al. 2024), tokens [B, L] with
    L = num_latent_tokens, for images of exactly `resolution` px (learned positions). The
    `vit_*`, `patch_size` and `conv_channels` fields apply; the conv fields do not.
    `latent_channels` and `quantizer` apply to both.

    layout "multiscale": the conv tokenizer's latent quantized as residual token maps at
    `scales` (VAR, Tian et al. 2024; see `vqar.tokenizer.multiscale`), tokens [B, sum(s^2)]
    coarse to fine, for images of exactly `resolution` px (the last scale is the latent's side).
    """

    model_type = "vqar_tokenizer"

    resolution: int = 256  # training resolution; the model is fully convolutional
    # how training cut images to `resolution`: shorter side resized to this, then a centre (or random) crop;
    # `vqar tokenize` and `vqar evaluate` prepare images the same way. None: resized to `resolution`.
    resize_to: int | None = None
    channels: int = 128  # width of the first level
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # residual blocks per level
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes with self-attention
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    latent_channels: int = 256  # width of the latents handed to the quantizer
    dropout: float = 0.0
    quantizer: dict = field(default_factory=lambda: {"kind": "vq", "codebook_size": 16384, "code_dim": 8})
    layout: str = "grid"  # "grid" (conv, tokens [B, h, w]) or "1d" (ViT, tokens [B, L])
    # grid: "taming" (VQGAN's ResNet blocks, attention at attn_resolutions) or "magvit2" (Open-MAGVIT2's:
    # bias-free blocks, no attention, depth-to-space up, adaptive group norm in the decoder)
    conv_backbone: str = "taming"
    # conv backbones: GroupNorm groups hold at least this many channels (32 groups where the width allows,
    # as taming; 1 was the only choice before, and at width 32 it normalises each channel alone, which
    # erases the colours: see blocks.group_norm). Up to 4 leaves taming's 128+ channel widths unchanged.
    norm_group_size: int = 1
    num_latent_tokens: int = 32  # 1d: L
    patch_size: int = 16  # 1d
    vit_width: int = 512  # 1d: encoder and decoder width
    vit_depth: int = 8  # 1d: blocks in each of encoder and decoder
    vit_heads: int = 8  # 1d
    vit_mlp_ratio: float = 4.0  # 1d
    conv_channels: int = 0  # 1d: width of a two-conv stem before patch embedding and head after; 0 = none
    nested_dropout: bool = False  # 1d: train on a random leading k in [1, L] tokens, so any prefix decodes
    # 1d: the share of images nested dropout shortens; the rest train all L tokens (with k uniform,
    # token i is otherwise trained in only (L - i + 1) / L of the images: the last ones hardly ever)
    nested_dropout_share: float = 1.0
    scales: list[int] | None = None  # multiscale: token map sides, increasing, the last = resolution / factor
    phi_count: int = 4  # multiscale: refinement convs shared over the scales (VAR: 4; 1: one for all)
    # written by save_pretrained (`vqar.tokenizer.fingerprint`): what the codes mean, so that loading does not
    # hash the weights again; and the fingerprints of tokenizers whose codes this one shares (the base of a
    # decoder-only fine-tune), which priors trained on them recorded
    code_fingerprint: str | None = None
    same_codes_as: list[str] = field(default_factory=list)

    def __post_init__(self, **kwargs):
        # transformers hands unknown keys to __post_init__ and would keep them as attributes: a
        # misspelt field would silently fall back to its default. Its own bookkeeping is allowed.
        unknown = sorted(
            k
            for k in kwargs
            if not (k.startswith("_") or k in ("model_type", "name_or_path") or hasattr(PretrainedConfig, k))
        )
        if unknown:
            raise ValueError(
                f"unknown TokenizerConfig field(s) {unknown}; known fields: {sorted(self.__annotations__)}"
            )
        # Save every quantizer option, defaults included, so a saved tokenizer never changes
        # meaning when a default does.
        self.quantizer = QuantizerConfig.from_dict(self.quantizer).to_dict()
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Read a saved config, refusing one that lacks a field its layout needs (a truncated or
        hand-edited config.json would otherwise build a different model from defaults)."""
        needed = REQUIRED_FIELDS.get(config_dict.get("layout", "grid"), ())
        missing = sorted(set(needed) - config_dict.keys())
        if missing:
            raise ValueError(
                f"tokenizer config lacks field(s) {missing}, which a {config_dict.get('layout', 'grid')!r} "
                "tokenizer needs; was config.json truncated or edited?"
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_architecture(self):
        """Checked by transformers on construction and on every load of a config.json."""
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(f"channel_multipliers must be positive ints, got {self.channel_multipliers!r}")
        for name in ("resolution", "channels", "num_res_blocks", "latent_channels", "norm_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.resize_to is not None and self.resize_to < self.resolution:
            raise ValueError(f"resize_to ({self.resize_to}) must be >= resolution ({self.resolution})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.conv_backbone not in CONV_BACKBONES:
            raise ValueError(f"conv_backbone must be one of {CONV_BACKBONES}, got {self.conv_backbone!r}")
        layout_kind(self).validate_config(self)

    @property
    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig.from_dict(self.quantizer)

    @property
    def token_layout(self) -> TokenLayout:
        """The layout of one image's tokens at the training resolution (`vqar.layouts`)."""
        return layout_of_config(self)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side (conv encoders); for 1d the patch size, which input sizes must divide."""
        return layout_kind(self).downsample_factor(self)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the conv encoder's latent at the training resolution."""
        return self.resolution // self.downsample_factor

    @property
    def num_patches(self) -> int:
        """1d: patches the ViTs see."""
        return (self.resolution // self.patch_size) ** 2

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One image's tokens: (h, w) for grids, (L,) for 1d, (sum of s^2,) for multiscale."""
        return self.token_layout.shape
