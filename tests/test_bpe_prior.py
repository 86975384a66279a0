"""A prior over visual-BPE ids: training on them, and generation that always fills one image."""

import json

import pytest
import torch
from conftest import tokenize_digits_with_tiny_tokenizer

from vqar.ar import VocabLayout, build_prior, load_prior, load_prior_bpe
from vqar.bpe import VisualBPE, train_bpe
from vqar.generation import SamplingConfig, build_prompts, generate_ids
from vqar.tokens import load_tokens
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior


@pytest.fixture(scope="module")
def bpe_tokens(tmp_path_factory):
    """Digits tokenized by a tiny tokenizer whose folder also holds a visual_bpe.json."""
    tokens = tokenize_digits_with_tiny_tokenizer(tmp_path_factory.mktemp("bpe_prior"))
    train_bpe(tokens, vocab_size=25 + 40, output=tokens.parent / "tokenizer")
    return tokens


def test_train_ar_picks_up_the_tokenizers_bpe(bpe_tokens, tmp_path):
    options = {
        "tokens": bpe_tokens,
        "size": "tiny",
        "output_dir": tmp_path,
        "max_steps": 3,
        "batch_size": 16,
        "log_with": "none",
        "save_every": 0,
        "eval_every": 0,
    }
    metrics = train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["vqar_vocab"]["num_bpe_tokens"] == 40 and config["vocab_size"] == 25 + 40 + 4 + 10
    assert metrics["bits_per_token"] > 0 and metrics["bits_per_image"] > 0
    prior, layout = load_prior(str(tmp_path / "prior"))
    bpe = load_prior_bpe(str(tmp_path / "prior"))
    assert bpe is not None and bpe.num_merges == 40
    codes = generate_ids(prior, layout, build_prompts(layout, classes=[1, 2], bpe=bpe), SamplingConfig(seed=0), bpe=bpe)
    assert codes.shape == (2, 8, 8) and codes.max() < 25


@pytest.fixture(scope="module")
def bpe_and_layout(bpe_tokens):
    bpe = VisualBPE.load(bpe_tokens.parent / "tokenizer")
    layout = VocabLayout.create(
        codebook_size=25,
        tokens_per_image=64,
        grid=[8, 8],
        num_bpe_tokens=bpe.num_merges,
        class_names=list("0123456789"),
    )
    return bpe, layout


@pytest.mark.parametrize("favour", ["eoi", "long_tokens", "nothing"])
def test_generation_always_yields_exactly_one_image_of_codes(bpe_and_layout, favour):
    bpe, layout = bpe_and_layout
    torch.manual_seed(0)
    prior = build_prior(layout, size="tiny").eval()
    bias = torch.zeros(layout.ids.vocab_size)
    if favour == "eoi":
        bias[layout.ids.eoi] = 50.0  # without the budget every sequence would end at once
    elif favour == "long_tokens":
        bias[: layout.ids.image_vocab_size] = 5.0 * bpe.token_lengths.float()  # would overrun rows and the image
    handle = prior.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        for cfg_scale in (1.0, 2.0):
            prompts = build_prompts(layout, classes=list(range(10)) * 3, bpe=bpe)
            codes = generate_ids(
                prior, layout, prompts, SamplingConfig(temperature=1.5, cfg_scale=cfg_scale, seed=3), bpe=bpe
            )
            assert codes.shape == (30, 8, 8)
            assert 0 <= codes.min() and codes.max() < 25
    finally:
        handle.remove()


def test_bpe_prefix_completion_keeps_the_prefix_rows(bpe_and_layout, bpe_tokens):
    bpe, layout = bpe_and_layout
    prior = build_prior(layout, size="tiny").eval()
    dataset, _ = load_tokens(bpe_tokens)
    rows = torch.tensor(dataset["eval"]["tokens"][0]).reshape(1, 8, 8)[:, :3]
    prompts = build_prompts(layout, classes=[4], num_images=4, prefix=rows, bpe=bpe)
    codes = generate_ids(prior, layout, prompts, SamplingConfig(seed=0, cfg_scale=1.5), bpe=bpe)
    assert torch.equal(codes[:, :3], rows.expand(4, -1, -1))


def test_a_bpe_prior_needs_its_bpe(bpe_and_layout):
    _, layout = bpe_and_layout
    with pytest.raises(ValueError, match="pass its VisualBPE"):
        build_prompts(layout, classes=[1])


def test_a_bpe_that_does_not_match_the_prior_or_the_tokens_is_refused(bpe_tokens, tmp_path):
    from vqar.bpe import train_bpe as learn

    options = {
        "tokens": bpe_tokens,
        "size": "tiny",
        "output_dir": tmp_path / "run",
        "max_steps": 1,
        "batch_size": 16,
        "log_with": "none",
        "save_every": 0,
        "eval_every": 0,
    }
    train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
    prior_dir = tmp_path / "run" / "prior"
    learn(bpe_tokens, vocab_size=25 + 10, output=prior_dir)  # overwrite with 10 merges instead of 40
    with pytest.raises(ValueError, match="visual BPE does not match the prior: it has 10 merges, the prior models 40"):
        load_prior_bpe(str(prior_dir))
    other = VisualBPE.train(torch.randint(0, 30, (50, 8, 8)), vocab_size=30 + 5, codebook_size=30)
    other.save(tmp_path)
    options |= {"bpe": tmp_path / "visual_bpe.json", "output_dir": tmp_path / "other"}
    with pytest.raises(ValueError, match="learned on 30 codes in rows of 8, the tokens of .* have 25 codes"):
        train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
