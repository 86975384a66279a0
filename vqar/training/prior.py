"""Train the stage-2 prior: `vqar train-ar RECIPE.yaml [--field value ...]`.

A stock `transformers` causal LM over the sequences of `VocabLayout` (`[condition, BOI,
codes]`), trained on a dataset written by `vqar tokenize`, with the checkpoint, resume,
logging and progress machinery of `training.common`. Class-conditional models replace a
fraction of labels by the null class, so that one model also gives the unconditional
predictions classifier-free guidance needs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from ..ar import PROMPT_LENGTH, VocabLayout, build_prior, image_nll
from ..bpe import FILENAME as BPE_FILENAME
from ..bpe import VisualBPE
from ..data import make_loader
from .common import (
    EMA,
    EpochSampler,
    LoopHooks,
    TrainConfig,
    backward_and_check,
    begin_run,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    parse_recipe,
    run_loop,
)
from .tokenize import load_tokens


@dataclass
class PriorArgs:
    tokens: str = "outputs/tokens"  # a dataset written by `vqar tokenize`
    model_type: str = "llama"  # any AutoModelForCausalLM config type
    size: str = "cpu"  # a name of vqar.ar.PRIOR_SIZES
    prior: dict = field(default_factory=dict)  # overrides of the model config (hidden_size, ...)
    bpe: str = "auto"  # visual_bpe.json to train on: "auto" (the tokenizer's, if any), "none", or a path
    num_tokens: int | None = None  # 1d nested-dropout tokenizers: model only each image's first k tokens
    conditional: bool = True  # class-conditional when the tokens have labels
    label_dropout: float = 0.1  # fraction of labels replaced by the null class (LlamaGen: 0.1)
    eval_batch_size: int = 128

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")


def layout_for(manifest: dict, conditional: bool, bpe: VisualBPE | None, num_tokens: int | None = None) -> VocabLayout:
    tokenizer = manifest["tokenizer"]
    if Path(tokenizer).exists():
        tokenizer = str(Path(tokenizer).resolve())  # generation may run from another folder
    return VocabLayout(
        codebook_size=manifest["codebook_size"],
        tokens_per_image=num_tokens or manifest["tokens_per_image"],
        grid=manifest.get("grid"),
        num_bpe_tokens=bpe.num_merges if bpe else 0,
        class_names=manifest["class_names"] if conditional else [],
        tokenizer=tokenizer,
    )


def leading_tokens(tokens: dict, manifest: dict, k: int) -> dict:
    """Keep each image's first k tokens: a 1d nested-dropout tokenizer decodes any prefix."""
    if manifest.get("grid") or not 1 <= k <= manifest["tokens_per_image"]:
        raise ValueError(f"num_tokens={k} needs a 1d tokenizer and 1 <= k <= {manifest['tokens_per_image']} "
                         f"(these tokens are {'a grid ' + str(manifest['grid']) if manifest.get('grid') else '1d'})")  # fmt: skip
    return {name: split.map(lambda batch: {"tokens": [t[:k] for t in batch["tokens"]]}, batched=True,
                            keep_in_memory=True) for name, split in tokens.items()}  # fmt: skip


def find_bpe(choice: str, manifest: dict) -> VisualBPE | None:
    if choice == "none":
        return None
    if choice == "auto":
        path = Path(manifest["tokenizer"]) / BPE_FILENAME
        return VisualBPE.load(path) if path.is_file() else None
    return VisualBPE.load(choice)


def bpe_encoded(split, bpe: VisualBPE, grid: list[int] | None):
    """A tokens split with its codes replaced by BPE ids, left-aligned and padded with -1."""
    codes = np.asarray(split["tokens"], dtype=np.int64)
    encoded = bpe.encode(codes.reshape(len(codes), *grid) if grid else codes)
    padded = np.full((len(encoded), codes.shape[1]), -1, dtype=np.int64)
    for row, ids in zip(padded, encoded):
        row[: len(ids)] = ids.numpy()
    return datasets.Dataset.from_dict({"tokens": padded, "label": split["label"]})


def collate_tokens(rows: list[dict]) -> dict:
    return {"tokens": torch.stack([r["tokens"] for r in rows]).long(), "labels": torch.stack([r["label"] for r in rows])}


def training_sequences(layout: VocabLayout, tokens: torch.Tensor, labels: torch.Tensor, label_dropout: float):
    """(input ids [B, 2 + N], targets [B, 2 + N] with -100 on the prompt) with label dropout."""
    if label_dropout > 0:
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < label_dropout, -1, labels)
    ids = layout.to_sequence(labels, tokens)
    targets = ids.masked_fill(ids == layout.pad, -100)
    targets[:, :PROMPT_LENGTH] = -100
    return ids, targets


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


def train_prior(args: PriorArgs, train: TrainConfig) -> dict | None:
    """Train, checkpoint, evaluate; save OUTPUT/prior and OUTPUT/metrics.json."""
    started = time.time()
    accelerator = make_accelerator(train)
    tokens, manifest = load_tokens(args.tokens)
    if args.num_tokens:
        tokens = leading_tokens(tokens, manifest, args.num_tokens)
    bpe = find_bpe(args.bpe, manifest)
    layout = layout_for(manifest, args.conditional and bool(manifest["class_names"]), bpe, args.num_tokens)
    model = build_prior(layout, args.model_type, args.size, **args.prior)
    if bpe is not None:
        tokens = {name: bpe_encoded(tokens[name], bpe, manifest.get("grid")) for name in ("train", "eval")}
    train_split = tokens["train"].with_format("torch")
    eval_split = tokens["eval"].with_format("torch")
    if len(train_split) < train.batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_split)} training sequences cannot fill a batch of {train.batch_size}")
    sampler = EpochSampler(len(train_split), train.seed)
    loader = make_loader(train_split, train.batch_size, sampler=sampler, collate_fn=collate_tokens, drop_last=True)
    optimizer = make_optimizer(model.parameters(), train)
    scheduler = make_scheduler(optimizer, train)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    ema = EMA(accelerator.unwrap_model(model), train.ema_decay) if train.ema_decay > 0 else None

    state = begin_run(accelerator, train, "prior", (args, train), ema)

    def step(batch: dict, step: int) -> dict:
        ids, targets = training_sequences(layout, batch["tokens"], batch["labels"], args.label_dropout)
        loss = model(input_ids=ids, labels=targets).loss
        backward_and_check(accelerator, loss, model.parameters(), optimizer, train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        return {"loss/total": loss.detach(), "lr": torch.tensor(scheduler.get_last_lr()[0])}

    def evaluate_now(step: int) -> str:
        metrics = evaluate_prior(accelerator.unwrap_model(model), layout, eval_split, args.eval_batch_size)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        return f"held-out {metrics['bits_per_token']:.3f} bits/token, {metrics['bits_per_image']:.1f} bits/image"

    hooks = LoopHooks(step=step, count=lambda b: b["tokens"].numel(), evaluate=evaluate_now, speed_unit="tok_s")
    state = run_loop(accelerator, train, {"loader": loader, "sampler": sampler, "dataset": None}, state, hooks, ema)

    metrics = None
    if accelerator.is_main_process:
        prior = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(prior)
        metrics = evaluate_prior(prior, layout, eval_split, args.eval_batch_size)
        metrics |= {"steps": state["step"], "skipped_steps": state["skipped_steps"], "seconds": time.time() - started,
                    "parameters": sum(p.numel() for p in prior.parameters())}  # fmt: skip
        prior.save_pretrained(Path(train.output_dir) / "prior")
        if bpe is not None:
            bpe.save(Path(train.output_dir) / "prior")  # the prior's ids mean nothing without it
        (Path(train.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str]) -> dict | None:
    args, train = parse_recipe(argv, (PriorArgs, TrainConfig))
    return train_prior(args, train)
