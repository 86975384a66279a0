"""Converted LlamaGen GPTs against LlamaGen's own code: the same logits, the same greedy codes, no slower.

    python benchmarks/prior_parity.py --llamagen DIR [--sizes B,L,XL,XXL,3B] [--depth 4] [--repeats 3]

DIR is a checkout of LlamaGen; the script imports its GPT and its `generate()` from there (nothing
of it is in vqar), builds each published class-conditional size with random weights (every tensor
drawn, the output layer included, which LlamaGen's init zeroes), saves the checkpoint as LlamaGen
does (`{"model": ...}`), converts it with `vqar convert --from llamagen`, and compares:

- logits: the largest difference of the converted prior's logits from LlamaGen's forward over the
  same class and codes (a whole image's sequence), over the largest logit;
- greedy codes: the share of codes equal to LlamaGen's `generate()` with `sample_logits=False`
  (argmax), without CFG and at CFG 4, for `--greedy` images of the first size;
- sampling speed: images/s of vqar's default sampler (static cache) and of LlamaGen's `generate()` at
  equal settings (batch 8, CFG 4, top-k 2,000, the first size's whole grid), best of `--repeats`
  calls timed in turn, fp32 on this machine's CPU.

B and L are built at 256 px (16 x 16 codes), XL, XXL and 3B at 384 px (24 x 24), as published. Sizes
above `--full-depth-limit` parameters keep only their first `--depth` blocks (every block has the
same shape, so exactness is shown by any of them): two fp32 copies of XXL (1.4B) or 3B (3.1B) do
not fit beside each other in 24 GB.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from summary import interleaved_best_seconds, record, recorded

from vqar.ar import load_prior
from vqar.convert import ConvertArgs, convert
from vqar.generation import build_prompts, generate_ids
from vqar.samplers import SamplingConfig

# LlamaGen's class-conditional GPTs: (layers, heads, width) as its gpt.py builds them, and the
# image size each was published at (c2i_B_256.pt, c2i_L_256.pt, c2i_XL_384.pt, c2i_XXL_384.pt, c2i_3B_384.pt)
SIZES = {
    "B": (12, 12, 768, 256),
    "L": (24, 16, 1024, 256),
    "XL": (36, 20, 1280, 384),
    "XXL": (48, 24, 1536, 384),
    "3B": (24, 32, 3200, 384),
}
CODES, CLASSES, FACTOR = 16384, 1000, 16


def llamagen_gpt(checkout: str, size: str, depth: int | None) -> torch.nn.Module:
    """LlamaGen's own Transformer at a published size, random weights throughout, eval mode."""
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    gpt = importlib.import_module("autoregressive.models.gpt")
    layers, heads, width, image_size = SIZES[size]
    grid = image_size // FACTOR
    args = gpt.ModelArgs(
        n_layer=depth or layers, n_head=heads, dim=width, vocab_size=CODES, num_classes=CLASSES,
        block_size=grid * grid, cls_token_num=1, model_type="c2i", class_dropout_prob=0.1,
        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    model = gpt.Transformer(args)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.02)
    return model.eval()


def converted_prior(original: torch.nn.Module, image_size: int, heads: int, folder: Path):
    torch.save({"model": original.state_dict()}, folder / "gpt.pt")
    convert(
        ConvertArgs(
            source="llamagen", checkpoint=str(folder / "gpt.pt"), output=str(folder / "prior"),
            image_size=image_size, heads=heads,
        )
    )  # fmt: skip
    (folder / "gpt.pt").unlink()  # the checkpoint's memory and disk are needed for the next size
    return load_prior(str(folder / "prior"))


def logits_difference(original, prior, layout, grid: int) -> float:
    """max |ours - LlamaGen's| / max |LlamaGen's| over a whole image's sequence for two classes."""
    classes = torch.tensor([7, 981])
    codes = torch.randint(0, CODES, (2, grid * grid - 1))
    positions = torch.arange(grid * grid)
    theirs = original(codes, classes, input_pos=positions)[0]
    ids = torch.cat([layout.ids.class_token(classes)[:, None], codes], dim=1)
    ours = prior(input_ids=ids).logits[..., :CODES].float()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def llamagen_generate(checkout: str, original, classes: torch.Tensor, grid: int, cfg: float, **sampling):
    generate = importlib.import_module("autoregressive.models.generate").generate
    return generate(original, classes, grid * grid, cfg_scale=cfg, **sampling).reshape(len(classes), grid, grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen", help="a LlamaGen checkout")
    parser.add_argument("--sizes", default="B,L,XL,XXL,3B")
    parser.add_argument("--depth", type=int, default=4, help="blocks kept of the sizes above the limit")
    parser.add_argument("--full-depth-limit", type=float, default=1e9, help="parameters; above it --depth blocks")
    parser.add_argument("--greedy", type=int, default=4, help="images drawn greedily at each CFG scale")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.llamagen:  # `make bench` runs every script bare
        print("prior_parity: give --llamagen, a checkout of LlamaGen, to compare against")
        return
    transformers.utils.logging.disable_progress_bar()
    sizes = [s.strip() for s in args.sizes.split(",")]
    print(f"random weights, fp32, {torch.get_num_threads()} threads\n")
    print("| GPT | image size | blocks | parameters | max logit difference / max logit |")
    print("|---|---|---|---|---|")
    first = None
    for size in sizes:
        layers, heads, width, image_size = SIZES[size]
        full = 12 * layers * width**2 + 2 * CODES * width  # blocks plus embeddings, roughly
        depth = args.depth if full > args.full_depth_limit else None
        torch.manual_seed(0)
        original = llamagen_gpt(args.llamagen, size, depth)
        with tempfile.TemporaryDirectory() as folder:
            prior, layout = converted_prior(original, image_size, heads, Path(folder))
            difference = logits_difference(original, prior, layout, image_size // FACTOR)
            parameters = sum(p.numel() for p in original.parameters())
            print(
                f"| {size} | {image_size} | {depth or layers} of {layers} | {parameters / 1e6:,.0f}M | {difference:.1e} |"
            )
            if first is None:
                first = (size, original, prior, layout, image_size // FACTOR)
            else:
                del original, prior
    size, original, prior, layout, grid = first
    greedy_and_speed(args, size, original, prior, layout, grid)


def greedy_and_speed(args, size: str, original, prior, layout, grid: int) -> None:
    print(f"\n| GPT-{size}, greedy | codes equal to LlamaGen's generate() |\n|---|---|")
    classes = torch.tensor([1, 207, 388, 980][: args.greedy] + list(range(max(0, args.greedy - 4))))
    names = [layout.ids.class_names[c] for c in classes.tolist()]
    for cfg in (1.0, 4.0):
        theirs = llamagen_generate(args.llamagen, original, classes, grid, cfg, sample_logits=False, top_k=0)
        ours = generate_ids(
            prior, layout, build_prompts(layout, classes=names), SamplingConfig(temperature=0, cfg_scale=cfg)
        )
        share = (ours == theirs.to(ours.dtype)).float().mean().item()
        print(f"| CFG {cfg:g} | {share:.2%} |", flush=True)

    batch = torch.randint(0, CLASSES, (args.batch,), generator=torch.Generator().manual_seed(0))
    prompts = build_prompts(layout, classes=[layout.ids.class_names[c] for c in batch.tolist()])
    sampling = SamplingConfig(cfg_scale=4.0, top_k=2000, seed=0)
    start = time.perf_counter()
    seconds = interleaved_best_seconds(
        {
            "vqar": lambda: generate_ids(prior, layout, prompts, sampling),
            "llamagen": lambda: llamagen_generate(args.llamagen, original, batch, grid, 4.0, top_k=2000, top_p=1.0),
        },
        args.repeats,
    )
    ours, theirs = args.batch / seconds["vqar"], args.batch / seconds["llamagen"]
    print(
        f"\n| GPT-{size}, batch {args.batch}, CFG 4, top-k 2,000, {grid * grid} tokens | vqar images/s | "
        f"LlamaGen's generate() images/s | ratio |\n|---|---|---|---|\n"
        f"| sampling (best of {args.repeats}; {time.perf_counter() - start:.0f} s in all) | {ours:.3f} | "
        f"{theirs:.3f} | {ours / theirs:.2f}x |"
    )
    record("converted prior", f"GPT-{size} sampling", ours, "img/s", "LlamaGen generate()", theirs)


if __name__ == "__main__":
    with recorded("prior_parity"):
        with torch.no_grad():
            main()
