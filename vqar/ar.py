"""Stage 2's view of the world: the vocabulary layout, and a stock causal LM sized for it.

The AR model sees integer ids only. `VocabLayout` owns the id space of DESIGN.md:

    [0, K)              image codes of the tokenizer (K = codebook size)
    [K, K+M)            visual-BPE merged tokens (M = 0 without BPE)
    K+M .. K+M+3        begin-of-image, end-of-image, pad, null class (the CFG "no class")
    K+M+4 ..            one token per class

A training sequence is `[condition, BOI, code_1 .. code_N]`: the condition is a class token,
or the null class for unconditional models and for CFG's label dropout. Raster priors model it
token by token; over multiscale tokens (`scales`), the prior predicts a whole scale at a time
from an input derived from the same sequence (`vqar.next_scale`). The layout is saved
inside the AR model's config.json (key `vqar_vocab`), so a checkpoint describes itself and
`AutoModelForCausalLM.from_pretrained` loads it without vqar.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .bpe import VisualBPE, load_bpe
from .next_scale import next_scale_logits

if TYPE_CHECKING:
    from .tokenizer import VQTokenizer
    from .tokens import TokensManifest

CONFIG_KEY = "vqar_vocab"
IDS_KEY = "vqar_ids"  # derived from the layout; for readers of config.json without vqar
PROMPT_LENGTH = 2  # condition, BOI


@dataclass
class VocabLayout:
    codebook_size: int
    tokens_per_image: int
    grid: list[int] | None = None  # [h, w] for grid tokenizers; None for 1D sequences
    scales: list[int] | None = None  # multiscale tokenizers: the token maps' sides, coarse to fine
    num_bpe_tokens: int = 0
    class_names: list[str] = field(default_factory=list)  # empty: unconditional
    tokenizer: str = ""  # the tokenizer trained on: a Hub id, or its folder relative to the prior's
    tokenizer_fingerprint: str = ""  # its `VQTokenizer.fingerprint`: no other tokenizer's codes mean the same

    def __post_init__(self):
        if self.codebook_size < 2 or self.tokens_per_image < 1:
            raise ValueError(
                f"bad layout: codebook_size={self.codebook_size}, tokens_per_image={self.tokens_per_image}"
            )
        if self.grid is not None and math.prod(self.grid) != self.tokens_per_image:
            raise ValueError(f"grid {self.grid} does not hold tokens_per_image={self.tokens_per_image}")
        if self.scales is not None:
            if self.grid is not None or self.num_bpe_tokens:
                raise ValueError("multiscale tokens have no grid and no visual BPE (merges would cross scales)")
            if sum(s * s for s in self.scales) != self.tokens_per_image:
                raise ValueError(f"scales {self.scales} do not hold tokens_per_image={self.tokens_per_image}")

    @property
    def is_multiscale(self) -> bool:
        """A next-scale prior (VAR): one forward pass per scale, not per token."""
        return self.scales is not None

    # -- ids --------------------------------------------------------------------------------

    @property
    def image_vocab_size(self) -> int:
        """Ids that may appear inside an image: codes, then BPE tokens."""
        return self.codebook_size + self.num_bpe_tokens

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
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> int:
        return self.image_vocab_size + 4 + self.num_classes

    @property
    def uses_bpe(self) -> bool:
        """BPE sequences vary in length: they end with EOI and are padded to `sequence_length`."""
        return self.num_bpe_tokens > 0

    @property
    def sequence_length(self) -> int:
        """The longest sequence: the prompt, one id per code at worst, and EOI with BPE."""
        return PROMPT_LENGTH + self.tokens_per_image + int(self.uses_bpe)

    def class_token(self, classes: Tensor | list[int] | int) -> Tensor:
        """Class indices [B] (or one int) -> their condition token ids [B]."""
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        if self.num_classes == 0:
            raise ValueError("this model is unconditional: it has no class tokens")
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"class index must lie in [0, {self.num_classes}), got {classes.tolist()}")
        return self.image_vocab_size + 4 + classes

    def class_index(self, name_or_index: str | int) -> int:
        """A class by name (as in the dataset's labels) or index -> its index, checked."""
        if isinstance(name_or_index, str) and not name_or_index.lstrip("-").isdigit():
            if name_or_index not in self.class_names:
                raise ValueError(f"unknown class {name_or_index!r}; classes: {self.class_names}")
            return self.class_names.index(name_or_index)
        if isinstance(name_or_index, float) and not name_or_index.is_integer():
            raise TypeError(f"a class is a name or an integer index, got {name_or_index!r}")
        index = int(name_or_index)
        if not 0 <= index < self.num_classes:
            raise ValueError(f"class index must lie in [0, {self.num_classes}), got {index}")
        return index

    # -- sequences ----------------------------------------------------------------------------

    def conditions(self, labels: Tensor | None, batch_size: int) -> Tensor:
        """Condition ids [B]: class tokens for labels >= 0, the null class for None or -1."""
        if labels is None or self.num_classes == 0:
            return torch.full((batch_size,), self.null_class, dtype=torch.long)
        labels = labels.long()
        null = labels < 0
        tokens = self.class_token(labels.clamp_min(0))
        return torch.where(null, torch.full_like(tokens, self.null_class), tokens)

    def prompt(self, conditions: Tensor) -> Tensor:
        """Condition ids [B] -> the prompt [B, 2]: condition, BOI."""
        return torch.stack([conditions, torch.full_like(conditions, self.boi)], dim=1)

    def to_sequence(self, labels: Tensor | None, image_ids: Tensor) -> Tensor:
        """(labels [B] or None, image ids [B, N] or [B, h, w]) -> AR input ids [B, sequence_length].

        With BPE, image ids are [B, L] left-aligned and padded with -1; the output is
        `condition, BOI, ids, EOI` padded with the pad id.
        """
        ids = image_ids.reshape(image_ids.shape[0], -1).long()
        prompt = self.prompt(self.conditions(labels, ids.shape[0]).to(ids.device))
        if not self.uses_bpe:
            self.check_image_ids(ids)
            return torch.cat([prompt, ids], dim=1)
        present = ids >= 0
        self.check_image_ids(ids[present])
        B, L = ids.shape
        out = torch.full((B, self.sequence_length), self.pad, dtype=torch.long, device=ids.device)
        out[:, :PROMPT_LENGTH] = prompt
        out[:, PROMPT_LENGTH : PROMPT_LENGTH + L] = torch.where(present, ids, self.pad)
        return out.scatter_(1, PROMPT_LENGTH + present.sum(1, keepdim=True), self.eoi)

    def from_sequence(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """AR ids -> (condition ids [B], image ids).

        Image ids are [B, N] (a grid [B, h, w] when there is one), or with BPE [B, L] padded
        with -1 after each sequence's EOI.
        """
        if sequences.ndim != 2 or sequences.shape[1] > self.sequence_length:
            raise ValueError(f"sequences must be [B, <= {self.sequence_length}], got {tuple(sequences.shape)}")
        images = sequences[:, PROMPT_LENGTH:]
        if self.uses_bpe:
            ended = (images == self.eoi).long().cumsum(1) > 0
            images = images.masked_fill(ended | (images == self.pad), -1)
            self.check_image_ids(images[images >= 0])
            return sequences[:, 0], images
        if images.shape[1] != self.tokens_per_image:
            raise ValueError(f"sequences must be [B, {self.sequence_length}], got {tuple(sequences.shape)}")
        self.check_image_ids(images)
        return sequences[:, 0], self.to_grid(images)

    def to_grid(self, image_ids: Tensor) -> Tensor:
        """[B, N] -> [B, h, w] for grid tokenizers; unchanged for 1D ones."""
        return image_ids.reshape(image_ids.shape[0], *self.grid) if self.grid else image_ids

    def check_image_ids(self, ids: Tensor, codes_only: bool = False) -> None:
        """Ids that may stand inside an image; `codes_only` also refuses BPE tokens."""
        limit = self.codebook_size if codes_only else self.image_vocab_size
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"image ids must be integers, got dtype {ids.dtype}")
        low, high = (ids.min().item(), ids.max().item()) if ids.numel() else (0, 0)  # Python ints: no uint8 wrap
        if low < 0 or high >= limit:
            raise ValueError(f"image ids must lie in [0, {limit}), got values in [{low}, {high}]")

    # -- building, saving and checking -------------------------------------------------------

    @classmethod
    def from_manifest(
        cls, manifest: TokensManifest, *, conditional: bool, bpe: VisualBPE | None = None, num_tokens: int | None = None
    ) -> VocabLayout:
        """The layout of a prior over a tokens folder: its codes, BPE merges and (if conditional) classes.

        `num_tokens`: model only each image's first k tokens (1D tokenizers trained with nested dropout).
        """
        if manifest.scales is not None and bpe is not None:
            raise ValueError(
                f"visual BPE does not apply to multiscale tokens ({manifest.tokenizer}): merges would cross scales; "
                "train the prior with bpe: none"
            )
        if num_tokens is not None and (
            manifest.grid or manifest.scales or not 1 <= num_tokens <= manifest.tokens_per_image
        ):
            shape = f"a grid {manifest.grid}" if manifest.grid else "1d"
            raise ValueError(
                f"num_tokens={num_tokens} needs a 1d tokenizer and 1 <= k <= {manifest.tokens_per_image} "
                f"(these tokens are {shape})"
            )
        if bpe is not None:
            bpe.check_codes(manifest.codebook_size, manifest.grid, what=f"the tokens of {manifest.tokenizer}")
        return cls(
            codebook_size=manifest.codebook_size,
            tokens_per_image=num_tokens or manifest.tokens_per_image,
            grid=manifest.grid,
            scales=manifest.scales,
            num_bpe_tokens=bpe.num_merges if bpe else 0,
            class_names=manifest.class_names if conditional else [],
            tokenizer=manifest.tokenizer,
            tokenizer_fingerprint=manifest.tokenizer_fingerprint,
        )

    def saved_in(self, prior_folder: str | Path) -> VocabLayout:
        """This layout as the prior saved in `prior_folder` records it: a local tokenizer by its path
        relative to that folder, so that the two folders can move together."""
        if not Path(self.tokenizer).is_absolute():
            return self
        return replace(self, tokenizer=os.path.relpath(self.tokenizer, Path(prior_folder).resolve()))

    def tokenizer_location(self, prior: str | Path) -> str:
        """Where the prior's tokenizer is: its folder (resolved from the prior's), or its Hub id."""
        if not self.tokenizer:
            raise ValueError(f"the prior {prior} does not name its tokenizer: pass --tokenizer DIR_OR_HUB_ID")
        local = Path(prior) / self.tokenizer
        return str(local.resolve()) if Path(prior).is_dir() and local.exists() else self.tokenizer

    def to_dict(self) -> dict:
        return asdict(self)

    def special_ids(self) -> dict:
        """The ids a prompt is made of, for users of plain transformers: saved in the config as `vqar_ids`."""
        classes = {name: self.image_vocab_size + 4 + i for i, name in enumerate(self.class_names)}
        return {"boi": self.boi, "eoi": self.eoi, "pad": self.pad, "null_class": self.null_class, "classes": classes}

    @classmethod
    def from_model_config(cls, config) -> VocabLayout:
        data = getattr(config, CONFIG_KEY, None)
        if data is None:
            raise ValueError(f"this model's config has no `{CONFIG_KEY}`: it was not trained by vqar")
        return cls(**data)

    def check_tokenizer(self, tokenizer: VQTokenizer, *, allow_other: bool = False) -> None:
        """Refuse a tokenizer whose codes do not mean what the model was trained on: another shape,
        or (by fingerprint) other weights; `allow_other` turns the second into a warning.

        A prior over the first k tokens of a 1d tokenizer trained with nested dropout matches it.
        """
        self._check_tokenizer_shape(tokenizer)
        if self.tokenizer_fingerprint and tokenizer.fingerprint != self.tokenizer_fingerprint:
            message = (
                f"the prior was trained on another tokenizer ({self.tokenizer}, fingerprint "
                f"{self.tokenizer_fingerprint[:12]}); this one ({tokenizer.name_or_path or 'in memory'}) has other "
                f"weights or settings (fingerprint {tokenizer.fingerprint[:12]}), so its codes mean other things"
            )
            if not allow_other:
                raise ValueError(message + "; use the prior's tokenizer, or --allow-other-tokenizer to go on anyway")
            warnings.warn(message + "; going on (allow_other_tokenizer)", stacklevel=2)

    def _check_tokenizer_shape(self, tokenizer: VQTokenizer) -> None:
        expected = (self.codebook_size, self.tokens_per_image)
        got = (tokenizer.codebook_size, tokenizer.tokens_per_image)
        one_d = tokenizer.token_grid is None and self.grid is None
        if one_d and self.tokens_per_image < got[1]:
            if not tokenizer.decodes_prefixes:
                raise ValueError(
                    f"the prior models the first {self.tokens_per_image} of {got[1]} tokens, but the "
                    "tokenizer was not trained with nested_dropout, so it cannot decode a prefix"
                )
            got = (got[0], self.tokens_per_image)
        grid = list(tokenizer.token_grid) if tokenizer.token_grid else None
        if tokenizer.scales != self.scales:
            raise ValueError(
                f"tokenizer does not match the prior: the prior models {self._token_kind(self.scales)}, the "
                f"tokenizer gives {self._token_kind(tokenizer.scales)}"
            )
        if got != expected or grid != self.grid:
            raise ValueError(
                f"tokenizer does not match the prior: the prior was trained on {self.tokenizer or 'a tokenizer'} with "
                f"codebook_size={expected[0]}, tokens_per_image={expected[1]}; got codebook_size={got[0]}, "
                f"tokens_per_image={got[1]}"
                + (f" (token grid {grid}, the prior's {self.grid})" if grid != self.grid else "")
            )

    @staticmethod
    def _token_kind(scales: list[int] | None) -> str:
        return f"multiscale tokens at scales {scales}" if scales else "single-scale tokens (a grid or a 1D sequence)"

    def check_bpe(self, bpe: VisualBPE | None) -> None:
        """Refuse a visual BPE that is not the one the prior's ids were made with (or a missing one)."""
        if bpe is None:
            if self.uses_bpe:
                raise ValueError(
                    f"this prior models {self.num_bpe_tokens} visual-BPE tokens, but no visual BPE was given"
                )
            return
        if bpe.num_merges != self.num_bpe_tokens:
            raise ValueError(
                f"visual BPE does not match the prior: it has {bpe.num_merges} merges, the prior models "
                f"{self.num_bpe_tokens} BPE tokens"
            )
        bpe.check_codes(self.codebook_size, self.grid, what="the prior's codes")


# -- the causal LM ----------------------------------------------------------------------------

PRIOR_SIZES = {
    # Llama shapes; "S"/"B" follow LlamaGen's GPT-B/L widths scaled down for CPUs.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172),
    "cpu": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=512),
    "S": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
    "B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "L": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816),
}


def prior_loss(model, layout: VocabLayout, sequences: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in nats of the image ids (and EOI, with BPE) of sequences [B, S] from
    `layout.to_sequence`: token by token (raster), or each scale given the coarser ones (multiscale)."""
    if layout.is_multiscale:
        codes = sequences[:, PROMPT_LENGTH:]
        logits = next_scale_logits(model, layout.scales, layout.boi, sequences[:, 0], codes).float()
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction=reduction)
    targets = sequences.masked_fill(sequences == layout.pad, -100)
    targets[:, :PROMPT_LENGTH] = -100
    logits = model(input_ids=sequences).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), targets[:, 1:], ignore_index=-100, reduction=reduction)


def _modelled_ids(layout: VocabLayout, sequences: Tensor) -> int:
    """How many ids of the sequences the prior predicts: the codes (and EOI with BPE), not padding."""
    return int((sequences[:, PROMPT_LENGTH:] != layout.pad).sum().item())


@torch.inference_mode()
def image_nll(model, layout: VocabLayout, sequences: Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood in nats of the image ids (and EOI, with BPE) of AR
    sequences [B, S] from `layout.to_sequence`, and how many ids that covers."""
    return prior_loss(model, layout, sequences, reduction="sum").item(), _modelled_ids(layout, sequences)


def build_prior(layout: VocabLayout, model_type: str = "llama", size: str = "cpu", **overrides) -> PreTrainedModel:
    """A freshly initialised `AutoModelForCausalLM` whose vocabulary and context fit `layout`."""
    if size not in PRIOR_SIZES:
        raise ValueError(f"unknown prior size {size!r}; sizes: {sorted(PRIOR_SIZES)}")
    options = {**PRIOR_SIZES[size], **overrides}
    context = options.pop("max_position_embeddings", layout.sequence_length)
    if context < layout.sequence_length:
        raise ValueError(
            f"max_position_embeddings={context} is shorter than one image's sequence ({layout.sequence_length} = "
            f"{PROMPT_LENGTH} prompt tokens + {layout.tokens_per_image} image tokens)"
        )
    config = AutoConfig.for_model(
        model_type,
        vocab_size=layout.vocab_size,
        max_position_embeddings=context,
        bos_token_id=layout.boi,
        eos_token_id=layout.eoi,
        pad_token_id=layout.pad,
        **options,
    )
    if "num_key_value_heads" not in options and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = config.num_attention_heads  # some configs default to 32 KV heads (Qwen2)
    setattr(config, CONFIG_KEY, layout.to_dict())
    setattr(config, IDS_KEY, layout.special_ids())
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = plain_generation_config(layout)
    return model


def plain_generation_config(layout: VocabLayout) -> GenerationConfig:
    """What plain `model.generate(prompt)` needs to sample one image: the number of new tokens,
    sampling from the model's own distribution, and every id that is not an image id suppressed
    (with visual BPE, EOI stays allowed; the code budget only vqar's sampler keeps)."""
    banned = [i for i in range(layout.image_vocab_size, layout.vocab_size) if not (layout.uses_bpe and i == layout.eoi)]
    new_tokens = layout.sequence_length - PROMPT_LENGTH
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0 if layout.uses_bpe else new_tokens,
        do_sample=True,
        top_k=0,
        suppress_tokens=banned,
        bos_token_id=layout.boi,
        eos_token_id=layout.eoi,
        pad_token_id=layout.pad,
    )


def load_prior(path: str, **kwargs) -> tuple[PreTrainedModel, VocabLayout]:
    """A prior saved by `vqar train-prior` (folder or Hub id) and its vocabulary layout; safetensors only."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **{"use_safetensors": True, **kwargs})
    except OSError as error:
        where = (
            "the folder holds no prior" if Path(path).is_dir() else "no such folder here, and the Hub did not give it"
        )
        raise OSError(
            f"cannot load the prior {str(path)!r}: {where}; give the OUTPUT/prior folder of `vqar train-prior` or a "
            f"Hub id ({' '.join(str(error).split())[:200]})"
        ) from error
    return model.eval(), VocabLayout.from_model_config(model.config)


def load_prior_bpe(path: str, layout: VocabLayout | None = None) -> VisualBPE | None:
    """The visual BPE a prior was trained on (saved beside its weights), or None; checked
    against the prior's layout (read from its config when not given)."""
    bpe = load_bpe(path)
    layout = layout or VocabLayout.from_model_config(AutoConfig.from_pretrained(path))
    layout.check_bpe(bpe)
    return bpe
