"""The catalogue of named tokenizer presets: the config JSON files of the repository's `tokenizers/` folder.

The folder is data, never a Python package (it would shadow Hugging Face's `tokenizers`). A
wheel ships it as `vqar/presets/`; a source checkout or editable install reads it in place.
This module reads the files only; `presets.describe_presets` builds the models' summaries.
"""

from __future__ import annotations

import json
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def preset_dir() -> Path:
    installed = _PACKAGE_DIR / "presets"  # non-editable install: shipped as package data
    return installed if installed.is_dir() else _PACKAGE_DIR.parent / "tokenizers"


def list_presets() -> list[str]:
    """Names of the tokenizer presets, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def load_preset(name: str) -> dict:
    """The config dict of preset `name`, without its `_comment` notes."""
    path = preset_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown tokenizer preset {name!r}; available presets: {', '.join(list_presets())}")
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}
