"""The `vqar` command. Thin: it parses arguments and calls the library.

    vqar train-tokenizer RECIPE.yaml [--field value ...]
    vqar presets
    vqar demo [--output DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train_tokenizer(argv: list[str]) -> None:
    from .training.tokenizer import main

    main(argv)


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
    "presets": (_presets, "list the tokenizer presets"),
    "demo": (_demo, "the quickstart on bundled data"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
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
