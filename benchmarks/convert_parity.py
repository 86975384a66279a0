"""Converted tokenizers against their original code: the same indices, the same pixels, no slower.

    python benchmarks/convert_parity.py --taming DIR --llamagen DIR --seed-voken DIR [--images 2] [--repeats 6]

The three DIRs are checkouts of taming-transformers, LlamaGen and SEED-Voken (Open-MAGVIT2 and
IBQ); the script imports each one's own model code from there (nothing of it is in vqar), builds
every published configuration at 256 px with random weights (each codebook set from encoder
outputs, so codes are used as they would be), saves the checkpoint in that project's format
(Lightning-style `state_dict` with discriminator tensors and, for SEED-Voken, EMA weights; LlamaGen's
`{"model": ...}`), converts it with `vqar convert`, and compares on random images:

- indices equal: the share of tokens whose index is the same (a differing one should only occur
  where the two nearest codes are tied to within float rounding);
- pixels: the largest difference of decoding the same indices, over the largest output value;
- encode and decode images/s of each, fp32, best of `--repeats` calls timed in turn with the
  original's (the order reversed every round): the two run the same convolutions, so what
  separates them is a few per cent, and a shared machine drifts by more than that between
  separately timed runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from summary import interleaved_best_seconds, record, recorded

from vqar import TokenizerConfig, VQTokenizer
from vqar.convert import ConvertArgs, convert

DDCONFIG = dict(double_z=False, in_channels=3, out_ch=3, ch=128, resolution=256, dropout=0.0)


def fields(config: TokenizerConfig) -> dict:
    return {name: getattr(config, name) for name in TokenizerConfig.__annotations__}


def use_checkout(path: str):
    if path not in sys.path:
        sys.path.insert(0, path)


def codebook_from_latents(codebook: torch.Tensor, latents: torch.Tensor) -> None:
    """Set a codebook [K, D] to encoder outputs [M, D] (with noise): codes where latents are."""
    with torch.no_grad():
        picks = latents[torch.randint(0, len(latents), (len(codebook),))]
        codebook.copy_(picks + 0.05 * picks.std() * torch.randn_like(picks))


# -- the originals, as each project composes its encode and decode ------------------------------


class Taming(torch.nn.Module):
    """taming's VQModel without its Lightning shell: encoder, quant_conv, VectorQuantizer2, post_quant_conv, decoder."""

    def __init__(
        self, root: str, n_embed: int, embed_dim: int = 256, z_channels: int = 256, blocks: int = 2, ibq=False
    ):
        super().__init__()
        use_checkout(root)
        package = "src.IBQ.modules" if ibq else "taming.modules"
        model = importlib.import_module(f"{package}.diffusionmodules.model")
        quantize = importlib.import_module(f"{package}.vqvae.quantize")
        config = dict(
            DDCONFIG, z_channels=z_channels, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=blocks, attn_resolutions=[16]
        )
        self.encoder, self.decoder = model.Encoder(**config), model.Decoder(**config)
        if ibq:
            self.quantize = quantize.IndexPropagationQuantize(n_embed, embed_dim, 0.25, False)
        else:
            self.quantize = quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)

    def latents(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        h = self.latents(x)
        indices = self.quantize(h)[2][2]
        return indices.reshape(len(x), *h.shape[-2:])

    def decode(self, indices):
        B, h, w = indices.shape
        codes = self.quantize.get_codebook_entry(indices.flatten(), (B, h, w, self.quant_conv.out_channels))
        return self.decoder(self.post_quant_conv(codes))

    def codebook(self):
        return self.quantize.embedding.weight


class LlamaGen(torch.nn.Module):
    def __init__(self, root: str, name: str):
        super().__init__()
        use_checkout(root)
        self.model = importlib.import_module("tokenizer.tokenizer_image.vq_model").VQ_models[name]()

    def latents(self, x):
        return torch.nn.functional.normalize(self.model.quant_conv(self.model.encoder(x)), dim=1)

    def encode(self, x):
        quant, _, (_, _, indices) = self.model.encode(x)
        return indices.reshape(len(x), *quant.shape[-2:])

    def decode(self, indices):
        B, h, w = indices.shape
        return self.model.decode_code(indices.flatten(), (B, self.model.config.codebook_embed_dim, h, w))

    def codebook(self):
        return self.model.quantize.embedding.weight


class OpenMAGVIT2(torch.nn.Module):
    def __init__(self, root: str):
        super().__init__()
        use_checkout(root)
        model = importlib.import_module("src.Open_MAGVIT2.modules.diffusionmodules.improved_model")
        lfq = importlib.import_module("src.Open_MAGVIT2.modules.vqvae.lookup_free_quantize")
        config = {k: v for k, v in DDCONFIG.items() if k != "dropout"} | dict(
            z_channels=18, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4
        )
        self.encoder, self.decoder = model.Encoder(**config), model.Decoder(**config)
        self.quantize = lfq.LFQ(dim=18, codebook_size=2**18)

    def encode(self, x):
        h = self.encoder(x)
        return self.quantize(h)[2].reshape(len(x), *h.shape[-2:])

    def decode(self, indices):
        B, h, w = indices.shape
        codes = self.quantize.get_codebook_entry(indices.reshape(B, h * w), (B, h, w, 18), order=None)
        return self.decoder(codes)


# -- one comparison -----------------------------------------------------------------------------


def lightning_checkpoint(model: torch.nn.Module, ema: bool) -> dict:
    """The state dict as a SEED-Voken / taming Lightning checkpoint holds it: the model, GAN tensors and EMA."""
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # dropped by the converter
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    if ema:  # LitEma: every parameter under its name without dots; the originals evaluate these
        for name, p in model.named_parameters():
            state[f"model_ema.{name.replace('.', '')}"] = p.detach() + 0.01 * torch.randn_like(p)
        state["model_ema.num_updates"] = torch.tensor(1000)
    return {"state_dict": state}


def apply_ema(model: torch.nn.Module, checkpoint: dict) -> None:
    """What the originals' `ema_scope()` does before they evaluate: the EMA weights into the model."""
    state = checkpoint["state_dict"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[f"model_ema.{name.replace('.', '')}"])


@torch.inference_mode()
def compare(name: str, original, source: str, preset: str, images: torch.Tensor, repeats: int, ema=False) -> dict:
    original.eval()
    if hasattr(original, "codebook"):  # codes where the encoder's outputs are
        latents = original.latents(images).permute(0, 2, 3, 1).reshape(-1, original.codebook().shape[1])
        codebook_from_latents(original.codebook(), latents)
    checkpoint = lightning_checkpoint(original, ema) if source != "llamagen" else {"model": original.model.state_dict()}
    if ema:
        apply_ema(original, checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(checkpoint, Path(folder) / "original.ckpt")
        convert(ConvertArgs(source=source, checkpoint=str(Path(folder) / "original.ckpt"), output=f"{folder}/vqar"))
        converted = VQTokenizer.from_pretrained(f"{folder}/vqar").eval()
    assert fields(converted.config) == fields(VQTokenizer.from_preset(preset).config), (
        f"{name}: not the preset's config"
    )
    ours, theirs = converted.encode(images), original.encode(images)
    pixels_ours, pixels_theirs = converted.decode(theirs), original.decode(theirs)
    scale = pixels_theirs.abs().max().item()
    seconds = interleaved_best_seconds(
        {
            ("encode", "vqar"): lambda: converted.encode(images),
            ("encode", "original"): lambda: original.encode(images),
            ("decode", "vqar"): lambda: converted.decode(theirs),
            ("decode", "original"): lambda: original.decode(theirs),
        },
        repeats,
    )
    row = {
        "model": name,
        "indices_equal": (ours == theirs).float().mean().item(),
        "pixel_difference": (pixels_ours - pixels_theirs).abs().max().item() / scale,
        **{what: [len(images) / seconds[what, who] for who in ("vqar", "original")] for what in ("encode", "decode")},
    }
    print(
        f"| {name} | {row['indices_equal']:.4%} | {row['pixel_difference']:.2e} | {row['encode'][0]:.2f} | "
        f"{row['encode'][1]:.2f} | {row['encode'][0] / row['encode'][1]:.2f}x | {row['decode'][0]:.2f} | "
        f"{row['decode'][1]:.2f} | {row['decode'][0] / row['decode'][1]:.2f}x |",
        flush=True,
    )
    for what in ("encode", "decode"):
        record("converted tokenizer", f"{name} {what}", row[what][0], "img/s", "original code", row[what][1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taming", help="a taming-transformers checkout")
    parser.add_argument("--llamagen", help="a LlamaGen checkout")
    parser.add_argument("--seed-voken", help="a SEED-Voken checkout (Open-MAGVIT2, IBQ)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--only", help="comma-separated words of the rows to run, e.g. 'IBQ' or 'VQ-16,2^18'")
    args = parser.parse_args()
    if not (args.taming and args.llamagen and args.seed_voken):  # `make bench` runs every script bare
        print("convert_parity: give --taming, --llamagen and --seed-voken checkouts to compare against")
        return
    transformers.utils.logging.disable_progress_bar()  # save/load bars would break the table
    torch.manual_seed(0)
    images = torch.rand(args.images, 3, 256, 256) * 2 - 1
    print(f"{args.images} random 256 px images, fp32, {torch.get_num_threads()} threads\n")
    print(
        "| model | indices equal | max pixel difference / max pixel | vqar encode img/s | original | ratio | "
        "vqar decode img/s | original | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    models = [
        ("taming VQGAN f16-1024", lambda: Taming(args.taming, 1024), "taming", "taming-vqgan-f16-1024", False),
        ("taming VQGAN f16-16384", lambda: Taming(args.taming, 16384), "taming", "taming-vqgan-f16-16384", False),
        ("LlamaGen VQ-16", lambda: LlamaGen(args.llamagen, "VQ-16"), "llamagen", "llamagen-vq16", False),
        ("LlamaGen VQ-8", lambda: LlamaGen(args.llamagen, "VQ-8"), "llamagen", "llamagen-vq8", False),
        ("Open-MAGVIT2 2^18", lambda: OpenMAGVIT2(args.seed_voken), "open-magvit2", "open-magvit2-256-2p18", True),
        ("IBQ 2^14", lambda: Taming(args.seed_voken, 16384, blocks=4, ibq=True), "ibq", "ibq-256-2p14", True),
        ("IBQ 2^18", lambda: Taming(args.seed_voken, 2**18, blocks=4, ibq=True), "ibq", "ibq-256-2p18", True),
    ]
    if args.only:
        models = [m for m in models if any(word.strip() in m[0] for word in args.only.split(","))]
    for name, build, source, preset, ema in models:
        torch.manual_seed(0)
        compare(name, build(), source, preset, images, args.repeats, ema)


if __name__ == "__main__":
    with recorded("convert_parity"):
        main()
