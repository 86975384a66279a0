"""The sequence codec: how a condition and an image's ids become one sequence of the prior, and back.

A sequence is `[condition, BOI, image ids]` (DESIGN.md): the condition a class token or the null
class, then begin-of-image, then the image's ids in the token layout's order. A text-conditional
prior's condition is a caption's text ids instead, of any length up to `text_length`: sequences of a
batch are left-padded with the pad id, which attention skips and positions do not count
(`attention_inputs`), so a prompt reads the same alone or in a batch; the empty caption (only BOI
left) is the unconditional prompt. A prior converted from
LlamaGen has no begin-of-image (`begin_of_image=False`): its class position predicts the first code. Raster priors model
it token by token; with visual BPE the image's ids vary in number, so the sequence ends with EOI
and is padded to `sequence_length`. A next-scale prior (multiscale tokens) reads the same
sequence and predicts a scale at a time (`vqar.next_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layouts import TokenLayout
from .vocab import IdSpace


@dataclass(frozen=True)
class SequenceCodec:
    """(condition, image ids) <-> sequences [B, S] of `ids`, for images of `tokens`' layout."""

    ids: IdSpace
    tokens: TokenLayout
    begin_of_image: bool = True  # a BOI id between the condition and the image (LlamaGen's priors have none)
    text_length: int = 0  # text priors: the most text ids a prompt holds (captions are cut to it)

    @property
    def prompt_length(self) -> int:
        """Ids before the image's: the condition (a class, or at most `text_length` text ids) and BOI."""
        return (self.text_length if self.ids.uses_text else 1) + int(self.begin_of_image)

    @property
    def sequence_length(self) -> int:
        """The longest sequence: the prompt, one id per code at worst, and EOI with BPE."""
        return self.prompt_length + self.tokens.tokens_per_image + int(self.ids.uses_bpe)

    def conditions(self, labels: Tensor | None, batch_size: int) -> Tensor:
        """Condition ids [B]: class tokens for labels >= 0, the null class for None or -1."""
        if labels is None or self.ids.num_classes == 0:
            return torch.full((batch_size,), self.ids.null_class, dtype=torch.long)
        labels = labels.long()
        tokens = self.ids.class_token(labels.clamp_min(0))
        return torch.where(labels < 0, torch.full_like(tokens, self.ids.null_class), tokens)

    def prompt(self, conditions: Tensor) -> Tensor:
        """Condition ids [B] -> the prompt [B, prompt_length]: condition, BOI."""
        if not self.begin_of_image:
            return conditions[:, None]
        return torch.stack([conditions, torch.full_like(conditions, self.ids.boi)], dim=1)

    def to_sequence(self, labels: Tensor | None, image_ids: Tensor) -> Tensor:
        """(labels [B] or None, image ids [B, N] or [B, *shape]) -> AR input ids [B, sequence_length].

        With BPE, image ids are [B, L] left-aligned and padded with -1; the output is
        `condition, BOI, ids, EOI` padded with the pad id.
        """
        ids = self.tokens.flatten(image_ids).long()
        if self.ids.uses_text:  # a text prior's unconditional sequence: the empty caption, BOI alone
            if labels is not None:
                raise ValueError("a text prior is conditioned on captions, not labels: use text_sequence")
            return self.text_sequence(torch.full((ids.shape[0], 1), self.ids.boi, device=ids.device), ids)
        prompt = self.prompt(self.conditions(labels, ids.shape[0]).to(ids.device))
        if not self.ids.uses_bpe:
            self.ids.check_image_ids(ids)
            return torch.cat([prompt, ids], dim=1)
        present = ids >= 0
        self.ids.check_image_ids(ids[present])
        B, L = ids.shape
        out = torch.full((B, self.sequence_length), self.ids.pad, dtype=torch.long, device=ids.device)
        out[:, : self.prompt_length] = prompt
        out[:, self.prompt_length : self.prompt_length + L] = torch.where(present, ids, self.ids.pad)
        return out.scatter_(1, self.prompt_length + present.sum(1, keepdim=True), self.ids.eoi)

    def from_sequence(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """AR ids -> (condition ids [B], image ids).

        Image ids are [B, *shape] (a grid [B, h, w] when there is one), or with BPE [B, L] padded
        with -1 after each sequence's EOI.
        """
        if sequences.ndim != 2 or sequences.shape[1] > self.sequence_length:
            raise ValueError(f"sequences must be [B, <= {self.sequence_length}], got {tuple(sequences.shape)}")
        images = sequences[:, self.prompt_length :]
        if self.ids.uses_bpe:
            ended = (images == self.ids.eoi).long().cumsum(1) > 0
            images = images.masked_fill(ended | (images == self.ids.pad), -1)
            self.ids.check_image_ids(images[images >= 0])
            return sequences[:, 0], images
        if self.ids.uses_text:  # a left-padded text prompt of any length, then the image
            images = sequences[:, -self.tokens.tokens_per_image :]
            self.ids.check_image_ids(images)
            return sequences[:, : -self.tokens.tokens_per_image], self.tokens.unflatten(images)
        if images.shape[1] != self.tokens.tokens_per_image:
            raise ValueError(f"sequences must be [B, {self.sequence_length}], got {tuple(sequences.shape)}")
        self.ids.check_image_ids(images)
        return sequences[:, 0], self.tokens.unflatten(images)

    def text_sequence(self, prompts: Tensor, image_ids: Tensor) -> Tensor:
        """Text prompts [B, P] (left-padded, ending with BOI: `vqar.text.TextTokenizer.prompts`) and image
        ids [B, N] or [B, *shape] -> sequences [B, P + N]."""
        ids = self.tokens.flatten(image_ids).long()
        self.ids.check_image_ids(ids)
        return torch.cat([prompts.to(ids.device), ids], dim=1)

    def modelled_ids(self, sequences: Tensor) -> Tensor:
        """Bool [B, S]: the positions whose ids the prior predicts (the image's, and EOI with BPE)."""
        modelled = sequences != self.ids.pad
        prompt = sequences.shape[1] - self.tokens.tokens_per_image if self.ids.uses_text else self.prompt_length
        modelled[:, :prompt] = False
        return modelled

    def attention_inputs(self, sequences: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(attention mask [B, S], position ids [B, S]) for sequences with a left-padded text prompt: the
        pads are not attended to and not counted; (None, None) for every other prior (nothing to skip)."""
        if not self.ids.uses_text:
            return None, None
        return padded_attention(sequences != self.ids.pad)


def padded_attention(keep: Tensor) -> tuple[Tensor, Tensor]:
    """A bool [B, S] of the ids that count (left pads excluded) -> (attention mask [B, S] long, position
    ids [B, S]): each id's position is the number of counted ids before it."""
    mask = keep.long()
    return mask, (mask.cumsum(1) - 1).clamp_min(0)
