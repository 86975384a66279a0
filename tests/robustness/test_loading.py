"""Loading: safetensors only, no unpickling, configs and weights that do not match are named."""

import json
import pickle
import shutil

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
        (
            {"layout": "1d", "num_latent_tokens": 64, "patch_size": 4, "vit_width": 8, "vit_depth": 1, "vit_heads": 2},
            r"the prior models a 8 x 8 grid of tokens, the tokenizer gives a sequence of 64 tokens",
        ),
    ],
)
def test_a_tokenizer_that_does_not_match_the_prior_is_refused(tokenizer_overrides, message):
    from conftest import TINY_F2

    from vqar.ar import VocabLayout, build_prior
    from vqar.generation import build_prompts, generate_images

    layout = VocabLayout.create(codebook_size=25, tokens_per_image=64, grid=[8, 8])
    prior = build_prior(layout, size="tiny").eval()
    tokenizer = VQTokenizer(TokenizerConfig(**{**TINY_F2, **tokenizer_overrides})).eval()
    with pytest.raises(ValueError, match="tokenizer does not match the prior.*" + message):
        generate_images(prior, tokenizer, layout, build_prompts(layout, num_images=1))


@pytest.mark.parametrize("damage", ["missing", "truncated", "not safetensors"])
def test_a_bad_rng_state_file_stops_the_resume(tmp_path, damage):
    run(tiny_args(tmp_path, max_steps=2, save_every=2))
    rng_file = tmp_path / "checkpoints" / "step-000002" / "rng_state_0.safetensors"
    if damage == "missing":
        rng_file.unlink()
    elif damage == "truncated":
        rng_file.write_bytes(rng_file.read_bytes()[:100])
    else:
        rng_file.write_bytes(pickle.dumps({"torch_manual_seed": torch.get_rng_state()}))
    with pytest.raises((FileNotFoundError, ValueError), match=r"rng_state_0\.safetensors"):
        run(tiny_args(tmp_path, max_steps=4, resume="latest"))


def test_a_pickle_payload_in_accelerates_rng_file_never_runs_and_resume_stays_exact(tmp_path, monkeypatch):
    from conftest import tokenize_digits_with_tiny_tokenizer
    from safetensors.torch import load_file

    from vqar.training import checkpoints
    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_prior import PriorArgs, train_prior

    tokens = tokenize_digits_with_tiny_tokenizer(tmp_path)

    def train(output, **overrides):  # label dropout draws from the global RNG every step
        options = {
            "tokens": tokens,
            "size": "tiny",
            "output_dir": output,
            "batch_size": 16,
            "log_with": "none",
            "eval_every": 0,
            "max_steps": 4,
            "save_every": 2,
            "keep_checkpoints": 3,
            **overrides,
        }
        train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
        return load_file(output / "prior" / "model.safetensors")

    full = train(tmp_path / "full")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-000002"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", checkpoint)
    assert not (checkpoint / "random_states_0.pkl").exists()  # vqar keeps its own, pickle-free
    marker = tmp_path / "pwned"
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    resumed = train(tmp_path / "resumed", resume="latest")
    assert not marker.exists()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # and the RNG states matter here: resumed with other ones, the weights differ
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    monkeypatch.setattr(checkpoints, "load_rng_state", lambda folder, rank: torch.manual_seed(1))
    other = train(tmp_path / "resumed", resume="latest")
    assert any(not torch.equal(full[k], other[k]) for k in full)


@pytest.mark.parametrize("cut", [0.001, 0.5, 0.99])
def test_a_truncated_weights_file_is_named_with_what_is_wrong(saved_tokenizer, cut, tmp_path):
    from vqar.ar import VocabLayout, build_prior, load_prior

    path = saved_tokenizer / "model.safetensors"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    with pytest.raises(ValueError, match=rf"tokenizer's weights file {path} is damaged .* save or download it again"):
        VQTokenizer.from_pretrained(saved_tokenizer)
    build_prior(VocabLayout.create(codebook_size=25, tokens_per_image=4, grid=[2, 2]), size="tiny").save_pretrained(
        tmp_path / "prior"
    )
    weights = tmp_path / "prior" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * cut)])
    with pytest.raises(ValueError, match=rf"prior's weights file {weights} is damaged"):
        load_prior(str(tmp_path / "prior"))


def test_resume_latest_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, capsys):
    run(tiny_args(tmp_path, max_steps=4, save_every=2, keep_checkpoints=3))
    newest = tmp_path / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    metrics = run(tiny_args(tmp_path, max_steps=6, save_every=2, keep_checkpoints=3, resume="latest"))
    out = capsys.readouterr().out
    assert "step-000004 cannot be read" in out and "is damaged" in out and "trying the one before" in out
    assert "resumed from" in out and "step-000002 at step 2" in out
    assert metrics["steps"] == 6
