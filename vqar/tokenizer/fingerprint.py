"""A tokenizer's fingerprint: a digest of what gives its codes their meaning.

A prior records the fingerprint of the tokenizer it was trained on and refuses another, and a
tokens folder records it too. Two tokenizers with the same fingerprint map every image to the
same codes, so anything trained on one's codes works with the other.

Scheme 2 (today's) hashes an explicit list — `CODE_MEANING_FIELDS` of the config, and every tensor
of the encoder and the quantizer — under a version tag. It leaves out the decoder: fine-tuning
only the decoder keeps the codes, and every prior trained on them, valid. A new config field is
outside it unless it is added to the list on purpose. `save_pretrained` stores it in config.json
(`code_fingerprint`), so loading does not hash the weights again.

Scheme 1 (tokenizers and priors saved before) hashed every config field but `resize_to`, and every
tensor, decoder included. Priors and tokens folders that recorded such a fingerprint keep matching:
`legacy_fingerprint` recomputes it with the fields as they were then (frozen below), and a
decoder-only fine-tune carries its base's fingerprints in `same_codes_as`.
"""

from __future__ import annotations

import hashlib
import json

import torch

VERSION = 2
PREFIX = f"v{VERSION}:"
# the config fields that decide what a code stands for: the encoder's architecture, the quantizer and the
# layout; not the decoder's training options (dropout, nested_dropout_share), nor `resize_to` (how images
# are cut before encoding, which a tokens folder's own fingerprint records)
CODE_MEANING_FIELDS = (
    "attn_resolutions",
    "channel_multipliers",
    "channels",
    "conv_backbone",
    "conv_channels",
    "latent_channels",
    "layout",
    "mid_attention",
    "nested_dropout",
    "norm_group_size",
    "num_latent_tokens",
    "num_res_blocks",
    "patch_size",
    "phi_count",
    "quantizer",
    "resolution",
    "scales",
    "vit_depth",
    "vit_heads",
    "vit_mlp_ratio",
    "vit_width",
)
CODE_MEANING_MODULES = ("encoder.", "quantizer.")  # tensors whose values decide the codes

# -- scheme 1, frozen as it was ---------------------------------------------------------------
LEGACY_FIELDS = (*CODE_MEANING_FIELDS, "dropout", "nested_dropout_share")
LEGACY_QUANTIZER_FIELDS = (
    "kind",
    "implementation",
    "codebook_size",
    "levels",
    "code_dim",
    "use_cosine",
    "ema_update",
    "ema_decay",
    "kmeans_init",
    "dead_code_threshold",
    "rotation_trick",
    "commitment_weight",
    "entropy_weight",
    "diversity_gamma",
    "project",
    "entropy_temperature",
    "entropy_group_bits",
    "standardize",
    "fsq_entropy_weight",
)
# fields scheme 1 left out at these values (every tokenizer saved before they existed had them)
LEGACY_LATER_FIELDS = {"norm_group_size": 1, "nested_dropout_share": 1.0}
LEGACY_LATER_QUANTIZER_FIELDS = {"standardize": False, "fsq_entropy_weight": 0.0}


def is_current(fingerprint: str) -> bool:
    """Whether a recorded fingerprint is of today's scheme (else scheme 1's)."""
    return fingerprint.startswith(PREFIX)


def code_fingerprint(config, state: dict[str, torch.Tensor]) -> str:
    """Scheme 2: `CODE_MEANING_FIELDS` of the config and the encoder's and quantizer's tensors."""
    fields = {name: getattr(config, name) for name in CODE_MEANING_FIELDS}
    tensors = {name: t for name, t in state.items() if name.startswith(CODE_MEANING_MODULES)}
    return PREFIX + _digest(fields, tensors)


def legacy_fingerprint(config, state: dict[str, torch.Tensor]) -> str:
    """Scheme 1, as priors and tokens folders saved before scheme 2 recorded it."""
    fields = {name: getattr(config, name) for name in LEGACY_FIELDS}
    fields = {k: v for k, v in fields.items() if not (k in LEGACY_LATER_FIELDS and v == LEGACY_LATER_FIELDS[k])}
    quantizer = {name: config.quantizer[name] for name in LEGACY_QUANTIZER_FIELDS if name in config.quantizer}
    later = LEGACY_LATER_QUANTIZER_FIELDS
    fields["quantizer"] = {k: v for k, v in quantizer.items() if not (k in later and v == later[k])}
    return _digest(fields, state)


def _digest(fields: dict, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_key(tensors: dict[str, torch.Tensor]) -> tuple | None:
    """What identifies the tensors' current values without reading them: each one's storage and its
    count of in-place writes (`_version`); None when some were made under inference_mode (no count)."""
    if any(t.is_inference() for t in tensors.values()):
        return None
    return tuple((t.data_ptr(), t._version) for t in tensors.values())
