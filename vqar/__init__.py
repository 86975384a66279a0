"""vqar: discrete-token image generation. The public API, re-exported; nothing else.

The names load on first use (PEP 562), so that `import vqar.data` or `vqar evaluate --help` do
not pay for transformers' model machinery (which imports accelerate) before they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "VisualBPE": ".bpe",
    "CodeStats": ".quantizers",
    "QuantizerConfig": ".quantizers",
    "QuantizerOutput": ".quantizers",
    "build_quantizer": ".quantizers",
    "TokenizerConfig": ".tokenizer",
    "TokenizerOutput": ".tokenizer",
    "VQTokenizer": ".tokenizer",
    "list_presets": ".tokenizer",
}
__all__ = [
    "CodeStats",
    "QuantizerConfig",
    "QuantizerOutput",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQTokenizer",
    "VisualBPE",
    "build_quantizer",
    "list_presets",
]

if TYPE_CHECKING:
    from .bpe import VisualBPE
    from .quantizers import CodeStats, QuantizerConfig, QuantizerOutput, build_quantizer
    from .tokenizer import TokenizerConfig, TokenizerOutput, VQTokenizer, list_presets


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
