"""Prompts -> ids -> images: prompts built and checked, completed by a sampler, decoded.

The decode loops themselves (a static-cache loop, transformers' `generate()`, speculative Jacobi
decoding) live in `vqar.samplers`; `SamplingConfig.sampler` picks one. Every one samples only
image ids, so every generated sequence decodes, and runs classifier-free guidance (Ho & Salimans
2022) batched: conditional and unconditional rows in one forward pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.hf_argparser import HfArg

from .ar import VocabLayout
from .bpe import VisualBPE
from .samplers import (  # noqa: F401  (re-exported: the sampling API lives beside generation)
    CodeBudget,
    ImageTokenSampler,
    JacobiStats,
    SamplingConfig,
    TokenPicker,
    decode,
    decode_jacobi,
    decode_next_scale,
    decode_static,
    decode_with_generate,
    guide,
    sample_tokens,
)

# -- prompts --------------------------------------------------------------------------------


def build_prompts(
    layout: VocabLayout,
    *,
    classes: list[int | str] | Tensor | None = None,
    num_images: int | None = None,
    prefix: Tensor | None = None,
    prompt_ids: Tensor | None = None,
    bpe: VisualBPE | None = None,
) -> Tensor:
    """The prompt ids [B, 2 + P]: condition, BOI, then P prefix image ids.

    - classes: class indices or names (one image each); None for unconditional images;
    - num_images: how many, when no classes are given (or to repeat a single class);
    - prefix: image ids [B, P] or grid rows [B, r, w] the model must continue;
    - prompt_ids: raw ids [B, 2 + P], checked and used as they are;
    - bpe: the prior's visual BPE, which prefix codes are encoded with (whole rows only).
    """
    if layout.ids.uses_bpe and bpe is None:
        raise ValueError("this prior models visual-BPE ids: pass its VisualBPE (see vqar.ar.load_prior_bpe)")
    if prompt_ids is not None:
        return _check_prompt_ids(layout, prompt_ids, bpe)
    conditions = _conditions(layout, classes, num_images)
    prompts = layout.codec.prompt(conditions)
    if prefix is None:
        return prompts
    prefix = _check_prefix(layout, prefix, len(conditions), None)
    if bpe is not None:
        prefix = _encode_prefix(bpe, prefix)
    return torch.cat([prompts, prefix.expand(len(conditions), -1)], dim=1)


def _encode_prefix(bpe: VisualBPE, prefix: Tensor) -> Tensor:
    if bpe.row_length and prefix.shape[1] % bpe.row_length:
        raise ValueError(
            f"a BPE prior completes whole rows: prefix of {prefix.shape[1]} codes is not rows of {bpe.row_length}"
        )
    if bpe.row_length:
        encoded = bpe.encode(prefix.reshape(len(prefix), -1, bpe.row_length))
    else:
        encoded = bpe.encode(prefix)
    if len({len(e) for e in encoded}) > 1:
        raise ValueError("prefixes of one batch must encode to the same number of BPE ids; give one prefix")
    return torch.stack(encoded)


def _conditions(layout: VocabLayout, classes, num_images: int | None) -> Tensor:
    if classes is None:
        if not num_images or num_images < 1:
            raise ValueError(f"give classes or num_images >= 1, got num_images={num_images!r}")
        return torch.full((num_images,), layout.ids.null_class, dtype=torch.long)
    if isinstance(classes, Tensor):
        classes = classes.tolist()
    indices = [layout.ids.class_index(c) for c in classes]
    if num_images and len(indices) == 1:
        indices = indices * num_images
    return layout.ids.class_token(indices)


def _check_prefix(layout: VocabLayout, prefix: Tensor, batch: int, bpe: VisualBPE | None) -> Tensor:
    prefix = layout.tokens.check_prompt_prefix(prefix, batch)
    if bpe is None:  # codes
        layout.ids.check_image_ids(prefix, codes_only=True)
        codes = prefix.shape[1]
    else:  # BPE ids, as in raw prompt ids of a BPE prior
        layout.ids.check_image_ids(prefix)
        codes = bpe.token_lengths[prefix.long()].sum(1).max().item() if prefix.numel() else 0
    per_image = layout.tokens.tokens_per_image
    if codes >= per_image:
        raise ValueError(f"prefix of {codes} tokens leaves nothing to generate: an image has {per_image}")
    return prefix.long()


def _check_prompt_ids(layout: VocabLayout, prompt_ids: Tensor, bpe: VisualBPE | None) -> Tensor:
    if not isinstance(prompt_ids, Tensor) or prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool:
        raise TypeError(
            f"prompt_ids must be an integer tensor, got {getattr(prompt_ids, 'dtype', type(prompt_ids).__name__)}"
        )
    ids, prompt_length = layout.ids, layout.codec.prompt_length
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < prompt_length or prompt_ids.shape[0] < 1:
        raise ValueError(
            f"prompt_ids must be [B >= 1, >= {prompt_length}] (condition, BOI, ...), got {tuple(prompt_ids.shape)}"
        )
    prompt_ids = prompt_ids.long()
    if prompt_ids.min() < 0 or prompt_ids.max() >= ids.vocab_size:
        raise ValueError(
            f"prompt ids must lie in [0, {ids.vocab_size}), got values in "
            f"[{prompt_ids.min().item()}, {prompt_ids.max().item()}]"
        )
    conditions = prompt_ids[:, 0]
    if not ids.is_condition(conditions).all():
        raise ValueError(
            f"prompt_ids[:, 0] must be a class token or the null class ({ids.null_class}), got {conditions.tolist()}"
        )
    if layout.codec.begin_of_image and (prompt_ids[:, 1] != ids.boi).any():
        raise ValueError(f"prompt_ids[:, 1] must be begin-of-image ({ids.boi}), got {prompt_ids[:, 1].tolist()}")
    _check_prefix(layout, prompt_ids[:, prompt_length:], len(prompt_ids), bpe)
    return prompt_ids


# -- generation -----------------------------------------------------------------------------


@torch.inference_mode()
def generate_ids(
    prior: PreTrainedModel,
    layout: VocabLayout,
    prompts: Tensor,
    sampling: SamplingConfig | None = None,
    use_cache: bool = True,
    bpe: VisualBPE | None = None,
    stats: JacobiStats | None = None,
) -> Tensor:
    """Complete prompts [B, 2 + P] to full images: codes [B, N] (a grid [B, h, w] if any).

    `sampling.sampler` picks the decode loop (see `vqar.samplers`); `use_cache=False` runs
    `generate()` without a KV cache (a baseline). A next-scale prior (multiscale tokens) samples a
    scale per forward pass, codes [B, sum s^2]. A BPE prior samples BPE ids under a
    `CodeBudget` and its output is decoded through `bpe`. `stats` collects a Jacobi decode's
    forward passes.
    """
    sampling = sampling or SamplingConfig()
    if layout.ids.uses_bpe and bpe is None:
        raise ValueError("this prior models visual-BPE ids: pass its VisualBPE (see vqar.ar.load_prior_bpe)")
    if sampling.uses_cfg and layout.ids.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional prior; this one is unconditional")
    device = prior.device
    prompts = prompts.to(device)
    batch = prompts
    if sampling.uses_cfg:
        unconditional = prompts.clone()
        unconditional[:, 0] = layout.ids.null_class  # swap only the condition; the image prefix stays
        batch = torch.cat([prompts, unconditional])
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    budget = CodeBudget(layout, bpe) if layout.ids.uses_bpe else None
    picker = TokenPicker(layout, sampling, generator, budget)
    out = decode(prior, batch, layout.codec.sequence_length - prompts.shape[1], picker, use_cache, stats)
    images = layout.codec.from_sequence(out[: len(prompts)])[1]
    return layout.tokens.unflatten(bpe.decode(images.cpu())) if budget else images


def generate_images(
    prior,
    tokenizer,
    layout: VocabLayout,
    prompts: Tensor,
    sampling: SamplingConfig | None = None,
    bpe: VisualBPE | None = None,
    allow_other_tokenizer: bool = False,
) -> Tensor:
    """Prompts -> pixels [B, 3, H, W] in [-1, 1], decoded by the tokenizer the prior was trained on
    (another one of the same shape only with `allow_other_tokenizer`)."""
    layout.check_tokenizer(tokenizer, allow_other=allow_other_tokenizer)
    codes = generate_ids(prior, layout, prompts, sampling, bpe=bpe)
    return tokenizer.decode(codes.to(tokenizer.device)).clamp(-1, 1)


def prefix_from_image(tokenizer, image_path: str, rows: int, resolution: int | None = None) -> Tensor:
    """The start of an image file's tokens, encoded as the tokenizer's training prepared images.

    Grid tokenizers: the first `rows` token rows [1, rows, w]. 1d tokenizers: the first `rows`
    tokens [1, rows] (the coarsest part of the image, with nested dropout). Multiscale tokenizers:
    the first `rows` scales [1, s_1^2 + ... + s_rows^2]. `resolution`: cut the image to this side
    (a prior over a grid of another size than the tokenizer's), else as the tokenizer's training did.
    """
    from .data import read_image

    pixels = tokenizer.image_transform(resolution)(read_image(image_path))[None].to(tokenizer.device, tokenizer.dtype)
    layout = tokenizer.token_layout.at_resolution(pixels.shape[-1], tokenizer.downsample_factor)
    return layout.prefix_of(tokenizer.encode(pixels), rows)


# -- from a prior folder to PNGs (`vqar generate`) -------------------------------------------


@dataclass
class GenerateArgs:
    """Sample images from a trained prior into a folder: one PNG each, and grid.png."""

    prior: str = HfArg(help="a prior: the OUTPUT/prior folder of `vqar train-prior`, or a Hub id")
    output: str = HfArg(help="folder for the PNGs and grid.png")
    tokenizer: str | None = HfArg(default=None, help="default: the tokenizer the prior was trained on")
    allow_other_tokenizer: bool = HfArg(default=False, help="decode with a tokenizer the prior was not trained on")
    classes: list[str] = HfArg(
        default_factory=list,
        aliases=["--class"],
        help="class names or indices: --class 3 7, or --class 3 --class 7",
        metadata={"action": "extend"},
    )

    num_images: int | None = HfArg(default=None, help="images per class, or in all without classes (default: 1 / 8)")
    prefix_image: str | None = HfArg(default=None, help="an image to complete from its first --prefix-rows")
    prefix_rows: int | None = HfArg(
        default=None, help="token rows (grid), leading tokens (1D) or scales (multiscale) of --prefix-image to keep"
    )
    device: str | None = HfArg(default=None, help="cpu, cuda, cuda:N, mps (default: the best present)")
    dtype: str = HfArg(default="fp32", help="fp32, bf16 or fp16 (GPU) for the prior and the tokenizer")
    codes_only: bool = HfArg(
        default=False, help="write codes.npy only: no tokenizer needed (it is not at hand, or a pipeline decodes later)"
    )

    def __post_init__(self):
        if self.codes_only and self.prefix_image:
            raise ValueError("--prefix-image needs the tokenizer to encode it: drop --codes-only")
        if (self.prefix_image is None) != (self.prefix_rows is None):
            raise ValueError(
                "--prefix-image and --prefix-rows go together: the image to complete, and how many of its leading "
                "token rows (grid tokenizers) or tokens (1D) to keep"
            )


def load_tokenizer_for(prior: str, layout: VocabLayout, tokenizer: str | None = None, *, allow_other: bool = False):
    """The tokenizer to decode a prior's codes with: `tokenizer`, or the one the prior names
    (beside it, or on the Hub), checked against what the prior was trained on."""
    from .tokenizer import VQTokenizer

    location = tokenizer or layout.provenance.location(prior)
    try:
        loaded = VQTokenizer.from_pretrained(location).eval()
    except OSError as error:
        if tokenizer:
            raise
        local = (Path(prior) / layout.provenance.tokenizer).resolve()
        raise FileNotFoundError(
            f"the prior {prior} was trained on the tokenizer {layout.provenance.tokenizer!r}, which is neither at {local} "
            "nor on the Hub; pass its folder or Hub id with --tokenizer"
        ) from error
    layout.check_tokenizer(loaded, allow_other=allow_other)
    return loaded


def generate_to_folder(args: GenerateArgs, sampling: SamplingConfig | None = None) -> list[str]:
    """`vqar generate`: load the prior and its tokenizer, sample, write `codes.npy` ([N, h, w] or [N, L]
    ints), the PNGs and a grid with a row per class (named) or, completing an image, the source beside
    its completions. With `codes_only`, the codes alone (no tokenizer is loaded). Returns the files."""
    from .ar import load_prior, load_prior_bpe
    from .data import read_image, save_images
    from .devices import resolve_device, resolve_dtype

    sampling = sampling or SamplingConfig()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    prior, layout = load_prior(args.prior)
    prior.to(device=device, dtype=dtype)
    if layout.ids.num_classes == 0 and (args.classes or sampling.uses_cfg):
        raise ValueError(
            f"the prior {args.prior} is unconditional (its tokens had no class labels): drop --class and --cfg-scale"
        )
    bpe = load_prior_bpe(args.prior, layout)
    tokenizer = prefix = side = None
    if not args.codes_only:
        tokenizer = load_tokenizer_for(args.prior, layout, args.tokenizer, allow_other=args.allow_other_tokenizer)
        tokenizer.for_inference(device, dtype)
        side = layout.tokens.image_side(tokenizer.downsample_factor)  # the prior's grid may not be the tokenizer's
    if args.prefix_image:
        prefix = prefix_from_image(tokenizer, args.prefix_image, args.prefix_rows, side)
    per_class = args.num_images or (1 if args.classes else 8)
    classes = [c for c in args.classes for _ in range(per_class)] or None
    prompts = build_prompts(layout, classes=classes, num_images=None if classes else per_class, prefix=prefix, bpe=bpe)
    codes = generate_ids(prior, layout, prompts, sampling, bpe=bpe)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    codes_file = str(Path(args.output) / "codes.npy")
    np.save(codes_file, codes.cpu().numpy())
    if args.codes_only:
        return [codes_file]
    images = tokenizer.decode(codes.to(tokenizer.device)).clamp(-1, 1)
    labels = [layout.ids.class_names[layout.ids.class_index(c)] for c in args.classes] if args.classes else None
    source = boundary = None
    if prefix is not None:  # the grid shows the image completed, and where its kept part ends
        source = tokenizer.image_transform(side)(read_image(args.prefix_image))[None]
        boundary = tokenizer.token_layout.prefix_pixel_row(args.prefix_rows, tokenizer.downsample_factor)
    rows = len(args.classes) or 1
    return [codes_file, *save_images(images, args.output, rows=rows, labels=labels, first=source, mark_row=boundary)]
