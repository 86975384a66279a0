"""The `vqar` command. Thin: each subcommand parses its arguments into the library's own
dataclasses (HfArgumentParser, as the trainers do) and makes one library call.

Errors a user can fix (a wrong path, field or value, missing weights, no network) print one line
and exit with status 1; `--debug` or VQAR_DEBUG=1 shows the traceback. Tracebacks are for bugs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from transformers import HfArgumentParser

ABOUT = """vqar: discrete-token image generation.

Train an image tokenizer (VQ, FSQ, LFQ or BSQ bottleneck; a grid or 1D tokens), encode images
into tokens, optionally merge frequent token pairs (visual BPE), train an autoregressive prior
on the tokens (a stock transformers causal LM), and generate images from classes or from the
start of an image. Every command takes --help.

Your own images, four commands:
  vqar train-tokenizer --data DIR --output_dir runs/tokenizer
  vqar tokenize --tokenizer runs/tokenizer/tokenizer --data DIR --output runs/tokens
  vqar train-prior --tokens runs/tokens --output_dir runs/prior
  vqar generate --prior runs/prior/prior --output runs/samples"""

ALIASES = {"train-ar": "train-prior"}  # the command's first name


def _parse(command: str, description: str, types: tuple, argv: list[str]) -> tuple:
    parser = HfArgumentParser(types, prog=f"vqar {command}", description=description)
    return parser.parse_args_into_dataclasses(args=argv)


# -- the commands -------------------------------------------------------------------------------


def _train_tokenizer(argv: list[str]) -> None:
    from .losses import LossConfig
    from .training.recipes import TrainConfig, parse_recipe
    from .training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer

    types = (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)
    train_tokenizer(*parse_recipe(argv, types, prog="vqar train-tokenizer", description=COMMANDS["train-tokenizer"][1]))


def _train_prior(argv: list[str]) -> None:
    from .training.recipes import TrainConfig, parse_recipe
    from .training.train_prior import PriorArgs, train_prior

    train_prior(
        *parse_recipe(argv, (PriorArgs, TrainConfig), prog="vqar train-prior", description=COMMANDS["train-prior"][1])
    )


def _tokenize(argv: list[str]) -> None:
    from .training.encode_dataset import TokenizeArgs, tokenize_dataset

    (args,) = _parse("tokenize", TokenizeArgs.__doc__, (TokenizeArgs,), argv)
    manifest = tokenize_dataset(args)
    counts = ", ".join(f"{n} {name}" for name, n in manifest.num_images.items())
    print(f"{counts} images, {manifest.tokens_per_image} tokens each, in {args.output}")


def _train_bpe(argv: list[str]) -> None:
    from .bpe import TrainBPEArgs, train_bpe

    (args,) = _parse("train-bpe", TrainBPEArgs.__doc__, (TrainBPEArgs,), argv)
    stats = train_bpe(args.tokens, args.vocab_size, args.output)
    print(f"{stats['merges']} merges -> {args.output}/visual_bpe.json")
    print(
        f"mean tokens per image: {stats['tokens_per_image']} before; after: "
        f"{stats['train_mean_tokens_after']:.1f} (train), {stats['eval_mean_tokens_after']:.1f} (held out)"
    )


def _generate(argv: list[str]) -> None:
    from .generation import GenerateArgs, SamplingConfig, generate_to_folder

    args, sampling = _parse("generate", GenerateArgs.__doc__, (GenerateArgs, SamplingConfig), argv)
    paths = generate_to_folder(args, sampling)
    images = sum(p.endswith(".png") for p in paths)
    print(
        f"wrote {images} images, grid.png and codes.npy to {args.output}"
        if images
        else f"wrote codes.npy to {args.output}"
    )


def _evaluate_generation(argv: list[str]) -> None:
    from .samplers import SamplingConfig
    from .training.evaluate_generation import EvaluateGenerationArgs, evaluate_generation

    description = EvaluateGenerationArgs.__doc__
    args, sampling = _parse("evaluate-generation", description, (EvaluateGenerationArgs, SamplingConfig), argv)
    report = evaluate_generation(args, sampling)
    if report is not None:
        print((Path(args.output) / "report.md").read_text())
        print(
            f"wrote the samples (.npz, ADM format), reference_stats.npz, report.json, report.md and fid_vs_cfg.png to {args.output}"
        )


def _evaluate(argv: list[str]) -> None:
    from .evaluation import EvaluateArgs, evaluate_tokenizer, format_table

    (args,) = _parse("evaluate", EvaluateArgs.__doc__, (EvaluateArgs,), argv)
    report = evaluate_tokenizer(args)
    print(format_table(report))
    print(f"wrote report.json, report.md and samples.png to {args.output}")


def _push(argv: list[str]) -> None:
    from .hub import PushArgs, push_from_args

    (args,) = _parse("push", PushArgs.__doc__, (PushArgs,), argv)
    folders = push_from_args(args)
    print(("wrote " if args.dry_run else "uploaded ") + ", ".join(str(f) for f in folders))


def _convert(argv: list[str]) -> None:
    from .convert import ConvertArgs, convert

    (args,) = _parse("convert", ConvertArgs.__doc__, (ConvertArgs,), argv)
    print(f"wrote {convert(args)}: load it with VQTokenizer.from_pretrained")


def _presets(argv: list[str]) -> None:
    from .tokenizer.presets import describe_presets

    _parse("presets", "The tokenizer presets: `preset: NAME` in a recipe, or VQTokenizer.from_preset(NAME).", (), argv)
    print("| preset | layout | codes | tokens/image | parameters | what |")
    print("|---|---|---|---|---|---|")
    for p in describe_presets():
        print(
            f"| {p['name']} | {p['layout']} | {p['codes']:,} | {p['tokens_per_image']} at {p['resolution']} px | "
            f"{p['parameters'] / 1e6:.1f}M | {p['description']} |"
        )


def _demo(argv: list[str]) -> None:
    from .demo import DemoArgs, run_demo

    (args,) = _parse("demo", DemoArgs.__doc__, (DemoArgs,), argv)
    run_demo(args.output, args.recipes)


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "train-tokenizer": (
        _train_tokenizer,
        "train an image tokenizer: `vqar train-tokenizer [RECIPE.yaml] [--field value ...]`",
    ),
    "tokenize": (_tokenize, "encode images with a trained tokenizer into a tokens folder"),
    "train-bpe": (_train_bpe, "learn visual-BPE merges of frequent token pairs"),
    "train-prior": (
        _train_prior,
        "train the autoregressive prior: `vqar train-prior [RECIPE.yaml] [--field value ...]`",
    ),
    "generate": (_generate, "sample images from a trained prior"),
    "evaluate": (_evaluate, "rate, distortion and modelability report of a tokenizer (and prior)"),
    "evaluate-generation": (_evaluate_generation, "FID, IS, precision/recall of a prior's samples at CFG scales"),
    "push": (_push, "upload a tokenizer (and prior) to the Hub with model cards"),
    "convert": (_convert, "a published tokenizer (taming, LlamaGen, Open-MAGVIT2, IBQ) as a vqar folder"),
    "presets": (_presets, "list the tokenizer presets"),
    "demo": (_demo, "the quickstart on bundled digits"),
}


# -- running one, and what a user sees when it fails --------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, missing files or weights, or no network: one line, no traceback."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    from .training import TrainingStopped

    return ValueError, OSError, ImportError, StrictDataclassError, SafetensorError, TrainingStopped


def _message(error: BaseException) -> str:
    if error.__cause__ is not None and type(error).__name__.startswith("StrictDataclass"):
        error = error.__cause__  # the validator's own message, not the wrapper's
    return " ".join(str(error).split()) or type(error).__name__


def _quiet_libraries() -> None:
    """Our progress bars only: no 'Loading weights' / 'Writing model shards' / 'Map' bars on every command,
    no retry warnings from huggingface_hub."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per checkpoint file
    hub_logging.set_verbosity_error()  # no line per retry while the Hub is out of reach: vqar's error says it once


def _usage(unknown: str | None = None) -> None:
    width = max(map(len, COMMANDS))
    lines = [ABOUT, "", "commands:", *(f"  {name:{width}s}  {help}" for name, (_, help) in COMMANDS.items())]
    lines += ["", "options: --version; --debug (or VQAR_DEBUG=1) shows tracebacks"]
    if unknown:
        print(f"vqar: unknown command {unknown!r}; the commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VQAR_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"vqar {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        return _usage()
    command = ALIASES.get(argv[0], argv[0])
    if command not in COMMANDS:
        return _usage(unknown=argv[0])
    _quiet_libraries()
    try:
        COMMANDS[command][0](argv[1:])
    except KeyboardInterrupt:
        print(f"vqar {command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except _user_errors() as error:
        if debug:
            raise
        print(f"vqar {command}: error: {_message(error)}", file=sys.stderr)
        print("  (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
