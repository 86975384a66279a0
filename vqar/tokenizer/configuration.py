"""Configuration of the stage-1 tokenizer, saved as `config.json` beside its weights."""

from __future__ import annotations

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from ..quantizers import QuantizerConfig


@strict
class TokenizerConfig(PretrainedConfig):
    """A VQGAN-style convolutional tokenizer (Esser et al. 2021, "Taming Transformers").

    The encoder halves the resolution once per entry of `channel_multipliers` after the first,
    so the downsampling factor is 2 ** (len(channel_multipliers) - 1). The defaults are the
    taming / LlamaGen VQGAN f16 at 256 px.
    """

    model_type = "vqar_tokenizer"

    resolution: int = 256  # training resolution; the model is fully convolutional
    channels: int = 128  # width of the first level
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # residual blocks per level
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes with self-attention
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    latent_channels: int = 256  # width of the latents handed to the quantizer
    dropout: float = 0.0
    quantizer: dict = field(default_factory=lambda: {"kind": "vq", "codebook_size": 16384, "code_dim": 8})

    def __post_init__(self, **kwargs):
        # Save every quantizer option, defaults included, so a saved tokenizer never changes
        # meaning when a default does.
        self.quantizer = QuantizerConfig.from_dict(self.quantizer).to_dict()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked by transformers on construction and on every load of a config.json."""
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(f"channel_multipliers must be positive ints, got {self.channel_multipliers!r}")
        for name in ("resolution", "channels", "num_res_blocks", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor {self.downsample_factor}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig.from_dict(self.quantizer)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side at the training resolution."""
        return self.resolution // self.downsample_factor
