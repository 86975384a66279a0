"""Stage 2's view of the world: the prior's layout, and a stock causal LM sized for it.

The AR model sees integer ids only. What they mean is split by reason to change:

- `IdSpace` (`vqar.vocab`): the id table — codes, visual-BPE tokens, specials, conditions;
- `SequenceCodec` (`vqar.sequences`): how a condition and an image become a sequence and back;
- `TokenizerProvenance` (`vqar.provenance`): which tokenizer the codes come from, its fingerprint.

`VocabLayout` holds the three and the image's `TokenLayout` (`vqar.layouts`). It is saved inside
the AR model's config.json (key `vqar_vocab`, the same flat fields as ever: old priors load), so a
checkpoint describes itself and `AutoModelForCausalLM.from_pretrained` loads it without vqar.
Raster priors model the sequence token by token; over multiscale tokens, the prior predicts a
whole scale at a time from an input derived from the same sequence (`vqar.next_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .bpe import VisualBPE, load_bpe
from .layouts import NEXT_SCALE, NEXT_TOKEN, TokenLayout
from .next_scale import next_scale_logits
from .provenance import TokenizerProvenance
from .sequences import SequenceCodec
from .vocab import IdSpace
from .weights import damaged_file

if TYPE_CHECKING:
    from .tokenizer import VQTokenizer
    from .tokens import TokensManifest

CONFIG_KEY = "vqar_vocab"
IDS_KEY = "vqar_ids"  # derived from the layout; for readers of config.json without vqar


@dataclass(frozen=True)
class VocabLayout:
    """Everything a prior's ids mean: the id space, the image's token layout, the codec between
    them, and the tokenizer the codes come from.

    >>> layout = VocabLayout.create(codebook_size=1000, tokens_per_image=16, grid=[4, 4], class_names=["a", "b"])
    >>> layout.ids.boi, layout.codec.sequence_length
    (1000, 18)
    """

    ids: IdSpace
    tokens: TokenLayout
    provenance: TokenizerProvenance = field(default_factory=TokenizerProvenance)
    begin_of_image: bool = True  # False: `[condition, codes]`, as LlamaGen's priors read them
    text_length: int = 0  # text priors: the most text ids of a prompt (`vqar.text`)

    def __post_init__(self):
        if self.ids.uses_bpe and self.tokens.prior_order != NEXT_TOKEN:
            raise ValueError(f"{self.tokens.kind} tokens have no grid and no visual BPE (merges would cross scales)")
        if self.ids.uses_text and (self.ids.uses_bpe or not self.begin_of_image or self.text_length < 1):
            raise ValueError(
                "a text prior reads `[text ids] BOI [codes]`: it needs text_length >= 1 and takes no visual BPE, got "
                f"text_length={self.text_length}, num_bpe_tokens={self.ids.num_bpe_tokens}"
            )

    @property
    def codec(self) -> SequenceCodec:
        return SequenceCodec(self.ids, self.tokens, self.begin_of_image, self.text_length)

    # -- the saved form (`vqar_vocab`) ------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        codebook_size: int,
        tokens_per_image: int,
        grid: list[int] | None = None,
        scales: list[int] | None = None,
        num_bpe_tokens: int = 0,
        class_names: list[str] | tuple[str, ...] = (),
        tokenizer: str = "",
        tokenizer_fingerprint: str = "",
        begin_of_image: bool = True,
        num_text_tokens: int = 0,
        text_length: int = 0,
    ) -> VocabLayout:
        """A layout from the flat fields `vqar_vocab` holds (those of every vqar version)."""
        if codebook_size < 2 or tokens_per_image < 1:
            raise ValueError(f"bad layout: codebook_size={codebook_size}, tokens_per_image={tokens_per_image}")
        return cls(
            IdSpace(codebook_size, num_bpe_tokens, tuple(class_names), num_text_tokens),
            TokenLayout.from_fields(tokens_per_image, grid, scales),
            TokenizerProvenance(tokenizer, tokenizer_fingerprint),
            begin_of_image,
            text_length,
        )

    def to_dict(self) -> dict:
        fields = {
            "codebook_size": self.ids.codebook_size,
            **self.tokens.to_fields(),
            "num_bpe_tokens": self.ids.num_bpe_tokens,
            "class_names": list(self.ids.class_names),
            "tokenizer": self.provenance.tokenizer,
            "tokenizer_fingerprint": self.provenance.fingerprint,
        }
        if not self.begin_of_image:
            fields["begin_of_image"] = False  # written only when False: older readers assume BOI
        if self.ids.uses_text:
            fields |= {"num_text_tokens": self.ids.num_text_tokens, "text_length": self.text_length}
        return fields

    @classmethod
    def from_model_config(cls, config) -> VocabLayout:
        data = getattr(config, CONFIG_KEY, None)
        if data is None:
            raise ValueError(f"this model's config has no `{CONFIG_KEY}`: it was not trained by vqar")
        return cls.create(**data)

    def saved_in(self, prior_folder: str | Path) -> VocabLayout:
        """This layout as the prior saved in `prior_folder` records it (the tokenizer by a relative path)."""
        return replace(self, provenance=self.provenance.saved_in(prior_folder))

    @classmethod
    def from_manifest(
        cls, manifest: TokensManifest, *, conditional: bool, bpe: VisualBPE | None = None, num_tokens: int | None = None
    ) -> VocabLayout:
        """The layout of a prior over a tokens folder: its codes, BPE merges and (if conditional) classes.

        `num_tokens`: model only each image's first k tokens (1D tokenizers trained with nested dropout).
        """
        tokens = manifest.token_layout
        if bpe is not None and tokens.prior_order != NEXT_TOKEN:
            raise ValueError(
                f"visual BPE does not apply to {tokens.describe()} ({manifest.tokenizer}): merges would cross "
                "scales; train the prior with bpe: none"
            )
        if num_tokens is not None:
            tokens = tokens.leading(num_tokens)
        if bpe is not None:
            bpe.check_codes(manifest.codebook_size, tokens.row_length, what=f"the tokens of {manifest.tokenizer}")
        classes = tuple(manifest.class_names) if conditional else ()
        return cls(
            IdSpace(manifest.codebook_size, bpe.num_merges if bpe else 0, classes),
            tokens,
            TokenizerProvenance(manifest.tokenizer, manifest.tokenizer_fingerprint),
        )

    # -- checks -----------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer: VQTokenizer, *, allow_other: bool = False) -> None:
        """Refuse a tokenizer whose codes do not mean what the model was trained on: another kind of
        tokens or codebook, or (by fingerprint) other weights; `allow_other` turns the last into a warning.

        A grid tokenizer decodes the prior's grid whatever size it was trained at; a prior over the
        first k tokens of a 1d tokenizer trained with nested dropout matches it.
        """
        why = self.tokens.accepts(tokenizer.token_layout, tokenizer.decodes_prefixes)
        if why is None and tokenizer.codebook_size == self.ids.codebook_size:
            self.provenance.check(tokenizer, allow_other=allow_other)
            return
        raise ValueError(
            f"tokenizer does not match the prior: the prior was trained on {self.provenance.tokenizer or 'a tokenizer'} "
            f"with codebook_size={self.ids.codebook_size}, tokens_per_image={self.tokens.tokens_per_image}; got "
            f"codebook_size={tokenizer.codebook_size}, tokens_per_image={tokenizer.tokens_per_image}"
            + (f" ({why})" if why else "")
        )

    def check_bpe(self, bpe: VisualBPE | None) -> None:
        """Refuse a visual BPE that is not the one the prior's ids were made with (or a missing one)."""
        if bpe is None:
            if self.ids.uses_bpe:
                raise ValueError(
                    f"this prior models {self.ids.num_bpe_tokens} visual-BPE tokens, but no visual BPE was given"
                )
            return
        if bpe.num_merges != self.ids.num_bpe_tokens:
            raise ValueError(
                f"visual BPE does not match the prior: it has {bpe.num_merges} merges, the prior models "
                f"{self.ids.num_bpe_tokens} BPE tokens"
            )
        bpe.check_codes(self.ids.codebook_size, self.tokens.row_length, what="the prior's codes")


# -- the causal LM ----------------------------------------------------------------------------

PRIOR_SIZES = {
    # Llama shapes. "tiny" and "cpu" are for tests and CPU recipes; "S" is a small GPU prior; "B" to "3B" are
    # LlamaGen's GPT-B/L/XL/XXL/3B (Sun et al. 2024; FFN width 2/3 of 4x, rounded up to a multiple of 256).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172),
    "cpu": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=512),
    "S": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
    "B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "L": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816),
    "XL": dict(hidden_size=1280, num_hidden_layers=36, num_attention_heads=20, intermediate_size=3584),
    "XXL": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, intermediate_size=4096),
    "3B": dict(hidden_size=3200, num_hidden_layers=24, num_attention_heads=32, intermediate_size=8704),
}


def _next_token_loss(model, layout: VocabLayout, sequences: Tensor, reduction: str, text_weight: float) -> Tensor:
    modelled = layout.codec.modelled_ids(sequences)
    targets = sequences.masked_fill(~modelled, -100)
    mask, positions = layout.codec.attention_inputs(sequences)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits[:, :-1].float()
    loss = F.cross_entropy(logits.transpose(1, 2), targets[:, 1:], ignore_index=-100, reduction=reduction)
    if text_weight:  # each caption's ids after its first, and BOI: the text is modelled too
        text = ~modelled & (sequences != layout.ids.pad) & (mask.cumsum(1) > 1)
        text_targets = sequences.masked_fill(~text, -100)[:, 1:]
        loss = loss + text_weight * F.cross_entropy(
            logits.transpose(1, 2), text_targets, ignore_index=-100, reduction=reduction
        )
    return loss


def _next_scale_loss(model, layout: VocabLayout, sequences: Tensor, reduction: str, text_weight: float) -> Tensor:
    if text_weight:
        raise ValueError("a next-scale prior models the image only: text_loss_weight must be 0")
    prompt = sequences.shape[1] - layout.tokens.tokens_per_image
    codes = sequences[:, prompt:]
    conditions, pad = (sequences[:, :prompt], layout.ids.pad) if layout.ids.uses_text else (sequences[:, 0], None)
    logits = next_scale_logits(model, list(layout.tokens.scales), layout.ids.boi, conditions, codes, pad).float()
    return F.cross_entropy(logits.transpose(1, 2), codes, reduction=reduction)


PRIOR_LOSSES = {NEXT_TOKEN: _next_token_loss, NEXT_SCALE: _next_scale_loss}  # by `TokenLayout.prior_order`


def prior_loss(
    model, layout: VocabLayout, sequences: Tensor, reduction: str = "mean", text_weight: float = 0.0
) -> Tensor:
    """Cross-entropy in nats of the image ids (and EOI, with BPE) of sequences [B, S] from
    `layout.codec.to_sequence`: token by token (raster), or each scale given the coarser ones (multiscale).
    A text prior's `text_weight` adds the captions' own cross-entropy, so weighted."""
    if text_weight and not layout.ids.uses_text:
        raise ValueError("text_loss_weight is for text priors; this one has no text")
    return PRIOR_LOSSES[layout.tokens.prior_order](model, layout, sequences, reduction, text_weight)


@torch.inference_mode()
def image_nll(model, layout: VocabLayout, sequences: Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood in nats of the image ids (and EOI, with BPE) of AR
    sequences [B, S] from `layout.to_sequence`, and how many ids that covers."""
    return prior_loss(model, layout, sequences, reduction="sum").item(), int(layout.codec.modelled_ids(sequences).sum())


def build_prior(layout: VocabLayout, model_type: str = "llama", size: str = "cpu", **overrides) -> PreTrainedModel:
    """A freshly initialised `AutoModelForCausalLM` whose vocabulary and context fit `layout`."""
    if size not in PRIOR_SIZES:
        raise ValueError(f"unknown prior size {size!r}; sizes: {sorted(PRIOR_SIZES)}")
    options = {**PRIOR_SIZES[size], **overrides}
    codec, ids = layout.codec, layout.ids
    context = options.pop("max_position_embeddings", codec.sequence_length)
    if context < codec.sequence_length:
        raise ValueError(
            f"max_position_embeddings={context} is shorter than one image's sequence ({codec.sequence_length} = "
            f"{codec.prompt_length} prompt tokens + {layout.tokens.tokens_per_image} image tokens)"
        )
    config = AutoConfig.for_model(
        model_type,
        vocab_size=ids.vocab_size,
        max_position_embeddings=context,
        bos_token_id=ids.boi,
        eos_token_id=ids.eoi,
        pad_token_id=ids.pad,
        **options,
    )
    if "num_key_value_heads" not in options and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = config.num_attention_heads  # some configs default to 32 KV heads (Qwen2)
    setattr(config, CONFIG_KEY, layout.to_dict())
    setattr(config, IDS_KEY, ids.special_ids())
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = plain_generation_config(layout)
    return model


def plain_generation_config(layout: VocabLayout) -> GenerationConfig:
    """What plain `model.generate(prompt)` needs to sample one image: the number of new tokens,
    sampling from the model's own distribution, and every id that is not an image id suppressed
    (with visual BPE, EOI stays allowed; the code budget only vqar's sampler keeps)."""
    ids, codec = layout.ids, layout.codec
    banned = [i for i in range(ids.image_vocab_size, ids.vocab_size) if not (ids.uses_bpe and i == ids.eoi)]
    new_tokens = codec.sequence_length - codec.prompt_length
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=0 if ids.uses_bpe else new_tokens,
        do_sample=True,
        top_k=0,
        suppress_tokens=banned,
        bos_token_id=ids.boi,
        eos_token_id=ids.eoi,
        pad_token_id=ids.pad,
    )


def from_language_model(name: str, layout: VocabLayout, max_text_tokens: int):
    """A text prior started from a causal language model (folder or Hub id) and its fast tokenizer, as
    Liquid and Lumina-mGPT start theirs: the model's vocabulary becomes the prior's text range (its
    embedding rows moved there, from `ids.first_text`), and the image codes and specials are new rows
    before it, drawn around the mean of the model's own. -> (model, TextTokenizer, the text layout)."""
    from transformers import AutoTokenizer

    from .text import TextTokenizer, text_vocab_size

    tokenizer = AutoTokenizer.from_pretrained(name)
    if not tokenizer.is_fast:
        raise ValueError(f"{name} has no fast tokenizer (tokenizer.json): its ids cannot be moved into the prior's")
    raw = tokenizer.backend_tokenizer
    model = AutoModelForCausalLM.from_pretrained(name)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = replace(layout.ids, class_names=(), num_text_tokens=max(rows, text_vocab_size(raw)))
    text = TextTokenizer.from_backend(raw, ids, max_text_tokens)
    grown = replace(layout, ids=ids, text_length=text.text_length)
    if getattr(model.config, "max_position_embeddings", grown.codec.sequence_length) < grown.codec.sequence_length:
        raise ValueError(
            f"{name} reads at most {model.config.max_position_embeddings} positions; a prompt and an image take "
            f"{grown.codec.sequence_length}: lower --max_text_tokens or use another model"
        )
    model.resize_token_embeddings(ids.vocab_size, mean_resizing=False)
    embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings()
    _move_rows(embeddings, rows, ids.first_text)
    if output is not None and output.weight is not embeddings:
        _move_rows(output.weight, rows, ids.first_text)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = ids.boi, ids.eoi, ids.pad
    setattr(model.config, CONFIG_KEY, grown.to_dict())
    setattr(model.config, IDS_KEY, ids.special_ids())
    model.generation_config = plain_generation_config(grown)
    return model, text, grown


@torch.no_grad()
def _move_rows(weight: Tensor, rows: int, first: int) -> None:
    """A grown embedding [V, d] whose first `rows` rows are a language model's: move them to start at
    `first`; every other row is drawn from a normal around their mean, with their spread."""
    theirs = weight[:rows].clone()
    weight.copy_(theirs.mean(0) + theirs.std() * torch.randn_like(weight))
    weight[first : first + rows] = theirs


def load_prior(path: str, **kwargs) -> tuple[PreTrainedModel, VocabLayout]:
    """A prior saved by `vqar train-prior` (folder or Hub id) and its vocabulary layout; safetensors only."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **{"use_safetensors": True, **kwargs})
    except SafetensorError as error:
        raise damaged_file(path, error, "the prior's weights file", "save or download it again") from error
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
