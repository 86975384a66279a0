"""The prior's id space: one contiguous range of integer ids, as DESIGN.md lays it out.

    [0, K)              image codes of the tokenizer (K = codebook size)
    [K, K+M)            visual-BPE merged tokens (M = 0 without BPE)
    K+M .. K+M+3        begin-of-image, end-of-image, pad, null class (the CFG "no class")
    K+M+4 ..            the conditions: one token per class (C classes)
    K+M+4+C ..          the text tokens of a text-conditional prior (T of them; its text tokenizer
                        gives them, offset to here: `vqar.text`)

`IdSpace` is the only owner of this arithmetic. How a condition and an image become a sequence of
these ids is `vqar.sequences`; which tokenizer the codes come from is `vqar.provenance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layouts import check_id_range, check_integer_ids

NUM_SPECIALS = 4  # begin-of-image, end-of-image, pad, null class


@dataclass(frozen=True)
class IdSpace:
    """The ids of a prior: codes, visual-BPE tokens, the four specials, one token per class, then the
    text tokens (a prior takes classes or text, not both).

    >>> ids = IdSpace(codebook_size=125, class_names=("cat", "dog"))
    >>> ids.boi, ids.null_class, ids.class_token([1]).tolist(), ids.vocab_size
    (125, 128, [130], 131)
    """

    codebook_size: int
    num_bpe_tokens: int = 0
    class_names: tuple[str, ...] = ()  # empty: unconditional (or text-conditional)
    num_text_tokens: int = 0  # > 0: a text-conditional prior

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.codebook_size < 2:
            raise ValueError(f"bad layout: codebook_size={self.codebook_size} (at least 2 codes)")
        if self.num_bpe_tokens < 0 or self.num_text_tokens < 0:
            raise ValueError(
                f"num_bpe_tokens and num_text_tokens must be >= 0, got {self.num_bpe_tokens}, {self.num_text_tokens}"
            )
        if self.class_names and self.num_text_tokens:
            raise ValueError("a prior is conditioned on classes or on text, not both")

    # -- ranges -----------------------------------------------------------------------------

    @property
    def image_vocab_size(self) -> int:
        """Ids that may appear inside an image: codes, then BPE tokens."""
        return self.codebook_size + self.num_bpe_tokens

    @property
    def uses_bpe(self) -> bool:
        return self.num_bpe_tokens > 0

    @property
    def boi(self) -> int:
        return self.image_vocab_size

    @property
    def eoi(self) -> int:
        return self.image_vocab_size + 1

    @property
    def pad(self) -> int:
        return self.image_vocab_size + 2

    @property
    def null_class(self) -> int:
        return self.image_vocab_size + 3

    @property
    def first_condition(self) -> int:
        return self.image_vocab_size + NUM_SPECIALS

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def first_text(self) -> int:
        return self.first_condition + self.num_classes

    @property
    def uses_text(self) -> bool:
        return self.num_text_tokens > 0

    @property
    def vocab_size(self) -> int:
        return self.first_text + self.num_text_tokens

    # -- classes ----------------------------------------------------------------------------

    def class_token(self, classes: Tensor | list[int] | int) -> Tensor:
        """Class indices [B] (or one int) -> their condition token ids [B]."""
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        if self.num_classes == 0:
            raise ValueError("this model is unconditional: it has no class tokens")
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class index must lie in [0, {self.num_classes}), got {classes.tolist()}")
        return self.first_condition + classes

    def class_index(self, name_or_index: str | int) -> int:
        """A class by name (as in the dataset's labels) or index -> its index, checked."""
        if isinstance(name_or_index, str) and not name_or_index.lstrip("-").isdigit():
            if name_or_index not in self.class_names:
                raise ValueError(f"unknown class {name_or_index!r}; classes: {list(self.class_names)}")
            return self.class_names.index(name_or_index)
        if isinstance(name_or_index, float) and not name_or_index.is_integer():
            raise TypeError(f"a class is a name or an integer index, got {name_or_index!r}")
        index = int(name_or_index)
        if not 0 <= index < self.num_classes:
            raise ValueError(f"class index must lie in [0, {self.num_classes}), got {index}")
        return index

    def is_condition(self, ids: Tensor) -> Tensor:
        """Bool, where an id may stand as a sequence's condition: a class token or the null class."""
        return (ids == self.null_class) | (ids >= self.first_condition) & (ids < self.vocab_size)

    # -- checks and export ------------------------------------------------------------------

    def check_image_ids(self, ids: Tensor, codes_only: bool = False) -> None:
        """Ids that may stand inside an image; `codes_only` also refuses BPE tokens."""
        check_integer_ids(ids, "image ids")
        check_id_range(ids, self.codebook_size if codes_only else self.image_vocab_size, "image ids")

    def special_ids(self) -> dict:
        """The ids a prompt is made of, for users of plain transformers: saved in the config as `vqar_ids`."""
        classes = {name: self.first_condition + i for i, name in enumerate(self.class_names)}
        ids = {"boi": self.boi, "eoi": self.eoi, "pad": self.pad, "null_class": self.null_class, "classes": classes}
        return ids | ({"text": [self.first_text, self.vocab_size]} if self.uses_text else {})
