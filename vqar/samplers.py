"""The decode loops: prompt ids -> image ids, from a stock `transformers` causal LM.

`SamplingConfig.sampler` picks one; all three sample each image token from the same
distribution — the prior's logits restricted to image ids, guided (CFG), then temperature, top-k
and top-p — so they differ only in speed:

- "static" (the default): one KV cache allocated up front for the whole sequence (transformers'
  `StaticCache`), then one forward of one token per step, the logits sliced to the image ids
  before anything else is done with them. No `generate()` bookkeeping, no logits processors over
  the full vocabulary. Same seed, same ids as "generate".
- "generate": transformers' `generate()`, greedy over the one token a logits processor leaves
  possible after sampling it itself (`ImageTokenSampler`): the reference.
- "jacobi": speculative Jacobi decoding (Teng et al. 2024, arXiv 2410.01699): a window of draft
  tokens is checked in one forward pass, each accepted with probability min(1, p/q) (p the
  prior's distribution given the tokens before it, q the one the draft was drawn from), the first
  rejected one resampled from (p - q)+, so the images are distributed exactly as token-by-token
  sampling gives them; rejected positions get new drafts from the same pass. Rows of a batch
  advance together, by the fewest tokens any of them accepted (every kept token is still an exact
  sample). Raster code priors only.

Classifier-free guidance (Ho & Salimans 2022) runs batched in all three: conditional and
unconditional rows in one batch, one forward pass per step, both taking the same token.

A text prior's prompts are left-padded to the longest (`vqar.text`): every loop passes the rows'
attention mask (pads unseen) and position ids (pads uncounted), so a prompt samples the same
image alone or beside longer ones, and a batch of mixed lengths is one batch.

A next-scale prior over multiscale tokens (VAR) has a loop of its own, `decode_next_scale`: one
forward pass per scale, the KV cache holding the coarser scales, every token of a scale sampled
at once from the same transformed distribution.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, StaticCache
from transformers.hf_argparser import HfArg

from .ar import VocabLayout
from .bpe import VisualBPE
from .layouts import NEXT_SCALE, NEXT_TOKEN
from .next_scale import as_attention_mask, block_causal_mask, next_scale_inputs, scale_boundaries, without_pads
from .sequences import padded_attention


@dataclass
class SamplingConfig:
    """How to pick each token."""

    temperature: float = HfArg(default=1.0, help="softmax temperature; 0: greedy")
    top_k: int = HfArg(default=0, help="sample among the k likeliest tokens; 0: all")
    top_p: float = HfArg(default=1.0, help="nucleus sampling: the likeliest tokens holding this mass; 1: all")
    cfg_scale: float = HfArg(default=1.0, help="classifier-free guidance; 1: none (LlamaGen samples ImageNet at 1.5-2)")
    seed: int | None = HfArg(default=0, help="same seed, same images; None draws from torch's global generator")
    sampler: Literal["static", "generate", "jacobi"] = HfArg(
        default="static", help="static: a static-cache loop (fast); generate: transformers' generate(); jacobi"
    )
    jacobi_window: int = HfArg(default=16, help="jacobi: tokens checked per forward pass")
    compile: bool = HfArg(default=False, help="static: torch.compile the one-token forward (first call compiles)")

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.sampler not in ("static", "generate", "jacobi"):
            raise ValueError(f"sampler must be static, generate or jacobi, got {self.sampler!r}")
        if self.jacobi_window < 2:
            raise ValueError(f"jacobi_window must be >= 2, got {self.jacobi_window}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0


# -- one token ----------------------------------------------------------------------------------


def filtered_logits(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Logits [B, V] after temperature, top-k and top-p (nucleus) filtering (-inf outside)."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > sampling.top_p  # keeps the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits


def sample_tokens(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Logits [B, V] -> token ids [B], after temperature, top-k and top-p (nucleus) filtering."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(filtered_logits(logits, sampling).softmax(dim=-1), 1, generator=generator).squeeze(-1)


def guide(scores: Tensor, cfg_scale: float) -> Tensor:
    """Batched CFG: rows [cond; uncond] -> uncond + s * (cond - uncond), [B, V] from [2B, V]."""
    cond, uncond = scores.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


class CodeBudget:
    """Keeps BPE sequences to exactly one image: an id is legal only if its codes fit what is
    left of the current grid row (merges never cross rows) or, for 1D tokenizers, of the image;
    when the image is full, only EOI is."""

    def __init__(self, layout: VocabLayout, bpe: VisualBPE):
        lengths = torch.zeros(layout.ids.vocab_size, dtype=torch.long)
        lengths[: layout.ids.image_vocab_size] = bpe.token_lengths
        self.token_lengths, self.layout, self.row_length = lengths, layout, bpe.row_length

    def legal(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """-> (legal image ids [B, image_vocab_size], image complete [B])."""
        lengths = self.token_lengths.to(input_ids.device)
        used = lengths[input_ids[:, self.layout.codec.prompt_length :]].sum(dim=1)  # codes generated so far, [B]
        room = self.layout.tokens.tokens_per_image - used
        if self.row_length:
            room = torch.minimum(room, self.row_length - used % self.row_length)
        return lengths[None, : self.layout.ids.image_vocab_size] <= room[:, None], room <= 0


@dataclass
class TokenPicker:
    """The next image token of every row from the prior's logits: what all samplers share."""

    layout: VocabLayout
    sampling: SamplingConfig
    generator: torch.Generator | None
    budget: CodeBudget | None = None

    def scores(self, logits: Tensor, sequences: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits [R, V] (R = 2B rows with CFG) -> (scores [B, image ids], rows whose image is full [B] or None)."""
        scores = logits[:, : self.layout.ids.image_vocab_size].float()  # only image ids may be sampled
        if self.sampling.uses_cfg:  # rows [cond; uncond] -> B guided rows; both halves share their past
            scores = guide(scores, self.sampling.cfg_scale)
        if self.budget is None:
            return scores, None
        legal, done = self.budget.legal(sequences[: len(scores)])
        scores = scores.masked_fill(~legal | done[:, None], float("-inf"))
        scores[done, 0] = 0.0  # a finite placeholder; the row gets EOI
        return scores, done

    def pick(self, logits: Tensor, sequences: Tensor | None = None) -> Tensor:
        """-> the token of every row [R] (repeated for both CFG halves)."""
        scores, done = self.scores(logits, sequences)
        tokens = sample_tokens(scores, self.sampling, self.generator)
        if done is not None:
            tokens = torch.where(done, self.layout.ids.eoi, tokens)
        return tokens.repeat(2) if self.sampling.uses_cfg else tokens


class ImageTokenSampler(LogitsProcessor):
    """A logits processor for `generate()`: samples the next image token itself (`TokenPicker`)
    and returns scores where only that token is finite, so greedy decoding takes it."""

    def __init__(self, picker: TokenPicker):
        self.picker = picker

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        tokens = self.picker.pick(scores, input_ids)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, tokens[:, None], 0.0)


# -- the loops ----------------------------------------------------------------------------------


@dataclass
class PromptPadding:
    """The left pads of a batch of prompt rows [R, P] and what they imply for the positions after
    them: an attention mask over the whole sequence, and each position's id (pads uncounted).
    `None` from `of` for priors whose prompts have no pads (class and unconditional priors)."""

    pads: Tensor  # [R] pads before each row's prompt
    keep: Tensor  # [R, P] bool: the prompt's counted ids

    @classmethod
    def of(cls, batch: Tensor, layout: VocabLayout) -> PromptPadding | None:
        if not layout.ids.uses_text:
            return None
        keep = batch != layout.ids.pad
        return cls((~keep).sum(1), keep)

    def mask(self, length: int) -> Tensor:
        """The attention mask [R, length] of the prompt and `length - P` positions after it (all counted)."""
        rows, prompt = self.keep.shape
        after = torch.ones(rows, length - prompt, dtype=torch.long, device=self.keep.device)
        return torch.cat([self.keep.long(), after], dim=1)

    def positions(self, start: int, stop: int) -> Tensor:
        """Position ids [R, stop - start] of absolute sequence indices [start, stop)."""
        index = torch.arange(start, stop, device=self.keep.device)[None] - self.pads[:, None]
        return index.clamp_min(0)


def decode_with_generate(
    prior: PreTrainedModel, batch: Tensor, new_tokens: int, picker: TokenPicker, use_cache: bool = True
) -> Tensor:
    """The reference: transformers' generate() with the picker as its one logits processor (it takes
    the positions of left-padded prompts from their attention mask itself)."""
    layout, budget = picker.layout, picker.budget
    padding = PromptPadding.of(batch, layout)
    return prior.generate(
        input_ids=batch,
        attention_mask=padding.mask(batch.shape[1]) if padding is not None else torch.ones_like(batch),
        max_new_tokens=new_tokens,
        min_new_tokens=0 if budget else new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([ImageTokenSampler(picker)]),
        use_cache=use_cache,
        pad_token_id=layout.ids.pad,
        eos_token_id=layout.ids.eoi if budget else None,
    )


@torch.inference_mode()
def decode_static(prior: PreTrainedModel, batch: Tensor, new_tokens: int, picker: TokenPicker) -> Tensor:
    """A static KV cache for prompt + image, then one token per forward: [R, P] -> [R, P + new_tokens]
    (BPE priors: shorter once every row has ended its image, padded after EOI as generate() does)."""
    prompt = batch.shape[1]
    step = _step_function(prior, picker.sampling.compile)
    cache = _static_cache(prior, len(batch), prompt + new_tokens, picker.sampling.compile)
    sequences = torch.full(
        (len(batch), prompt + new_tokens), picker.layout.ids.pad, dtype=torch.long, device=batch.device
    )
    sequences[:, :prompt] = batch
    padding = PromptPadding.of(batch, picker.layout)
    mask = padding.mask(prompt + new_tokens) if padding is not None else None  # one shape for every step
    logits = _last_logits(prior, batch, cache, mask, padding.positions(0, prompt) if padding is not None else None)
    for position in range(prompt, prompt + new_tokens):
        token = picker.pick(logits, sequences[:, :position])
        sequences[:, position] = token
        if picker.budget is not None and position % 8 == 0 and (sequences == picker.layout.ids.eoi).any(1).all():
            return _pad_after_end(sequences[:, : position + 1], picker.layout)  # a sync every 8 steps, not each
        if position + 1 < prompt + new_tokens:
            positions = padding.positions(position, position + 1) if padding is not None else None
            logits = step(token[:, None], cache, mask, positions)
    return _pad_after_end(sequences, picker.layout) if picker.budget is not None else sequences


def _last_logits(
    prior: PreTrainedModel,
    input_ids: Tensor,
    cache: StaticCache,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """[R, T] ids after the cache -> the logits of the last position [R, V] (a text prior's padded
    prompts: with their mask over the whole cache and their position ids)."""
    return prior(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]


def _pad_after_end(sequences: Tensor, layout: VocabLayout) -> Tensor:
    """A row that ended keeps its first EOI; what the loop wrote after it becomes padding."""
    is_end = sequences == layout.ids.eoi
    return sequences.masked_fill(is_end.cumsum(1) - is_end.long() > 0, layout.ids.pad)


@dataclass
class _CompiledStep:
    """A prior's compiled one-token forward and the static cache its graph was traced with:
    reusing that cache (reset) is what spares a recompilation per call."""

    step: object | None
    cache: StaticCache | None = None


_COMPILED: weakref.WeakKeyDictionary[PreTrainedModel, _CompiledStep] = weakref.WeakKeyDictionary()


def _static_cache(prior: PreTrainedModel, rows: int, length: int, compile: bool) -> StaticCache:
    """A static cache for `rows` sequences of up to `length` tokens; with compile, the prior's
    last one when its size fits, emptied."""
    compiled = _COMPILED.get(prior)
    cache = compiled.cache if compile and compiled is not None else None
    if cache is not None and _cache_fits(cache, rows, length, prior):
        cache.reset()
        return cache
    cache = StaticCache(config=prior.config, max_cache_len=length)
    if compile and compiled is not None:
        compiled.cache = cache
    return cache


def _cache_fits(cache: StaticCache, rows: int, length: int, prior: PreTrainedModel) -> bool:
    layer = cache.layers[0]
    if layer.max_cache_len != length or not layer.is_initialized:
        return layer.max_cache_len == length
    return layer.batch_size == rows and layer.keys.dtype == prior.dtype and layer.keys.device == prior.device


def _step_function(prior: PreTrainedModel, compile: bool):
    """The one-token forward of the decode loop: `_last_logits`, through torch.compile when asked
    (once per prior; the cache's shapes are static, so one graph serves every step). Where
    compilation fails, one warning and the eager function: the ids do not depend on it."""
    eager = functools.partial(_last_logits, prior)
    if not compile:
        return eager
    if prior not in _COMPILED:
        _COMPILED[prior] = _CompiledStep(torch.compile(eager, dynamic=False))
    compiled = _COMPILED[prior]

    def step(token: Tensor, cache: StaticCache, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        if compiled.step is not None:
            length = int(cache.get_seq_length())
            try:
                return compiled.step(token, cache, mask, positions)
            except Exception as error:  # no compiler, an unsupported op: sample eagerly
                warnings.warn(
                    f"torch.compile is unavailable here ({type(error).__name__}: {error}); sampling eagerly",
                    stacklevel=2,
                )
                compiled.step = None
                cache.crop(-(int(cache.get_seq_length()) - length))  # undo a half-done update, if any
        return eager(token, cache, mask, positions)

    return step


@torch.inference_mode()
def decode_next_scale(prior: PreTrainedModel, batch: Tensor, picker: TokenPicker, use_cache: bool = True) -> Tensor:
    """Scale by scale: prompts [R, 2 + P] (P: the codes of leading whole scales, maybe none) ->
    [R, 2 + sum s^2]. Each pass feeds the next scale's input block (its coarser scale's codes,
    upsampled) and samples all its tokens; without the cache each pass re-reads the whole sequence."""
    layout, rows = picker.layout, len(batch)
    scales, prompt_length = list(layout.tokens.scales), layout.codec.prompt_length
    if layout.ids.uses_text:  # the caption's block ends with BOI, left-padded to the batch's longest
        prompt_length = int((batch[0] == layout.ids.boi).nonzero().max()) + 1
    ends = scale_boundaries(scales)
    conditions, codes = batch[:, :prompt_length] if layout.ids.uses_text else batch[:, 0], batch[:, prompt_length:]
    condition = prompt_length if layout.ids.uses_text else 1  # ids of the condition block
    cache = DynamicCache(config=prior.config) if use_cache else None
    fed = 0  # input positions the cache holds
    for k in range(ends.index(codes.shape[1]), len(scales)):
        inputs = next_scale_inputs(scales, layout.ids.boi, conditions, codes)  # [R, condition + ends[k + 1]]
        new = slice(fed if use_cache else 0, inputs.shape[1])
        allowed = block_causal_mask(scales, batch.device, new, condition)
        positions = torch.arange(new.start, new.stop, device=batch.device)[None].expand(rows, -1)
        if layout.ids.uses_text:
            keep = inputs != layout.ids.pad
            allowed, positions = without_pads(allowed, keep, new), padded_attention(keep)[1][:, new]
        mask = as_attention_mask(prior, allowed, rows)
        logits = prior(
            input_ids=inputs[:, new],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=scales[k] ** 2,  # the block that predicts scale k
        ).logits
        fed = inputs.shape[1]
        tokens = picker.pick(logits.reshape(-1, logits.shape[-1]))  # rows [cond; uncond] stay halves when flat
        codes = torch.cat([codes, tokens.reshape(rows, -1)], dim=1)
    return torch.cat([batch[:, :prompt_length], codes], dim=1)


@dataclass
class JacobiStats:
    """How a Jacobi decode went: tokens generated per row and forward passes spent."""

    tokens: int = 0
    forward_passes: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.forward_passes)


@torch.inference_mode()
def decode_jacobi(
    prior: PreTrainedModel, batch: Tensor, new_tokens: int, picker: TokenPicker, stats: JacobiStats | None = None
) -> Tensor:
    """Speculative Jacobi decoding (see the module docstring): [R, P] -> [R, P + new_tokens].

    The cache holds every known token but the last; each pass feeds that token and the drafts."""
    if picker.budget is not None:
        raise ValueError('sampler "jacobi" decodes raster code priors; a visual-BPE prior samples with "static"')
    stats = stats if stats is not None else JacobiStats()
    prompt, end = batch.shape[1], batch.shape[1] + new_tokens
    window_size = picker.sampling.jacobi_window
    cache = StaticCache(config=prior.config, max_cache_len=end + window_size)
    padding = PromptPadding.of(batch, picker.layout)
    mask = padding.mask(end + window_size) if padding is not None else None

    def forward(ids: Tensor, start: int):  # ids at sequence indices [start, start + n)
        positions = padding.positions(start, start + ids.shape[1]) if padding is not None else None
        return prior(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)

    if prompt > 1:
        forward(batch[:, :-1], 0)
    window = _JacobiWindow(picker, len(batch) // (2 if picker.sampling.uses_cfg else 1), batch.device)
    pieces, known = [batch], prompt
    while known < end:
        drafts = window.drafts(min(window_size - 1, end - known))
        logits = forward(torch.cat([pieces[-1][:, -1:], drafts], dim=1), known - 1).logits
        stats.forward_passes += 1
        accepted = window.verify(logits)  # [R, kept + 1]
        cache.crop(-(drafts.shape[1] + 1 - accepted.shape[1]))  # forget the states of rejected drafts
        pieces.append(accepted)
        known += accepted.shape[1]
    stats.tokens += new_tokens
    return torch.cat(pieces, dim=1)[:, :end]


class _JacobiWindow:
    """The draft tokens ahead of the known sequence, and the distributions q they were drawn from."""

    def __init__(self, picker: TokenPicker, images: int, device: torch.device):
        self.picker, self.images, self.device = picker, images, device
        self.tokens: Tensor | None = None  # [B, n]
        self.proposals: Tensor | None = None  # [B, n, K]

    def drafts(self, count: int) -> Tensor:
        """[R, count] drafts for the next positions: last pass's where there are some, uniform ones past them."""
        K = self.picker.layout.ids.image_vocab_size
        rows = self.images
        have = 0 if self.tokens is None else self.tokens.shape[1]
        if have < count:
            fresh = torch.randint(0, K, (rows, count - have), generator=self.picker.generator, device=self.device)
            uniform = torch.full((rows, count - have, K), 1.0 / K, device=self.device)
            self.tokens = fresh if self.tokens is None else torch.cat([self.tokens, fresh], dim=1)
            self.proposals = uniform if self.proposals is None else torch.cat([self.proposals, uniform], dim=1)
        self.tokens, self.proposals = self.tokens[:, :count], self.proposals[:, :count]
        return self.tokens.repeat(2, 1) if self.picker.sampling.uses_cfg else self.tokens

    def verify(self, logits: Tensor) -> Tensor:
        """Logits [R, n + 1, V] of the last known token and the n drafts -> the tokens now known [R, kept + 1].

        Drafts are accepted left to right with probability min(1, p/q); every row keeps the fewest
        any row accepted, then one token more: where that row rejected its draft, a resample from
        (p - q)+; where it accepted it, the draft; past the last draft, a sample from p. Then the
        positions after become the next drafts, drawn from this pass's p."""
        p = self._distributions(logits)  # [B, n + 1, K]: p[:, i] is the target distribution of draft i
        drafts, q = self.tokens, self.proposals
        n = drafts.shape[1]
        p_draft = p[:, :n].gather(-1, drafts[..., None])[..., 0]
        q_draft = q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(drafts.shape, generator=self.picker.generator, device=self.device)
        accepted = u * q_draft < p_draft  # probability min(1, p/q)
        first_rejection = torch.where(accepted.all(1), n, (~accepted).int().argmax(1))  # [B]
        kept = int(first_rejection.min())  # the one host sync of a pass: it sets the shapes
        if kept == n:
            last = torch.multinomial(p[:, n], 1, generator=self.picker.generator)[:, 0]
        else:
            residual = (p[:, kept] - q[:, kept]).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, kept])
            resampled = torch.multinomial(residual, 1, generator=self.picker.generator)[:, 0]
            last = torch.where(first_rejection == kept, resampled, drafts[:, kept])
        known = torch.cat([drafts[:, :kept], last[:, None]], dim=1)
        self._redraft(p[:, kept + 1 :])
        return known.repeat(2, 1) if self.picker.sampling.uses_cfg else known

    def _redraft(self, p: Tensor) -> None:
        """The positions after the known ones: drafts drawn from p [B, m, K] (given the old drafts)."""
        if p.shape[1] == 0:
            self.tokens = self.proposals = None
            return
        flat = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=self.picker.generator)
        self.tokens, self.proposals = flat.reshape(p.shape[:2]), p

    def _distributions(self, logits: Tensor) -> Tensor:
        """Logits [R, n, V] -> the distribution each position is sampled from [B, n, K]: image ids,
        guided, then temperature, top-k and top-p as `sample_tokens` applies them (one-hot when greedy)."""
        R, n, V = logits.shape
        if self.picker.sampling.uses_cfg:  # [cond; uncond] rows stay halves: all cond positions, then all uncond
            cond, uncond = logits.chunk(2, dim=0)
            flat = torch.cat([cond.reshape(-1, V), uncond.reshape(-1, V)])
        else:
            flat = logits.reshape(R * n, V)
        scores, _ = self.picker.scores(flat)
        if self.picker.sampling.temperature == 0:
            probs = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
        else:
            probs = filtered_logits(scores, self.picker.sampling).softmax(-1)
        return probs.reshape(-1, n, probs.shape[-1])


# -- which loop ---------------------------------------------------------------------------------


def _decode_by_token(prior, batch: Tensor, new_tokens: int, picker: TokenPicker, use_cache: bool, stats) -> Tensor:
    sampler = picker.sampling.sampler
    if sampler == "generate" or not use_cache:
        return decode_with_generate(prior, batch, new_tokens, picker, use_cache)
    if sampler == "jacobi":
        return decode_jacobi(prior, batch, new_tokens, picker, stats)
    return decode_static(prior, batch, new_tokens, picker)


def _decode_by_scale(prior, batch: Tensor, new_tokens: int, picker: TokenPicker, use_cache: bool, stats) -> Tensor:
    if picker.sampling.sampler != "static":
        raise ValueError(
            f'a next-scale prior samples scale by scale: sampler "static", not {picker.sampling.sampler!r}'
        )
    return decode_next_scale(prior, batch, picker, use_cache)


DECODE_LOOPS = {NEXT_TOKEN: _decode_by_token, NEXT_SCALE: _decode_by_scale}  # by `TokenLayout.prior_order`


def decode(
    prior: PreTrainedModel, batch: Tensor, new_tokens: int, picker: TokenPicker, use_cache: bool = True, stats=None
) -> Tensor:
    """Complete prompt rows [R, P] with the loop that fits the prior and `picker.sampling.sampler`."""
    loop = DECODE_LOOPS[picker.layout.tokens.prior_order]
    return loop(prior, batch, new_tokens, picker, use_cache, stats)
