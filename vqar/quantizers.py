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
- IBQ: index backpropagation quantization (Shi et al. 2024, arXiv 2412.02692, SEED-Voken).

Published tokenizers need their quantizer computed exactly as they were trained, and fast at
their sizes (2^14 to 2^18 codes): `implementation: "vqar"` gives vqar's own VQ (taming,
LlamaGen: the nearest code, searched exactly in chunks of codes so memory stays flat; a
codebook learned by gradient; optional l2-normalised codes; optional linear maps in and out,
the published models' `quant_conv` / `post_quant_conv`), LFQ (Open-MAGVIT2's little-endian bit
order; the entropy penalty over groups of bits, whose per-sample part is exact because the
code distribution factorises over bits) and IBQ. The default, "vector-quantize-pytorch", keeps
lucidrains' EMA codebooks, k-means init, dead-code replacement and the rotation trick.

Quantization always runs in fp32, whatever autocast is active: rounding bf16 latents to codes
loses the index (a bf16 has 8 bits of mantissa).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from .metrics import code_histogram, code_perplexity, codebook_usage

QUANTIZER_KINDS = ("vq", "fsq", "lfq", "bsq", "ibq")
IMPLEMENTATIONS = ("vector-quantize-pytorch", "vqar")
OWN_KINDS = ("vq", "lfq", "ibq")  # the kinds vqar implements itself
MAX_CODEBOOK_SIZE = 2**31 - 1  # indices must fit int32 inside vector-quantize-pytorch
MAX_FSQ_ENTROPY_CODES = 2**14  # the fsq entropy penalty holds [tokens, codes] affinities


@dataclass
class QuantizerConfig:
    """What kind of bottleneck, and its options. Fields a kind does not use are ignored by it."""

    kind: Literal["vq", "fsq", "lfq", "bsq", "ibq"] = "fsq"
    # "vector-quantize-pytorch" or vqar's own ("vqar"; vq, lfq and ibq): None picks vqar only for ibq
    implementation: str | None = None
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
    diversity_gamma: float = 1.0  # lfq/bsq/fsq: weight of codebook entropy inside the entropy penalty
    project: bool | None = None  # vqar vq/ibq/lfq: linear maps in and out of code_dim; None: when widths differ
    entropy_temperature: float = 0.01  # vqar lfq/ibq, fsq: softmax temperature of the entropy penalty
    entropy_group_bits: int = 9  # vqar lfq: the codebook entropy is taken over groups of this many bits
    # fsq: standardise each latent channel (batch statistics in training, running ones after) and
    # scale it so FSQ's tanh bound spreads a standard normal about evenly over the levels (iFSQ)
    standardize: bool = False
    # fsq: weight of an entropy penalty over the joint codes (MAGVIT-v2's, with soft assignments
    # of the bounded latents to all prod(levels) codes at `entropy_temperature`): spreads the
    # latents over combinations of levels that correlated channels leave unused
    fsq_entropy_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        self.implementation = self.implementation or ("vqar" if self.kind == "ibq" else "vector-quantize-pytorch")
        self._check_implementation()
        if self.kind == "fsq":
            self._check_levels()
        elif self.standardize or self.fsq_entropy_weight:
            name = "standardize" if self.standardize else "fsq_entropy_weight"
            raise ValueError(f"{name} is an fsq option; got kind {self.kind!r}: drop it")
        elif self.kind in ("vq", "ibq"):
            if self.codebook_size is None or self.codebook_size < 2:
                raise ValueError(f"{self.kind} needs codebook_size >= 2, got {self.codebook_size!r}")
            if self.use_cosine and not self.ema_update and self.implementation == "vector-quantize-pytorch":
                raise ValueError(
                    "vq with use_cosine=True needs ema_update=True in vector-quantize-pytorch, which cannot learn a "
                    'cosine codebook by gradient; implementation: "vqar" can'
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
        for name in ("dead_code_threshold", "commitment_weight", "entropy_weight", "fsq_entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_implementation(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"quantizer implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if self.implementation == "vqar" and self.kind not in OWN_KINDS:
            raise ValueError(f'implementation "vqar" has {OWN_KINDS}; {self.kind} is vector-quantize-pytorch\'s')
        if self.kind == "ibq" and self.implementation != "vqar":
            raise ValueError('ibq is vqar\'s own quantizer: implementation must be "vqar"')
        if not 1 <= self.entropy_group_bits <= 16 or self.entropy_temperature <= 0:
            raise ValueError(
                f"entropy_group_bits must lie in [1, 16] and entropy_temperature be > 0, got "
                f"{self.entropy_group_bits}, {self.entropy_temperature}"
            )

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
        if self.fsq_entropy_weight and math.prod(levels) > MAX_FSQ_ENTROPY_CODES:
            raise ValueError(
                f"fsq_entropy_weight compares every latent with all {math.prod(levels)} codes of levels {levels}; "
                f"it takes at most {MAX_FSQ_ENTROPY_CODES} codes: use fewer levels, or drop it"
            )
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
    """What every quantizer kind returns for tokens [B, N, D]: the same four fields, so the
    tokenizer never asks which kind it holds (a multiscale bottleneck returns them over its scales)."""

    quantized: Tensor  # [B, N, D] float32, what the decoder sees
    indices: Tensor  # [B, N] long in [0, K)
    loss: Tensor  # scalar bottleneck loss, already weighted (0 for FSQ without fsq_entropy_weight, and in eval mode)
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


# tanh(0.8 z) is close to 2 Phi(z) - 1, which maps a standard normal z to uniform on (-1, 1)
# (iFSQ, Lin et al. 2026): standardised latents then fill FSQ's levels about evenly
UNIFORMING_SCALE = 0.8


class Standardize(nn.Module):
    """Latents [B, N, D] -> each channel at zero mean and unit variance, times UNIFORMING_SCALE.

    In training by the batch's statistics, with running averages for evaluation (BatchNorm
    without its affine map). Without it an FSQ encoder's latents drift into tanh's flat ends: the
    extreme levels take most tokens, and latents there get no gradient to come back.
    """

    def __init__(self, dim: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, latents: Tensor) -> Tensor:
        flat = latents.reshape(-1, latents.shape[-1])
        if self.training and flat.shape[0] > 1:
            normed = F.batch_norm(flat, self.running_mean, self.running_var, training=True, momentum=self.momentum)
        else:  # the quantizer computes in fp32 even in a model cast to bf16
            mean, var = self.running_mean.to(flat.dtype), self.running_var.to(flat.dtype)
            normed = F.batch_norm(flat, mean, var, training=False)
        return (normed * UNIFORMING_SCALE).view_as(latents)


FSQ_BOUND_EPS = 1e-3  # vector-quantize-pytorch's FSQ widens its bound by this, so tanh's ends round inward


def _fsq_bounded(z: Tensor, levels: Tensor) -> Tensor:
    """FSQ's bound of latents [M, d] before rounding, in code units ([-1, 1]): rounding it to the
    nearest level gives the code. Even level counts are shifted half a level, so that tanh's
    range rounds to exactly L values."""
    half_range = (levels - 1) * (1 + FSQ_BOUND_EPS) / 2
    offset = (levels % 2 == 0).to(z.dtype) * 0.5
    return (torch.tanh(z + torch.atanh(offset / half_range)) * half_range - offset) / (levels // 2)


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


# -- vqar's own quantizers (implementation: "vqar") --------------------------------------------


Grid = tuple[int, int] | None  # (h, w) of the token grid that [B, N, D] tokens were flattened from


class TokenProjection(nn.Conv1d):
    """A linear map of each token's features [B, N, D_in] -> [B, N, D_out], computed as the published
    models' 1x1 quant convs are. Given the token `grid` (h, w), it is a 1x1 conv2d over [B, D, h, w],
    exactly their operation: oneDNN picks its kernel by spatial shape, so a Linear, a conv1d over
    [B, D, N] or a conv2d over another shape give the same map but, on some CPUs, not the same last bit."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, kernel_size=1)

    def forward(self, x: Tensor, grid: Grid = None) -> Tensor:
        tokens = x.transpose(1, 2)  # [B, D_in, N]
        if grid is None:
            return super().forward(tokens).transpose(1, 2)
        B, D, N = tokens.shape
        grid_layout = tokens.reshape(B, D, *grid).contiguous()  # NCHW, as theirs (a view here would be channels-last)
        h = F.conv2d(grid_layout, self.weight[..., None], self.bias)  # [B, D_out, h, w]
        return h.flatten(2).transpose(1, 2)


class NoProjection(nn.Module):
    def forward(self, x: Tensor, grid: Grid = None) -> Tensor:
        return x


def _projections(config: QuantizerConfig, dim: int, code_dim: int) -> tuple[nn.Module, nn.Module]:
    """Maps between the latent width and the codes' (the published models' quant_conv, post_quant_conv)."""
    project = code_dim != dim if config.project is None else config.project
    if not project and code_dim != dim:
        raise ValueError(f"codes of width {code_dim} need project: true for latents of width {dim}")
    return (
        (TokenProjection(dim, code_dim), TokenProjection(code_dim, dim))
        if project
        else (NoProjection(), NoProjection())
    )


def _straight_through(x: Tensor, quantized: Tensor) -> Tensor:
    """The quantized value forward, the identity backward (in evaluation, the code itself is used:
    x + (q - x) is not q to the last bit)."""
    return x + (quantized - x).detach()


def _entropy_penalty(logits: Tensor, temperature: float, batch_weight: float) -> Tensor:
    """MAGVIT-v2's entropy penalty of affinities [M, K]: mean per-sample entropy (confident codes)
    minus `batch_weight` times the entropy of the mean (all codes in use)."""
    logits = logits.float() / temperature
    probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    mean_probs = probs.mean(0)
    return sample_entropy - batch_weight * -(mean_probs * torch.log(mean_probs + 1e-5)).sum()


class NearestCode(nn.Module):
    """VQ as taming-transformers and LlamaGen train it: each latent takes its nearest code (of
    l2-normalised vectors with `use_cosine`), the codebook learns by gradient (codebook loss plus
    beta times the commitment loss), gradients pass straight through. The search is exact, over
    chunks of codes, so that memory stays flat however large the codebook."""

    CHUNK_ELEMENTS = 1 << 24  # latents x codes per distance block (64 MiB in fp32)

    def __init__(self, config: QuantizerConfig, dim: int):
        super().__init__()
        self.config, code_dim = config, config.code_dim or dim
        self.project_in, self.project_out = _projections(config, dim, code_dim)
        K = config.codebook_size
        codebook = torch.empty(K, code_dim).uniform_(-1 / K, 1 / K)  # taming's and LlamaGen's init
        self.codebook = nn.Parameter(F.normalize(codebook, dim=-1) if config.use_cosine else codebook)

    def codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1) if self.config.use_cosine else self.codebook

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Latents [M, D] -> the index of each one's nearest code [M]: the smallest
        |z|^2 + |e|^2 - 2 z.e, as the published models compute it, the first code on a tie."""
        codes, best_distance = self.codes(), None
        chunk = max(1024, self.CHUNK_ELEMENTS // max(1, len(z)))
        z_squared = z.pow(2).sum(1, keepdim=True)
        for start in range(0, len(codes), chunk):
            block = codes[start : start + chunk]
            distance, index = (z_squared + block.pow(2).sum(1) - 2 * z @ block.t()).min(1)
            if best_distance is None:
                best_distance, best_index = distance, index
            else:
                better = distance < best_distance
                best_distance, best_index = (
                    torch.where(better, distance, best_distance),
                    torch.where(better, index + start, best_index),
                )
        return best_index

    def forward(self, latents: Tensor, grid: Grid = None) -> tuple[Tensor, Tensor, Tensor]:
        z = self.project_in(latents, grid)  # [B, N, D]
        if self.config.use_cosine:
            z = F.normalize(z, dim=-1)
        indices = self.nearest(z.reshape(-1, z.shape[-1])).reshape(z.shape[:-1])
        z_q = self.codes()[indices]
        loss = z.new_zeros(())
        if self.training:
            codebook_loss, commitment = F.mse_loss(z_q, z.detach()), F.mse_loss(z, z_q.detach())
            loss = codebook_loss + self.config.commitment_weight * commitment
        return self.project_out(_straight_through(z, z_q) if self.training else z_q, grid), indices, loss

    def indices_to_codes(self, indices: Tensor, grid: Grid = None) -> Tensor:
        return self.project_out(self.codes()[indices], grid)


class IndexBackprop(NearestCode):
    """IBQ (SEED-Voken): the code is the argmax of the latent's dot products with the codebook;
    in training the gradient reaches every code through a softmax over those logits (a one-hot
    whose value is the hard code's), which keeps the whole codebook in use at 2^18 codes."""

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        codes, best_logit = self.codes(), None
        chunk = max(1024, self.CHUNK_ELEMENTS // max(1, len(z)))
        for start in range(0, len(codes), chunk):
            logit, index = (z @ codes[start : start + chunk].t()).max(1)
            if best_logit is None:
                best_logit, best_index = logit, index
            else:
                better = logit > best_logit
                best_logit, best_index = (
                    torch.where(better, logit, best_logit),
                    torch.where(better, index + start, best_index),
                )
        return best_index

    def forward(self, latents: Tensor, grid: Grid = None) -> tuple[Tensor, Tensor, Tensor]:
        if not self.training:
            return super().forward(latents, grid)  # the argmax code; no losses
        z = self.project_in(latents, grid)
        flat, codes = z.reshape(-1, z.shape[-1]), self.codes()
        logits = flat @ codes.t()  # [M, K]: all codes take part, as IBQ's gradient needs
        soft = logits.softmax(-1)
        indices = logits.argmax(-1)
        hard = F.one_hot(indices, len(codes)).to(soft.dtype)
        z_q = ((hard - soft.detach() + soft) @ codes).reshape(z.shape)
        z_hard = codes[indices].reshape(z.shape)
        beta = self.config.commitment_weight
        loss = F.mse_loss(z_q, z) + F.mse_loss(z, z_hard.detach()) + beta * F.mse_loss(z_hard, z.detach())
        if self.config.entropy_weight:
            penalty = _entropy_penalty(logits, self.config.entropy_temperature, self.config.diversity_gamma)
            loss = loss + self.config.entropy_weight * penalty
        return self.project_out(z_q, grid), indices.reshape(z.shape[:-1]), loss


class SignBits(nn.Module):
    """LFQ as Open-MAGVIT2 computes it: each channel's sign is one bit, channel d the bit of value
    2^d, the code value +-1. The entropy penalty is taken over groups of `entropy_group_bits`
    bits (2^9 codes each, not 2^18 at once): exact for the per-sample entropy, since a latent's
    softmax over all codes is a product of per-bit ones; the sum of the groups' codebook
    entropies bounds the whole codebook's from above."""

    def __init__(self, config: QuantizerConfig, dim: int):
        super().__init__()
        self.config, self.bits = config, int(math.log2(config.codebook_size))
        self.project_in, self.project_out = _projections(config, dim, self.bits)
        self.register_buffer("powers", 2 ** torch.arange(self.bits), persistent=False)
        group = min(config.entropy_group_bits, self.bits)
        self.register_buffer("group_codes", _all_signs(group), persistent=False)  # [2^g, g]

    def forward(self, latents: Tensor, grid: Grid = None) -> tuple[Tensor, Tensor, Tensor]:
        x = self.project_in(latents, grid)  # [B, N, bits]
        positive = x > 0
        quantized = torch.where(positive, 1.0, -1.0).to(x.dtype)
        indices = (positive.long() * self.powers).sum(-1)
        loss = x.new_zeros(())
        if self.training:
            loss = self.config.commitment_weight * F.mse_loss(x, quantized.detach())
            if self.config.entropy_weight:
                loss = loss + self.config.entropy_weight * self._entropy(x.reshape(-1, self.bits))
        output = _straight_through(x, quantized) if self.training else quantized
        return self.project_out(output, grid), indices, loss

    def _entropy(self, x: Tensor) -> Tensor:
        group = self.group_codes.shape[1]
        penalties = [
            _entropy_penalty(
                2 * x[:, start : start + group] @ self.group_codes[:, : min(group, self.bits - start)].t(),
                self.config.entropy_temperature,
                self.config.diversity_gamma,
            )
            for start in range(0, self.bits, group)
        ]
        return torch.stack(penalties).sum()

    def indices_to_codes(self, indices: Tensor, grid: Grid = None) -> Tensor:
        bits = (indices[..., None] & self.powers) != 0
        return self.project_out(torch.where(bits, 1.0, -1.0).to(self.powers.device), grid)


def _all_signs(bits: int) -> Tensor:
    """Every +-1 vector of `bits` entries, index i's bit d = channel d: [2^bits, bits]."""
    codes = torch.arange(2**bits)[:, None] & (2 ** torch.arange(bits))
    return torch.where(codes != 0, 1.0, -1.0)


QUANTIZER_BUILDERS = {"vq": _build_vq, "fsq": _build_fsq, "lfq": _build_lfq, "bsq": _build_bsq}
OWN_QUANTIZERS = {"vq": NearestCode, "lfq": SignBits, "ibq": IndexBackprop}


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
        self.inner = _build(config, dim)
        self.standardize = Standardize(dim) if config.standardize else nn.Identity()

    def forward(self, latents: Tensor, grid: Grid = None) -> QuantizerOutput:
        """Quantize latents [B, N, D] (any float dtype) -> QuantizerOutput, computed in fp32.

        `grid`: the (h, w) the N tokens were flattened from, if they form a grid: vqar's own
        quantizers then compute their projections exactly as the published models did."""
        if latents.ndim != 3 or latents.shape[-1] != self.dim:
            raise ValueError(f"quantizer expects latents [B, N, {self.dim}], got {tuple(latents.shape)}")
        with torch.autocast(device_type=latents.device.type, enabled=False):
            quantized, indices, loss = self._quantize(latents.float(), grid)
        indices = indices.long()
        return QuantizerOutput(quantized, indices, loss, self._code_stats(indices))

    def _quantize(self, latents: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        latents = self.standardize(latents)
        out = self.inner(latents, grid) if self.config.implementation == "vqar" else self.inner(latents)
        if self.config.kind == "fsq":  # FSQ has no loss of its own
            quantized, indices = out
            return quantized, indices, self._fsq_entropy(latents)
        quantized, indices, loss = out
        return quantized, indices, loss.reshape(())

    def _fsq_entropy(self, latents: Tensor) -> Tensor:
        """The weighted fsq entropy penalty of latents [B, N, D] (0 without it, and in evaluation)."""
        weight = self.config.fsq_entropy_weight
        if not (weight and self.training):
            return latents.new_zeros(())
        z = self.inner.project_in(latents).reshape(-1, len(self.config.levels))
        codes = self.inner.implicit_codebook  # [K, d], every combination of levels, in [-1, 1]
        soft = _fsq_bounded(z, self.inner._levels.to(z.dtype))
        # -|soft - code|^2 up to a per-token constant, which a softmax over codes ignores
        affinity = 2 * soft @ codes.t() - codes.square().sum(-1)
        return weight * _entropy_penalty(affinity, self.config.entropy_temperature, self.config.diversity_gamma)

    @torch.no_grad()
    def _code_stats(self, indices: Tensor) -> CodeStats:
        counts = code_histogram(indices, self.codebook_size)
        return CodeStats(usage=codebook_usage(counts), perplexity=code_perplexity(counts))

    def indices_to_codes(self, indices: Tensor, grid: Grid = None) -> Tensor:
        """Indices [B, N] in [0, K) -> quantized latents [B, N, D], as the forward pass made them
        (`grid` as in `forward`)."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            if self.config.implementation == "vqar":
                return self.inner.indices_to_codes(indices, grid)
            if self.config.kind == "vq":
                return self.inner.get_output_from_indices(indices)
            return self.inner.indices_to_codes(indices)

    def reset_derived_buffers(self) -> None:
        """Recompute the buffers vector-quantize-pytorch derives from the config and never saves.

        transformers' `from_pretrained` refills non-persistent buffers with uninitialised memory
        (transformers issue #48892); FSQ's levels and LFQ's codebook live in such buffers.
        """
        with torch.device("cpu"):
            fresh = _build(self.config, self.dim)
        own = dict(self.inner.named_buffers())
        for name in _non_persistent_buffer_names(fresh):
            value = fresh.get_buffer(name)
            own[name].data = value.to(device=own[name].device, dtype=value.dtype)


def _build(config: QuantizerConfig, dim: int) -> nn.Module:
    if config.implementation == "vqar":
        return OWN_QUANTIZERS[config.kind](config, dim)
    return QUANTIZER_BUILDERS[config.kind](config, dim)


def build_quantizer(config: QuantizerConfig | dict, dim: int) -> Quantizer:
    """Build the bottleneck for latents of width `dim` from a QuantizerConfig (or its dict)."""
    if isinstance(config, dict):
        config = QuantizerConfig.from_dict(config)
    if dim < 1:
        raise ValueError(f"quantizer latent width must be >= 1, got {dim}")
    return Quantizer(config, dim)
