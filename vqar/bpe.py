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

Ids: [0, K) are the codes, K + i the i-th merge. Every id's codes are one slice of a flat array
of all expansions; decoding copies those slices out in one compiled pass over the batch (numba),
which also validates every id and each sequence's length on the way.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers.hf_argparser import HfArg

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
        lengths = np.array([len(e) for e in self._expansions], dtype=np.int64)
        all_codes = np.fromiter((c for e in self._expansions for c in e), np.int64, int(lengths.sum()))
        self._all_codes = np.concatenate(
            [all_codes, np.zeros(_COPY_BLOCK, np.int64)]
        )  # slack: block copies read past the end
        self._starts = np.cumsum(lengths) - lengths  # token t's codes: _all_codes[_starts[t] : _starts[t] + lengths[t]]
        self._lengths = lengths
        self.token_lengths = torch.from_numpy(lengths)  # [V] codes per id

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
    def train(
        cls, sequences, vocab_size: int, codebook_size: int, row_length: int | None = None, min_frequency: int = 2
    ) -> VisualBPE:
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
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=[_char(c) for c in range(codebook_size)],
            limit_alphabet=codebook_size,
        )
        tokenizer.train_from_iterator((_to_text(r) for r in rows), trainer, length=len(rows))
        learned = json.loads(tokenizer.to_str())["model"]["merges"]
        return cls(codebook_size, _merges_to_ids(learned, codebook_size), row_length)

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, codes: Tensor | np.ndarray, padded: bool = False) -> list[Tensor] | Tensor:
        """Codes [B, N] or [B, h, w] -> B id sequences (long tensors) of varying length.

        padded=True returns one [B, L_max] long tensor instead, -1 after each sequence's end
        (the form `decode` reads fastest, and the one generation produces).
        """
        codes = torch.as_tensor(np.asarray(codes) if not isinstance(codes, Tensor) else codes)
        rows, _ = _rows(codes, self.codebook_size, self.row_length)
        per_image = len(rows) // len(codes)
        encoded = self._tokenizer.encode_batch([_to_text(r) for r in rows], add_special_tokens=False)
        ids = [torch.tensor(e.ids, dtype=torch.long) for e in encoded]
        sequences = [torch.cat(ids[i * per_image : (i + 1) * per_image]) for i in range(len(codes))]
        return pad_sequence(sequences, batch_first=True, padding_value=-1) if padded else sequences

    def decode(self, ids: Tensor | np.ndarray | list) -> Tensor:
        """Id sequences -> codes [B, N] (long), N equal for all.

        ids: [B, L] padded with -1 after each sequence's end (the fastest form: what
        `encode(padded=True)` and generation give), a single [L] sequence, or a list of 1D
        sequences of varying length. Ids outside [0, vocab_size), ids after the padding, and
        sequences expanding to different numbers of codes are refused.
        """
        padded = self._padded(ids)
        first = padded[0][padded[0] >= 0] if len(padded) else padded.ravel()
        per_sequence = int(self._lengths[first.clip(0, self.vocab_size - 1)].sum())  # sequence 0 sets N; all must match
        # Allocated by NumPy, which asks Linux for huge pages; inside the kernel numba's allocator
        # does not, and page faults then cost as much as the decoding itself.
        codes = np.empty((len(padded), per_sequence), dtype=np.int64)
        status, row, value = self._run_kernel(padded, codes)
        if status == _OUT_OF_RANGE:
            raise ValueError(
                f"BPE ids must lie in [0, {self.vocab_size}) (-1 only as padding), got {value} in sequence {row}"
            )
        if status == _AFTER_PADDING:
            raise ValueError(f"sequence {row} has id {value} after its -1 padding; pad only at the end")
        if status == _LENGTH_MISMATCH:
            raise ValueError(
                f"id sequences decode to different numbers of codes: sequence 0 to {codes.shape[1]}, "
                f"sequence {row} to {value}"
            )
        return torch.from_numpy(codes)

    def _run_kernel(self, padded: np.ndarray, codes: np.ndarray) -> tuple[int, int, int]:
        """Run the kernel over slices of the batch in `torch.get_num_threads()` threads.

        The kernel releases the GIL and writes each sequence's codes only inside its own row, so
        plain Python threads run it in parallel with no shared state (numba's own parallel
        layers abort on concurrent calls or after fork). Returns the first problem found.
        """
        kernel, tables = _expand_kernel(), (self._starts, self._lengths, self._all_codes)
        threads = min(torch.get_num_threads(), padded.size // _IDS_PER_THREAD + 1, len(padded))
        if threads <= 1:
            return kernel(padded, *tables, codes)
        bounds = np.linspace(0, len(padded), threads + 1).astype(int)
        slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        results = list(_thread_pool(os.getpid()).map(lambda rows: kernel(padded[rows], *tables, codes[rows]), slices))
        for rows, (status, row, value) in zip(slices, results):
            if status != _OK:
                return status, rows.start + row, value
        return _OK, -1, 0

    def _padded(self, ids) -> np.ndarray:
        """Any accepted form -> int64 [B, L], -1 after each sequence."""
        if isinstance(ids, (list, tuple)):
            rows = [torch.as_tensor(row).reshape(-1) for row in ids]
            ids = (
                pad_sequence(rows, batch_first=True, padding_value=-1) if rows else torch.zeros(0, 0, dtype=torch.long)
            )
        array = self._integers(ids)
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2:
            raise ValueError(
                f"BPE ids must be [B, L] (padded with -1), [L] or a list of sequences, got shape {array.shape}"
            )
        return np.ascontiguousarray(array, dtype=np.int64)

    @staticmethod
    def _integers(ids) -> np.ndarray:
        array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        if array.dtype.kind not in "iu":
            raise TypeError(f"BPE ids must be integers, got dtype {array.dtype}")
        return array

    # -- saving -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write JSON (never pickle); a folder gets `visual_bpe.json` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        data = {
            "format_version": FORMAT_VERSION,
            "codebook_size": self.codebook_size,
            "row_length": self.row_length,
            "merges": self.merges,
        }
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

    def check_codes(self, codebook_size: int, row_length: int | None, what: str = "the tokens") -> None:
        """Refuse merges learned on other codes: another codebook size, or another grid row length
        (`row_length`: the codes per grid row, `TokenLayout.row_length`; None for whole sequences)."""
        if (self.codebook_size, self.row_length) != (codebook_size, row_length):
            raise ValueError(
                f"visual BPE does not match {what}: it was learned on {self.codebook_size} codes in rows of "
                f"{self.row_length or 'whole sequences'}, {what} have {codebook_size} codes in rows of "
                f"{row_length or 'whole sequences'}; run `vqar train-bpe` on these tokens"
            )


def load_bpe(path: str | Path) -> VisualBPE | None:
    """The visual BPE saved in a folder (or Hub repo) as `visual_bpe.json`, or a path to such a file.

    Returns None when the folder or repo has none; a file path that does not exist is an error.
    """
    path = Path(path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"visual BPE file {path} does not exist")
        return VisualBPE.load(path)
    if path.is_dir():
        return VisualBPE.load(path) if (path / FILENAME).is_file() else None
    from transformers.utils import cached_file  # a Hub id: its visual_bpe.json, if the repo has one

    found = cached_file(str(path), FILENAME, _raise_exceptions_for_missing_entries=False)
    return VisualBPE.load(found) if found else None


@dataclass
class TrainBPEArgs:
    """Learn visual-BPE merges on a tokens folder (`vqar train-bpe`)."""

    tokens: str = HfArg(help="a tokens folder written by `vqar tokenize`")
    vocab_size: int = HfArg(help="codebook size + the number of merges to learn")
    output: str = HfArg(help="folder for visual_bpe.json (the tokenizer's, for `vqar train-prior --bpe auto`)")


def train_bpe(tokens: str | Path, vocab_size: int, output: str | Path) -> dict:
    """Learn visual-BPE merges on a tokenized dataset's train split (`vqar train-bpe`).

    Saves `visual_bpe.json` in `output` and returns the mean tokens per image before and after,
    on both splits.
    """
    from .tokens import code_arrays, load_tokens

    dataset, manifest = load_tokens(tokens)
    codes = code_arrays(dataset, manifest)
    bpe = VisualBPE.train(codes["train"], vocab_size=vocab_size, codebook_size=manifest.codebook_size)
    Path(output).mkdir(parents=True, exist_ok=True)
    bpe.save(output)
    stats = {"tokens_per_image": manifest.tokens_per_image, "merges": bpe.num_merges}
    for name, split_codes in codes.items():
        stats[f"{name}_mean_tokens_after"] = float(np.mean([len(ids) for ids in bpe.encode(split_codes)]))
    return stats


def _rows(sequences, codebook_size: int, row_length: int | None) -> tuple[list[np.ndarray], int | None]:
    """Split code sequences into the units merges stay inside: grid rows, or whole sequences."""
    if isinstance(sequences, (Tensor, np.ndarray)):
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


_OK, _OUT_OF_RANGE, _AFTER_PADDING, _LENGTH_MISMATCH = range(4)
_COPY_BLOCK = 4
_IDS_PER_THREAD = 1 << 16  # below this a second thread costs more than it saves


@functools.cache
def _thread_pool(pid: int) -> ThreadPoolExecutor:
    """Kept for the process (starting threads on every decode costs as much as a small batch);
    keyed by pid, because a forked child (a DataLoader worker) inherits the pool but not its threads."""
    return ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="vqar-bpe-decode")


@functools.cache
def _expand_kernel():
    """Compile (once; numba caches it on disk) the decode loop: ids -> codes, with validation.

    A plain loop, because each output position depends on the lengths of all ids before it;
    in NumPy that takes a cumulative sum, a scatter and a gather over the whole output
    (several times slower), in Python a per-code loop. Codes are copied in blocks of
    `_COPY_BLOCK` whatever a token's length, so that the loop does not branch on it (token
    lengths are unpredictable, and a mispredicted branch costs more than the copy): a block
    may read past a token's codes (`all_codes` has slack) and write past its end, where the
    next token overwrites it. Only a row's last block is copied exactly, so no write leaves
    its row.
    """
    import numba

    block = _COPY_BLOCK

    @numba.njit(cache=True, nogil=True)
    def expand(padded, starts, lengths, all_codes, codes):
        """padded [B, W] ids -> codes [B, N]; returns (status, row, offending value)."""
        batch, width = padded.shape
        vocab, per_sequence = len(lengths), codes.shape[1]
        for b in range(batch):
            position, j = 0, 0
            while j < width:
                t = padded[b, j]
                if t < 0 or t >= vocab:
                    break
                start, length = starts[t], lengths[t]
                if position + length + block - 1 <= per_sequence:
                    for offset in range(0, length, block):
                        for k in range(block):
                            codes[b, position + offset + k] = all_codes[start + offset + k]
                elif position + length <= per_sequence:
                    for k in range(length):
                        codes[b, position + k] = all_codes[start + k]
                position += length
                j += 1
            if j < width and padded[b, j] != -1:
                return _OUT_OF_RANGE, b, padded[b, j]
            for k in range(j, width):
                if padded[b, k] != -1:
                    return _AFTER_PADDING, b, padded[b, k]
            if position != per_sequence:
                return _LENGTH_MISMATCH, b, position
        return _OK, -1, 0

    return expand
