"""The tokenizer presets described: one row per preset for `vqar presets` (the files themselves are
read by `vqar.tokenizer.catalogue`)."""

from __future__ import annotations

import json
import math

from .catalogue import list_presets, load_preset, preset_dir
from .configuration import TokenizerConfig
from .modeling import parameter_count


def describe_presets() -> list[dict]:
    """One row per preset: name, layout, codes, tokens per image at its resolution, parameters, description."""
    rows = []
    for name in list_presets():
        raw = json.loads((preset_dir() / f"{name}.json").read_text())
        config = TokenizerConfig(**load_preset(name))
        rows.append(
            {
                "name": name,
                "layout": config.layout,
                "codes": config.quantizer_config.num_codes,
                "tokens_per_image": math.prod(config.token_shape),
                "resolution": config.resolution,
                "parameters": parameter_count(config),
                "description": raw.get("_comment", ""),
            }
        )
    return rows
