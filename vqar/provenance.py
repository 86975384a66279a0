"""Provenance of a prior's codes: which tokenizer they came from, its fingerprint, where it lives.

A prior is only as good as the tokenizer that decodes its codes: it records the tokenizer it was
trained on — a Hub id, or its folder relative to the prior's, so that the two can move together —
and that tokenizer's fingerprint (`VQTokenizer.fingerprint`), and refuses another unless told.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class TokenizerProvenance:
    """The tokenizer a prior was trained on: where it is, and the fingerprint of its codes."""

    tokenizer: str = ""  # a Hub id, or its folder (absolute in memory, relative to the prior's once saved)
    fingerprint: str = ""  # `VQTokenizer.fingerprint` (either scheme): no other tokenizer's codes mean the same

    def saved_in(self, prior_folder: str | Path) -> TokenizerProvenance:
        """As the prior saved in `prior_folder` records it: a local tokenizer by its path relative to that folder."""
        if not Path(self.tokenizer).is_absolute():
            return self
        return replace(self, tokenizer=os.path.relpath(self.tokenizer, Path(prior_folder).resolve()))

    def location(self, prior: str | Path) -> str:
        """Where the prior's tokenizer is: its folder (resolved from the prior's), or its Hub id."""
        if not self.tokenizer:
            raise ValueError(f"the prior {prior} does not name its tokenizer: pass --tokenizer DIR_OR_HUB_ID")
        local = Path(prior) / self.tokenizer
        return str(local.resolve()) if Path(prior).is_dir() and local.exists() else self.tokenizer

    def check(self, tokenizer, *, allow_other: bool = False) -> None:
        """Refuse a tokenizer whose codes are not those of the recorded one (by fingerprint);
        `allow_other` turns the refusal into a warning."""
        if not self.fingerprint or tokenizer.has_codes_of(self.fingerprint):
            return
        message = (
            f"the prior was trained on another tokenizer ({self.tokenizer}, fingerprint {self.fingerprint[:15]}); "
            f"this one ({tokenizer.name_or_path or 'in memory'}) has other weights or settings (fingerprint "
            f"{tokenizer.fingerprint[:15]}), so its codes mean other things"
        )
        if not allow_other:
            raise ValueError(message + "; use the prior's tokenizer, or --allow-other-tokenizer to go on anyway")
        warnings.warn(message + "; going on (allow_other_tokenizer)", stacklevel=3)
