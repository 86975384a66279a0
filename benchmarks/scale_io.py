"""Data at scale on this machine: tokenize throughput, and memory flat in the number of images.

    python benchmarks/scale_io.py [--small 20000 --large 200000] [--evaluate-images 5000] [--parts memory,...]

1. `vqar tokenize` of 20,000 16 px digits from a parquet file (PNG bytes decoded in a DataLoader
   worker, Arrow shards written) against the tokenizer's own `encode` of the same images already
   in memory, same batch size: tokenize images/s / encode images/s (target >= 0.8).
2. Peak memory of `vqar tokenize` and of `vqar train-prior` (50 steps, held-out evaluation included)
   on 20,000 and on 200,000 images, no DataLoader workers so that all of it is counted: the growth
   from the one to the other (target <= 60 MB). Twice: the whole process (Linux VmHWM, which also
   counts the pages of memory-mapped token and Arrow files it read: cache the kernel takes back when
   it needs it), and the anonymous memory the process holds itself (RssAnon, sampled every 10 ms).
3. Peak memory of `vqar evaluate` on 5,000 structured 256 px images (target <= 2 GB).

Each measurement runs in a fresh child process (`--one`), one at a time: nothing else may share
the two cores while it runs. The tokenizer is the quickstart's (fsq-cpu, f2, 125 codes), untrained:
speed and memory do not depend on its weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from summary import recorded

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "outputs" / "bench-scale-io"
TOKENIZER = {"channel_multipliers": [1, 2], "latent_channels": 3, "quantizer": {"kind": "fsq", "levels": [5, 5, 5]}}


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every 10 ms on a thread: the memory the process itself
    holds. VmHWM also counts the pages of memory-mapped files it has read (token shards, a dataset's
    Arrow cache), which the kernel drops when it needs the memory; this does not."""

    def __init__(self):
        import threading

        self.peak, self.running = 0.0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
            time.sleep(0.01)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def digits_parquet(count: int) -> Path:
    """`count` digits (the 1,797 bundled ones, repeated, each copy shifted by a pixel or two) as PNG rows."""
    path = WORK / f"digits-{count}.parquet"
    if path.is_file():
        return path
    import datasets
    from PIL import Image

    from vqar.data import load_source

    digits = load_source("digits").cast_column("image", datasets.Image())
    base = [np.asarray(row["image"]) for row in digits]
    labels = digits["label"]

    def rows():
        for i in range(count):
            j = i % len(base)
            shifted = np.roll(base[j], shift=(i // len(base)) % 3 - 1, axis=1)
            yield {"image": Image.fromarray(shifted), "label": labels[j]}

    features = datasets.Features({"image": datasets.Image(), "label": digits.features["label"]})
    WORK.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_generator(rows, features=features).to_parquet(str(path))
    return path


def tokenizer_folder() -> Path:
    folder = WORK / "tokenizer"
    if not (folder / "config.json").is_file():
        from vqar import TokenizerConfig, VQTokenizer
        from vqar.tokenizer import load_preset

        torch.manual_seed(0)
        VQTokenizer(TokenizerConfig(**{**load_preset("fsq-cpu"), "resolution": 16, **TOKENIZER})).save_pretrained(
            folder
        )
    return folder


# -- one measurement per child process ---------------------------------------------------------


def one_throughput(count: int, batch: int, workers: int, rounds: int = 3) -> dict:
    """In one process, in turn: the tokenizer's own `encode` of the images already decoded in memory, and
    `vqar tokenize` of the same parquet file from scratch; the best of `rounds` of each (this machine's
    speed drifts by half between minutes: only interleaved figures compare)."""
    import shutil

    from summary import interleaved_best_seconds

    from vqar import VQTokenizer
    from vqar.data import ImageDataset, collate_images, load_source
    from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset

    tokenizer = VQTokenizer.from_pretrained(tokenizer_folder()).eval()
    source = load_source(str(digits_parquet(count)))
    dataset = ImageDataset(source, tokenizer.image_transform())
    pixels = collate_images(dataset.__getitems__(list(range(len(dataset)))))["pixels"]
    output = WORK / "tokens-throughput"

    def encode():
        with torch.inference_mode():
            for chunk in pixels.split(batch):
                tokenizer.encode(chunk)

    def tokenize():
        shutil.rmtree(output, ignore_errors=True)
        args = TokenizeArgs(
            tokenizer=str(tokenizer_folder()), data=str(digits_parquet(count)), output=str(output),
            batch_size=batch, num_workers=workers, eval_fraction=0.01,
        )  # fmt: skip
        tokenize_dataset(args)

    seconds = interleaved_best_seconds({"encode": encode, "tokenize": tokenize}, rounds)
    return {name: count / value for name, value in seconds.items()}


def one_tokenize(count: int, batch: int, workers: int) -> dict:
    from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset

    output = WORK / f"tokens-{count}-{workers}"
    if output.exists():
        import shutil

        shutil.rmtree(output)
    args = TokenizeArgs(
        tokenizer=str(tokenizer_folder()), data=str(digits_parquet(count)), output=str(output),
        batch_size=batch, num_workers=workers, eval_fraction=0.01,
    )  # fmt: skip
    start = time.perf_counter()
    tokenize_dataset(args)
    return {"images_per_s": count / (time.perf_counter() - start), "peak_mib": peak_mib()}


def one_train_prior(count: int) -> dict:
    from vqar.training.recipes import TrainConfig
    from vqar.training.train_prior import PriorArgs, train_prior

    tokens = WORK / f"tokens-{count}-0"
    train = TrainConfig(
        output_dir=str(WORK / f"prior-{count}"), max_steps=50, batch_size=32, log_with="none", eval_every=0,
        save_every=0,
    )  # fmt: skip
    train_prior(PriorArgs(tokens=str(tokens), size="tiny", eval_samples=0, eval_batch_size=256), train)
    return {"peak_mib": peak_mib()}


def one_evaluate(count: int) -> dict:
    from gpu_check import structured_images

    from vqar import TokenizerConfig, VQTokenizer
    from vqar.evaluation import EvaluateArgs, evaluate_tokenizer
    from vqar.tokenizer import load_preset

    images = WORK / f"photos-{count}"
    if not images.is_dir():
        structured_images(images, count, 256)
    folder = WORK / "tokenizer-256"
    torch.manual_seed(0)
    VQTokenizer(TokenizerConfig(**{**load_preset("vq-cpu"), "resolution": 256})).save_pretrained(folder)
    start = time.perf_counter()
    evaluate_tokenizer(
        EvaluateArgs(tokenizer=str(folder), data=str(images), output=str(WORK / "report"), num_workers=0)
    )
    return {"images_per_s": count / (time.perf_counter() - start), "peak_mib": peak_mib()}


def child(*argv) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", *map(str, argv)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(args) -> None:
    """Peak memory of tokenize and train-prior at the small and the large count: the whole process (VmHWM)
    and what it holds itself (anonymous memory, sampled)."""
    memory = {}
    for count in (args.small, args.large):
        memory["tokenize", count] = child("tokenize", count, args.batch, 0)
        memory["prior", count] = child("prior", count)
    for kind, what in (("tokenize", "vqar tokenize"), ("prior", "vqar train-prior, 50 steps")):
        for key, how in (("peak_mib", "peak memory"), ("peak_anonymous_mib", "peak anonymous memory")):
            small, large = memory[kind, args.small][key], memory[kind, args.large][key]
            print(
                f"| {what}: {how} at {args.large:,} images | {large:,.0f} MiB | at {args.small:,}: {small:,.0f} MiB | "
                f"{large - small:+,.0f} MiB | <= +60 MB |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--evaluate-images", type=int, default=5000)
    parser.add_argument("--parts", default="throughput,memory,evaluate", help="which measurements, comma-separated")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, *rest = args.one
        functions = {"throughput": one_throughput, "tokenize": one_tokenize, "prior": one_train_prior}
        functions["evaluate"] = one_evaluate
        anonymous = AnonymousPeak()
        print(json.dumps(functions[kind](*map(int, rest)) | {"peak_anonymous_mib": anonymous.peak}))
        return
    torch.set_num_threads(2)
    parts = args.parts.split(",")
    for count in (args.small, args.large):
        digits_parquet(count)
    tokenizer_folder()
    print(f"\nData at scale on this machine ({', '.join(parts)}):\n")
    print("| measure | value | baseline | ratio | target |\n|---|---|---|---|---|")
    if "throughput" in parts:
        rates = child("throughput", args.small, args.batch, 1)
        encode, tokenize = rates["encode"], rates["tokenize"]
        print(
            f"| vqar tokenize, {args.small:,} 16 px digits from parquet (1 decoding worker; the whole command) | "
            f"{tokenize:,.0f} images/s | the tokenizer's encode of the same images in memory: {encode:,.0f} images/s "
            f"| {tokenize / encode:.2f} | >= 0.8 |"
        )
    if "memory" in parts:
        memory_rows(args)
    if "evaluate" not in parts:
        return
    evaluate = child("evaluate", args.evaluate_images)
    print(
        f"| vqar evaluate, {args.evaluate_images:,} images at 256 px: peak memory | {evaluate['peak_mib']:,.0f} MiB | "
        f"({evaluate['images_per_s']:.1f} images/s) | | <= 2,048 MiB |"
    )


if __name__ == "__main__":
    with recorded("scale_io"):
        main()
