"""Text prompts on the bundled `shapes`: how well a text prior draws what its prompts ask.

    python benchmarks/prompt_following.py [--images 96] [--reuse] [--output outputs/bench-prompts]

Trains the shipped pair of recipes on 2 CPU cores, as a user would run them (`shapes-text-cpu.yaml`:
the tokenizer; `vqar tokenize`; `shapes-text-prior-cpu.yaml`: the text prior), each stage timed, into
OUTPUT (later runs at the same commit reuse it; `--reuse` at any commit, said as reused). Then:

- prompt following, in the spirit of GenEval: for the seen and the held-out colour-shape combinations,
  `--images` canonical prompts ("two red circles at the top") sampled at CFG 0 (the empty caption:
  unprompted, the chance line), 1, 2 and 4; the detector of `vqar.shapes` reads colour, shape,
  position and count back from each image. Beside them, the detector's accuracy on real renders
  (the ceiling) and on the tokenizer's reconstructions of them (what the codes can carry), and chance;
- a sample grid, OUTPUT/prompt_grid.png: a row per prompt (its label), seen combinations then held-out, CFG 2;
- left padding against per-length groups: 64 prompts of mixed lengths sampled as one left-padded
  batch, and as one batch per prompt length, images/s of each (best of 3, timed in turn).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from provenance import header, mark_run, reusable_run, reused_from
from summary import Table, interleaved_best_seconds, record

from vqar.ar import load_prior
from vqar.data import image_grid, load_source
from vqar.generation import SamplingConfig, build_prompts, generate_ids, generate_images, load_tokenizer_for
from vqar.shapes import ATTRIBUTES, Scene, accuracy, detect, evaluation_scenes, prompt_following, render
from vqar.text import load_text_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCALES = (0.0, 1.0, 2.0, 4.0)
GRID_SCENES = [  # four seen colour-shape pairs, then four held out of training
    Scene("red", "circle", "left", 1), Scene("blue", "triangle", "top", 2), Scene("yellow", "square", "bottom", 1),
    Scene("white", "circle", "right", 2), Scene("red", "triangle", "left", 1), Scene("green", "circle", "top", 2),
    Scene("blue", "square", "bottom", 1), Scene("purple", "circle", "right", 2),
]  # fmt: skip


def train(output: Path) -> dict[str, float]:
    """The three commands of the recipes' header, timed; returns seconds per stage."""
    vqar = [sys.executable, "-m", "vqar"]
    stages = {
        "tokenizer": [*vqar, "train-tokenizer", str(REPO / "recipes/shapes-text-cpu.yaml"),
                      "--output_dir", str(output / "tokenizer-run")],
        "tokenize": [*vqar, "tokenize", "--tokenizer", str(output / "tokenizer-run/tokenizer"), "--data", "shapes",
                     "--output", str(output / "tokens")],
        "prior": [*vqar, "train-prior", str(REPO / "recipes/shapes-text-prior-cpu.yaml"), "--tokens",
                  str(output / "tokens"), "--output_dir", str(output / "prior-run")],
    }  # fmt: skip
    seconds = {}
    for name, command in stages.items():
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name] / 60:.1f} min", flush=True)
    (output / "seconds.txt").write_text(repr(seconds))
    return seconds


def reconstruction_ceiling(tokenizer, scenes: list[Scene]) -> dict[str, float]:
    """The detector on the tokenizer's reconstructions of real renders: what the codes carry."""
    images = [render(scene, np.random.default_rng([7, i])) for i, scene in enumerate(scenes)]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        reconstructions = tokenizer.decode(tokenizer.encode(pixels)).clamp(-1, 1)
    return accuracy(detect(reconstructions), scenes)


def sample_grid(prior, tokenizer, layout, text, path: Path, per_prompt: int = 6) -> list[str]:
    """Four seen and four held-out prompts (colours, shapes, halves and counts spread), `per_prompt`
    samples each at CFG 2, a row per prompt."""
    prompts = [scene.canonical_prompt() for scene in GRID_SCENES]
    asked = [p for p in prompts for _ in range(per_prompt)]
    images = generate_images(prior, tokenizer, layout, asked, SamplingConfig(cfg_scale=2.0, seed=0), text=text)
    rows = list(images.split(per_prompt))
    image_grid(rows, labels=[("held out: " if i >= 4 else "") + p for i, p in enumerate(prompts)]).save(path)
    return prompts


def padding_speed(prior, layout, text, count: int = 64) -> dict[str, float]:
    """Images/s of mixed-length prompts as one left-padded batch, and as a batch per prompt length."""
    scenes = [Scene(*attrs) for attrs in (("red", "circle", "left", 1), ("white", "square", "top", 2))]
    rng = np.random.default_rng(0)
    captions = [scenes[i % 2].caption(rng) for i in range(count)]
    lengths = [len(ids) for ids in text.encode(captions)]
    sampling = SamplingConfig(cfg_scale=2.0, seed=0)

    def padded():
        generate_ids(prior, layout, build_prompts(layout, texts=captions, text=text), sampling)

    def grouped():
        for length in sorted(set(lengths)):
            group = [c for c, n in zip(captions, lengths) if n == length]
            generate_ids(prior, layout, build_prompts(layout, texts=group, text=text), sampling)

    seconds = interleaved_best_seconds({"padded": padded, "grouped": grouped}, repeats=3)
    return {name: count / s for name, s in seconds.items()} | {"lengths": len(set(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/bench-prompts")
    parser.add_argument("--images", type=int, default=96, help="prompts per group (seen, held-out) and CFG scale")
    parser.add_argument("--reuse", action="store_true", help="show a run made at another commit (said as reused)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    output = Path(args.output)
    made_at = reusable_run(output, args.reuse)
    if made_at is None:
        seconds = train(output)
        mark_run(output)
    else:
        seconds = eval((output / "seconds.txt").read_text())  # noqa: S307 (our own repr of a dict of floats)
    reused = reused_from(made_at)
    print(header("prompt_following", reused is None, reused))
    folder = output / "prior-run" / "prior"
    prior, layout = load_prior(str(folder))
    tokenizer, text = load_tokenizer_for(str(folder), layout).eval(), load_text_tokenizer(folder, layout)
    load_source("shapes")  # drawn once here, not inside a timing

    minutes = sum(seconds.values()) / 60
    timing = Table("prompt_following", "Training the shapes text recipes", ["stage", "minutes"])
    for name, value in seconds.items():
        timing.add([name, f"{value / 60:.1f}"], reused_from=reused)
    timing.add(["all", f"{minutes:.1f}"], reused_from=reused)
    timing.print()
    timing.save("timing")

    start = time.perf_counter()
    rows = prompt_following(prior, tokenizer, layout, text, num_images=args.images, cfg_scales=SCALES)
    sampled = time.perf_counter() - start
    table = Table(
        "prompt_following",
        "Prompt following on shapes (detector accuracy per attribute)",
        ["prompts", "CFG", *ATTRIBUTES, "all four", "of the ceiling (colour, position)"],
        notes=f"{args.images} prompts per group and scale; sampled in {sampled:.0f} s",
    )
    ceilings = {r["combinations"]: r for r in rows if r.get("source") == "detector on real images"}
    for row in rows:
        group = row["combinations"]
        scale = row.get("source") or f"{row['cfg_scale']:g}"
        share = ""
        if row.get("source") is None:
            ceiling = ceilings[group]
            share = f"{row['colour'] / ceiling['colour']:.2f}, {row['position'] / ceiling['position']:.2f}"
        table.add([group, scale, *(f"{row[a]:.2f}" for a in (*ATTRIBUTES, "all")), share], reused_from=None)
    for group, held_out in (("seen", False), ("held-out", True)):
        decoded = reconstruction_ceiling(tokenizer, evaluation_scenes(held_out, args.images))
        cells = [f"{decoded[a]:.2f}" for a in (*ATTRIBUTES, "all")]
        table.add([group, "detector on the tokenizer's reconstructions", *cells, ""], reused_from=None)
    table.print()
    table.save("accuracy")
    seen_at_4 = next(r for r in rows if r["combinations"] == "seen" and r["cfg_scale"] == 4.0)
    record(
        "prompt following",
        "seen colour accuracy at CFG 4",
        seen_at_4["colour"],
        "",
        "ceiling",
        ceilings["seen"]["colour"],
    )
    record(
        "prompt following",
        "seen position accuracy at CFG 4",
        seen_at_4["position"],
        "",
        "ceiling",
        ceilings["seen"]["position"],
    )

    prompts = sample_grid(prior, tokenizer, layout, text, output / "prompt_grid.png")
    print(f"sample grid: {output / 'prompt_grid.png'} (rows: {'; '.join(prompts)})")

    speed = padding_speed(prior, layout, text)
    padding = Table("prompt_following", "Mixed-length prompts: one left-padded batch or a batch per length",
                    ["batching", "images/s", "ratio"],
                    notes=f"64 prompts of {speed['lengths']} lengths, CFG 2, best of 3 timed in turn")  # fmt: skip
    padding.add(["one left-padded batch", f"{speed['padded']:.1f}", f"{speed['padded'] / speed['grouped']:.2f}x"])
    padding.add(["a batch per length", f"{speed['grouped']:.1f}", "1.00x"])
    padding.print()
    padding.save("padding")
    record(
        "text prompts",
        "mixed lengths, left-padded batch",
        speed["padded"],
        "img/s",
        "per-length batches",
        speed["grouped"],
    )


if __name__ == "__main__":
    main()  # its tables record themselves (Table.save), the training rows with where they were made
