"""Visual BPE: merge frequent adjacent codes into new tokens, exactly invertibly.

Byte-pair encoding over token sequences, as in "From Pixels to Tokens: Byte-Pair Encoding on
Quantized Visual Modalities" (arXiv 2410.02155) — but invertible, so a prior can generate BPE
ids that decode back to one image's codes. Training and encoding run in Hugging Face's
`tokenizers` (Rust): each code c becomes the character U+10000 + c (above the surrogates at
U+D800, so 2^18 codes fit), with no normalizer, no pre-tokenizer and no byte-level step, and
the trainer is given the full alphabet so that no code is ever dropped as unknown.

Merges never cross grid rows: the last code of a row and the first of the next are not
neighbours in the image, so a merged token always covers a horizontal run of one row, and
a prefix of whole rows is always a prefix of whole tokens (prefix completion stays exact).

Ids: [0, K) are the codes, K + i the i-th merge. Decoding is one gather through an expansion
table, vectorised over the batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

CODE_POINT_BASE = 0x10000
FILENAME = "visual_bpe.json"
FORMAT_VERSION = 1


def _char(code: int) -> str:
    return chr(CODE_POINT_BASE + code)


def _to_text(codes: np.ndarray) -> str:
    return (codes.astype(np.int64) + CODE_POINT_BASE).astype(np.uint32).tobytes().decode("utf-32-le")


class VisualBPE:
    """Merges over codes in [0, K). Build with `VisualBPE.train` or `VisualBPE.load`."""

    def __init__(self, codebook_size: int, merges: list[tuple[int, int]], row_length: int | None = None):
        if codebook_size < 1 or codebook_size + CODE_POINT_BASE > 0x10FFFF:
            raise ValueError(f"codebook_size must lie in [1, {0x10FFFF - CODE_POINT_BASE}], got {codebook_size}")
        self.codebook_size, self.row_length = codebook_size, row_length
        self.merges = [(int(a), int(b)) for a, b in merges]
        self._expansions = self._expand()
        self._tokenizer = self._build_tokenizer()
        lengths = torch.tensor([len(e) for e in self._expansions])
        table = torch.full((len(self._expansions), int(lengths.max())), -1, dtype=torch.long)
        for i, codes in enumerate(self._expansions):
            table[i, : len(codes)] = torch.tensor(codes)
        self.token_lengths, self._table = lengths, table  # [V], [V, max_len] padded with -1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + len(self.merges)

    @property
    def num_merges(self) -> int:
        return len(self.merges)

    def _expand(self) -> list[tuple[int, ...]]:
        expansions = [(c,) for c in range(self.codebook_size)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < len(expansions) and 0 <= b < len(expansions)):
                raise ValueError(f"merge {i} = ({a}, {b}) refers to an id not defined before it")
            expansions.append(expansions[a] + expansions[b])
        return expansions

    def _build_tokenizer(self):
        from tokenizers import Tokenizer, models

        strings = ["".join(map(_char, e)) for e in self._expansions]
        vocab = {s: i for i, s in reversed(list(enumerate(strings)))}  # first id wins for a repeated string
        merges = [(strings[a], strings[b]) for a, b in self.merges]
        return Tokenizer(models.BPE(vocab=vocab, merges=merges))

    # -- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, sequences, vocab_size: int, codebook_size: int, row_length: int | None = None,
              min_frequency: int = 2) -> VisualBPE:  # fmt: skip
        """Learn up to `vocab_size - codebook_size` merges from code sequences.

        sequences: an int array/tensor [B, N] (or [B, h, w]; rows are then kept apart) or an
        iterable of 1D code sequences. row_length: codes per grid row (merges never cross a
        row); taken from [B, h, w] input, None for 1D tokenizers.
        """
        from tokenizers import Tokenizer, models, trainers

        if vocab_size <= codebook_size:
            raise ValueError(f"vocab_size ({vocab_size}) must exceed codebook_size ({codebook_size}) to add merges")
        rows, row_length = _rows(sequences, codebook_size, row_length)
        tokenizer = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False, special_tokens=[],
            initial_alphabet=[_char(c) for c in range(codebook_size)], limit_alphabet=codebook_size,
        )  # fmt: skip
        tokenizer.train_from_iterator((_to_text(r) for r in rows), trainer, length=len(rows))
        learned = json.loads(tokenizer.to_str())["model"]["merges"]
        return cls(codebook_size, _merges_to_ids(learned, codebook_size), row_length)

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, codes: Tensor | np.ndarray) -> list[Tensor]:
        """Codes [B, N] or [B, h, w] -> B id sequences (long tensors) of varying length."""
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, Tensor) else codes)
        rows, _ = _rows(codes, self.codebook_size, self.row_length)
        per_image = len(rows) // len(codes)
        encoded = self._tokenizer.encode_batch([_to_text(r) for r in rows], add_special_tokens=False)
        ids = [torch.tensor(e.ids, dtype=torch.long) for e in encoded]
        return [torch.cat(ids[i * per_image : (i + 1) * per_image]) for i in range(len(codes))]

    def decode(self, ids: Tensor | list[Tensor]) -> Tensor:
        """Id sequences (a list of 1D tensors, or [B, L] padded with -1) -> codes [B, N], N equal for all.

        One gather for the whole batch: every id's codes come from the expansion table.
        """
        if not isinstance(ids, Tensor):
            ids = pad_sequence([torch.as_tensor(row).reshape(-1) for row in ids], batch_first=True, padding_value=-1)
        ids = ids[None] if ids.ndim == 1 else ids
        present = ids >= 0
        flat = self._check_ids(ids[present])  # row-major: sequence by sequence, in order
        codes_per_sequence = (self.token_lengths[ids.clamp_min(0).long()] * present).sum(dim=1)
        if (codes_per_sequence != codes_per_sequence[0]).any():
            raise ValueError(f"id sequences decode to different numbers of codes: {sorted(set(codes_per_sequence.tolist()))}")
        expanded = self._table[flat]  # [T, max_len], -1 past each token's end
        return expanded[expanded >= 0].reshape(len(ids), -1)

    def _check_ids(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point():
            raise TypeError(f"BPE ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"BPE ids must lie in [0, {self.vocab_size}), got values in [{ids.min().item()}, {ids.max().item()}]")
        return ids

    # -- saving -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write JSON (never pickle); a folder gets `visual_bpe.json` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        data = {"format_version": FORMAT_VERSION, "codebook_size": self.codebook_size,
                "row_length": self.row_length, "merges": self.merges}  # fmt: skip
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VisualBPE:
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported visual BPE format {data.get('format_version')!r}")
        return cls(data["codebook_size"], [tuple(m) for m in data["merges"]], data.get("row_length"))


def _rows(sequences, codebook_size: int, row_length: int | None) -> tuple[list[np.ndarray], int | None]:
    """Split code sequences into the units merges stay inside: grid rows, or whole sequences."""
    if isinstance(sequences, Tensor) or isinstance(sequences, np.ndarray):
        array = np.asarray(sequences.cpu() if isinstance(sequences, Tensor) else sequences)
        if array.dtype.kind not in "iu":
            raise TypeError(f"codes must be integers, got dtype {array.dtype}")
        if array.ndim == 3:
            row_length = array.shape[2]
            array = array.reshape(array.shape[0], -1)
        if array.ndim != 2:
            raise ValueError(f"codes must be [B, N] or [B, h, w], got shape {array.shape}")
        sequences = array
    else:
        sequences = [np.asarray(s).reshape(-1) for s in sequences]
    rows = []
    for seq in sequences:
        if seq.size and (seq.min() < 0 or seq.max() >= codebook_size):
            raise ValueError(f"codes must lie in [0, {codebook_size}), got values in [{seq.min()}, {seq.max()}]")
        if row_length and seq.size % row_length:
            raise ValueError(f"a sequence of {seq.size} codes is not a whole number of rows of {row_length}")
        rows += np.split(seq, seq.size // row_length) if row_length else [seq]
    return rows, row_length


def _merges_to_ids(merges: list, codebook_size: int) -> list[tuple[int, int]]:
    ids = {_char(c): c for c in range(codebook_size)}
    pairs = []
    for merge in merges:
        left, right = merge if isinstance(merge, (list, tuple)) else merge.split(" ")
        pairs.append((ids[left], ids[right]))
        ids.setdefault(left + right, codebook_size + len(pairs) - 1)
    return pairs
