"""A tokenized dataset on disk: the boundary between stage 1 and stage 2.

`vqar tokenize` (vqar.training.encode_dataset) encodes images with a frozen tokenizer and
writes, with `write_tokens`, a `datasets.DatasetDict` with `train` and `eval` splits — `tokens`
(int32, one row of codes per image) and `label` (-1 without labels) — plus `vqar_tokens.json`,
the `TokensManifest`: what the codes are (codebook size, tokens per image, grid, 1D or multiscale)
and where they came from. The prior trainer and visual-BPE training read both with `load_tokens`;
neither needs the tokenizer itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import torch

from .layouts import TokenLayout

MANIFEST = "vqar_tokens.json"


@dataclass
class TokensManifest:
    """What a tokens folder holds, saved as `vqar_tokens.json` beside the splits."""

    tokenizer: str  # the tokenizer: the absolute path of its folder, or its Hub id
    codebook_size: int
    tokens_per_image: int
    grid: list[int] | None  # [h, w] for grid tokenizers; None for 1D sequences and multiscale tokens
    scales: list[int] | None = None  # multiscale tokenizers: the token maps' sides, coarse to fine
    fingerprint: str = ""  # of the tokenizer, the source, the options and the preprocessing: reuse is safe
    tokenizer_fingerprint: str = ""  # `VQTokenizer.fingerprint`: config and weights; the prior records it
    decodes_prefixes: bool = False  # 1D with nested dropout: any leading k tokens decode
    class_names: list[str] = field(default_factory=list)  # empty: the source has no class labels
    data: str = ""
    num_images: dict[str, int] = field(default_factory=dict)  # per split
    skipped_images: int = 0

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2))
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


def write_tokens(output: str | Path, splits: dict[str, dict], manifest: TokensManifest) -> None:
    """Write splits {name: {"tokens": [N rows of codes], "label": [N]}} and the manifest.

    The manifest is removed first and written last, so an interrupted rewrite never looks up to date.
    """
    output = Path(output)
    features = datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("int32")), "label": datasets.Value("int64")}
    )
    dataset = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"tokens": np.stack(columns["tokens"]) if columns["tokens"] else [], "label": columns["label"]},
                features=features,
            )
            for name, columns in splits.items()
        }
    )
    (output / MANIFEST).unlink(missing_ok=True)
    dataset.save_to_disk(str(output))
    manifest.save(output)


def load_tokens(path: str | Path) -> tuple[datasets.DatasetDict, TokensManifest]:
    """A tokenized dataset and its manifest, as written by `vqar tokenize`."""
    manifest = TokensManifest.load(path)
    if manifest is None:
        raise FileNotFoundError(f"{path} holds no tokenized dataset ({MANIFEST} missing); run `vqar tokenize` first")
    return datasets.load_from_disk(str(path)), manifest


def code_arrays(dataset: datasets.DatasetDict, manifest: TokensManifest) -> dict[str, np.ndarray]:
    """Each split's codes as one int64 array [N, *shape]: [N, h, w] for grids, [N, L] for 1D tokens."""
    layout = manifest.token_layout
    return {
        name: layout.unflatten(torch.from_numpy(np.asarray(split["tokens"], dtype=np.int64))).numpy()
        for name, split in dataset.items()
    }
