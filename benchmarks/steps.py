"""How many steps until samples are recognisable: the shipped CPU recipes measured along their training.

    python benchmarks/steps.py [--every 100] [--output outputs/bench-steps] [--reuse]

Trains the two bundled pipelines as their recipes ship, on 2 CPU cores, evaluating the tokenizer and
keeping a prior checkpoint every `--every` steps, then measures each checkpoint:

- digits (`quickstart-digits.yaml`, `digits-prior-cpu.yaml`): the tokenizer's held-out PSNR at each
  evaluation; per prior checkpoint, 100 samples (10 a class, CFG 2, as the demo samples) and the share
  that the demo's digit classifier reads as the asked class (its accuracy on real digits: the ceiling);
- shapes (`shapes-text-cpu.yaml`, `shapes-text-prior-cpu.yaml`): the same PSNR; per prior checkpoint,
  prompt following on 48 seen prompts at CFG 2 (colour, position, all four attributes), beside the
  detector's accuracy on real renders.

The docs page "How many steps" shows the table. Later runs at the same commit reuse the training
(`--reuse`: at any commit, said as reused).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from provenance import header, mark_run, reusable_run, reused_from
from safetensors.torch import load_file
from summary import Table

from vqar.ar import load_prior
from vqar.demo import DEMO_SAMPLING, digit_features, fit_digit_classifier
from vqar.generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for
from vqar.shapes import detector_ceiling, evaluation_scenes, prompt_following
from vqar.text import load_text_tokenizer

REPO = Path(__file__).resolve().parent.parent
PIPELINES = {  # tokenizer recipe, prior recipe, data
    "digits": ("quickstart-digits.yaml", "digits-prior-cpu.yaml", "digits"),
    "shapes": ("shapes-text-cpu.yaml", "shapes-text-prior-cpu.yaml", "shapes"),
}
EVALUATION = re.compile(r"^step (\d+): held-out (?:PSNR ([\d.]+) dB|([\d.]+) bits/token, ([\d.]+) bits/image)", re.M)


def run(command: list[str]) -> str:
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return done.stdout + done.stderr


def train(name: str, output: Path, every: int) -> None:
    """Both stages of a pipeline, every evaluation's line kept in OUTPUT/NAME/*.log."""
    tokenizer_recipe, prior_recipe, data = PIPELINES[name]
    folder, vqar = output / name, [sys.executable, "-m", "vqar"]
    folder.mkdir(parents=True, exist_ok=True)
    log = run([*vqar, "train-tokenizer", str(REPO / "recipes" / tokenizer_recipe), "--output_dir",
               str(folder / "tokenizer-run"), "--eval_every", str(every), "--log_with", "none"])  # fmt: skip
    (folder / "tokenizer.log").write_text(log)
    run([*vqar, "tokenize", "--tokenizer", str(folder / "tokenizer-run/tokenizer"), "--data", data,
         "--output", str(folder / "tokens")])  # fmt: skip
    log = run([*vqar, "train-prior", str(REPO / "recipes" / prior_recipe), "--tokens", str(folder / "tokens"),
               "--output_dir", str(folder / "prior-run"), "--save_every", str(every), "--eval_every", str(every),
               "--keep_checkpoints", "1000", "--log_with", "none"])  # fmt: skip
    (folder / "prior.log").write_text(log)


def prior_evaluations(folder: Path) -> dict[int, tuple[float, ...]]:
    """step -> (bits/token, bits/image) of the prior's evaluations, the last one from its metrics.json."""
    found = evaluations((folder / "prior.log").read_text())
    final = json.loads((folder / "prior-run" / "metrics.json").read_text())
    found.setdefault(final["steps"], (final["bits_per_token"], final["bits_per_image"]))
    return found


def evaluations(log: str) -> dict[int, tuple[float, ...]]:
    """step -> (PSNR,) or (bits/token, bits/image), from a run's printed evaluation lines."""
    found = {}
    for match in EVALUATION.finditer(log):
        step, psnr, per_token, per_image = match.groups()
        found[int(step)] = (float(psnr),) if psnr else (float(per_token), float(per_image))
    return found


def checkpoints(folder: Path):
    """(step, the prior with that checkpoint's weights, its layout), oldest first."""
    prior, layout = load_prior(str(folder / "prior-run" / "prior"))
    for path in sorted((folder / "prior-run" / "checkpoints").glob("step-*")):
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = prior.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # a tied output layer is saved once
            raise RuntimeError(f"{path}: weights do not fit the prior ({missing[:3]}, {unexpected[:3]})")
        yield int(path.name.split("-")[1]), prior.eval(), layout


def digits_rows(folder: Path) -> list[list[str]]:
    tokenizer_psnr = evaluations((folder / "tokenizer.log").read_text())
    prior_bits = prior_evaluations(folder)
    _, layout = load_prior(str(folder / "prior-run" / "prior"))
    tokenizer = load_tokenizer_for(str(folder / "prior-run" / "prior"), layout).eval()
    classifier, ceiling = fit_digit_classifier(tokenizer.config.resolution)
    classes = [c for c in range(10) for _ in range(10)]
    rows = [["digits", "tokenizer", step, f"{psnr:.2f} dB", ""] for step, (psnr,) in sorted(tokenizer_psnr.items())]
    for step, prior, layout in checkpoints(folder):
        images = generate_images(prior, tokenizer, layout, build_prompts(layout, classes=classes), DEMO_SAMPLING)
        agreement = float(np.mean(classifier.predict(digit_features(images)) == np.array(classes)))
        bits = prior_bits.get(step, (float("nan"),) * 2)[1]
        rows.append(["digits", "prior", step, f"{bits:.1f} bits/image", f"{agreement:.0%} of the asked class"])
    rows.append(["digits", "real digits", "", "", f"{ceiling:.0%} (the classifier's ceiling)"])
    return rows


def shapes_rows(folder: Path) -> list[list[str]]:
    tokenizer_psnr = evaluations((folder / "tokenizer.log").read_text())
    prior_bits = prior_evaluations(folder)
    _, layout = load_prior(str(folder / "prior-run" / "prior"))
    prior_folder = folder / "prior-run" / "prior"
    tokenizer, text = load_tokenizer_for(str(prior_folder), layout).eval(), load_text_tokenizer(prior_folder, layout)
    rows = [["shapes", "tokenizer", step, f"{psnr:.2f} dB", ""] for step, (psnr,) in sorted(tokenizer_psnr.items())]
    for step, prior, layout in checkpoints(folder):
        seen = prompt_following(prior, tokenizer, layout, text, num_images=48, cfg_scales=(2.0,),
                                sampling=SamplingConfig())[0]  # fmt: skip
        bits = prior_bits.get(step, (float("nan"),) * 2)[1]
        share = f"colour {seen['colour']:.2f}, position {seen['position']:.2f}, all four {seen['all']:.2f}"
        rows.append(["shapes", "prior", step, f"{bits:.1f} bits/image", share])
    real = detector_ceiling(evaluation_scenes(False, 48))
    rows.append(["shapes", "real renders", "", "", f"colour {real['colour']:.2f}, position {real['position']:.2f}, "
                 f"all four {real['all']:.2f} (the detector's ceiling)"])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/bench-steps")
    parser.add_argument("--every", type=int, default=100, help="evaluate and keep a prior checkpoint this often")
    parser.add_argument("--reuse", action="store_true", help="show runs made at another commit (said as reused)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    output = Path(args.output)
    made_at = reusable_run(output, args.reuse)
    if made_at is None:
        for name in PIPELINES:
            train(name, output, args.every)
        mark_run(output)
    reused = reused_from(made_at)
    print(header("steps", True, None) + f"; training {'reused from ' + reused if reused else 'done now'}")
    table = Table(
        "steps",
        "How many steps: the CPU recipes along their training",
        ["data", "stage", "step", "held-out", "recognisable?"],
        notes="Samples drawn now from each kept checkpoint; the training runs' provenance is the row's.",
    )
    for cells in digits_rows(output / "digits") + shapes_rows(output / "shapes"):
        table.add([str(c) for c in cells], reused_from=reused)
    table.print()
    table.save()


if __name__ == "__main__":
    main()
