"""LlamaGen's class-conditional GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion") as a
transformers causal LM: the stock Llama with LlamaGen's 2D rotary positions.

LlamaGen's GPT is a Llama (RMSNorm, SwiGLU, no biases) whose rotary embedding is two-dimensional:
of a head's d/2 frequency pairs, the first d/4 turn with the image token's row and the last d/4
with its column, both at the frequencies 1 / base^(4k/d), k < d/4; the `cls_token_num` class
positions before the image get cos = sin = 0, which zeroes their queries and keys (their values
still count). Its pairs are interleaved (dims 2k, 2k+1); stock Llama rotates halves (k, k + d/2),
so `vqar.convert` permutes the rows of the query and key projections, which leaves every dot
product, and so every logit, as it was.

Nothing else differs, so `LlamaGenForCausalLM` is `LlamaForCausalLM` with `Rope2D` in place of the
1D rotary module: the same attention kernels, caches (dynamic, static), `generate()`, gradient
checkpointing and sharding. vqar's sequence for it is `[class, codes]` (no begin-of-image: the
class position predicts the first code, as LlamaGen trains it). This file imports only torch and
transformers: `save_pretrained` copies it beside the weights, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads a prior without vqar.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class LlamaGenConfig(LlamaConfig):
    """A Llama config with LlamaGen's 2D rotary positions: `grid_size` x `grid_size` image tokens after
    `cls_token_num` condition positions."""

    model_type = "vqar_llamagen"

    def __init__(self, grid_size: int = 16, cls_token_num: int = 1, **kwargs):
        self.grid_size, self.cls_token_num = grid_size, cls_token_num
        super().__init__(**kwargs)


def llamagen_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """The d/4 frequencies each of the two axes turns at: 1 / base^(4k/d) (LlamaGen's
    `precompute_freqs_cis_2d`: a half of the head for each axis, standard RoPE over that half)."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))


def llamagen_angles(positions: torch.Tensor, grid_size: int, cls_token_num: int, frequencies: torch.Tensor):
    """Positions [...] -> (angles [..., d/2], whether each position is an image token [...]): pair k < d/4
    turns by row * f_k, pair d/4 + k by column * f_k; condition positions have no angle (masked out)."""
    image = positions >= cls_token_num
    token = (positions - cls_token_num).clamp_min(0)
    row, column = (token // grid_size).float(), (token % grid_size).float()
    angles = torch.cat([row[..., None] * frequencies, column[..., None] * frequencies], dim=-1)
    return angles, image


class Rope2D(nn.Module):
    """LlamaGen's 2D rotary embedding in stock Llama's form: (cos, sin) [B, S, d] for `position_ids`
    [B, S], halves repeated as `rotate_half` reads them; cos = sin = 0 at the condition positions."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.grid_size, self.cls_token_num = config.grid_size, config.cls_token_num
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.base = config.rope_parameters["rope_theta"]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed here, not kept in a buffer: transformers builds models on the meta device and leaves
        # unsaved buffers uninitialised (d/4 numbers cost nothing to make)
        frequencies = llamagen_frequencies(self.head_dim, self.base).to(position_ids.device)
        angles, image = llamagen_angles(position_ids, self.grid_size, self.cls_token_num, frequencies)
        keep = image[..., None].float()
        emb = torch.cat([angles, angles], dim=-1)
        return (emb.cos() * keep).to(x.dtype), (emb.sin() * keep).to(x.dtype)


class LlamaGenForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` with LlamaGen's 2D rotary positions (see the module docstring)."""

    config_class = LlamaGenConfig

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.model.rotary_emb = Rope2D(config)


AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig)
AutoModelForCausalLM.register(LlamaGenConfig, LlamaGenForCausalLM)
LlamaGenConfig.register_for_auto_class()
LlamaGenForCausalLM.register_for_auto_class("AutoModelForCausalLM")
