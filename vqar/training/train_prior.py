"""Train the stage-2 prior: `vqar train-prior RECIPE.yaml [--field value ...]`.

A stock `transformers` causal LM over the sequences of `VocabLayout` (`[condition, BOI,
codes]`), trained on a dataset written by `vqar tokenize`. The same three pieces as the
tokenizer trainer — `setup`, `train_step`, `evaluate` — with `training.loop` doing the rest.
Class-conditional models replace a fraction of labels by the null class, so that one model also
gives the unconditional predictions classifier-free guidance needs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from ..ar import PROMPT_LENGTH, VocabLayout, build_prior, image_nll
from ..bpe import VisualBPE, load_bpe
from ..data import make_loader
from ..tokens import TokensManifest, code_arrays, load_tokens
from .loop import EpochSampler, LoopHooks, Run, TrainData, begin_run, finish_run, run_loop, step_optimizer
from .optim import backward_and_check, make_accelerator, make_ema, make_optimizer, make_scheduler
from .recipes import JSONDict, TrainConfig, parse_recipe


@dataclass
class PriorArgs:
    tokens: str = "outputs/tokens"  # a dataset written by `vqar tokenize`
    model_type: str = "llama"  # any AutoModelForCausalLM config type
    size: str = "cpu"  # a name of vqar.ar.PRIOR_SIZES
    prior: JSONDict = field(default_factory=JSONDict)  # overrides of the model config (hidden_size, ...)
    bpe: str = "auto"  # visual_bpe.json to train on: "auto" (the tokenizer's, if any), "none", or a path
    num_tokens: int | None = None  # 1d nested-dropout tokenizers: model only each image's first k tokens
    conditional: bool = True  # class-conditional when the tokens have labels
    label_dropout: float = 0.1  # fraction of labels replaced by the null class (LlamaGen: 0.1)
    eval_batch_size: int = 128

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")


# -- data -----------------------------------------------------------------------------------


def find_bpe(choice: str, manifest: TokensManifest) -> VisualBPE | None:
    """The visual BPE to train on: "none", "auto" (the tokenizer folder's, if it has one), or a path."""
    if choice == "none":
        return None
    return load_bpe(manifest.tokenizer if choice == "auto" else choice)


def leading_tokens(tokens: datasets.DatasetDict, k: int) -> datasets.DatasetDict:
    """Keep each image's first k tokens: a 1d nested-dropout tokenizer decodes any prefix."""
    return datasets.DatasetDict(
        {
            name: split.map(
                lambda batch: {"tokens": [t[:k] for t in batch["tokens"]]}, batched=True, keep_in_memory=True
            )
            for name, split in tokens.items()
        }
    )


def bpe_encoded(tokens: datasets.DatasetDict, manifest: TokensManifest, bpe: VisualBPE) -> datasets.DatasetDict:
    """Each split with its codes replaced by BPE ids, left-aligned and padded with -1."""
    encoded = {}
    for name, codes in code_arrays(tokens, manifest).items():
        ids = bpe.encode(codes, padded=True)
        padded = np.full((len(codes), math.prod(codes.shape[1:])), -1, dtype=np.int64)  # at most one id per code
        padded[:, : ids.shape[1]] = ids.numpy()
        encoded[name] = datasets.Dataset.from_dict({"tokens": padded, "label": tokens[name]["label"]})
    return datasets.DatasetDict(encoded)


def collate_tokens(rows: list[dict]) -> dict:
    return {
        "tokens": torch.stack([r["tokens"] for r in rows]).long(),
        "labels": torch.stack([r["label"] for r in rows]),
    }


def training_sequences(layout: VocabLayout, tokens: torch.Tensor, labels: torch.Tensor, label_dropout: float):
    """(input ids [B, 2 + N], targets [B, 2 + N] with -100 on the prompt) with label dropout."""
    if label_dropout > 0:
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < label_dropout, -1, labels)
    ids = layout.to_sequence(labels, tokens)
    targets = ids.masked_fill(ids == layout.pad, -100)
    targets[:, :PROMPT_LENGTH] = -100
    return ids, targets


# -- setup ----------------------------------------------------------------------------------


@dataclass
class PriorRun(Run):
    """A `Run` with the prior's vocabulary, its visual BPE, and the held-out sequences."""

    layout: VocabLayout = None
    bpe: VisualBPE | None = None
    eval_split: datasets.Dataset = None
    args: PriorArgs = None


def _sequences(args: PriorArgs) -> tuple[datasets.DatasetDict, VocabLayout, VisualBPE | None]:
    """The tokens to train on (prefixes, BPE ids) and the layout of the prior over them."""
    tokens, manifest = load_tokens(args.tokens)
    bpe = find_bpe(args.bpe, manifest)
    layout = VocabLayout.from_manifest(
        manifest, conditional=args.conditional and bool(manifest.class_names), bpe=bpe, num_tokens=args.num_tokens
    )
    if args.num_tokens:
        tokens = leading_tokens(tokens, args.num_tokens)
    if bpe is not None:
        tokens = bpe_encoded(tokens, manifest, bpe)
    return tokens, layout, bpe


def setup(args: PriorArgs, train: TrainConfig) -> PriorRun:
    accelerator = make_accelerator(train)
    tokens, layout, bpe = _sequences(args)
    model = build_prior(layout, args.model_type, args.size, **args.prior)
    train_split = tokens["train"].with_format("torch")
    if len(train_split) < train.batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_split)} training sequences cannot fill a batch of {train.batch_size}")
    sampler = EpochSampler(len(train_split), train.seed)
    loader = make_loader(train_split, train.batch_size, sampler=sampler, collate_fn=collate_tokens, drop_last=True)
    optimizer = make_optimizer(model.parameters(), train)
    scheduler = make_scheduler(optimizer, train)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    return PriorRun(
        accelerator,
        train,
        model,
        optimizer,
        scheduler,
        TrainData(loader, sampler),
        make_ema(accelerator, model, train),
        layout=layout,
        bpe=bpe,
        eval_split=tokens["eval"].with_format("torch"),
        args=args,
    )


# -- one step -------------------------------------------------------------------------------


def train_step(run: PriorRun, batch: dict) -> dict[str, torch.Tensor]:
    ids, targets = training_sequences(run.layout, batch["tokens"], batch["labels"], run.args.label_dropout)
    loss = run.model(input_ids=ids, labels=targets).loss
    backward_and_check(run.accelerator, loss, run.model.parameters(), run.optimizer, run.train.grad_clip)
    step_optimizer(run)
    return {"loss/total": loss.detach()}


# -- evaluation -----------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_prior(model, layout: VocabLayout, dataset, batch_size: int) -> dict:
    """Held-out negative log-likelihood of the image tokens, in bits per token and per image."""
    was_training = model.training
    model.eval()
    total_nats, count, images = 0.0, 0, 0
    for batch in make_loader(dataset, batch_size, collate_fn=collate_tokens):
        ids = layout.to_sequence(batch["labels"].to(model.device), batch["tokens"].to(model.device))
        nats, tokens = image_nll(model, layout, ids)
        total_nats, count, images = total_nats + nats, count + tokens, images + len(ids)
    model.train(was_training)
    bits = total_nats / math.log(2)
    # With BPE a token is not a code: bits per image (EOI included) is what compares across layouts.
    return {"bits_per_token": bits / max(count, 1), "bits_per_image": bits / max(images, 1), "eval_tokens": count}


def evaluate(run: PriorRun, step: int) -> dict:
    metrics = evaluate_prior(run.unwrapped, run.layout, run.eval_split, run.args.eval_batch_size)
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def summary(metrics: dict) -> str:
    return f"held-out {metrics['bits_per_token']:.3f} bits/token, {metrics['bits_per_image']:.1f} bits/image"


def _save(run: PriorRun, prior, output: Path) -> dict:
    prior.save_pretrained(output / "prior")
    if run.bpe is not None:
        run.bpe.save(output / "prior")  # the prior's ids mean nothing without it
    return {"parameters": sum(p.numel() for p in prior.parameters())}


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
        save=lambda prior, output: _save(run, prior, output),
        speed_unit="tok_s",
    )
    state = run_loop(run, state, hooks)
    return finish_run(run, state, hooks, started)


def main(argv: list[str]) -> dict | None:
    args, train = parse_recipe(argv, (PriorArgs, TrainConfig))
    return train_prior(args, train)
