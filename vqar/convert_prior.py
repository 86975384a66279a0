"""LlamaGen's published priors as vqar priors: `vqar convert --from llamagen --checkpoint c2i_L_256.pt`.

LlamaGen (FoundationVision/LlamaGen) publishes class-conditional GPTs for ImageNet: B 111M, L 343M,
XL 775M, XXL 1.4B and 3B, at 256 px (16 x 16 codes of its VQ-16) and 384 px (24 x 24). A checkpoint
is a `{"model": state_dict}` pickle (or the bare state dict) with `tok_embeddings` (the codes),
`cls_embedding.embedding_table` (one row per class, and a last row for the "no class" of CFG),
`layers.N.attention.wqkv` (query, key and value rows stacked), `feed_forward.w1/w2/w3`, RMSNorms and
`output`. This reads one with the same refusals as the tokenizers' (`vqar.convert.read_state_dict`),
infers the size from the tensors, and writes a `LlamaGenForCausalLM` (`vqar.llamagen`) over vqar's
id space: codes keep their ids, each class row becomes that class's token, the extra row the null
class. The grid is not in the tensors (positions are computed): it is the image size (from the
file name, `_384`, or `--image-size`, default 256) over the tokenizer's factor (16).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from .ar import CONFIG_KEY, IDS_KEY, VocabLayout, plain_generation_config
from .layouts import GridLayout
from .llamagen import LlamaGenConfig, LlamaGenForCausalLM
from .provenance import TokenizerProvenance
from .vocab import IdSpace

# LlamaGen's GPT sizes by (width, layers): the name and the heads (not in the tensors: the head width is)
LLAMAGEN_GPTS = {
    (768, 12): ("B", 12),
    (1024, 24): ("L", 16),
    (1280, 36): ("XL", 20),
    (1536, 48): ("XXL", 24),
    (2560, 48): ("XXXL", 40),
    (3200, 24): ("3B", 32),
}
GPT_KEYS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "output.weight", "norm.weight")
LAYER_KEYS = (
    "attention.wqkv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)
VQ_FACTOR = 16  # LlamaGen's c2i GPTs model the tokens of its VQ-16


def is_llamagen_gpt(state: dict[str, Tensor]) -> bool:
    """A LlamaGen GPT checkpoint (rather than a VQ one)."""
    return "tok_embeddings.weight" in state and any(k.endswith("attention.wqkv.weight") for k in state)


def _layers(state: dict[str, Tensor]) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"the GPT checkpoint's layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def check_gpt(state: dict[str, Tensor], path: str | Path) -> int:
    """Refuse a checkpoint that is not a whole class-conditional LlamaGen GPT, naming what is off; returns its layers."""
    if "cls_embedding.uncond_embedding" in state or "cls_embedding.cap_proj.fc1.weight" in state:
        raise ValueError(f"{path} is a text-to-image LlamaGen GPT (t2i): only the class-conditional (c2i) ones convert")
    missing = [k for k in GPT_KEYS if k not in state]
    layers = _layers(state)
    missing += [f"layers.{i}.{k}" for i in range(layers) for k in LAYER_KEYS if f"layers.{i}.{k}" not in state]
    if missing or layers == 0:
        raise ValueError(f"{path} is not a whole LlamaGen GPT: it lacks {missing[:6] or ['every layer']}")
    known = set(GPT_KEYS) | {f"layers.{i}.{k}" for i in range(layers) for k in LAYER_KEYS} | {"freqs_cis"}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"{path} has {len(unknown)} tensor(s) a LlamaGen c2i GPT does not: {unknown[:6]}")
    return layers


def infer_gpt_config(
    state: dict[str, Tensor],
    path: str | Path,
    image_size: int | None = None,
    heads: int | None = None,
    factor: int = VQ_FACTOR,
) -> tuple[dict, str]:
    """The GPT's shape from its tensors (and its file name for the image size): (fields, size name)."""
    layers = check_gpt(state, path)
    codes, width = state["tok_embeddings.weight"].shape
    classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1  # the last row: CFG's "no class"
    name, known_heads = LLAMAGEN_GPTS.get((width, layers), (f"{width}x{layers}", None))
    heads = heads or known_heads
    if heads is None:
        raise ValueError(
            f"{path}: a GPT of width {width} and {layers} layers is none of LlamaGen's sizes "
            f"({', '.join(n for n, _ in LLAMAGEN_GPTS.values())}); give its heads with --heads"
        )
    qkv = state["layers.0.attention.wqkv.weight"].shape[0]
    kv_heads = (qkv - width) // 2 // (width // heads)
    image_size = image_size or (384 if re.search(r"_384\b|_384\.", Path(path).name) else 256)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of the tokenizer's factor {factor}")
    fields = dict(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0], codes=codes, classes=classes,
        grid=image_size // factor, image_size=image_size,
    )  # fmt: skip
    return fields, name


def _interleaved_to_halves(weight: Tensor, heads: int) -> Tensor:
    """Rows of a query/key projection, per head, from LlamaGen's interleaved rotary pairs (2k, 2k+1) to
    stock Llama's halves (k, k + d/2): the same dot products, so the same attention."""
    rows, width = weight.shape
    head_dim = rows // heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.reshape(heads, head_dim, width)[:, order].reshape(rows, width)


def gpt_weights(state: dict[str, Tensor], fields: dict, ids: IdSpace) -> dict[str, Tensor]:
    """LlamaGen's tensors under `LlamaGenForCausalLM`'s names, over vqar's id space."""
    width, codes, classes = fields["hidden_size"], fields["codes"], fields["classes"]
    embed = torch.zeros(ids.vocab_size, width, dtype=state["tok_embeddings.weight"].dtype)
    embed[:codes] = state["tok_embeddings.weight"]
    table = state["cls_embedding.embedding_table.weight"]
    embed[ids.first_condition : ids.first_condition + classes] = table[:classes]
    embed[ids.null_class] = table[classes]
    head = torch.zeros_like(embed)
    head[:codes] = state["output.weight"]  # logits of non-code ids are 0: samplers never draw them
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": state["norm.weight"]}
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = width // heads
    for i in range(fields["num_hidden_layers"]):
        ours, theirs = f"model.layers.{i}.", f"layers.{i}."
        q, k, v = state[theirs + "attention.wqkv.weight"].split([width, kv_heads * head_dim, kv_heads * head_dim])
        weights |= {
            ours + "self_attn.q_proj.weight": _interleaved_to_halves(q, heads),
            ours + "self_attn.k_proj.weight": _interleaved_to_halves(k, kv_heads),
            ours + "self_attn.v_proj.weight": v,
            ours + "self_attn.o_proj.weight": state[theirs + "attention.wo.weight"],
            ours + "mlp.gate_proj.weight": state[theirs + "feed_forward.w1.weight"],
            ours + "mlp.up_proj.weight": state[theirs + "feed_forward.w3.weight"],
            ours + "mlp.down_proj.weight": state[theirs + "feed_forward.w2.weight"],
            ours + "input_layernorm.weight": state[theirs + "attention_norm.weight"],
            ours + "post_attention_layernorm.weight": state[theirs + "ffn_norm.weight"],
        }
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def build_llamagen_prior(state: dict[str, Tensor], fields: dict, provenance: TokenizerProvenance):
    """(a `LlamaGenForCausalLM` holding the checkpoint's weights, its vqar layout)."""
    grid = fields["grid"]
    layout = VocabLayout(
        IdSpace(fields["codes"], 0, tuple(str(c) for c in range(fields["classes"]))),
        GridLayout(grid, grid),
        provenance,
        begin_of_image=False,
    )
    config = LlamaGenConfig(
        grid_size=grid,
        cls_token_num=1,
        vocab_size=layout.ids.vocab_size,
        hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"],
        num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields["num_key_value_heads"],
        max_position_embeddings=layout.codec.sequence_length,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=layout.ids.boi,
        eos_token_id=layout.ids.eoi,
        pad_token_id=layout.ids.pad,
    )
    setattr(config, CONFIG_KEY, layout.to_dict())
    setattr(config, IDS_KEY, layout.ids.special_ids())
    with torch.device("meta"):
        model = LlamaGenForCausalLM(config)
    weights = gpt_weights(state, fields, layout.ids)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = plain_generation_config(layout)
    return model.eval(), layout
