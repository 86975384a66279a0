"""A tokenized dataset on disk: the boundary between stage 1 and stage 2.

`vqar tokenize` (vqar.training.encode_dataset) encodes images with a frozen tokenizer into a
folder that `datasets.load_from_disk` reads: `train` and `eval` splits of Arrow shards, each
row `tokens` (one image's codes, the smallest unsigned integer type that holds them), `label`
(-1 without labels) and, for captioned sources, `caption`. `vqar_tokens.json` beside them is the
`TokensManifest`: what the codes are (codebook size, token layout) and where they came from.

Every process writes its own shards as it goes (`ShardWriter`: written to a temporary name and
renamed, so a crash leaves whole shards only), and the main process ties them into splits at the
end (`finish_split`), without reading or copying them. Readers get the codes memory-mapped
(`TokenRows`): a prior's memory does not grow with the number of images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.arrow_writer import ArrowWriter

from .layouts import TokenLayout

MANIFEST = "vqar_tokens.json"
SPLITS = ("train", "eval")


@dataclass
class TokensManifest:
    """What a tokens folder holds, saved as `vqar_tokens.json` beside the splits."""

    tokenizer: str  # the tokenizer: the absolute path of its folder, or its Hub id
    codebook_size: int
    tokens_per_image: int
    grid: list[int] | None  # [h, w] for grid tokenizers; None for 1D sequences and multiscale tokens
    scales: list[int] | None = None  # multiscale tokenizers: the token maps' sides, coarse to fine
    fingerprint: str = ""  # of the tokenizer, the source's content, the options and the preprocessing
    tokenizer_fingerprint: str = ""  # `VQTokenizer.fingerprint`: what the codes mean; the prior records it
    decodes_prefixes: bool = False  # 1D with nested dropout: any leading k tokens decode
    class_names: list[str] = field(default_factory=list)  # empty: the source has no class labels
    data: str = ""
    num_images: dict[str, int] = field(default_factory=dict)  # per split
    skipped_images: int = 0
    num_captions: dict[str, int] = field(default_factory=dict)  # per split; empty: the source has no captions
    resolution: int | None = None  # the images' side as they were encoded (None: written before it was recorded)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        partial = path.with_name(f".partial-{path.name}")
        partial.write_text(json.dumps(asdict(self), indent=2))
        partial.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TokensManifest | None:
        """The manifest of a tokens folder, or None when it has none (not written, or being rewritten)."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path} has unknown field(s) {unknown}: written by a newer vqar?")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def token_layout(self) -> TokenLayout:
        """The layout of one image's tokens (`vqar.layouts`), from `tokens_per_image`, `grid` and `scales`."""
        return TokenLayout.from_fields(self.tokens_per_image, self.grid, self.scales, self.decodes_prefixes)

    @property
    def has_captions(self) -> bool:
        return any(self.num_captions.values())

    def describe(self, name: str) -> str:
        """One line: what a prior trained on this folder will see."""
        counts = ", ".join(f"{n:,} {split}" for split, n in self.num_images.items())
        classes = f"{len(self.class_names)} classes" if self.class_names else "no class labels"
        captions = f", {sum(self.num_captions.values()):,} captions" if self.has_captions else ""
        return f"{name}: {counts} images of {self.token_layout.describe()} ({self.codebook_size:,} codes), {classes}{captions}"


def code_dtype(codebook_size: int) -> str:
    """The smallest unsigned integer type that holds every code: uint8 up to 256 codes, then uint16, uint32."""
    return "uint8" if codebook_size <= 2**8 else "uint16" if codebook_size <= 2**16 else "uint32"


def token_features(tokens_per_image: int, codebook_size: int, captions: bool) -> datasets.Features:
    """Fixed-length rows of codes (an Arrow FixedSizeList: readable as one [N, L] array), a label, a caption."""
    columns = {
        "tokens": datasets.List(datasets.Value(code_dtype(codebook_size)), length=tokens_per_image),
        "label": datasets.Value("int64"),
    }
    return datasets.Features(columns | ({"caption": datasets.Value("string")} if captions else {}))


# -- writing --------------------------------------------------------------------------------------


class ShardWriter:
    """One Arrow shard of a split, written to a temporary name and renamed once complete."""

    def __init__(self, path: Path, features: datasets.Features):
        self.path, self.partial = path, path.with_name(f".partial-{path.name}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = ArrowWriter(features=features, path=str(self.partial))
        self.rows = 0

    def write(self, batch: dict) -> None:
        """Rows {"tokens": [B, L] ints, "label": [B], ("caption": [B] strings)}."""
        self.writer.write_batch(batch)
        self.rows += len(batch["label"])

    def close(self) -> Path:
        self.writer.finalize()
        self.writer.close()
        os.replace(self.partial, self.path)
        return self.path


def finish_split(folder: Path, shards: list[Path], features: datasets.Features) -> datasets.Dataset:
    """Tie finished shards (in order) into a split folder that `datasets.load_from_disk` reads, as
    `save_to_disk` lays it out — without copying them — and return the split, memory-mapped."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [datasets.Dataset.from_file(str(shard)) for shard in shards]
    split = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict({}, features=features)
    datasets.DatasetInfo(features=features).write_to_directory(str(folder))
    state = {
        "_data_files": [{"filename": str(shard.relative_to(folder))} for shard in shards],
        "_fingerprint": split._fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    if not shards:  # an empty split still loads: one empty shard
        empty = ShardWriter(folder / "data-empty.arrow", features)
        state["_data_files"] = [{"filename": empty.close().name}]
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    return split


def finish_tokens(output: Path, splits: tuple[str, ...], manifest: TokensManifest) -> None:
    """The folder's last two files: the split list, then the manifest (which marks it complete)."""
    (output / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    manifest.save(output)


# -- reading ---------------------------------------------------------------------------------------


def load_tokens(path: str | Path) -> tuple[datasets.DatasetDict, TokensManifest]:
    """A tokenized dataset (memory-mapped) and its manifest, as written by `vqar tokenize`."""
    manifest = TokensManifest.load(path)
    if manifest is None:
        raise FileNotFoundError(f"{path} holds no tokenized dataset ({MANIFEST} missing); run `vqar tokenize` first")
    return datasets.load_from_disk(str(path)), manifest


def token_matrix(split: datasets.Dataset) -> list[np.ndarray]:
    """The split's codes as [n, L] arrays, one per Arrow chunk, viewing the memory-mapped file
    (no copy). Folders written before fixed-length rows (int32 lists) are read the same way."""
    column = split.data.column("tokens")
    arrays = []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        if isinstance(chunk, pa.FixedSizeListArray):
            width = chunk.type.list_size
            values = chunk.values.slice(chunk.offset * width, len(chunk) * width)
        else:  # a variable-length list of equal-length rows (vqar before shards)
            offsets = chunk.offsets.to_numpy()
            width = int(offsets[1] - offsets[0])
            if not (np.diff(offsets) == width).all():
                raise ValueError("a tokens split holds rows of different lengths; re-run `vqar tokenize`")
            values = chunk.values.slice(int(offsets[0]), len(chunk) * width)
        arrays.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), width))
    return arrays


class TokenRows(torch.utils.data.Dataset):
    """A split's rows for a DataLoader, read from the memory-mapped shards a batch at a time:
    {"tokens": [L] int64 (the first `num_tokens`), "label": int, "caption": str (if any)}."""

    def __init__(self, split: datasets.Dataset, num_tokens: int | None = None):
        self.chunks = token_matrix(split)
        self.starts = np.cumsum([0, *(len(c) for c in self.chunks)])
        self.labels = split.data.column("label").to_numpy()  # [N] int64: small beside the codes
        self.captions = split.data.column("caption") if "caption" in split.column_names else None
        self.num_tokens = num_tokens

    def __len__(self) -> int:
        return int(self.starts[-1])

    def codes(self, indices: np.ndarray) -> np.ndarray:
        """Rows [len(indices), L] (int64), gathered chunk by chunk."""
        indices = np.asarray(indices, dtype=np.int64)
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        width = self.chunks[0].shape[1] if self.chunks else 0
        out = np.empty((len(indices), width), dtype=np.int64)
        for c in np.unique(chunk):
            where = chunk == c
            out[where] = self.chunks[c][indices[where] - self.starts[c]]
        return out[:, : self.num_tokens]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        codes, labels = self.codes(indices), self.labels[indices]
        rows = [{"tokens": torch.from_numpy(c), "label": int(label)} for c, label in zip(codes, labels)]
        if self.captions is not None:
            for row, caption in zip(rows, self.captions.take(np.asarray(indices, dtype=np.int64)).to_pylist()):
                row["caption"] = caption or ""
        return rows

    def caption_list(self, limit: int | None = None) -> list[str]:
        """The first `limit` captions (all by default; "" where a row has none): what a text tokenizer learns
        from. Empty without captions."""
        if self.captions is None:
            return []
        captions = self.captions if limit is None else self.captions.slice(0, limit)
        return [c or "" for c in captions.to_pylist()]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def code_arrays(dataset: datasets.DatasetDict, manifest: TokensManifest) -> dict[str, np.ndarray]:
    """Each split's codes as one int64 array [N, *shape] ([N, h, w] for grids, [N, L] for 1D tokens),
    in memory: for what needs all of them at once (training visual-BPE merges)."""
    layout = manifest.token_layout
    return {
        name: layout.unflatten(torch.from_numpy(TokenRows(split).codes(np.arange(len(split))))).numpy()
        for name, split in dataset.items()
    }
