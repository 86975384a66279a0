"""Published tokenizers -> vqar tokenizer folders: taming-transformers' VQGAN, LlamaGen's VQ-8 and
VQ-16, Open-MAGVIT2 and IBQ (SEED-Voken). The only module that reads other projects' formats.

    vqar convert --from llamagen --checkpoint vq_ds16_c2i.pt --output tokenizers/llamagen-vq16

A conversion reads the checkpoint without unpickling arbitrary objects (`weights_only`; a file
that needs them is refused, its types named, unless `trust_pickle`), infers the architecture
from the tensors' names and shapes (for the published models, the config of their preset),
builds that `VQTokenizer`, and fills every one of its tensors from the source — 1x1 quant convs
become the quantizer's linear maps, separate q/k/v convs one qkv conv — checking each shape.
Discriminator and LPIPS tensors are dropped and counted; any other tensor left over, or one
missing, is an error naming it. Open-MAGVIT2 and IBQ checkpoints hold EMA weights beside the
trained ones: those are what their authors evaluate, and what is converted (`ema`).
The folder then loads with `VQTokenizer.from_pretrained`, no conversion code involved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from torch import Tensor, nn
from transformers.hf_argparser import HfArg

from .convert_prior import VQ_FACTOR, build_llamagen_prior, infer_gpt_config, is_llamagen_gpt
from .devices import resolve_device
from .hub import PROVENANCE
from .provenance import TokenizerProvenance
from .tokenizer import TokenizerConfig, VQTokenizer
from .tokenizer.blocks import AttnBlock

logger = logging.getLogger(__name__)

SOURCES = ("taming", "llamagen", "open-magvit2", "ibq")
TRAINING_ONLY = ("loss.", "discriminator.", "perceptual_loss.", "lpips")  # GAN and LPIPS tensors of the source
BOOKKEEPING = ("quantize.codebook_used", "model_ema.num_updates", "model_ema.decay")  # not weights


@dataclass
class ConvertArgs:
    """Convert a published tokenizer checkpoint into a vqar tokenizer folder."""

    source: Literal["taming", "llamagen", "open-magvit2", "ibq"] = HfArg(
        aliases=["--from"], help="the project that wrote the checkpoint"
    )
    checkpoint: str = HfArg(help="the checkpoint: a Lightning .ckpt or a .pt holding `model` / `state_dict`")
    output: str = HfArg(help="the vqar tokenizer folder to write (config.json + model.safetensors)")
    config: str | None = HfArg(
        default=None, help="the source's model YAML (taming, SEED-Voken): its training resolution"
    )
    resolution: int = HfArg(default=256, help="the training resolution, without a YAML (all published models: 256)")
    ema: Literal["auto", "yes", "no"] = HfArg(
        default="auto", help="use the checkpoint's EMA weights (auto: when present)"
    )
    trust_pickle: bool = HfArg(
        default=False,
        help="WARNING: load a checkpoint that needs arbitrary Python objects; it can run any code. Only for files you trust",
    )
    device: str | None = HfArg(
        default=None,
        help="where the converted model encodes and decodes one image as a check (default: the best present)",
    )
    tokenizer: str | None = HfArg(
        default=None, help="LlamaGen GPTs: the converted tokenizer folder the prior decodes with (recorded, checked)"
    )
    image_size: int | None = HfArg(
        default=None,
        help="LlamaGen GPTs: the images' side it was trained at (default: 384 if the file name says _384, else 256)",
    )
    heads: int | None = HfArg(default=None, help="LlamaGen GPTs of other sizes than LlamaGen's: the attention heads")


# -- reading the checkpoint ---------------------------------------------------------------------


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The model tensors of a checkpoint: a Lightning `.ckpt` (`state_dict`), a `.pt` with `model`
    (LlamaGen) or `state_dict`, or a bare state dict; read with `weights_only` unless `trust_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise ValueError(f"cannot read checkpoint {path}: {not_torch}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # LlamaGen saves its args: plain values
            loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # truncated, damaged, or needs arbitrary objects
        raise _unreadable(path, error, trust_pickle) from error
    for key in ("state_dict", "model", "module"):  # Lightning, DDP, DeepSpeed (FSDP: the bare state dict)
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"checkpoint {path} holds no state dict of tensors (looked for `state_dict`, `model` and `module`)"
        )
    return loaded


def _not_a_torch_file(path: Path) -> str | None:
    """Why a file cannot be a torch checkpoint at all (torch.save writes a zip archive; before torch 1.6,
    a pickle), or None."""
    with open(path, "rb") as file:
        head = file.read(4)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # a zip archive, or a pickle's PROTO opcode
        return None
    if not head:
        return "the file is empty"
    if head[:2] == b"PK":
        return "it is a damaged or truncated zip archive (torch.save's format): download it again"
    return (
        f"it is not a torch checkpoint: neither a zip archive (what torch.save writes) nor a pickle; it starts "
        f"with the bytes {head.hex(' ')}"
    )


def _unreadable(path: Path, error: Exception, trust_pickle: bool = False) -> Exception:
    if trust_pickle or not isinstance(error, pickle.UnpicklingError):
        return ValueError(f"cannot read checkpoint {path}: it is damaged or truncated ({' '.join(str(error).split())})")
    try:
        types = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
    except Exception:  # noqa: BLE001 - naming the types is a courtesy; the refusal stands either way
        types = "unknown"
    return ValueError(
        f"checkpoint {path} needs arbitrary Python objects to load ({types}); vqar does not run them, since a "
        "pickle can run any code. If you trust the file, pass --trust-pickle"
    )


def _weights(state: dict[str, Tensor], ema: str) -> tuple[dict[str, Tensor], int, bool]:
    """(the weights to convert, how many training-only tensors were dropped, whether EMA weights were used)."""
    shadows = {k[len("model_ema.") :]: v for k, v in state.items() if k.startswith("model_ema.")}
    use_ema = bool(shadows) if ema == "auto" else ema == "yes"
    if use_ema and not shadows:
        raise ValueError("ema=yes, but the checkpoint holds no EMA weights (no model_ema.* tensors)")
    weights, dropped = {}, 0
    for name, value in state.items():
        if name.startswith(TRAINING_ONLY) or name.startswith(BOOKKEEPING) or name.startswith("model_ema."):
            dropped += not name.startswith("model_ema.")
            continue
        shadow = shadows.get(name.replace(".", ""))  # LitEma keeps each parameter under its name without dots
        weights[name] = shadow if use_ema and shadow is not None else value
    return weights, dropped, use_ema


# -- the architecture, from the tensors ---------------------------------------------------------


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(source: str, state: dict[str, Tensor], resolution: int = 256) -> TokenizerConfig:
    """The vqar config of a published tokenizer, read off its tensors' names and shapes."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; the sources: {', '.join(SOURCES)}")
    _require(state, ["encoder.conv_in.weight", "decoder.conv_out.weight"], source)
    if source == "open-magvit2":
        return _infer_magvit2(state, resolution)
    llamagen = source == "llamagen"
    level = "encoder.conv_blocks.{}.res.{}" if llamagen else "encoder.down.{}.block.{}"
    levels = _count(state, r"encoder\.conv_blocks\.(\d+)\." if llamagen else r"encoder\.down\.(\d+)\.")
    blocks = _count(
        state, (r"encoder\.conv_blocks\.0\.res\.(\d+)\." if llamagen else r"encoder\.down\.0\.block\.(\d+)\.")
    )
    channels = state["encoder.conv_in.weight"].shape[0]
    widths = [state[level.format(i, blocks - 1) + ".conv2.weight"].shape[0] for i in range(levels)]
    attention = "encoder.conv_blocks.{}.attn.0.q.weight" if llamagen else "encoder.down.{}.attn.0.q.weight"
    attn_resolutions = [resolution // 2**i for i in range(levels) if attention.format(i) in state]
    codebook = _require(state, ["quantize.embedding.weight"], source)[0]
    quantizer = {
        "kind": "ibq" if source == "ibq" else "vq",
        "implementation": "vqar",
        "codebook_size": codebook.shape[0],
        "code_dim": codebook.shape[1],
        "project": True,
        "commitment_weight": 0.25,
    }
    if llamagen:
        quantizer["use_cosine"] = True
    if source == "ibq":
        quantizer["entropy_weight"] = 0.05
    return TokenizerConfig(
        resolution=resolution,
        channels=channels,
        channel_multipliers=[w // channels for w in widths],
        num_res_blocks=blocks,
        attn_resolutions=attn_resolutions,
        mid_attention=True,
        dropout=0.0,
        latent_channels=state["encoder.conv_out.weight"].shape[0],
        quantizer=quantizer,
    )


def _infer_magvit2(state: dict[str, Tensor], resolution: int) -> TokenizerConfig:
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = state["encoder.conv_in.weight"].shape[0]
    widths = [state[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"].shape[0] for i in range(levels)]
    bits = state["encoder.conv_out.weight"].shape[0]  # one channel per bit of the code
    return TokenizerConfig(
        resolution=resolution,
        conv_backbone="magvit2",
        channels=channels,
        channel_multipliers=[w // channels for w in widths],
        num_res_blocks=blocks,
        attn_resolutions=[],
        mid_attention=False,
        dropout=0.0,
        latent_channels=bits,
        quantizer={
            "kind": "lfq",
            "implementation": "vqar",
            "codebook_size": 2**bits,
            "entropy_weight": 0.1,
            "commitment_weight": 0.25,
        },
    )


def _require(state: dict, names: list[str], source: str) -> list[Tensor]:
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"this is not a {source} tokenizer checkpoint: it lacks {missing}")
    return [state[name] for name in names]


# -- their names for our tensors ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one of our tensors comes from: their tensor names, and how they combine into ours."""

    names: tuple[str, ...]
    combine: str = "copy"  # "copy", "cat" (q, k, v -> qkv), or "squeeze" (a 1x1 conv2d -> a 1x1 conv1d)


def _block(ours: str, theirs: str, module: nn.Module) -> Iterator[tuple[str, Source]]:
    """The tensors of one residual or attention block: ours -> theirs."""
    for name, _ in module.named_parameters():
        leaf = name.split(".")[0]
        if isinstance(module, AttnBlock) and leaf == "qkv":
            suffix = name.split(".", 1)[1]
            yield f"{ours}.{name}", Source(tuple(f"{theirs}.{p}.{suffix}" for p in "qkv"), "cat")
        else:
            mapped = name.replace("shortcut", "nin_shortcut", 1) if leaf == "shortcut" else name
            yield f"{ours}.{name}", Source((f"{theirs}.{mapped}",))


def _levels(ours: str, levels: nn.ModuleList, their_level) -> Iterator[tuple[str, Source]]:
    """Levels of interleaved residual (and attention) blocks; `their_level(i, kind, j)` names theirs."""
    for i, level in enumerate(levels):
        counts = {"res": 0, "attn": 0}
        for k, module in enumerate(level):
            kind = "attn" if isinstance(module, AttnBlock) else "res"
            yield from _block(f"{ours}.{i}.{k}", their_level(i, kind, counts[kind]), module)
            counts[kind] += 1


def _plain(ours: str, theirs: str, module: nn.Module) -> Iterator[tuple[str, Source]]:
    for name, _ in module.named_parameters():
        yield f"{ours}.{name}", Source((f"{theirs}.{name}",))


def _quantizer_names(tokenizer: VQTokenizer) -> Iterator[tuple[str, Source]]:
    inner = tokenizer.quantizer.inner
    if hasattr(inner, "codebook"):
        yield "quantizer.inner.codebook", Source(("quantize.embedding.weight",))
    for ours, theirs in (("project_in", "quant_conv"), ("project_out", "post_quant_conv")):
        if isinstance(getattr(inner, ours, None), nn.Conv1d):
            yield f"quantizer.inner.{ours}.weight", Source((f"{theirs}.weight",), "squeeze")
            yield f"quantizer.inner.{ours}.bias", Source((f"{theirs}.bias",))


@dataclass(frozen=True)
class _Layout:
    """How one project names a taming-style encoder and decoder."""

    level: str  # a block of level i (vqar's order: the encoder's finest first, the decoder's coarsest first)
    downsample: str
    upsample: str
    mid: dict[str, str]
    decoder_finest_first: bool  # taming numbers decoder levels by resolution, LlamaGen in the order it runs them


TAMING = _Layout(
    "{part}.{group}.{i}.{kind}.{j}",
    "encoder.down.{i}.downsample",
    "decoder.up.{i}.upsample",
    {"block1": "mid.block_1", "attn": "mid.attn_1", "block2": "mid.block_2"},
    True,
)
LLAMAGEN = _Layout(
    "{part}.conv_blocks.{i}.{kind}.{j}",
    "encoder.conv_blocks.{i}.downsample",
    "decoder.conv_blocks.{i}.upsample",
    {"block1": "mid.0", "attn": "mid.1", "block2": "mid.2"},
    False,
)


def _taming_names(tokenizer: VQTokenizer, layout: _Layout) -> Iterator[tuple[str, Source]]:
    """taming-transformers (and IBQ, which keeps its encoder and decoder) or LlamaGen names."""
    enc, dec, L = tokenizer.encoder, tokenizer.decoder, len(tokenizer.encoder.levels)

    def theirs(part: str, i: int, kind: str, j: int) -> str:
        if part == "decoder" and layout.decoder_finest_first:
            i = L - 1 - i
        group, kind = ("down" if part == "encoder" else "up"), {"res": "block", "attn": "attn"}[kind]
        if layout is LLAMAGEN:
            kind = {"block": "res"}.get(kind, kind)
        return layout.level.format(part=part, group=group, i=i, kind=kind, j=j)

    for part, module in (("encoder", enc), ("decoder", dec)):
        for name in ("conv_in", "norm_out", "conv_out"):
            yield from _plain(f"{part}.{name}", f"{part}.{name}", getattr(module, name))
        for ours, their_mid in layout.mid.items():
            yield from _block(f"{part}.mid.{ours}", f"{part}.{their_mid}", getattr(module.mid, ours))
        yield from _levels(f"{part}.levels", module.levels, lambda i, kind, j, part=part: theirs(part, i, kind, j))
    for i, sample in enumerate(enc.downsamples):
        yield from _plain(f"encoder.downsamples.{i}", layout.downsample.format(i=i), sample)
    for j, sample in enumerate(dec.upsamples):
        yield from _plain(
            f"decoder.upsamples.{j}", layout.upsample.format(i=L - 1 - j if layout.decoder_finest_first else j), sample
        )
    yield from _quantizer_names(tokenizer)


def _magvit2_names(tokenizer: VQTokenizer) -> Iterator[tuple[str, Source]]:
    """Open-MAGVIT2's names: down.{i}.block.{j}, mid_block.{j}, up.{i} and adaptive.{i} finest first."""
    enc, dec, L = tokenizer.encoder, tokenizer.decoder, len(tokenizer.encoder.levels)
    for part, module in (("encoder", enc), ("decoder", dec)):
        for name in ("conv_in", "norm_out", "conv_out"):
            yield from _plain(f"{part}.{name}", f"{part}.{name}", getattr(module, name))
        for j, block in enumerate(module.mid):
            yield from _block(f"{part}.mid.{j}", f"{part}.mid_block.{j}", block)
    for i, level in enumerate(enc.levels):
        for j, block in enumerate(level):
            yield from _block(f"encoder.levels.{i}.{j}", f"encoder.down.{i}.block.{j}", block)
    for i, sample in enumerate(enc.downsamples):
        yield from _plain(f"encoder.downsamples.{i}", f"encoder.down.{i}.downsample", sample)
    for j, level in enumerate(dec.levels):
        for k, block in enumerate(level):
            yield from _block(f"decoder.levels.{j}.{k}", f"decoder.up.{L - 1 - j}.block.{k}", block)
        yield from _plain(f"decoder.adaptive_norms.{j}", f"decoder.adaptive.{L - 1 - j}", dec.adaptive_norms[j])
    for j, sample in enumerate(dec.upsamples):
        for name, _ in sample.named_parameters():  # conv.weight -> upsample.conv1.weight
            yield (
                f"decoder.upsamples.{j}.{name}",
                Source((f"decoder.up.{L - 1 - j}.upsample.{name.replace('conv', 'conv1', 1)}",)),
            )
    yield from _quantizer_names(tokenizer)


def source_names(source: str, tokenizer: VQTokenizer) -> dict[str, Source]:
    """For every tensor of the vqar tokenizer, the source tensors it is made of."""
    if source == "open-magvit2":
        names = _magvit2_names(tokenizer)
    else:
        names = _taming_names(tokenizer, LLAMAGEN if source == "llamagen" else TAMING)
    return dict(names)


# -- filling the tokenizer ----------------------------------------------------------------------


def _value(source: Source, state: dict[str, Tensor]) -> Tensor:
    tensors = [state[name] for name in source.names]
    if source.combine == "cat":
        return torch.cat(tensors)
    if source.combine == "squeeze":
        return tensors[0][..., 0]  # [out, in, 1, 1] -> [out, in, 1]
    return tensors[0]


def load_into(tokenizer: VQTokenizer, source: str, state: dict[str, Tensor]) -> None:
    """Copy the source tensors into the tokenizer, every shape checked, nothing left over or missing."""
    mapping = source_names(source, tokenizer)
    ours = tokenizer.state_dict()
    unmapped = sorted(set(ours) - set(mapping))
    if unmapped:  # a vqar tensor the source has no counterpart for: a bug in the mapping, not in the file
        raise RuntimeError(f"no {source} counterpart for {unmapped[:5]}")
    missing = sorted({name for s in mapping.values() for name in s.names} - set(state))
    if missing:
        raise ValueError(
            f"the {source} checkpoint lacks {len(missing)} tensor(s) this architecture needs: {missing[:8]}"
        )
    used = {name for s in mapping.values() for name in s.names}
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ValueError(
            f"the {source} checkpoint has {len(unexpected)} tensor(s) vqar does not know: {unexpected[:8]}"
        )
    filled = {}
    for name, where in mapping.items():
        value = _value(where, state)
        if value.shape != ours[name].shape:
            raise ValueError(
                f"tensor {' + '.join(where.names)} has shape {list(value.shape)}; the architecture read off the "
                f"checkpoint needs {list(ours[name].shape)} for {name}"
            )
        filled[name] = value.to(ours[name].dtype)
    tokenizer.load_state_dict(filled, strict=True)


# -- the conversion ----------------------------------------------------------------------------


def _yaml_resolution(path: str | None, source: str, default: int) -> int:
    """The training resolution from the source's model YAML (taming: model.params, SEED-Voken: model.init_args)."""
    if path is None:
        return default
    config = yaml.safe_load(Path(path).read_text()) or {}
    model = config.get("model", {})
    ddconfig = (model.get("params") or model.get("init_args") or {}).get("ddconfig")
    if not ddconfig or "resolution" not in ddconfig:
        raise ValueError(f"{path} is not a {source} model YAML: no model.params/init_args.ddconfig.resolution")
    return int(ddconfig["resolution"])


def convert_gpt(args: ConvertArgs, state: dict[str, Tensor]) -> Path:
    """A LlamaGen c2i GPT as a vqar prior folder (`vqar.convert_prior`), linked to `args.tokenizer` if given."""
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    factor = tokenizer.downsample_factor if tokenizer is not None else VQ_FACTOR
    fields, name = infer_gpt_config(state, args.checkpoint, args.image_size, args.heads, factor)
    provenance = TokenizerProvenance()
    if tokenizer is not None:
        _check_gpt_tokenizer(fields, tokenizer, args)
        provenance = TokenizerProvenance(str(Path(args.tokenizer).resolve()), tokenizer.fingerprint)
    prior, layout = build_llamagen_prior(state, fields, provenance)
    output = Path(args.output)
    prior.config.vqar_vocab = layout.saved_in(output).to_dict()
    prior.save_pretrained(output)
    digest = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    source = f"llamagen GPT-{name} checkpoint {Path(args.checkpoint).name} (sha256 {digest[:16]})"
    (output / PROVENANCE).write_text(json.dumps({"source": source, "image_size": fields["image_size"]}, indent=2))
    logger.info(
        "LlamaGen GPT-%s: %d classes, %d x %d codes of %d",
        name,
        fields["classes"],
        *[fields["grid"]] * 2,
        fields["codes"],
    )
    return output


def _check_gpt_tokenizer(fields: dict, tokenizer: VQTokenizer, args: ConvertArgs) -> None:
    """Refuse a tokenizer whose codes are not the GPT's, or whose resolution gives another grid, naming both."""
    grid, size = fields["grid"], fields["image_size"]
    if tokenizer.codebook_size != fields["codes"]:
        raise ValueError(
            f"the GPT {args.checkpoint} models {fields['codes']} codes, the tokenizer {args.tokenizer} has "
            f"{tokenizer.codebook_size}: link the VQ model LlamaGen trained it on"
        )
    theirs = tokenizer.config.resolution // tokenizer.downsample_factor
    if theirs != grid:
        raise ValueError(
            f"the GPT {args.checkpoint} models {grid} x {grid} codes ({size} px), the tokenizer {args.tokenizer} was "
            f"converted for {tokenizer.config.resolution} px ({theirs} x {theirs}): convert it with --resolution {size} "
            f"(or give the GPT's --image-size)"
        )


@torch.inference_mode()
def _check_runs(tokenizer: VQTokenizer, device) -> None:
    """One grey image through the converted model: a mapping that loads but does not run says so here."""
    side = tokenizer.config.resolution
    tokenizer.to(device).eval()
    codes = tokenizer.encode(torch.zeros(1, 3, side, side, device=device))
    tokenizer.decode(codes)
    tokenizer.to("cpu")


def convert(args: ConvertArgs) -> Path:
    """Convert `args.checkpoint` into a tokenizer folder (or, for a LlamaGen GPT, a prior folder) `args.output`;
    returns the folder."""
    state = read_state_dict(args.checkpoint, args.trust_pickle)
    if args.source == "llamagen" and is_llamagen_gpt(state):
        return convert_gpt(args, state)
    weights, dropped, used_ema = _weights(state, args.ema)
    config = infer_config(args.source, weights, _yaml_resolution(args.config, args.source, args.resolution))
    tokenizer = VQTokenizer(config)
    load_into(tokenizer, args.source, weights)
    tokenizer.quantizer.reset_derived_buffers()
    _check_runs(tokenizer, resolve_device(args.device))
    output = Path(args.output)
    tokenizer.save_pretrained(output)
    digest = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    provenance = {
        "source": f"{args.source} checkpoint {Path(args.checkpoint).name} (sha256 {digest[:16]})",
        "ema_weights": used_ema,
        "dropped_training_tensors": dropped,
    }
    (output / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    logger.info("dropped %d discriminator / LPIPS tensors; %s weights", dropped, "EMA" if used_ema else "trained")
    return output
