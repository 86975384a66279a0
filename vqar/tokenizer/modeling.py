"""The stage-1 tokenizer: images <-> discrete codes (grids [B, h, w], 1D sequences [B, L], or
multi-scale residual tokens [B, sum(s^2)]), as a Hugging Face model.

`VQTokenizer` is a `PreTrainedModel`: `save_pretrained` writes `config.json` and
`model.safetensors`, `from_pretrained` reads a local folder or a Hub id, `push_to_hub` uploads.
Two departures from transformers' defaults keep a reload bit-identical:
- the model is built eagerly, not on the meta device (vector-quantize-pytorch's FSQ reads its
  levels back with `.item()` in its constructor, which a meta tensor cannot do), and the
  quantizer's derived, unsaved buffers are recomputed after loading: transformers refills
  them with uninitialised memory (transformers issue #48892);
- loading is strict: a weight file with missing, unexpected or mis-shaped tensors is refused
  with their names instead of being silently re-initialised.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..data import ImageTransform
from ..layouts import PER_TOKEN, RESIDUAL_SCALES, TokenLayout, layout_kind
from ..quantizers import CodeStats, build_quantizer
from ..weights import damaged_file
from . import fingerprint as fingerprints
from . import magvit2
from .blocks import AttnBlock, Decoder, Encoder, ResnetBlock
from .catalogue import load_preset
from .configuration import TokenizerConfig
from .multiscale import MultiScaleQuantizer
from .vit import TransformerBlock, ViTDecoder, ViTEncoder

PIXEL_RANGE_TOLERANCE = 1e-3  # resampling and float error may overshoot [-1, 1] slightly
BACKBONES = {  # encoder and decoder classes, by `TokenLayout.backbone(config)`
    "vit": (ViTEncoder, ViTDecoder),
    "taming": (Encoder, Decoder),
    "magvit2": (magvit2.Encoder, magvit2.Decoder),
}


def _residual_scales(config: TokenizerConfig) -> torch.nn.Module:
    beta = config.quantizer_config.commitment_weight
    return MultiScaleQuantizer(config.quantizer, config.latent_channels, config.scales, config.phi_count, beta)


BOTTLENECKS = {  # the quantizer module, by `TokenLayout.bottleneck`
    PER_TOKEN: lambda config: build_quantizer(config.quantizer_config, dim=config.latent_channels),
    RESIDUAL_SCALES: _residual_scales,  # residual quantization over the scales, through the adapter
}


def _backbone(config: TokenizerConfig) -> tuple[type, type]:
    return BACKBONES[layout_kind(config).backbone(config)]


@dataclass
class TokenizerOutput(ModelOutput):
    """What `VQTokenizer.forward` returns."""

    reconstruction: Tensor | None = None  # [B, 3, H, W], ~[-1, 1]
    indices: Tensor | None = None  # [B, h, w] (grid), [B, L] (1d) or [B, sum s^2] (multiscale), long in [0, K)
    bottleneck_loss: Tensor | None = None  # scalar, the quantizer's own weighted loss
    code_stats: CodeStats | None = None  # per-batch codebook usage and perplexity


class VQTokenizer(PreTrainedModel):
    """Encoder -> VQ/FSQ/LFQ/BSQ bottleneck -> decoder; conv (grid, multiscale) or ViT (1d) by `config.layout`.

    >>> tokenizer = VQTokenizer.from_preset("fsq-cpu")
    >>> indices = tokenizer.encode(images)      # [B, 3, H, W] in [-1, 1] -> [B, H/f, W/f]
    >>> images = tokenizer.decode(indices)      # -> [B, 3, H, W]
    >>> tokenizer = VQTokenizer.from_preset("titok-1d-cpu")
    >>> indices = tokenizer.encode(images)      # -> [B, L]
    >>> coarse = tokenizer.decode(indices[:, :8])  # any leading k tokens (nested dropout training)
    >>> tokenizer = VQTokenizer.from_preset("multiscale-digits")
    >>> indices = tokenizer.encode(images)      # -> [B, sum(s^2)], coarse to fine
    >>> maps = tokenizer.split_scales(indices)  # [B, s_k, s_k] per scale
    >>> coarse = tokenizer.decode(indices[:, :14])  # the first whole scales (1 + 4 + 9 tokens)
    """

    config_class = TokenizerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "tokenizer"

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        encoder, decoder = _backbone(config)
        self.encoder = encoder(config)
        self.quantizer = BOTTLENECKS[layout_kind(config).bottleneck](config)
        self.decoder = decoder(config)
        self.post_init()

    # -- Hugging Face plumbing --------------------------------------------------------------

    @classmethod
    def get_init_context(cls, *args, **kwargs):
        # A private hook whose parameters change between transformers releases (5.25 added
        # `config`): pass them on as given, and only take the meta device out.
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    def _init_weights(self, module):
        # Keep PyTorch's default init, as taming does (transformers' default is N(0, 0.02) for
        # every conv). Loaded models have their quantizer buffers rebuilt in from_pretrained.
        pass

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load from a folder or a Hub id, refusing weights that do not match the config.

        Weights are read from safetensors only: a folder with nothing but a pickled
        `pytorch_model.bin` is refused rather than unpickled.
        """
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except OSError as error:  # transformers' message does not always name what it could not find
            name = str(pretrained_model_name_or_path)
            where = (
                "the folder holds no tokenizer"
                if Path(name).is_dir()
                else "no such folder, and the Hub did not give it"
            )
            raise OSError(
                f"cannot load the tokenizer {name!r}: {where} ({' '.join(str(error).split())[:200]})"
            ) from error
        except SafetensorError as error:
            raise damaged_file(
                pretrained_model_name_or_path, error, "the tokenizer's weights file", "save or download it again"
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            # transformers names the tensors only in a logged report: name them in the error.
            raise ValueError(
                f"weights in {pretrained_model_name_or_path} do not match its config.json: "
                f"{cls._shape_mismatches(pretrained_model_name_or_path, **kwargs)}"
            ) from error
        problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if problems or info.get("error_msgs"):
            raise ValueError(
                f"weights in {pretrained_model_name_or_path} do not match its config.json: "
                f"{problems or info['error_msgs']}"
            )
        model.quantizer.reset_derived_buffers()
        _align(model)
        if not set(kwargs) & set(TokenizerConfig.__annotations__):  # no field overridden: config.json's holds
            model._trust_saved_fingerprint()
        return (model, info) if want_info else model

    def _trust_saved_fingerprint(self) -> None:
        """Take the fingerprint config.json records for the weights just loaded, instead of hashing them."""
        saved = self.config.code_fingerprint
        if saved and fingerprints.is_current(saved):
            state = {k: v for k, v in self.state_dict().items() if k.startswith(fingerprints.CODE_MEANING_MODULES)}
            self._fingerprint_cache = (fingerprints.tensors_key(state), saved)

    @classmethod
    def _shape_mismatches(cls, path, **kwargs) -> list[str]:
        """'name: file [shape] vs model [shape]' for every tensor whose shape the config does not give."""
        from safetensors import safe_open
        from transformers.utils import cached_file

        config_kwargs = {k: kwargs[k] for k in kwargs if k in TokenizerConfig.__annotations__}
        expected = cls(TokenizerConfig.from_pretrained(path, **config_kwargs)).state_dict()
        found = []
        with safe_open(cached_file(path, "model.safetensors"), "pt") as weights:
            for name in weights.keys():
                shape = list(weights.get_slice(name).get_shape())
                if name in expected and shape != list(expected[name].shape):
                    found.append(f"{name}: file {shape} vs model {list(expected[name].shape)}")
        return found

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VQTokenizer:
        """A freshly initialised tokenizer from a named preset in `tokenizers/`; see `list_presets()`."""
        return cls(TokenizerConfig(**{**load_preset(name), **overrides}))

    # -- sizes ------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def token_layout(self) -> TokenLayout:
        """One image's tokens at the training resolution (`vqar.layouts`): what every layout-dependent
        question is asked of."""
        return self.config.token_layout

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One image's tokens at the training resolution: (h, w), (L,) for 1d, (sum s^2,) for multiscale."""
        return self.token_layout.shape

    @property
    def tokens_per_image(self) -> int:
        """Tokens for one image at the training resolution."""
        return self.token_layout.tokens_per_image

    @property
    def decodes_prefixes(self) -> bool:
        """Whether any leading k tokens decode (a 1D tokenizer trained with nested dropout)."""
        return self.token_layout.decodes_prefixes

    @property
    def prefix_lengths(self) -> list[int]:
        """The prefix lengths a variable-length tokenizer is evaluated at: L/4, L/2, L (1d with nested
        dropout); the ends of the scales at a third, two thirds and all of them (multiscale); [] otherwise."""
        return self.token_layout.prefix_lengths

    # -- what the codes mean ----------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """What makes the codes mean what they mean (`vqar.tokenizer.fingerprint`, scheme 2): the
        encoder's and quantizer's config and tensors, not the decoder's.

        A prior records the fingerprint of the tokenizer it was trained on and refuses another.
        Stored in config.json at `save_pretrained`, and recomputed when an encoder or quantizer
        tensor is replaced or changed in place.
        """
        state = {k: v for k, v in self.state_dict().items() if k.startswith(fingerprints.CODE_MEANING_MODULES)}
        key = fingerprints.tensors_key(state)
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is None or key is None or cached[0] != key:
            self._fingerprint_cache = cached = (key, fingerprints.code_fingerprint(self.config, state))
        return cached[1]

    @property
    def legacy_fingerprint(self) -> str:
        """The fingerprint of scheme 1, which priors and tokens folders saved before scheme 2 recorded."""
        return fingerprints.legacy_fingerprint(self.config, self.state_dict())

    def has_codes_of(self, fingerprint: str) -> bool:
        """Whether this tokenizer gives the codes of the one a prior or tokens folder recorded
        (`fingerprint`, of either scheme): the same, or its decoder fine-tuned."""
        if fingerprint in (self.config.same_codes_as or []):
            return True
        if fingerprints.is_current(fingerprint):
            return fingerprint == self.fingerprint
        return fingerprint == self.legacy_fingerprint

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the fingerprint written into config.json."""
        self.config.code_fingerprint = self.fingerprint
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def bits_per_image(self) -> float:
        """Raw bits of one image's tokens: tokens_per_image * log2(codebook_size)."""
        return self.tokens_per_image * math.log2(self.codebook_size)

    def image_transform(self, resolution: int | None = None, resize_to: int | None = None) -> ImageTransform:
        """How to prepare images for this tokenizer: as its training evaluation did — its
        resolution, the shorter side resized to its `resize_to`, a centre crop — unless overridden.
        At another resolution the training's `resize_to` scales with it (the same share of the image is kept)."""
        trained = self.config.resolution
        if resize_to is None and self.config.resize_to and resolution:
            resize_to = round(self.config.resize_to * resolution / trained)
        resolution = resolution or trained
        resize_to = resize_to or self.config.resize_to
        return ImageTransform(resolution, resize_to if resize_to and resize_to >= resolution else None)

    def for_inference(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """This tokenizer in eval mode on `device`, its encoder and decoder in `dtype`; the quantizer stays
        in fp32 (rounding to codes in bf16 would move latents across code boundaries). Returns self.

        The fingerprint stays that of the weights as they were: a cast for inference is the same tokenizer."""
        fingerprint = self.fingerprint
        self.eval().to(device=device, dtype=dtype)
        self.quantizer.float()
        state = {k: v for k, v in self.state_dict().items() if k.startswith(fingerprints.CODE_MEANING_MODULES)}
        self._fingerprint_cache = (fingerprints.tensors_key(state), fingerprint)
        return self

    def freeze(self, parts: set[str]) -> None:
        """Train only `parts` of {"encoder", "quantizer", "decoder"}: the others get no gradients and stay in
        eval mode through `train()` (an EMA codebook would otherwise keep moving)."""
        unknown = parts - set(TRAINABLE_PARTS)
        if unknown or not parts:
            raise ValueError(f"train must name some of {', '.join(TRAINABLE_PARTS)}, got {sorted(parts) or 'nothing'}")
        self._frozen = tuple(p for p in TRAINABLE_PARTS if p not in parts)
        for name in self._frozen:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in getattr(self, "_frozen", ()):
            getattr(self, name).eval()
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each residual, attention and transformer block's activations in the backward pass
        instead of keeping them (less memory for more compute), as transformers' models do. Parameter
        names, and so saved weights, are unchanged: the blocks' own `forward` is wrapped in place."""
        for module in self.modules():
            if isinstance(module, CHECKPOINTED_BLOCKS) and "forward" not in module.__dict__:
                module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any("forward" in m.__dict__ for m in self.modules() if isinstance(m, CHECKPOINTED_BLOCKS))

    # -- the model --------------------------------------------------------------------------

    def forward(self, pixel_values: Tensor, num_tokens: int | None = None) -> TokenizerOutput:
        """Reconstruct pixels [B, 3, H, W] in [-1, 1] through the bottleneck.

        1d only: `num_tokens` decodes from the leading k tokens; in training with
        `nested_dropout`, each image keeps a random leading k in [1, L] instead.
        """
        layout = self._check_pixels(pixel_values)
        latents = self.encoder(pixel_values)
        out = layout.quantize(self.quantizer, latents)
        quantized = out.quantized.to(latents.dtype)
        reconstruction = layout.decode_with(self.decoder, quantized, num_tokens, self._nested_dropout_mask(quantized))
        return TokenizerOutput(reconstruction, out.indices, out.loss, out.code_stats)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> indices [B, H/f, W/f], [B, L] for 1d, [B, sum s^2] for
        multiscale (long, in [0, K))."""
        layout = self._check_pixels(pixel_values)
        return layout.quantize(self.quantizer, self.encoder(pixel_values)).indices

    @torch.inference_mode()
    def decode(self, indices: Tensor) -> Tensor:
        """Indices -> pixels [B, 3, H, W].

        Grid: [B, h, w] -> [B, 3, h*f, w*f]. 1d: [B, k], any leading 1 <= k <= L tokens ->
        [B, 3, R, R]. Multiscale: [B, k], the tokens of the first whole scales -> [B, 3, R, R] (the
        coarser, the fewer). Any integer dtype, values in [0, codebook_size).
        """
        layout = self.token_layout
        layout.check_indices(indices, self.codebook_size)
        return layout.decode_with(self.decoder, layout.dequantize(self.quantizer, indices).to(self.dtype))

    def split_scales(self, indices: Tensor) -> list[Tensor]:
        """Multiscale tokens [B, sum s^2] (or leading whole scales) -> one map [B, s_k, s_k] per scale."""
        return self.token_layout.split(indices)

    def _nested_dropout_mask(self, quantized: Tensor) -> Tensor | None:
        """Bool [B, L]: each image keeps its leading k ~ U{1..L} tokens, or with probability
        1 - nested_dropout_share all L; None when not training with it."""
        if not (self.training and self.config.nested_dropout):
            return None
        B, L = quantized.shape[:2]
        kept = torch.randint(1, L + 1, (B, 1), device=quantized.device)
        if self.config.nested_dropout_share < 1:  # drawn only then: share 1 keeps the random stream
            whole = torch.rand(B, 1, device=quantized.device) >= self.config.nested_dropout_share
            kept = kept.masked_fill(whole, L)
        return torch.arange(L, device=quantized.device) < kept

    # -- input checks -----------------------------------------------------------------------

    def _check_pixels(self, pixels: Tensor) -> TokenLayout:
        """Refuse what the encoder cannot read; return the token layout these pixels give."""
        if not isinstance(pixels, Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor [B, 3, H, W], got {type(pixels).__name__}")
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [B, 3, H, W], got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise TypeError(f"pixel_values must be floats in [-1, 1], got dtype {pixels.dtype}")
        H, W = pixels.shape[-2:]
        layout, resolution, factor = self.token_layout, self.config.resolution, self.downsample_factor
        layout.check_image_size(H, W, resolution, factor)
        low, high = torch.aminmax(pixels.detach())
        if low.isnan() or high.isnan():  # NaN compares false with everything: ask for it by name
            raise ValueError("pixel_values contain NaN")
        if low < -1 - PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"pixel_values must lie in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]; "
                "map uint8 images with x / 127.5 - 1"
            )
        return layout if H == W == resolution else layout.at_resolution(H, factor)


TRAINABLE_PARTS = ("encoder", "quantizer", "decoder")
CHECKPOINTED_BLOCKS = (ResnetBlock, AttnBlock, magvit2.ResBlock, TransformerBlock)


def _checkpointed(forward, *args):
    """A block's forward, recomputed in the backward when it runs with gradients."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def _align(model: torch.nn.Module, alignment: int = 64) -> None:
    """Give every tensor an aligned copy of its own. Tensors read from safetensors can start at any
    offset of the file, and BLAS then takes another code path: the same weights give outputs
    differing in the last bit (and a deep decoder amplifies that), where aligned ones match the
    model that was saved, and the original code of a converted one, exactly."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.numel() and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()


def parameter_count(config: TokenizerConfig) -> int:
    """Parameters of a tokenizer with this config, without allocating its encoder and decoder."""
    encoder, decoder = _backbone(config)
    with torch.device("meta"):  # shapes only; the quantizer (small) cannot be built there: FSQ reads its levels
        nets = (encoder(config), decoder(config))
    quantizer = BOTTLENECKS[layout_kind(config).bottleneck](config)
    return sum(p.numel() for module in (*nets, quantizer) for p in module.parameters())


AutoConfig.register(TokenizerConfig.model_type, TokenizerConfig)
AutoModel.register(TokenizerConfig, VQTokenizer)
