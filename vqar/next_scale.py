"""Next-scale prediction (VAR, Tian et al. 2024) on a stock `transformers` causal LM.

A multiscale tokenizer gives each image's codes as maps at scales s_1 < ... < s_n, concatenated
coarse to fine (`vqar.tokenizer.multiscale`). The prior predicts all tokens of a scale at once,
given every coarser scale. Its input sequence, of 1 + sum(s_k^2) ids, is

    [condition | BOI x s_1^2 | scale 1's codes upsampled to s_2 x s_2 | ... | scale n-1's to s_n x s_n]

(nearest-neighbour upsampling of the code ids), and the output at every position of block k is
the distribution of the scale-k code at that place. A block-causal 4D attention mask lets each
position see the condition, every coarser block and the whole of its own block, never a finer
one; `position_ids` count the positions. So training is one forward pass per image, and sampling
one forward pass per scale with the KV cache (`vqar.samplers.decode_next_scale`).

A text prior's condition is a block of P ids (its left-padded caption and BOI) in place of the one
condition id: the pads are seen by no position (each sees itself only, so no row of the attention
is empty) and not counted by the positions.

`vqar.ar` (the layout, the loss) and `vqar.samplers` (the decode loop) use it; it uses only the
multiscale token layout itself (`scale_boundaries`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .layouts import scale_boundaries


@functools.cache
def _upsample_index(source: int, target: int) -> Tensor:
    """Nearest-neighbour upsampling of a source x source map to target x target, as the flat
    source position of every target position [target^2]."""
    positions = torch.arange(source * source, dtype=torch.float64).reshape(1, 1, source, source)
    return F.interpolate(positions, size=(target, target), mode="nearest").long().flatten()


def block_of_positions(scales: list[int], condition: int = 1) -> Tensor:
    """The block of every input position [condition + sum s^2]: 0 for the condition's, k for scale k's."""
    sizes = [condition] + [s * s for s in scales]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def block_causal_mask(scales: list[int], device=None, queries: slice = slice(None), condition: int = 1) -> Tensor:
    """Bool [1, 1, Q, K], True where the `queries` positions may attend, over every position up to
    the last query's block: a position sees the condition, the coarser blocks and its own block."""
    blocks = block_of_positions(scales, condition).to(device)
    query_blocks = blocks[queries]
    keys = blocks[: int((blocks <= query_blocks.max()).sum())]
    return (keys[None, :] <= query_blocks[:, None])[None, None]


def without_pads(allowed: Tensor, keep: Tensor, queries: slice = slice(None)) -> Tensor:
    """A block-causal mask [1, 1, Q, K] for rows whose inputs `keep` [B, >= K] says count (False at the
    left pads of a text condition) -> [B, 1, Q, K]: no position sees a pad; a pad sees itself only."""
    K = allowed.shape[-1]
    keep = keep[:, :K]
    query_index = torch.arange(K, device=keep.device)[queries]
    own = query_index[:, None] == torch.arange(K, device=keep.device)[None, :]  # [Q, K]
    pad_query = ~keep[:, query_index]  # [B, Q]
    return (allowed & keep[:, None, None, :]) | (own[None, None] & pad_query[:, None, :, None])


def as_attention_mask(model, allowed: Tensor, batch: int) -> Tensor:
    """A bool mask [1 or B, 1, Q, K] in the form the model's attention takes it, for `batch` rows:
    bool for SDPA and the other kernels, additive (0 or the float minimum) for "eager"."""
    config = model.module.config if hasattr(model, "module") else model.config  # accelerate's DDP wraps it
    if config._attn_implementation == "eager":
        allowed = torch.zeros(allowed.shape, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(torch.float32).min
        )
    return allowed.expand(batch, -1, -1, -1) if len(allowed) == 1 else allowed


def next_scale_inputs(scales: list[int], boi: int, conditions: Tensor, codes: Tensor) -> Tensor:
    """The model's input ids [B, P + sum s^2] for conditions [B] (P = 1; a text prior's: [B, P]) and the
    codes of the first whole scales [B, k tokens]: as many blocks as those codes determine (the
    condition, BOI block, then one upsampled block per known scale, up to scale n)."""
    ends = scale_boundaries(scales)
    known = ends.index(codes.shape[1])
    conditions = conditions[:, None] if conditions.ndim == 1 else conditions
    pieces = [conditions, torch.full((len(codes), scales[0] ** 2), boi, dtype=torch.long, device=codes.device)]
    for k in range(min(known, len(scales) - 1)):
        coarse = codes[:, ends[k] : ends[k + 1]]
        pieces.append(coarse[:, _upsample_index(scales[k], scales[k + 1]).to(codes.device)])
    return torch.cat(pieces, dim=1)


def next_scale_logits(
    model, scales: list[int], boi: int, conditions: Tensor, codes: Tensor, pad: int | None = None
) -> Tensor:
    """One forward pass over whole images: conditions [B] (or a text prior's [B, P], left-padded with
    `pad`), codes [B, sum s^2] -> the logits of every code given the coarser scales [B, sum s^2, V]
    (what training and the held-out NLL need)."""
    inputs = next_scale_inputs(scales, boi, conditions, codes[:, : scale_boundaries(scales)[-2]])
    condition = inputs.shape[1] - sum(s * s for s in scales)
    allowed = block_causal_mask(scales, inputs.device, condition=condition)
    positions = torch.arange(inputs.shape[1], device=inputs.device)[None].expand(len(inputs), -1)
    if pad is not None:
        keep = inputs != pad
        allowed, positions = without_pads(allowed, keep), (keep.long().cumsum(1) - 1).clamp_min(0)
    mask = as_attention_mask(model, allowed, len(inputs))
    return model(input_ids=inputs, attention_mask=mask, position_ids=positions).logits[:, condition:]
