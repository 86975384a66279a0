"""Text prompts for text-conditional priors: captions -> text ids in the prior's id space.

One vocabulary holds the text tokens and the image codes, as Chameleon, Emu3, Janus and Liquid
have it: the prior reads `[text ids] BOI [image codes]` (`vqar.sequences`). `TextTokenizer` wraps a
Hugging Face `tokenizers` tokenizer — a byte-level BPE trained on the captions (`train_bpe`), or a
language model's own (`from_language_model`) — with its ids moved to the prior's text range
(`IdSpace.first_text`) and BOI appended to every prompt. It is saved beside the prior's weights as a
plain `tokenizer.json`, so `AutoTokenizer.from_pretrained(prior)("a red circle")` gives the whole
prompt with plain transformers, and left-pads a batch with the prior's pad id.

Captions are cut to `max_text_tokens` (counted, and said once), and anything a caption holds —
emoji, any script, bytes that were not UTF-8 (replaced, and counted) — is tokenized, never refused:
a byte-level BPE has a token for every byte.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .vocab import IdSpace

logger = logging.getLogger(__name__)

BOI_TOKEN, PAD_TOKEN = "<|begin_of_image|>", "<|pad|>"
SETTINGS_FILE = "vqar_text.json"  # beside tokenizer.json: where the text ids sit, how long a prompt may be
DICT_VOCAB_MODELS = ("BPE", "WordPiece", "WordLevel")  # tokenizer models whose ids can be moved


def clean_caption(caption) -> tuple[str, bool]:
    """Any caption value -> (a valid UTF-8 string, whether something had to be replaced). None is "";
    bytes are decoded as UTF-8 with U+FFFD for what is not; lone surrogates (a file decoded with
    `surrogateescape`) are replaced alike."""
    if caption is None:
        return "", False
    if isinstance(caption, bytes):
        try:
            return caption.decode("utf-8"), False
        except UnicodeDecodeError:
            return caption.decode("utf-8", errors="replace"), True
    text = str(caption)
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8"), True


def bpe_vocab_size(captions: list[str]) -> int:
    """A byte-level BPE's size for a set of captions: the 256 bytes, and merges for about twice the
    distinct words (so most words become one or two tokens), within [64, 32,000] merges."""
    words = {word for caption in captions for word in re.findall(r"\w+", caption.lower())}
    return 256 + min(32_000, max(64, 2 * len(words)))


def text_vocab_size(raw) -> int:
    """The ids a tokenizer (ids from 0) uses: the size of the prior's text range."""
    return max(raw.get_vocab(with_added_tokens=True).values()) + 1


def train_bpe(captions: Iterable[str], vocab_size: int | None = None):
    """A byte-level BPE (`tokenizers`) trained on the captions, ids from 0; offline, seconds for 10^5 captions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    captions = [clean_caption(c)[0] for c in captions]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or bpe_vocab_size(captions),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    return tokenizer


@dataclass
class TextTokenizer:
    """Captions -> prompts of the prior: text ids (in the prior's range) then BOI, left-padded with pad.

    `backend` is a `tokenizers.Tokenizer` whose ids are already the prior's and whose post-processor
    appends BOI (after any start token of a language model's own tokenizer)."""

    backend: object
    ids: IdSpace
    max_text_tokens: int
    truncated: int = field(default=0, init=False)  # captions cut to max_text_tokens so far
    replaced: int = field(default=0, init=False)  # captions with bytes that were not UTF-8

    @classmethod
    def from_backend(cls, raw, ids: IdSpace, max_text_tokens: int) -> TextTokenizer:
        """A tokenizer with ids from 0 (trained here, or a language model's) moved to `ids.first_text` onward;
        `ids.num_text_tokens` must hold its `text_vocab_size` (a language model's embedding may have more rows)."""
        if ids.num_text_tokens < text_vocab_size(raw):
            raise ValueError(f"the prior has {ids.num_text_tokens} text ids, the tokenizer {text_vocab_size(raw)}")
        from tokenizers import Tokenizer, processors

        state = json.loads(raw.to_str())
        kind = state["model"]["type"]
        if kind not in DICT_VOCAB_MODELS:
            raise ValueError(
                f"a {kind} text tokenizer cannot be moved into the prior's id range (its ids are list positions); "
                f"give a language model whose tokenizer is one of {', '.join(DICT_VOCAB_MODELS)}"
            )
        prefix = raw.encode("").ids  # a language model's start token, if its post-processor adds one
        offset = ids.first_text
        state["model"]["vocab"] = {token: i + offset for token, i in state["model"]["vocab"].items()}
        state["model"]["vocab"] |= {BOI_TOKEN: ids.boi, PAD_TOKEN: ids.pad}
        added = [{**token, "id": token["id"] + offset} for token in state.get("added_tokens", [])]
        state["added_tokens"] = added + [_special(BOI_TOKEN, ids.boi), _special(PAD_TOKEN, ids.pad)]
        state["post_processor"] = None
        state["truncation"] = state["padding"] = None
        backend = Tokenizer.from_str(json.dumps(state))
        names = [raw.id_to_token(i) for i in prefix]
        backend.post_processor = processors.TemplateProcessing(
            single=[*names, "$A", BOI_TOKEN],
            special_tokens=[*((n, i + offset) for n, i in zip(names, prefix)), (BOI_TOKEN, ids.boi)],
        )
        backend.enable_truncation(max_length=max_text_tokens + len(prefix) + 1)
        return cls(backend, ids, max_text_tokens)

    @classmethod
    def load(cls, prior: str | Path, ids: IdSpace, text_length: int) -> TextTokenizer:
        """The text tokenizer saved beside a prior (folder or Hub id)."""
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(str(prior))
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"the text prior {prior} has no readable text tokenizer (tokenizer.json beside its weights): {error}"
            ) from error
        backend = loaded.backend_tokenizer
        if backend.token_to_id(BOI_TOKEN) != ids.boi or backend.token_to_id(PAD_TOKEN) != ids.pad:
            raise ValueError(
                f"the text tokenizer of {prior} does not match the prior: its {BOI_TOKEN} and {PAD_TOKEN} are "
                f"{backend.token_to_id(BOI_TOKEN)} and {backend.token_to_id(PAD_TOKEN)}, the prior's {ids.boi} and {ids.pad}"
            )
        start_tokens = len(backend.encode("").ids) - 1
        backend.enable_truncation(max_length=text_length + 1)
        return cls(backend, ids, text_length - start_tokens)

    @classmethod
    def load_saved(cls, folder: str | Path, ids: IdSpace) -> TextTokenizer:
        """A text tokenizer `save` wrote, for a prior whose ids are `ids` but for the text range."""
        saved = json.loads((Path(folder) / SETTINGS_FILE).read_text())
        ids = replace(ids, num_text_tokens=saved["num_text_tokens"])
        if ids.first_text != saved["first_text"]:
            raise ValueError(
                f"the text tokenizer in {folder} puts text at id {saved['first_text']}, this prior at {ids.first_text}"
            )
        return cls.load(folder, ids, saved["text_length"])

    @property
    def text_length(self) -> int:
        """The most text ids of a prompt (a language model's start token included, BOI not):
        `VocabLayout.text_length`."""
        return self.max_text_tokens + len(self.backend.encode("").ids) - 1

    def encode(self, captions: list) -> list[list[int]]:
        """Captions -> each one's prompt ids (text, BOI); those cut or cleaned are counted, and said once."""
        cleaned = [clean_caption(c) for c in captions]
        encodings = self.backend.encode_batch([text for text, _ in cleaned])
        cut, bad = sum(bool(e.overflowing) for e in encodings), sum(b for _, b in cleaned)
        if cut and not self.truncated:
            logger.warning(
                "captions longer than %d text tokens are cut to that length (said once, each one counted)",
                self.max_text_tokens,
            )
        if bad and not self.replaced:
            logger.warning("captions holding bytes that are not UTF-8 are read with U+FFFD in their place (counted)")
        self.truncated, self.replaced = self.truncated + cut, self.replaced + bad
        return [e.ids for e in encodings]

    def prompts(self, captions: list, length: int | None = None) -> Tensor:
        """Captions -> prompts [B, P] (long), left-padded with the pad id to the longest (or `length`)."""
        encoded = self.encode(captions)
        width = max(length or 0, max(len(e) for e in encoded))
        out = torch.full((len(encoded), width), self.ids.pad, dtype=torch.long)
        for row, ids in enumerate(encoded):
            out[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, folder: str | Path) -> None:
        """tokenizer.json and its transformers config beside the prior: `AutoTokenizer` loads it."""
        from transformers import PreTrainedTokenizerFast

        backend = self.backend.__class__.from_str(self.backend.to_str())
        backend.no_truncation()  # transformers sets truncation per call; the limit is model_max_length
        PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=PAD_TOKEN,
            padding_side="left",
            model_max_length=self.text_length + 1,
        ).save_pretrained(str(folder))
        settings = {"first_text": self.ids.first_text, "num_text_tokens": self.ids.num_text_tokens}
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings | {"text_length": self.text_length}))


def _special(content: str, id_: int) -> dict:
    return {
        "id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True,
    }  # fmt: skip


def load_text_tokenizer(prior: str | Path, layout) -> TextTokenizer | None:
    """The text tokenizer saved beside a text prior (folder or Hub id); None for other priors."""
    if not layout.ids.uses_text:
        return None
    return TextTokenizer.load(prior, layout.ids, layout.text_length)
