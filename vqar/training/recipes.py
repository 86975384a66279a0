"""Recipes: YAML files read into dataclasses, every field overridable from the command line.

A recipe's values become the defaults of a `transformers.HfArgumentParser` over the trainer's
dataclasses, so `vqar train-tokenizer RECIPE.yaml --max_steps 10` overrides one field and a
recipe with a misspelt field is refused by name. The fields a run actually used are saved as
`OUTPUT/recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging, the same for every trainer."""

    output_dir: str = HfArg(default="outputs/run", help="where checkpoints, logs, samples and the model are written")
    max_steps: int = HfArg(default=1000, help="optimisation steps")
    batch_size: int = HfArg(default=16, help="examples per step and process (per micro-batch with accumulation)")
    gradient_accumulation_steps: int = HfArg(default=1, help="micro-batches per optimizer step")
    global_batch_size: int | None = HfArg(
        default=None,
        help="examples per optimizer step over all processes: sets gradient_accumulation_steps to "
        "global_batch_size / (batch_size x processes), so a recipe's batch is the same on 1 GPU or 64",
    )
    gradient_checkpointing: bool = HfArg(default=False, help="recompute activations in the backward: less memory")
    process_group_timeout: int = HfArg(
        default=1800, help="seconds a collective waits for the other processes before the run stops (NCCL, gloo)"
    )
    learning_rate: float = HfArg(default=1e-3, help="peak learning rate (CPU-sized models; the GPU recipes set theirs)")
    weight_decay: float = HfArg(default=0.0, help="AdamW weight decay")
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1")
    adam_beta2: float = HfArg(default=0.95, help="AdamW beta2 (LlamaGen's, for both stages)")
    warmup_steps: int = HfArg(default=0, help="linear learning-rate warm-up from 0")
    min_lr_ratio: float = HfArg(default=0.0, help="the cosine decays to learning_rate * min_lr_ratio at max_steps")
    grad_clip: float = HfArg(default=1.0, help="max gradient norm; 0 turns clipping off")
    ema_decay: float = HfArg(default=0.0, help="EMA of the weights (e.g. 0.999), saved as the model; 0 turns it off")
    seed: int = HfArg(default=0, help="the seed of every random choice: same seed, same run")
    mixed_precision: Literal["no", "fp16", "bf16"] = HfArg(default="no", help="autocast: bf16 (CPU or GPU), fp16 (GPU)")
    compile: bool = HfArg(default=False, help="torch.compile the trained models (inductor), through accelerate")
    save_every: int = HfArg(default=500, help="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = HfArg(default=2, help="how many of the newest checkpoints to keep")
    save_best: bool = HfArg(default=False, help="also keep the weights with the best held-out figure in OUTPUT/best")
    eval_every: int = HfArg(default=250, help="steps between held-out evaluations; 0: only at the end")
    log_every: int = HfArg(default=10, help="steps between logged training figures")
    resume: str | None = HfArg(default=None, help='"latest" (the newest complete checkpoint) or a checkpoint folder')
    log_with: str = HfArg(default="tensorboard", help='an accelerate tracker (tensorboard, wandb, ...) or "none"')
    num_workers: int = HfArg(default=0, help="DataLoader worker processes")
    max_bad_steps: int = HfArg(default=10, help="NaN/inf steps in a row that are skipped before training stops")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "process_group_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.global_batch_size is not None and self.global_batch_size < self.batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is smaller than batch_size ({self.batch_size})"
            )
        if self.max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {self.max_bad_steps}")


class JSONDict(dict):
    """The type of a dict-valued recipe field: the command line gives it as JSON.

    `--tokenizer '{"channels": 64}'` (HfArgumentParser calls a field's type on the string; a
    plain `dict` would not parse it). A recipe's YAML mapping arrives as a dict and is kept.
    Calling it returns a plain dict, so recipes save and compare as plain data.
    """

    def __new__(cls, value=(), /) -> dict:
        return dict(json.loads(value) if isinstance(value, str) else value)


class Share(float):
    """The type of a recipe field that is a share in [0, 1]; `true` and `false` read as 1 and 0, so a
    field that was a switch keeps its recipes (`--random_channels true`, `random_channels: 0.25`)."""

    def __new__(cls, value=0.0, /) -> float:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        share = float(value)
        if not 0 <= share <= 1:
            raise ValueError(f"expected a share in [0, 1], got {value!r}")
        return share


def parse_recipe(
    argv: list[str], dataclass_types: tuple[type, ...], prog: str | None = None, description: str | None = None
) -> tuple:
    """`[RECIPE.yaml] [--field value ...]` -> one instance per dataclass type.

    The YAML's values become the defaults of an HfArgumentParser, so the command line overrides
    any of them; without a recipe the dataclasses' defaults apply. Dict-valued fields (typed
    `JSONDict`) take JSON on the command line, which merges into the recipe's dict key by key (nested
    dicts too), as OmegaConf and Hydra merge overrides: `--tokenizer '{"layout": "multiscale"}'`
    keeps the recipe's other tokenizer fields.
    """
    usage = f"{prog or 'vqar'} [RECIPE.yaml] [--field value ...]"
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description, usage=usage)
    recipe_path, overrides = _split_recipe(argv)
    if recipe_path is not None:
        recipe = yaml.safe_load(Path(recipe_path).read_text()) or {}
        known = {f.name for dataclass_type in dataclass_types for f in dataclasses.fields(dataclass_type)}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"recipe {recipe_path} has unknown field(s) {unknown}; known fields: {sorted(known)}")
        parser.set_defaults(**recipe)
    else:
        recipe = {}
    configs = parser.parse_args_into_dataclasses(args=overrides)
    for config in configs:
        for f in dataclasses.fields(config):
            if isinstance(recipe.get(f.name), dict) and isinstance(getattr(config, f.name), dict):
                setattr(config, f.name, merged(recipe[f.name], getattr(config, f.name)))
    return configs


def merged(base: dict, override: dict) -> dict:
    """`override` merged into `base` key by key: nested dicts merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _split_recipe(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and not argv[0].startswith("-"):
        if not Path(argv[0]).is_file():
            raise FileNotFoundError(f"recipe {argv[0]} does not exist (the recipes that ship are in recipes/)")
        return argv[0], argv[1:]
    return None, argv


def resolved_recipe(*configs) -> dict:
    """All fields of the recipe dataclasses, merged: what a run actually used."""
    merged = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged


def save_resolved_recipe(path: Path, *configs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_recipe(*configs), sort_keys=False))
