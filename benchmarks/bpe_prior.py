"""Does visual BPE lower a prior's held-out bits per image? Digits priors with 0 to N merges, at fair budgets.

    python benchmarks/bpe_prior.py [--merges 0,16,128] [--steps 400,1200] [--output outputs/bench-bpe-prior]

One tokenizer (recipes/quickstart-digits.yaml: 8x8 FSQ tokens, 125 codes), its tokens, and for
each number of merges a visual BPE learned on the training split and a class-conditional prior
(recipes/digits-prior-cpu.yaml) trained for each budget in --steps. Every prior is evaluated on
the held-out digits every 50 steps and keeps its best weights, so the figures are each
setting's best held-out bits per image (image ids plus the end-of-image token with BPE), not the
luck of where the schedule stopped. Bits per image are comparable across merges: every prior
codes the same held-out images losslessly. Runs already in --output are reused when they were made
at the present commit (any, with --reuse); otherwise they are made again.

Columns: merges, held-out tokens per image, vocabulary, prior parameters, steps, tokens seen in
training (the budget counted in sequence positions), best held-out bits per image and its step;
"vs no BPE" is the ratio to 0 merges at the same steps, in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from provenance import header, mark_run, reusable_run, reused_from
from summary import Table, record

from vqar.bpe import train_bpe
from vqar.losses import LossConfig
from vqar.tokens import MANIFEST, load_tokens
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior
from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CODEBOOK = 125  # quickstart-digits: FSQ 5, 5, 5
BATCH = 64  # digits-prior-cpu.yaml's batch_size


def tokens_folder(output: Path) -> Path:
    """The digits tokens of the quickstart tokenizer, trained and encoded unless already in `output`."""
    run, tokens = output / "tokenizer", output / "tokens"
    if not (run / "metrics.json").is_file():
        recipe = [str(RECIPES / "quickstart-digits.yaml"), "--output_dir", str(run), "--log_with", "none"]
        train_tokenizer(*parse_recipe(recipe, (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)))
    if not (tokens / MANIFEST).is_file():  # written last, so a folder holding it is complete
        tokenize_dataset(TokenizeArgs(tokenizer=str(run / "tokenizer"), data="digits", output=str(tokens)))
    return tokens


def prior_run(output: Path, tokens: Path, merges: int, steps: int) -> dict:
    """(metrics.json of) a prior with `merges` visual-BPE merges trained for `steps`, best weights kept."""
    bpe_folder = output / f"bpe-{merges}"
    if merges and not (bpe_folder / "visual_bpe.json").is_file():
        train_bpe(tokens, CODEBOOK + merges, bpe_folder)
    run = output / f"prior-{merges}-{steps}"
    if not (run / "metrics.json").is_file():
        recipe = [str(RECIPES / "digits-prior-cpu.yaml"), "--tokens", str(tokens), "--output_dir", str(run)]
        recipe += ["--bpe", str(bpe_folder) if merges else "none", "--max_steps", str(steps)]
        recipe += ["--eval_every", "50", "--save_best", "true", "--save_every", "0", "--log_with", "none"]
        recipe += ["--eval_samples", "0", "--warmup_steps", str(min(50, steps // 8))]
        train_prior(*parse_recipe(recipe, (PriorArgs, TrainConfig)))
    return json.loads((run / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", default="0,16,128")
    parser.add_argument("--steps", default="400,1200")
    parser.add_argument("--output", default="outputs/bench-bpe-prior")
    parser.add_argument("--reuse", action="store_true", help="show runs made at another commit instead of redoing them")
    args = parser.parse_args()
    output = Path(args.output)
    made_at = reusable_run(output, args.reuse)
    print(header("bpe_prior", measured=reused_from(made_at) is None, reused_from=reused_from(made_at)))
    tokens = tokens_folder(output)
    held_out = load_tokens(tokens)[1].num_images["eval"]
    merges_list, steps_list = ([int(v) for v in text.split(",")] for text in (args.merges, args.steps))
    columns = ["merges", "tokens/image", "vocabulary", "prior parameters", "steps", "positions seen"]
    columns += ["best held-out bits/image", "at step", "vs no BPE"]
    table = Table("bpe_prior", "digits priors with and without visual BPE at equal steps", columns)
    for steps in steps_list:
        baseline = None
        for merges in merges_list:
            m = prior_run(output, tokens, merges, steps)
            vocab = json.loads((output / f"prior-{merges}-{steps}" / "prior" / "config.json").read_text())["vocab_size"]
            per_image = m["eval_tokens"] / held_out  # image ids, and EOI with BPE
            seen = steps * BATCH * (per_image + 2)  # + the class and begin-of-image prompt
            baseline = m["best"] if merges == 0 else baseline
            ratio = f"{m['best'] / baseline:.2f}x" if baseline else ""
            cells = [merges, f"{per_image:.1f}", vocab, f"{m['parameters'] / 1e6:.2f}M", steps, f"{seen / 1e6:.1f}M"]
            table.add([*cells, f"{m['best']:.1f}", m["best_step"], ratio], reused_from=reused_from(made_at))
            if merges and baseline:
                measure = f"{merges} merges, {steps} steps: best held-out bits/image"
                record(
                    "visual BPE prior", measure, m["best"], "bits", "no BPE, same steps", baseline, reused_from(made_at)
                )
    if made_at is None:
        mark_run(output)
    table.print()
    table.save()


if __name__ == "__main__":
    main()
