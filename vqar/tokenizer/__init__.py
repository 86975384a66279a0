"""Stage 1: the image tokenizer (configuration, conv blocks, model, presets)."""

from .catalogue import list_presets, load_preset
from .configuration import TokenizerConfig
from .modeling import TokenizerOutput, VQTokenizer

__all__ = ["TokenizerConfig", "TokenizerOutput", "VQTokenizer", "list_presets", "load_preset"]
