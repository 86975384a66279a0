"""What users saved with earlier vqar still loads and matches: tokenizers, tokens folders and priors
written before the explicit fingerprint (tests/fixtures/legacy, written at commit c176936)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_F2

from vqar import TokenizerConfig, VQTokenizer
from vqar.ar import VocabLayout, load_prior
from vqar.generation import SamplingConfig, build_prompts, generate_images, load_tokenizer_for
from vqar.tokenizer import fingerprint as fingerprints
from vqar.tokens import load_tokens

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
PIXELS = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name", ["grid-tokenizer", "1d-tokenizer", "multiscale-tokenizer"])
def test_old_tokenizers_load_encode_as_before_and_keep_their_fingerprint(name):
    tokenizer = VQTokenizer.from_pretrained(LEGACY / name).eval()
    assert tokenizer.encode(PIXELS).tolist() == EXPECTED[name]["indices"]
    assert tokenizer.has_codes_of(EXPECTED[name]["fingerprint"])
    assert tokenizer.fingerprint.startswith(fingerprints.PREFIX)  # today's scheme, computed: none was stored


@pytest.mark.parametrize("kind", ["grid", "multiscale"])
def test_old_priors_load_find_their_tokenizer_and_generate(kind, tmp_path):
    shutil.copytree(LEGACY, tmp_path / "legacy")  # read-only checkouts: nothing may be written beside them
    prior_folder = tmp_path / "legacy" / f"{kind}-prior"
    prior, layout = load_prior(str(prior_folder))
    assert layout.provenance.fingerprint == EXPECTED[f"{kind}-tokenizer"]["fingerprint"]
    tokenizer = load_tokenizer_for(str(prior_folder), layout)  # refuses a tokenizer whose codes differ
    prompts = build_prompts(layout, classes=["circle", "square"])
    images = generate_images(prior, tokenizer, layout, prompts, SamplingConfig(seed=0, cfg_scale=2.0))
    assert images.shape == (2, 3, 16, 16)
    assert layout.to_dict() == json.loads((prior_folder / "config.json").read_text())["vqar_vocab"]


@pytest.mark.parametrize("kind", ["grid", "multiscale"])
def test_old_tokens_folders_load_and_give_the_layout_their_prior_was_trained_with(kind):
    dataset, manifest = load_tokens(LEGACY / f"{kind}-tokens")
    assert manifest.tokenizer_fingerprint == EXPECTED[f"{kind}-tokens"]["tokenizer_fingerprint"]
    layout = VocabLayout.from_manifest(manifest, conditional=True)
    _, saved = load_prior(str(LEGACY / f"{kind}-prior"))
    assert (layout.ids, layout.tokens) == (saved.ids, saved.tokens)
    assert len(dataset["train"][0]["tokens"]) == layout.tokens.tokens_per_image


def test_an_old_tokenizer_saved_again_still_matches_priors_trained_on_it(tmp_path):
    VQTokenizer.from_pretrained(LEGACY / "grid-tokenizer").save_pretrained(tmp_path / "again")
    resaved = VQTokenizer.from_pretrained(tmp_path / "again")
    assert resaved.has_codes_of(EXPECTED["grid-tokenizer"]["fingerprint"])
    _, layout = load_prior(str(LEGACY / "grid-prior"))
    layout.check_tokenizer(resaved)


def test_the_fingerprint_is_written_at_save_and_read_back_without_hashing(tmp_path, monkeypatch):
    tokenizer = VQTokenizer(TokenizerConfig(**TINY_F2))
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["code_fingerprint"]
    assert saved == tokenizer.fingerprint and saved.startswith("v2:")
    monkeypatch.setattr(fingerprints, "code_fingerprint", lambda *a: pytest.fail("hashed the weights on load"))
    assert VQTokenizer.from_pretrained(tmp_path).fingerprint == saved


def test_the_fingerprint_covers_the_encoder_and_quantizer_not_the_decoder_or_new_fields():
    tokenizer = VQTokenizer(TokenizerConfig(**TINY_F2))
    before = tokenizer.fingerprint
    with torch.no_grad():
        tokenizer.decoder.conv_out.weight.mul_(1.5)
    tokenizer.config.dropout = 0.1  # a training option of the decoder's
    assert tokenizer.fingerprint == before
    with torch.no_grad():
        tokenizer.encoder.conv_in.weight.mul_(1.01)
    assert tokenizer.fingerprint != before
    assert set(fingerprints.CODE_MEANING_FIELDS) <= set(TokenizerConfig.__annotations__)
    unlisted = set(TokenizerConfig.__annotations__) - set(fingerprints.CODE_MEANING_FIELDS)
    # a field outside the list must be there on purpose: what it holds does not change which code an image gets
    assert unlisted == {"resize_to", "dropout", "nested_dropout_share", "code_fingerprint", "same_codes_as"}
