"""The bottleneck: one adapter over vector-quantize-pytorch for VQ, FSQ, LFQ and BSQ.

This is the only module that imports `vector_quantize_pytorch` (lucidrains). Every kind takes
latents [B, N, D] and returns the same `QuantizerOutput`, so the tokenizer never branches on
the kind. Methods:
- VQ: learned codebook (van den Oord et al. 2017, "Neural Discrete Representation Learning"),
  EMA updates (VQ-VAE-2), l2-normalised codes (ViT-VQGAN, Yu et al. 2021; LlamaGen),
  k-means init and dead-code replacement (Jukebox / SoundStream), rotation trick
  (Fifty et al. 2024, arXiv 2410.06424).
- FSQ: finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505).
- LFQ: lookup-free quantization with an entropy loss (MAGVIT-v2, Yu et al. 2023, arXiv 2310.05737).
- BSQ: LFQ on the unit sphere (Zhao et al. 2024, arXiv 2406.07548).

Quantization always runs in fp32, whatever autocast is active: rounding bf16 latents to codes
loses the index (a bf16 has 8 bits of mantissa).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from .metrics import code_histogram, code_perplexity, codebook_usage

QUANTIZER_KINDS = ("vq", "fsq", "lfq", "bsq")
MAX_CODEBOOK_SIZE = 2**31 - 1  # indices must fit int32 inside vector-quantize-pytorch


@dataclass
class QuantizerConfig:
    """What kind of bottleneck, and its options. Fields a kind does not use are ignored by it."""

    kind: Literal["vq", "fsq", "lfq", "bsq"] = "fsq"
    # vq: any size >= 2; lfq/bsq: a power of two (one bit per latent channel); fsq: prod(levels).
    codebook_size: int | None = None
    levels: list[int] = field(default_factory=lambda: [8, 8, 8, 5, 5, 5])  # FSQ paper's ~2^16 codes
    code_dim: int | None = None  # vq: width of a code; latents are projected to it when it differs
    use_cosine: bool = False  # vq: l2-normalised codes and inputs (ViT-VQGAN, LlamaGen)
    ema_update: bool = True  # vq: codebook moves by EMA of assigned latents, not by gradient
    ema_decay: float = 0.99  # VQ-VAE-2's decay
    kmeans_init: bool = False  # vq: initialise the codebook by k-means on the first batch
    dead_code_threshold: float = 0.0  # vq: replace codes whose EMA usage falls below this
    rotation_trick: bool = True  # vq: gradients through the rotation trick instead of plain STE
    commitment_weight: float = 0.25  # vq/lfq/bsq: beta of the VQ-VAE paper
    entropy_weight: float = 0.1  # lfq/bsq: MAGVIT-v2's entropy penalty
    diversity_gamma: float = 1.0  # lfq/bsq: weight of codebook entropy inside the entropy penalty

    def __post_init__(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        if self.kind == "fsq":
            self._check_levels()
        elif self.kind == "vq":
            if self.codebook_size is None or self.codebook_size < 2:
                raise ValueError(f"vq needs codebook_size >= 2, got {self.codebook_size!r}")
            if self.use_cosine and not self.ema_update:
                raise ValueError(
                    "vq with use_cosine=True needs ema_update=True: vector-quantize-pytorch cannot learn a "
                    "cosine codebook by gradient"
                )
        else:
            size = self.codebook_size
            if size is None or size < 2 or size & (size - 1):
                raise ValueError(
                    f"{self.kind} needs codebook_size a power of two >= 2 (one bit per channel), got {size!r}"
                )
        if self.codebook_size is not None and self.codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"codebook_size must be at most 2^31 - 1, got {self.codebook_size}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        for name in ("dead_code_threshold", "commitment_weight", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_levels(self):
        levels = self.levels
        if not levels or not all(isinstance(level, int) for level in levels):
            raise ValueError(f"fsq needs levels, a non-empty list of ints, got {levels!r}")
        if any(level < 3 for level in levels):
            raise ValueError(
                f"fsq levels must each be >= 3, got {levels}: a level of 1 carries no information, and a "
                "level of 2 cannot be centred on zero by FSQ's bound (the FSQ paper uses 5 to 8 per channel)"
            )
        if math.prod(levels) > MAX_CODEBOOK_SIZE:
            raise ValueError(f"fsq levels {levels} give {math.prod(levels)} codes, more than 2^31 - 1")
        if self.codebook_size is not None and self.codebook_size != math.prod(levels):
            raise ValueError(
                f"fsq codebook_size is prod(levels) = {math.prod(levels)}; got codebook_size={self.codebook_size}"
            )

    @property
    def num_codes(self) -> int:
        """Codebook size K: the number of distinct indices."""
        return math.prod(self.levels) if self.kind == "fsq" else self.codebook_size

    @classmethod
    def from_dict(cls, options: dict) -> QuantizerConfig:
        """Build from a recipe or config.json section, naming any option that does not exist."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise ValueError(f"unknown quantizer option(s) {unknown}; known options: {known}")
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CodeStats:
    """Per-batch code statistics (detached scalars)."""

    usage: Tensor  # fraction of the codebook used in this batch, in [0, 1]
    perplexity: Tensor  # exp(entropy) of the code histogram: effective number of codes


@dataclass
class QuantizerOutput:
    quantized: Tensor  # [B, N, D] float32, what the decoder sees
    indices: Tensor  # [B, N] long in [0, K)
    loss: Tensor  # scalar bottleneck loss, already weighted (0 for FSQ, and in eval mode)
    code_stats: CodeStats


def _build_vq(config: QuantizerConfig, dim: int) -> nn.Module:
    return VectorQuantize(
        dim=dim,
        codebook_size=config.codebook_size,
        codebook_dim=config.code_dim,
        use_cosine_sim=config.use_cosine,
        ema_update=config.ema_update,
        learnable_codebook=not config.ema_update,
        decay=config.ema_decay,
        kmeans_init=config.kmeans_init,
        threshold_ema_dead_code=config.dead_code_threshold,
        rotation_trick=config.rotation_trick,
        commitment_weight=config.commitment_weight,
    )


def _build_fsq(config: QuantizerConfig, dim: int) -> nn.Module:
    return FSQ(levels=list(config.levels), dim=dim)


def _build_lfq(config: QuantizerConfig, dim: int, spherical: bool = False) -> nn.Module:
    return LFQ(
        dim=dim,
        codebook_size=config.codebook_size,
        entropy_loss_weight=config.entropy_weight,
        commitment_loss_weight=config.commitment_weight,
        diversity_gamma=config.diversity_gamma,
        spherical=spherical,
    )


def _build_bsq(config: QuantizerConfig, dim: int) -> nn.Module:
    return _build_lfq(config, dim, spherical=True)


QUANTIZER_BUILDERS = {"vq": _build_vq, "fsq": _build_fsq, "lfq": _build_lfq, "bsq": _build_bsq}


def _non_persistent_buffer_names(module: nn.Module) -> list[str]:
    names = []
    for prefix, sub in module.named_modules():
        names += [f"{prefix}.{name}" if prefix else name for name in sub._non_persistent_buffers_set]
    return names


class Quantizer(nn.Module):
    """A VQ/FSQ/LFQ/BSQ bottleneck over latents of width `dim`. Build with `build_quantizer`."""

    def __init__(self, config: QuantizerConfig, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.codebook_size = config.num_codes
        self.inner = QUANTIZER_BUILDERS[config.kind](config, dim)

    def forward(self, latents: Tensor) -> QuantizerOutput:
        """Quantize latents [B, N, D] (any float dtype) -> QuantizerOutput, computed in fp32."""
        if latents.ndim != 3 or latents.shape[-1] != self.dim:
            raise ValueError(f"quantizer expects latents [B, N, {self.dim}], got {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            quantized, indices, loss = self._quantize(latents.float())
        indices = indices.long()
        return QuantizerOutput(quantized, indices, loss, self._code_stats(indices))

    def _quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.inner(latents)
        if self.config.kind == "fsq":  # FSQ has no loss of its own
            quantized, indices = out
            return quantized, indices, latents.new_zeros(())
        quantized, indices, loss = out
        return quantized, indices, loss.reshape(())

    @torch.no_grad()
    def _code_stats(self, indices: Tensor) -> CodeStats:
        counts = code_histogram(indices, self.codebook_size)
        return CodeStats(usage=codebook_usage(counts), perplexity=code_perplexity(counts))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices [B, N] in [0, K) -> quantized latents [B, N, D], as the forward pass made them."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            if self.config.kind == "vq":
                return self.inner.get_output_from_indices(indices)
            return self.inner.indices_to_codes(indices)

    def reset_derived_buffers(self) -> None:
        """Recompute the buffers vector-quantize-pytorch derives from the config and never saves.

        transformers' `from_pretrained` refills non-persistent buffers with uninitialised memory
        (transformers issue #48892); FSQ's levels and LFQ's codebook live in such buffers.
        """
        with torch.device("cpu"):
            fresh = QUANTIZER_BUILDERS[self.config.kind](self.config, self.dim)
        own = dict(self.inner.named_buffers())
        for name in _non_persistent_buffer_names(fresh):
            value = fresh.get_buffer(name)
            own[name].data = value.to(device=own[name].device, dtype=value.dtype)


def build_quantizer(config: QuantizerConfig | dict, dim: int) -> Quantizer:
    """Build the bottleneck for latents of width `dim` from a QuantizerConfig (or its dict)."""
    if isinstance(config, dict):
        config = QuantizerConfig.from_dict(config)
    if dim < 1:
        raise ValueError(f"quantizer latent width must be >= 1, got {dim}")
    return Quantizer(config, dim)
