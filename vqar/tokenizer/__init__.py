"""Stage 1: the image tokenizer (configuration, conv blocks, model, presets)."""

from .configuration import TokenizerConfig
from .modeling import TokenizerOutput, VQTokenizer
from .presets import list_presets, load_preset

__all__ = ["TokenizerConfig", "TokenizerOutput", "VQTokenizer", "list_presets", "load_preset"]
