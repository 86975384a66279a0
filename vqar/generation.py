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
from .text import TextTokenizer, load_text_tokenizer

# -- prompts --------------------------------------------------------------------------------


def build_prompts(
    layout: VocabLayout,
    *,
    classes: list[int | str] | Tensor | None = None,
    texts: list[str] | None = None,
    text: TextTokenizer | None = None,
    num_images: int | None = None,
    prefix: Tensor | None = None,
    prompt_ids: Tensor | None = None,
    bpe: VisualBPE | None = None,
) -> Tensor:
    """The prompt ids [B, 2 + P]: condition, BOI, then P prefix image ids (a text prior's: the caption's
    text ids, BOI, the prefix ids, rows left-padded with the pad id to the longest).

    - classes: class indices or names (one image each); None for unconditional images;
    - texts: captions, for a text prior (one image each), tokenized by `text`, its text tokenizer
      (`vqar.text.TextTokenizer.load`); None: the empty caption, unconditional;
    - num_images: how many, when no classes or texts are given (or to repeat a single one);
    - prefix: image ids [B, P] or grid rows [B, r, w] the model must continue;
    - prompt_ids: raw ids [B, 2 + P], checked and used as they are;
    - bpe: the prior's visual BPE, which prefix codes are encoded with (whole rows only).
    """
    if layout.ids.uses_bpe and bpe is None:
        raise ValueError("this prior models visual-BPE ids: pass its VisualBPE (see vqar.ar.load_prior_bpe)")
    if prompt_ids is not None:
        return _check_prompt_ids(layout, prompt_ids, bpe)
    if layout.ids.uses_text:
        prompts = _text_prompts(layout, texts, text, classes, num_images)
    elif texts is not None:
        takes = (
            f"class names or indices ({_some(layout.ids.class_names)})" if layout.ids.num_classes else "no condition"
        )
        raise ValueError(f"this prior is not text-conditional: it takes {takes}, not text prompts")
    else:
        prompts = layout.codec.prompt(_conditions(layout, classes, num_images))
    if prefix is None:
        return prompts
    prefix = _check_prefix(layout, prefix, len(prompts), None)
    if bpe is not None:
        prefix = _encode_prefix(bpe, prefix)
    return torch.cat([prompts, prefix.to(prompts.device).expand(len(prompts), -1)], dim=1)


def _some(names: tuple[str, ...], count: int = 8) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _text_prompts(layout: VocabLayout, texts, text: TextTokenizer | None, classes, num_images) -> Tensor:
    if classes is not None:
        raise ValueError("this prior is text-conditional: it takes text prompts (--prompt), not classes")
    if text is None:
        raise ValueError("a text prior needs its text tokenizer: vqar.text.TextTokenizer.load(prior folder, ...)")
    if texts is None:
        if not num_images or num_images < 1:
            raise ValueError(f"give texts or num_images >= 1, got num_images={num_images!r}")
        texts = [""] * num_images  # the empty caption: unconditional samples
    elif isinstance(texts, str):
        texts = [texts]
    if num_images and len(texts) == 1:
        texts = list(texts) * num_images
    return text.prompts(list(texts))


def unconditional_prompts(layout: VocabLayout, prompts: Tensor, negative: Tensor | None = None) -> Tensor:
    """The rows classifier-free guidance contrasts `prompts` [B, P] with: the null class in place of the
    class; for a text prior, the empty caption, or the `negative` prompts [B, Q] (text ids, BOI) — each
    keeping the image prefix — with the two sides left-padded to one width."""
    if not layout.ids.uses_text:
        if negative is not None:
            raise ValueError("negative prompts are for text priors; this one takes classes")
        unconditional = prompts.clone()
        unconditional[:, 0] = layout.ids.null_class  # swap only the condition; the image prefix stays
        return unconditional
    end = text_prompt_end(layout, prompts)
    if negative is None:
        negative = torch.full((len(prompts), 1), layout.ids.boi, dtype=torch.long, device=prompts.device)
    return torch.cat([negative.to(prompts.device), prompts[:, end:]], dim=1)


def text_prompt_end(layout: VocabLayout, prompts: Tensor) -> int:
    """Where the caption part of text prompts [B, P] ends: the column after their BOI (an image prefix follows)."""
    columns = (prompts == layout.ids.boi).all(0).nonzero()
    if len(columns) == 0:
        raise ValueError(f"text prompts must end their caption with begin-of-image ({layout.ids.boi}) in every row")
    return int(columns.max()) + 1


def left_pad(rows: list[Tensor], pad: int) -> list[Tensor]:
    """Prompt rows [B_i, P_i] -> the same, each left-padded with `pad` to the widest."""
    width = max(r.shape[1] for r in rows)
    return [torch.nn.functional.pad(r, (width - r.shape[1], 0), value=pad) for r in rows]


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
    ids = layout.ids
    prompt_length = 1 if ids.uses_text else layout.codec.prompt_length  # a text prompt: at least BOI
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
    if ids.uses_text:  # [pads, text ids, BOI, prefix ids]
        end = text_prompt_end(layout, prompt_ids)
        caption = prompt_ids[:, : end - 1]
        if ((caption < ids.first_text) & (caption != ids.pad)).any():
            raise ValueError(
                f"a text prompt's ids before BOI must be text ids (>= {ids.first_text}) or left padding ({ids.pad})"
            )
        _check_prefix(layout, prompt_ids[:, end:], len(prompt_ids), bpe)
        return prompt_ids
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
    negative: Tensor | None = None,
) -> Tensor:
    """Complete prompts [B, 2 + P] to full images: codes [B, N] (a grid [B, h, w] if any).

    `sampling.sampler` picks the decode loop (see `vqar.samplers`); `use_cache=False` runs
    `generate()` without a KV cache (a baseline). A next-scale prior (multiscale tokens) samples a
    scale per forward pass, codes [B, sum s^2]. A BPE prior samples BPE ids under a
    `CodeBudget` and its output is decoded through `bpe`. `stats` collects a Jacobi decode's
    forward passes. A text prior's guidance contrasts each prompt with the empty caption, or with
    `negative`: text prompts [B, Q] (`TextTokenizer.prompts`) to steer away from.
    """
    sampling = sampling or SamplingConfig()
    if layout.ids.uses_bpe and bpe is None:
        raise ValueError("this prior models visual-BPE ids: pass its VisualBPE (see vqar.ar.load_prior_bpe)")
    if sampling.uses_cfg and layout.ids.num_classes == 0 and not layout.ids.uses_text:
        raise ValueError("classifier-free guidance needs a class- or text-conditional prior; this one is unconditional")
    device = prior.device
    prompts = prompts.to(device)
    batch = prompts
    if sampling.uses_cfg:
        unconditional = unconditional_prompts(layout, prompts, negative)
        batch = torch.cat(left_pad([prompts, unconditional], layout.ids.pad))
    elif negative is not None:
        raise ValueError("a negative prompt steers classifier-free guidance: give a cfg_scale other than 1")
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    budget = CodeBudget(layout, bpe) if layout.ids.uses_bpe else None
    picker = TokenPicker(layout, sampling, generator, budget)
    new_tokens = layout.codec.sequence_length - prompts.shape[1]
    if layout.ids.uses_text:  # prompts are as long as their longest caption: the image's tokens remain
        new_tokens = layout.tokens.tokens_per_image - (prompts.shape[1] - text_prompt_end(layout, prompts))
    out = decode(prior, batch, new_tokens, picker, use_cache, stats)
    images = layout.codec.from_sequence(out[: len(prompts)])[1]
    return layout.tokens.unflatten(bpe.decode(images.cpu())) if budget else images


def generate_images(
    prior,
    tokenizer,
    layout: VocabLayout,
    prompts: Tensor | list[str],
    sampling: SamplingConfig | None = None,
    bpe: VisualBPE | None = None,
    allow_other_tokenizer: bool = False,
    *,
    text: TextTokenizer | None = None,
    negative: str | list[str] | None = None,
) -> Tensor:
    """Prompts -> pixels [B, 3, H, W] in [-1, 1], decoded by the tokenizer the prior was trained on
    (another one of the same shape only with `allow_other_tokenizer`).

    A text prior takes its prompts as strings, with its text tokenizer (`vqar.text.load_text_tokenizer`):
    `generate_images(prior, tokenizer, layout, ["a red circle"], SamplingConfig(cfg_scale=3), text=text)`;
    `negative`: what guidance steers away from (one caption for all, or one per prompt)."""
    layout.check_tokenizer(tokenizer, allow_other=allow_other_tokenizer)
    if not isinstance(prompts, Tensor):
        prompts = build_prompts(layout, texts=list(prompts), text=text)
    negative_ids = None
    if negative is not None:
        if text is None:
            raise ValueError("a negative prompt is text: pass the prior's text tokenizer as text=")
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        negative_ids = text.prompts(negative)
    codes = generate_ids(prior, layout, prompts, sampling, bpe=bpe, negative=negative_ids)
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

    prompt: list[str] = HfArg(
        default_factory=list,
        help='text prompts for a text prior, quoted: --prompt "a red circle" --prompt "two blue squares"',
        metadata={"action": "extend"},
    )
    prompts: str | None = HfArg(default=None, help="a UTF-8 file of text prompts, one per line (blank lines skipped)")
    negative_prompt: str | None = HfArg(
        default=None, help="a text prior's guidance steers away from this caption instead of the empty one"
    )
    num_images: int | None = HfArg(
        default=None, help="images per class or prompt, or in all without either (default: 1 / 8)"
    )
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
        if self.prompts:
            self.prompt = [*self.prompt, *read_prompts_file(self.prompts)]
        if self.prompt and self.classes:
            raise ValueError("give --prompt (a text prior) or --class (a class prior), not both")
        if self.codes_only and self.prefix_image:
            raise ValueError("--prefix-image needs the tokenizer to encode it: drop --codes-only")
        if (self.prefix_image is None) != (self.prefix_rows is None):
            raise ValueError(
                "--prefix-image and --prefix-rows go together: the image to complete, and how many of its leading "
                "token rows (grid tokenizers) or tokens (1D) to keep"
            )


def read_prompts_file(path: str | Path) -> list[str]:
    """Text prompts from a UTF-8 file, one per line (blank lines skipped; bad bytes read as U+FFFD)."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the prompts file {path}: {error.strerror or error}") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"the prompts file {path} holds no prompt (one per line)")
    return prompts


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


def _check_conditions(args: GenerateArgs, layout: VocabLayout, sampling: SamplingConfig) -> None:
    """What was asked against what the prior takes: classes, text prompts, or nothing."""
    ids = layout.ids
    takes = (
        "text prompts (--prompt)"
        if ids.uses_text
        else f"classes (--class: {_some(ids.class_names)})"
        if ids.num_classes
        else "no condition (it is unconditional)"
    )
    if args.prompt and not ids.uses_text:
        raise ValueError(f"the prior {args.prior} takes {takes}, not text prompts: drop --prompt")
    if args.classes and not ids.num_classes:
        raise ValueError(f"the prior {args.prior} takes {takes}, not classes: drop --class")
    if args.negative_prompt is not None and not ids.uses_text:
        raise ValueError(f"the prior {args.prior} takes {takes}: --negative-prompt is for text priors")
    if args.negative_prompt is not None and not sampling.uses_cfg:
        raise ValueError("a negative prompt steers classifier-free guidance: give --cfg-scale above 1 as well")
    if sampling.uses_cfg and not (ids.num_classes or ids.uses_text):
        raise ValueError(
            f"the prior {args.prior} is unconditional: classifier-free guidance needs a condition; drop --cfg-scale"
        )


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
    _check_conditions(args, layout, sampling)
    text = load_text_tokenizer(args.prior, layout)
    bpe = load_prior_bpe(args.prior, layout)
    tokenizer = prefix = side = None
    if not args.codes_only:
        tokenizer = load_tokenizer_for(args.prior, layout, args.tokenizer, allow_other=args.allow_other_tokenizer)
        tokenizer.for_inference(device, dtype)
        side = layout.tokens.image_side(tokenizer.downsample_factor)  # the prior's grid may not be the tokenizer's
    if args.prefix_image:
        prefix = prefix_from_image(tokenizer, args.prefix_image, args.prefix_rows, side)
    asked = args.classes or args.prompt  # one grid row each
    each = args.num_images or (1 if asked else 8)
    classes = [c for c in args.classes for _ in range(each)] or None
    texts = [t for t in args.prompt for _ in range(each)] or None
    prompts = build_prompts(
        layout, classes=classes, texts=texts, text=text, num_images=None if asked else each, prefix=prefix, bpe=bpe
    )
    negative = text.prompts([args.negative_prompt] * len(prompts)) if args.negative_prompt else None
    codes = generate_ids(prior, layout, prompts, sampling, bpe=bpe, negative=negative)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    codes_file = str(Path(args.output) / "codes.npy")
    np.save(codes_file, codes.cpu().numpy())
    if args.codes_only:
        return [codes_file]
    images = tokenizer.decode(codes.to(tokenizer.device)).clamp(-1, 1)
    labels = [layout.ids.class_names[layout.ids.class_index(c)] for c in args.classes] if args.classes else None
    labels = labels or list(args.prompt) or None
    source = boundary = None
    if prefix is not None:  # the grid shows the image completed, and where its kept part ends
        source = tokenizer.image_transform(side)(read_image(args.prefix_image))[None]
        boundary = tokenizer.token_layout.prefix_pixel_row(args.prefix_rows, tokenizer.downsample_factor)
    rows = len(asked) or 1
    return [codes_file, *save_images(images, args.output, rows=rows, labels=labels, first=source, mark_row=boundary)]
