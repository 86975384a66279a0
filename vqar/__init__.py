"""vqar: discrete-token image generation. The public API, re-exported; nothing else."""

from .bpe import VisualBPE
from .quantizers import CodeStats, QuantizerConfig, QuantizerOutput, build_quantizer
from .tokenizer import TokenizerConfig, TokenizerOutput, VQTokenizer, list_presets

__version__ = "0.1.0"

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
