"""Ids from anywhere: every shape, dtype and value either works or gets a named ValueError/TypeError,
never a wrong image, an IndexError or a kernel assert."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vqar import VQTokenizer
from vqar.ar import VocabLayout, build_prior
from vqar.bpe import VisualBPE
from vqar.generation import SamplingConfig, build_prompts, generate_ids

NAMED = (ValueError, TypeError)
DTYPES = st.sampled_from([np.int64, np.int32, np.int16, np.uint8, np.float32, np.float64, np.bool_])
SHAPES = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
VALUES = st.integers(-(2**40), 2**40)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def any_array():
    return st.tuples(DTYPES, SHAPES).flatmap(lambda ds: arrays(ds[0], ds[1], elements=_elements(ds[0])))


def _elements(dtype):
    if dtype == np.bool_:
        return st.booleans()
    if np.issubdtype(dtype, np.floating):
        return st.one_of(st.floats(-1e6, 1e6, width=32), st.just(float("nan")))
    info = np.iinfo(dtype)
    return st.integers(int(info.min), int(info.max))


@pytest.fixture(scope="module")
def tokenizer():
    return VQTokenizer.from_preset("fsq-cpu").eval()  # f4, 1,000 codes


@SETTINGS
@given(any_array())
def test_tokenizer_decode_works_or_names_the_problem(tokenizer, array):
    indices = torch.from_numpy(array)
    valid = (
        array.ndim == 3
        and array.size > 0
        and np.issubdtype(array.dtype, np.integer)
        and array.min() >= 0
        and array.max() < 1000
    )
    if valid:
        assert tokenizer.decode(indices).shape == (array.shape[0], 3, 4 * array.shape[1], 4 * array.shape[2])
    else:
        with pytest.raises(NAMED):
            tokenizer.decode(indices)


@pytest.fixture(scope="module")
def bpe():
    rng = np.random.default_rng(0)
    return VisualBPE.train(rng.integers(0, 8, (200, 4, 4)), vocab_size=8 + 12, codebook_size=8)


@SETTINGS
@given(st.one_of(any_array(), st.lists(st.lists(VALUES, max_size=6), max_size=4)))
def test_bpe_decode_works_or_names_the_problem(bpe, ids):
    try:
        codes = bpe.decode(ids if isinstance(ids, list) else torch.from_numpy(ids))
    except NAMED:
        return
    except RuntimeError as error:  # torch refuses ragged/overflowing Python lists with its own message
        assert "Overflow" in str(error) or "value cannot be converted" in str(error)
        return
    # whatever decoded must round-trip: these ids really are the BPE encoding of these codes
    assert codes.dtype == torch.long and codes.ndim == 2
    assert ((codes >= 0) & (codes < 8)).all()


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 7), min_size=16, max_size=16), min_size=1, max_size=5))
def test_bpe_round_trips_any_codes(bpe, rows):
    codes = torch.tensor(rows).reshape(-1, 4, 4)
    assert torch.equal(bpe.decode(bpe.encode(codes, padded=True)), codes.reshape(len(codes), -1))


LAYOUT = VocabLayout.create(codebook_size=125, tokens_per_image=16, grid=[4, 4], class_names=list("0123456789"))


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return build_prior(LAYOUT, size="tiny").eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(any_array())
def test_generate_with_raw_prompt_ids_works_or_names_the_problem(prior, array):
    try:
        prompts = build_prompts(LAYOUT, prompt_ids=torch.from_numpy(array))
    except NAMED:
        return
    ids = generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=0))
    assert ids.shape == (len(array), 4, 4) and 0 <= ids.min() and ids.max() < 125


@pytest.mark.parametrize("classes", [[10], [-1], ["seven"], [1.5]])
def test_bad_classes_are_named(classes):
    with pytest.raises(NAMED):
        build_prompts(LAYOUT, classes=classes)
