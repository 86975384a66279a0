"""Train the stage-2 prior: `vqar train-prior RECIPE.yaml [--field value ...]`.

A stock `transformers` causal LM over the sequences of `VocabLayout` (`[condition, BOI,
codes]`), trained on a dataset written by `vqar tokenize`: token by token, or scale by scale
over multiscale tokens (`vqar.next_scale`), whichever the tokens' manifest says. The same three pieces as the
tokenizer trainer — `setup`, `train_step`, `evaluate` — with `training.loop` doing the rest.
Class-conditional models replace a fraction of labels by the null class, so that one model also
gives the unconditional predictions classifier-free guidance needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers.hf_argparser import HfArg

from ..ar import (
    CONFIG_KEY,
    IDS_KEY,
    VocabLayout,
    build_prior,
    from_language_model,
    image_nll,
    load_prior,
    plain_generation_config,
    prior_loss,
)
from ..bpe import VisualBPE, load_bpe
from ..data import image_grid, make_loader, share
from ..generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for
from ..text import TextTokenizer, text_vocab_size, train_bpe
from ..tokens import TokenRows, TokensManifest, load_tokens
from .loop import EpochSampler, LoopHooks, Run, TrainData, begin_run, finish_run, log_image, run_loop, step_optimizer
from .optim import backward_and_check, make_accelerator, make_ema, make_optimizer, make_scheduler
from .recipes import JSONDict, TrainConfig, parse_recipe

logger = logging.getLogger(__name__)


@dataclass
class PriorArgs:
    """Which prior to train, on which tokens."""

    tokens: str = HfArg(default="outputs/tokens", help="a tokens folder written by `vqar tokenize`")
    model_type: str = HfArg(default="llama", help="any transformers AutoModelForCausalLM config type")
    size: str = HfArg(
        default="cpu", help="tiny | cpu | S | B | L | XL | XXL | 3B (vqar.ar.PRIOR_SIZES; B-3B: LlamaGen's)"
    )
    prior: JSONDict = HfArg(
        default_factory=JSONDict, help="overrides of the model config, JSON: '{\"hidden_size\": 256}'"
    )
    bpe: str = HfArg(
        default="auto", help='visual BPE to train on: "auto" (the tokenizer folder\'s, if any), "none", a path'
    )
    num_tokens: int | None = HfArg(
        default=None, help="1D nested-dropout tokenizers: model only each image's first k tokens"
    )
    conditional: bool = HfArg(default=True, help="class-conditional when the tokens have labels")
    label_dropout: float = HfArg(
        default=0.1, help="share of labels replaced by the null class, for CFG (LlamaGen: 0.1)"
    )
    eval_batch_size: int = HfArg(default=128, help="sequences per held-out batch")
    eval_samples: int = HfArg(default=10, help="images sampled at each evaluation for TensorBoard; 0: none")
    init_from: str | None = HfArg(
        default=None,
        help="a prior (trained or converted, folder or Hub id) to fine-tune on these tokens: the same codes and "
        "token layout; classes it lacks are appended (its embedding grows)",
    )
    captions: str = HfArg(
        default="auto",
        help='"auto": a text-conditional prior when the tokens have captions (one vocabulary: text ids, BOI, '
        'codes); "off": ignore them',
    )
    caption_dropout: float = HfArg(default=0.1, help="share of captions replaced by the empty one, for CFG")
    max_text_tokens: int = HfArg(default=64, help="captions are cut to this many text tokens (counted, said once)")
    text_vocab_size: int | None = HfArg(
        default=None, help="the byte-level BPE trained on the captions (default: chosen for them, 256 + 2 x words)"
    )
    init_from_lm: str | None = HfArg(
        default=None,
        help="a causal language model (folder or Hub id) whose weights and tokenizer start the text prior: the "
        "image codes and specials extend its embeddings",
    )
    text_loss_weight: float = HfArg(
        default=0.0, help="also train on the captions' text, with this weight (0: images only)"
    )

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.captions not in ("auto", "off"):
            raise ValueError(f'captions must be "auto" or "off", got {self.captions!r}')
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {self.max_text_tokens}")


# -- data -----------------------------------------------------------------------------------


def find_bpe(choice: str, manifest: TokensManifest) -> VisualBPE | None:
    """The visual BPE to train on: "none", "auto" (the tokenizer folder's, if it has one), or a path."""
    if choice == "none":
        return None
    return load_bpe(manifest.tokenizer if choice == "auto" else choice)


class TokenBatches:
    """Collates `TokenRows` into a batch {"tokens": [B, L] long, "labels": [B]}: the image's codes,
    or with visual BPE its ids (encoded here, a batch at a time, left-aligned and padded with -1).
    `label_map`: the prior's class index of each of the tokens' classes (a fine-tuned prior keeps its own order).
    With a text tokenizer, also "text": the captions' prompts [B, P] (text ids, BOI; left-padded)."""

    def __init__(
        self,
        layout: VocabLayout,
        bpe: VisualBPE | None,
        label_map: list[int] | None = None,
        text: TextTokenizer | None = None,
    ):
        self.layout, self.bpe, self.text = layout, bpe, text
        self.label_map = torch.tensor(label_map, dtype=torch.long) if label_map else None

    def __call__(self, rows: list[dict]) -> dict:
        tokens = torch.stack([r["tokens"] for r in rows])
        if self.bpe is not None:
            tokens = self.bpe.encode(self.layout.tokens.unflatten(tokens), padded=True)
        labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        if self.label_map is not None:
            labels = torch.where(labels >= 0, self.label_map[labels.clamp_min(0)], labels)
        batch = {"tokens": tokens, "labels": labels}
        if rows and "caption" in rows[0]:
            batch["captions"] = [r["caption"] for r in rows]
            if self.text is not None:
                batch["text"] = self.text.prompts(batch["captions"])
        return batch


def training_sequences(layout: VocabLayout, batch: dict, label_dropout: float, caption_dropout: float = 0.0):
    """Sequences [B, 2 + N] (`layout.codec.to_sequence`) with a share `label_dropout` of the labels dropped;
    a text prior's [B, P + N], with a share `caption_dropout` of the captions made empty (BOI alone)."""
    tokens = batch["tokens"]
    if layout.ids.uses_text:
        prompts = batch["text"]
        if caption_dropout > 0:
            dropped = torch.rand(len(prompts), device=prompts.device) < caption_dropout
            caption = torch.arange(prompts.shape[1], device=prompts.device) < prompts.shape[1] - 1  # all but BOI
            prompts = prompts.masked_fill(dropped[:, None] & caption[None], layout.ids.pad)
        return layout.codec.text_sequence(prompts, tokens)
    labels = batch["labels"]
    if label_dropout > 0:
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < label_dropout, -1, labels)
    return layout.codec.to_sequence(labels, tokens)


# -- setup ----------------------------------------------------------------------------------


@dataclass
class PriorRun(Run):
    """A `Run` with the prior's vocabulary, its visual BPE, and the held-out sequences."""

    layout: VocabLayout = None
    bpe: VisualBPE | None = None
    eval_split: TokenRows = None
    args: PriorArgs = None
    tokenizer: torch.nn.Module | None = None  # decodes the evaluation samples (main process; None: no samples)
    label_map: list[int] | None = None  # the prior's class of each of the tokens' classes (fine-tuning)
    text: TextTokenizer | None = None  # a text prior's captions -> prompts
    captions: dict = field(default_factory=dict)  # how many captions were cut or cleaned


@dataclass
class Sequences:
    """What a prior trains on: the token rows (memory-mapped; the first `num_tokens` of each), the
    layout of the prior over them, its visual BPE, and where the tokens' classes sit in the prior."""

    rows: dict[str, TokenRows]
    layout: VocabLayout
    bpe: VisualBPE | None
    label_map: list[int] | None = None
    model: torch.nn.Module | None = None  # the prior fine-tuned (init_from), its embedding grown to the layout
    text: TextTokenizer | None = None  # a text prior's
    captions: dict = field(default_factory=dict)  # a text prior's caption counts, for metrics.json


def _sequences(args: PriorArgs, say=print, output_dir: str | None = None, accelerator=None) -> Sequences:
    tokens, manifest = load_tokens(args.tokens)
    say(manifest.describe(args.tokens))
    bpe = find_bpe(args.bpe, manifest)
    text = args.captions == "auto" and manifest.has_captions and not args.init_from
    if text and manifest.class_names:
        say(f"{args.tokens} has captions and class labels: a text-conditional prior (--captions off: by class)")
    conditional = args.conditional and bool(manifest.class_names) and not text
    if args.conditional and not manifest.class_names and not text:
        logger.info("the tokens in %s have no class labels nor captions: training an unconditional prior", args.tokens)
    layout = VocabLayout.from_manifest(manifest, conditional=conditional, bpe=bpe, num_tokens=args.num_tokens)
    rows = {name: TokenRows(split, args.num_tokens) for name, split in tokens.items()}
    if args.init_from:
        return _fine_tuned(args, rows, layout, bpe, say)
    if text:
        return _text_conditioned(args, rows, layout, bpe, say, output_dir, accelerator)
    if args.init_from_lm:
        raise ValueError(f"--init_from_lm starts a text prior, but the tokens in {args.tokens} have no captions")
    return Sequences(rows, layout, bpe)


TEXT_TOKENIZER_FOLDER = "text-tokenizer"  # in the run's output: every process, and a resumed run, reads the same


def _text_conditioned(args: PriorArgs, rows: dict, layout: VocabLayout, bpe, say, output_dir, accelerator) -> Sequences:
    """The text tokenizer (trained on the captions by the main process, or a language model's), the layout
    with its text ids, and with `init_from_lm` the language model grown to the layout."""
    if bpe is not None:
        raise ValueError(
            f"a text prior takes no visual BPE, and {args.tokens} comes with one: train it with --bpe none"
        )
    if args.init_from_lm:
        model, text, grown = from_language_model(args.init_from_lm, layout, args.max_text_tokens)
        say(f"{args.init_from_lm}: a text prior from its weights and tokenizer ({text.ids.num_text_tokens:,} text ids)")
        return Sequences(rows, grown, None, model=model.train(), text=text, captions=_caption_counts(text, rows, say))
    saved = Path(output_dir or ".") / TEXT_TOKENIZER_FOLDER
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if not (saved / "tokenizer.json").is_file():
            captions = rows["train"].caption_list(limit=500_000)
            raw = train_bpe(captions, args.text_vocab_size)
            ids = replace(layout.ids, num_text_tokens=text_vocab_size(raw))
            TextTokenizer.from_backend(raw, ids, args.max_text_tokens).save(saved)
        text = TextTokenizer.load_saved(saved, layout.ids)
    say(
        f"text prior: a byte-level BPE of {text.ids.num_text_tokens:,} tokens trained on the captions ({saved}), "
        f"captions cut to {text.max_text_tokens} tokens, {args.caption_dropout:.0%} dropped for CFG"
    )
    return Sequences(rows, text_layout(layout, text), None, text=text, captions=_caption_counts(text, rows, say))


def _caption_counts(text: TextTokenizer, rows: dict, say) -> dict:
    """The training captions read once at the start: how many are cut, how many had bytes that were not
    UTF-8 (said in a line, and kept for metrics.json)."""
    captions = rows["train"].caption_list(limit=500_000)
    text.encode(captions)
    counts = {"captions": len(captions), "captions_cut": text.truncated, "captions_with_bad_bytes": text.replaced}
    if text.truncated or text.replaced:
        say(
            f"captions: {text.truncated:,} of {len(captions):,} cut to {text.max_text_tokens} text tokens, "
            f"{text.replaced:,} with bytes that are not UTF-8 (read as U+FFFD)"
        )
    return counts


def text_layout(layout: VocabLayout, text: TextTokenizer) -> VocabLayout:
    return replace(layout, ids=text.ids, text_length=text.text_length)


def _fine_tuned(args: PriorArgs, rows: dict, tokens_layout: VocabLayout, bpe, say) -> Sequences:
    """A trained prior, checked against the tokens, with the classes it lacks appended (ids after its own)."""
    model, layout = load_prior(args.init_from)
    ours, theirs = layout.ids, tokens_layout.ids
    if (ours.codebook_size, ours.num_bpe_tokens) != (theirs.codebook_size, theirs.num_bpe_tokens):
        raise ValueError(
            f"the prior {args.init_from} models {ours.codebook_size} codes (+{ours.num_bpe_tokens} BPE ids), the tokens "
            f"in {args.tokens} hold {theirs.codebook_size} (+{theirs.num_bpe_tokens}): other codebooks cannot be fine-tuned on"
        )
    if layout.tokens != tokens_layout.tokens:
        raise ValueError(
            f"the prior {args.init_from} models {layout.tokens.describe()}, the tokens in {args.tokens} are "
            f"{tokens_layout.tokens.describe()}: tokenize at the prior's resolution"
        )
    known = set(ours.class_names)
    added = [name for name in theirs.class_names if name not in known]
    ids = replace(ours, class_names=(*ours.class_names, *added))
    grown = replace(layout, ids=ids)
    if added:
        model.resize_token_embeddings(ids.vocab_size, mean_resizing=True)  # new class rows start at the mean
        say(f"{args.init_from}: {len(added)} new classes appended after its {ours.num_classes}: {added[:8]}")
    fingerprint = tokens_layout.provenance.fingerprint
    if layout.provenance.fingerprint and fingerprint and fingerprint != layout.provenance.fingerprint:
        logger.warning("the tokens were made by another tokenizer than the one %s was trained on", args.init_from)
    grown = replace(grown, provenance=tokens_layout.provenance)  # the tokenizer that decodes what it learns now
    label_map = [ids.class_index(name) for name in theirs.class_names] or None
    return Sequences(rows, grown, bpe, label_map, model.train())


def setup(args: PriorArgs, train: TrainConfig) -> PriorRun:
    accelerator = make_accelerator(train)
    sequences = _sequences(args, say=accelerator.print, output_dir=train.output_dir, accelerator=accelerator)
    rows, layout, bpe = sequences.rows, sequences.layout, sequences.bpe
    model = sequences.model or build_prior(layout, args.model_type, args.size, **args.prior)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is for sampling; saved priors sample with it
    train_split = rows["train"]
    if len(train_split) < train.batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_split)} training sequences cannot fill a batch of {train.batch_size}")
    sampler = EpochSampler(len(train_split), train.seed)
    collate = TokenBatches(layout, bpe, sequences.label_map, sequences.text)
    loader = make_loader(train_split, train.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    optimizer = make_optimizer(model.parameters(), train)
    scheduler = make_scheduler(optimizer, train)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    run = PriorRun(
        accelerator,
        train,
        model,
        optimizer,
        scheduler,
        TrainData(loader, sampler),
        make_ema(accelerator, model, train),
        layout=layout,
        bpe=bpe,
        eval_split=rows["eval"],
        args=args,
        label_map=sequences.label_map,
        text=sequences.text,
        captions=sequences.captions,
    )
    if accelerator.is_main_process and args.eval_samples:
        run.tokenizer = _sample_decoder(train.output_dir, layout, accelerator.device)
    return run


def _sample_decoder(output_dir: str, layout: VocabLayout, device) -> torch.nn.Module | None:
    """The tokenizer of the tokens, to show samples at each evaluation; None (and a note) if it is gone."""
    try:
        return load_tokenizer_for(output_dir, layout, tokenizer=layout.provenance.tokenizer).to(device)
    except (OSError, ValueError) as error:
        logger.warning("no samples during training: cannot load the tokenizer (%s)", error)
        return None


# -- one step -------------------------------------------------------------------------------


def train_step(run: PriorRun, batch: dict) -> dict[str, torch.Tensor]:
    ids = training_sequences(run.layout, batch, run.args.label_dropout, run.args.caption_dropout)
    loss = prior_loss(run.model, run.layout, ids, text_weight=run.args.text_loss_weight)
    backward_and_check(run.accelerator, loss, run.model.parameters(), run.optimizer, run.train.grad_clip)
    step_optimizer(run)
    # bits per token: the held-out figure's unit (the loss is in nats; with label dropout on)
    return {"loss/total": loss.detach(), "train/bits_per_token": loss.detach() / math.log(2)}


# -- evaluation -----------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_prior(
    model,
    layout: VocabLayout,
    dataset,
    batch_size: int,
    bpe: VisualBPE | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    label_map: list[int] | None = None,
    text: TextTokenizer | None = None,
) -> dict:
    """Held-out negative log-likelihood of the image tokens, in bits per token and per image.

    With several processes each evaluates a contiguous share and `reduce` sums the totals; every
    process runs the same number of batches (a short share repeats its last one, uncounted), so a
    sharded model's collective forward passes line up."""
    was_training = model.training
    model.eval()
    collate = TokenBatches(layout, bpe, label_map, text)
    rows = share(len(dataset), rank, world_size)
    longest = math.ceil(len(dataset) / world_size)
    batches = math.ceil(longest / batch_size)  # the longest share's batches, run on every process
    totals = torch.zeros(3, dtype=torch.float64)  # nats, modelled ids, images
    for b in range(batches):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        counted = len(chunk) > 0
        batch = collate(dataset.__getitems__(list(chunk or rows[-1:] or [0])))
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = training_sequences(layout, batch, 0.0)  # nothing dropped
        nats, tokens = image_nll(model, layout, ids)
        if counted:
            totals += torch.tensor([nats, tokens, len(ids)], dtype=torch.float64)
    model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    total_nats, count, images = totals.tolist()
    count, images = int(count), int(images)
    bits = total_nats / math.log(2)
    # With BPE a token is not a code: bits per image (EOI included) is what compares across layouts.
    return {"bits_per_token": bits / max(count, 1), "bits_per_image": bits / max(images, 1), "eval_tokens": count}


def evaluate(run: PriorRun, step: int) -> dict:
    """Held-out bits per token and per image, logged as eval/*; with a tokenizer at hand, a grid of
    samples (one per class, cycling) in OUTPUT/samples/step-XXXXXX.png and TensorBoard."""
    accelerator = run.accelerator
    model = run.model if run.sharded else run.unwrapped  # a sharded model runs collectively, through its wrapper
    metrics = evaluate_prior(
        model,
        run.layout,
        run.eval_split,
        run.args.eval_batch_size,
        run.bpe,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        reduce=lambda totals: accelerator.reduce(totals.to(accelerator.device), "sum").cpu(),
        label_map=run.label_map,
        text=run.text,
    )
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if run.tokenizer is not None and accelerator.is_main_process and not run.sharded:
        grid = image_grid([_samples(run)])
        folder = Path(run.train.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{step:06d}.png")
        log_image(run.accelerator, "eval/samples", grid, step)
    return metrics


def _samples(run: PriorRun) -> torch.Tensor:
    """One per class (cycling), or for a text prior one per held-out caption (the first ones)."""
    layout, count = run.layout, run.args.eval_samples
    classes = [i % layout.ids.num_classes for i in range(count)] if layout.ids.num_classes else None
    texts = run.eval_split.caption_list(limit=count) if run.text is not None else None
    prompts = build_prompts(
        layout, classes=classes, texts=texts, text=run.text, num_images=None if classes or texts else count, bpe=run.bpe
    )
    was_training = run.unwrapped.training
    sampling = SamplingConfig(
        seed=0, cfg_scale=2.0 if run.text is not None else 1.0
    )  # shapes follow prompts best at 1-2
    images = generate_images(run.unwrapped.eval(), run.tokenizer, layout, prompts, sampling, bpe=run.bpe)
    run.unwrapped.train(was_training)
    return images


def summary(metrics: dict) -> str:
    return f"held-out {metrics['bits_per_token']:.3f} bits/token, {metrics['bits_per_image']:.1f} bits/image"


def _save(run: PriorRun, prior, output: Path, state_dict: dict | None = None) -> dict:
    folder = output / "prior"
    setattr(prior.config, CONFIG_KEY, run.layout.saved_in(folder).to_dict())  # the tokenizer by a relative path
    setattr(prior.config, IDS_KEY, run.layout.ids.special_ids())  # a fine-tuned prior may have grown classes
    prior.generation_config = plain_generation_config(run.layout)
    prior.save_pretrained(folder, state_dict=state_dict)
    if run.bpe is not None:
        run.bpe.save(folder)  # the prior's ids mean nothing without it
    if run.text is not None:
        run.text.save(folder)  # nor a text prior's without its text tokenizer
    return {"parameters": sum(p.numel() for p in prior.parameters()), **run.captions}


# -- the run --------------------------------------------------------------------------------


def train_prior(args: PriorArgs, train: TrainConfig) -> dict | None:
    """Train, checkpoint, evaluate; save OUTPUT/prior and OUTPUT/metrics.json. Returns the metrics."""
    started = time.time()
    run = setup(args, train)
    state = begin_run(run, "prior", (args, train))
    hooks = LoopHooks(
        step=lambda batch, step: train_step(run, batch),
        count=lambda batch: batch["tokens"].numel(),
        evaluate=lambda step: evaluate(run, step),
        summary=summary,
        save=lambda prior, output, state_dict: _save(run, prior, output, state_dict),
        speed_unit="tok_s",
        best=("bits_per_image", "min"),
    )
    state = run_loop(run, state, hooks)
    return finish_run(run, state, hooks, started)


def main(argv: list[str]) -> dict | None:
    args, train = parse_recipe(argv, (PriorArgs, TrainConfig))
    return train_prior(args, train)
