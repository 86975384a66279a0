"""The vocabulary layout and the stock causal LM built for it."""

import subprocess
import sys

import pytest
import torch

from vqar import VQTokenizer
from vqar.ar import VocabLayout, build_prior, load_prior

LAYOUT = VocabLayout.create(codebook_size=125, tokens_per_image=16, grid=[4, 4], class_names=list("0123456789"))


def test_ids_are_laid_out_as_designed():
    L = LAYOUT
    assert L.ids.image_vocab_size == 125
    assert (L.ids.boi, L.ids.eoi, L.ids.pad, L.ids.null_class) == (125, 126, 127, 128)
    assert L.ids.class_token([0, 9]).tolist() == [129, 138]
    assert L.ids.vocab_size == 139 and L.codec.sequence_length == 18


def test_sequence_round_trip_keeps_codes_and_conditions():
    codes = torch.randint(0, 125, (3, 4, 4))
    labels = torch.tensor([2, -1, 7])
    ids = LAYOUT.codec.to_sequence(labels, codes)
    assert ids.shape == (3, 18) and (ids[:, 1] == LAYOUT.ids.boi).all()
    conditions, grid = LAYOUT.codec.from_sequence(ids)
    assert torch.equal(grid, codes)
    assert conditions.tolist() == [
        LAYOUT.ids.class_token(2).item(),
        LAYOUT.ids.null_class,
        LAYOUT.ids.class_token(7).item(),
    ]
    assert (LAYOUT.codec.to_sequence(None, codes)[:, 0] == LAYOUT.ids.null_class).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: LAYOUT.ids.class_token([10]), r"class index must lie in \[0, 10\), got \[10\]"),
        (lambda: LAYOUT.ids.class_index("seven"), "unknown class 'seven'"),
        (lambda: LAYOUT.codec.to_sequence(None, torch.full((1, 16), 125)), r"image ids must lie in \[0, 125\)"),
        (lambda: LAYOUT.codec.from_sequence(torch.zeros(1, 17, dtype=torch.long)), r"sequences must be \[B, 18\]"),
        (lambda: VocabLayout.create(codebook_size=8, tokens_per_image=16, grid=[4, 3]), "does not hold"),
        (
            lambda: build_prior(LAYOUT, size="tiny", max_position_embeddings=10),
            "max_position_embeddings=10 is shorter than",
        ),
        (lambda: build_prior(LAYOUT, size="XXXL"), "unknown prior size"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_class_names_and_indices_both_work():
    assert LAYOUT.ids.class_index("3") == 3 and LAYOUT.ids.class_index(3) == 3


def test_a_mismatched_tokenizer_is_refused():
    tokenizer = VQTokenizer.from_preset("fsq-cpu", resolution=16)  # 1000 codes, 4x4 tokens
    with pytest.raises(ValueError, match="codebook_size=125, tokens_per_image=16; got codebook_size=1000"):
        LAYOUT.check_tokenizer(tokenizer)


def test_saved_prior_loads_with_plain_transformers(tmp_path):
    prior = build_prior(LAYOUT, size="tiny").eval()
    prior.save_pretrained(tmp_path)
    ids = LAYOUT.codec.to_sequence(torch.tensor([4]), torch.arange(16)[None])
    expected = prior(input_ids=ids).logits
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval(); "
        f"print('vqar' in sys.modules, m.config.vqar_vocab['codebook_size']); "
        f"torch.save(m(input_ids=torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "125"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
    loaded, layout = load_prior(str(tmp_path))
    assert layout == LAYOUT
