"""Loading: safetensors only, no unpickling, configs and weights that do not match are named."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_training import run, tiny_args

from vqar import TokenizerConfig, VQTokenizer


class RunsCode:
    """A pickle that, when loaded, writes a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved_tokenizer(tmp_path):
    tokenizer = VQTokenizer.from_preset("fsq-cpu")
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_a_checkpoint_that_needs_unpickling_is_refused_and_runs_nothing(tmp_path):
    run(tiny_args(tmp_path, max_steps=2, save_every=2))
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    marker = tmp_path / "pwned"
    optimizer_file = next(checkpoint.glob("optimizer*.bin"))
    optimizer_file.write_bytes(pickle.dumps({"state": RunsCode(marker)}))
    with pytest.raises(ValueError, match=r"step-000002 holds a file that needs unpickling.*refuses"):
        run(tiny_args(tmp_path, max_steps=4, resume="latest"))
    assert not marker.exists()


def test_a_tokenizer_with_only_pickled_weights_is_refused(saved_tokenizer, tmp_path):
    marker = tmp_path / "pwned"
    (saved_tokenizer / "model.safetensors").unlink()
    torch.save({"weights": RunsCode(marker)}, saved_tokenizer / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        VQTokenizer.from_pretrained(saved_tokenizer)
    assert not marker.exists()


def test_unknown_config_field_is_named(saved_tokenizer):
    config = json.loads((saved_tokenizer / "config.json").read_text())
    (saved_tokenizer / "config.json").write_text(json.dumps({**config, "chanels": 64}))
    with pytest.raises(ValueError, match=r"unknown TokenizerConfig field\(s\) \['chanels'\]"):
        VQTokenizer.from_pretrained(saved_tokenizer)
    with pytest.raises(ValueError, match=r"\['chanels'\]"):
        TokenizerConfig(chanels=64)


@pytest.mark.parametrize("field", ["channels", "quantizer", "channel_multipliers"])
def test_missing_config_field_is_named(saved_tokenizer, field):
    config = json.loads((saved_tokenizer / "config.json").read_text())
    del config[field]
    (saved_tokenizer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"lacks field\(s\) \['{field}'\]"):
        VQTokenizer.from_pretrained(saved_tokenizer)


@pytest.mark.parametrize("damage", ["missing", "misshaped", "unexpected"])
def test_weights_that_do_not_match_are_named(saved_tokenizer, damage):
    weights = load_file(saved_tokenizer / "model.safetensors")
    name = "decoder.conv_out.weight"
    if damage == "missing":
        del weights[name]
    elif damage == "misshaped":
        weights[name] = torch.zeros(3, 1, 1, 1)
    else:
        weights["decoder.extra"] = torch.zeros(1)
    save_file(weights, saved_tokenizer / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"decoder\.(conv_out\.weight|extra)"):
        VQTokenizer.from_pretrained(saved_tokenizer)


@pytest.mark.parametrize(
    "filename, message",
    [
        ("config.json", "config.json|JSON|Expecting"),
        ("model.safetensors", "(?i)safetensor|incomplete|header|deserializ"),
    ],
)
def test_a_half_written_file_is_refused(saved_tokenizer, filename, message):
    data = (saved_tokenizer / filename).read_bytes()
    (saved_tokenizer / filename).write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=message):
        VQTokenizer.from_pretrained(saved_tokenizer)


@pytest.mark.parametrize(
    "tokenizer_overrides, message",
    [
        ({"quantizer": {"kind": "fsq", "levels": [5, 5, 5]}}, r"codebook_size=125, tokens_per_image=64"),
        ({"resolution": 32}, r"tokens_per_image=256"),
    ],
)
def test_a_tokenizer_that_does_not_match_the_prior_is_refused(tokenizer_overrides, message):
    from conftest import TINY_F2

    from vqar.ar import VocabLayout, build_prior
    from vqar.generation import build_prompts, generate_images

    layout = VocabLayout(codebook_size=25, tokens_per_image=64, grid=[8, 8])
    prior = build_prior(layout, size="tiny").eval()
    tokenizer = VQTokenizer(TokenizerConfig(**{**TINY_F2, **tokenizer_overrides})).eval()
    with pytest.raises(ValueError, match="tokenizer does not match the prior.*" + message):
        generate_images(prior, tokenizer, layout, build_prompts(layout, num_images=1))
