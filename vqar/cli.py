"""The `vqar` command. Thin: it parses arguments and calls the library.

vqar train-tokenizer RECIPE.yaml [--field value ...]
vqar tokenize --tokenizer DIR --data SOURCE --output DIR
vqar train-bpe --tokens DIR --vocab-size N --output DIR
vqar train-prior RECIPE.yaml [--field value ...]     (also: train-ar)
vqar generate --prior DIR [--class C ...] [--prefix-image PNG --prefix-rows R] --output DIR
vqar evaluate --tokenizer DIR|HUB_ID [--prior DIR] --data SOURCE [--resolution N] --output DIR
vqar push --tokenizer DIR --repo-id NAME --report DIR [--private] [--prior DIR] [--dry-run --output DIR]
vqar presets
vqar demo [--output DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train_tokenizer(argv: list[str]) -> None:
    from .training.train_tokenizer import main

    main(argv)


def _train_prior(argv: list[str]) -> None:
    from .training.train_prior import main

    main(argv)


def _tokenize(argv: list[str]) -> None:
    from .training.encode_dataset import TokenizeArgs, tokenize_dataset

    parser = argparse.ArgumentParser(prog="vqar tokenize", description="Encode a dataset with a frozen tokenizer.")
    parser.add_argument("--tokenizer", required=True, help="trained tokenizer folder or Hub id")
    parser.add_argument("--data", required=True, help="digits | photos | folder | *.parquet | Hub id")
    parser.add_argument("--output", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column")
    parser.add_argument("--label-column")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = TokenizeArgs(**vars(parser.parse_args(argv)))
    manifest = tokenize_dataset(args)
    print(f"{manifest.num_images} images, {manifest.tokens_per_image} tokens each, in {args.output}")


def _train_bpe(argv: list[str]) -> None:
    from .bpe import train_bpe

    parser = argparse.ArgumentParser(prog="vqar train-bpe", description="Learn visual-BPE merges on tokens.")
    parser.add_argument("--tokens", required=True, help="a dataset written by `vqar tokenize`")
    parser.add_argument("--vocab-size", type=int, required=True, help="codebook size + number of merges")
    parser.add_argument("--output", required=True, help="folder for visual_bpe.json (e.g. the tokenizer's)")
    args = parser.parse_args(argv)
    stats = train_bpe(args.tokens, args.vocab_size, args.output)
    print(f"{stats['merges']} merges -> {args.output}/visual_bpe.json")
    print(
        f"mean tokens per image: {stats['tokens_per_image']} before; after: "
        f"{stats['train_mean_tokens_after']:.1f} (train), {stats['eval_mean_tokens_after']:.1f} (held out)"
    )


def _generate(argv: list[str]) -> None:
    from .ar import load_prior, load_prior_bpe
    from .data import save_images
    from .generation import SamplingConfig, build_prompts, generate_images, prefix_from_image
    from .tokenizer import VQTokenizer

    parser = argparse.ArgumentParser(prog="vqar generate", description="Sample images from a trained prior.")
    parser.add_argument("--prior", required=True, help="folder written by train-prior (OUTPUT/prior) or Hub id")
    parser.add_argument("--tokenizer", help="defaults to the tokenizer the prior was trained on")
    parser.add_argument("--class", dest="classes", action="append", help="class index or name; repeatable")
    parser.add_argument("--num-images", type=int, help="images per class, or in all when unconditional")
    parser.add_argument("--prefix-image", help="complete this image from its first token rows")
    parser.add_argument(
        "--prefix-rows",
        type=int,
        default=1,
        help="token rows of a grid tokenizer, or leading tokens of a 1d one, to keep",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    prior, layout = load_prior(args.prior)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer or layout.tokenizer).eval()
    layout.check_tokenizer(tokenizer)
    bpe = load_prior_bpe(args.prior, layout)
    prefix = prefix_from_image(tokenizer, args.prefix_image, args.prefix_rows) if args.prefix_image else None
    per_class = args.num_images or (1 if args.classes else 8)
    classes = [c for c in args.classes for _ in range(per_class)] if args.classes else None
    prompts = build_prompts(layout, classes=classes, num_images=None if classes else per_class, prefix=prefix, bpe=bpe)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.cfg_scale, args.seed)
    images = generate_images(prior, tokenizer, layout, prompts, sampling, bpe=bpe)
    save_images(images, args.output, rows=len(args.classes) if args.classes else 1)
    print(f"wrote {len(images)} images and grid.png to {args.output}")


def _evaluate(argv: list[str]) -> None:
    from .evaluation import EvaluateArgs, evaluate_tokenizer, format_table

    parser = argparse.ArgumentParser(prog="vqar evaluate", description="Rate, distortion and modelability report.")
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer folder or Hub id")
    parser.add_argument("--prior", help="a prior trained on this tokenizer: adds prior bits per image")
    parser.add_argument("--data", default="photos", help="digits | photos | image folder | parquet | Hub dataset id")
    parser.add_argument("--resolution", type=int, help="centre-crop and resize to N x N (default: the tokenizer's)")
    parser.add_argument("--holdout", type=float, help="evaluate only the hold-out training kept back (e.g. 0.25)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column")
    parser.add_argument("--label-column")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default="outputs/evaluate")
    args = parser.parse_args(argv)
    report = evaluate_tokenizer(EvaluateArgs(**{k.replace("-", "_"): v for k, v in vars(args).items()}))
    print(format_table(report))
    print(f"wrote report.json, report.md and samples.png to {args.output}")


def _push(argv: list[str]) -> None:
    from .hub import push

    parser = argparse.ArgumentParser(prog="vqar push", description="Upload a tokenizer (and prior) with model cards.")
    parser.add_argument("--tokenizer", required=True, help="a folder written by save_pretrained")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--report", required=True, help="a `vqar evaluate` output folder: the card's figures")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--prior", help="a prior folder, uploaded as REPO_ID-prior with a card linking the tokenizer")
    parser.add_argument("--dry-run", action="store_true", help="write the upload folder to --output, upload nothing")
    parser.add_argument("--output", default="outputs/push")
    args = parser.parse_args(argv)
    folders = push(args.tokenizer, args.repo_id, args.report, args.private, args.prior, args.dry_run, args.output)
    print(("wrote " if args.dry_run else "uploaded ") + ", ".join(str(f) for f in folders))


def _presets(argv: list[str]) -> None:
    from .tokenizer import list_presets, load_preset

    argparse.ArgumentParser(prog="vqar presets", description="List the tokenizer presets.").parse_args(argv)
    for name in list_presets():
        q = load_preset(name)["quantizer"]
        print(f"{name:16s} {q['kind']}")


def _demo(argv: list[str]) -> None:
    from .demo import run_demo

    parser = argparse.ArgumentParser(prog="vqar demo", description="Train on bundled data and report.")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--recipes", default="recipes", help="folder holding the demo recipes")
    args = parser.parse_args(argv)
    run_demo(args.output, args.recipes)


COMMANDS = {
    "train-tokenizer": (_train_tokenizer, "train a tokenizer from a YAML recipe"),
    "tokenize": (_tokenize, "encode a dataset with a trained tokenizer"),
    "train-bpe": (_train_bpe, "learn visual-BPE merges on a tokenized dataset"),
    "train-prior": (_train_prior, "train the autoregressive prior from a YAML recipe"),
    "generate": (_generate, "sample images from a trained prior"),
    "evaluate": (_evaluate, "rate-distortion-modelability report of a tokenizer"),
    "push": (_push, "upload a tokenizer (and prior) to the Hub with a model card"),
    "presets": (_presets, "list the tokenizer presets"),
    "demo": (_demo, "the quickstart on bundled data"),
}


ALIASES = {"train-ar": "train-prior"}  # the command's first name


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ALIASES:
        argv = [ALIASES[argv[0]], *argv[1:]]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\ncommands:\n" + "\n".join(f"  {name:16s} {help}" for name, (_, help) in COMMANDS.items()))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per checkpoint file
    command, handler_args = argv[0], argv[1:]
    COMMANDS[command][0](handler_args)


if __name__ == "__main__":
    main()
