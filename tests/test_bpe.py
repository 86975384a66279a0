"""Visual BPE: exact round trips, save/load, huge codebooks, rows kept apart."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vqar.bpe import VisualBPE


def _structured_codes(n=300, h=4, w=8, k=16, seed=0) -> torch.Tensor:
    """Codes with repeated horizontal patterns, so BPE has pairs worth merging."""
    patterns = np.random.default_rng(0).integers(0, k, (6, w))  # the same "image statistics" for every seed
    rng = np.random.default_rng(seed)
    rows = patterns[rng.integers(0, 6, (n, h))]
    noise = rng.random((n, h, w)) < 0.1
    rows[noise] = rng.integers(0, k, noise.sum())
    return torch.from_numpy(rows)


@pytest.fixture(scope="module")
def bpe():
    return VisualBPE.train(_structured_codes(), vocab_size=16 + 40, codebook_size=16)


def test_training_learns_merges_that_shorten_sequences(bpe):
    codes = _structured_codes(seed=1)
    ids = bpe.encode(codes)
    assert bpe.num_merges == 40 and bpe.vocab_size == 56
    assert np.mean([len(i) for i in ids]) < 0.6 * 32
    assert all(0 <= i.min() and i.max() < 56 for i in ids)


def test_round_trip_is_exact_on_real_structure(bpe):
    codes = _structured_codes(seed=2)
    assert torch.equal(bpe.decode(bpe.encode(codes)), codes.reshape(len(codes), -1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 15), min_size=8, max_size=8), min_size=4, max_size=4), st.integers(1, 5))
def test_round_trip_is_exact_for_any_codes(bpe, rows, batch):
    codes = torch.tensor(rows)[None].expand(batch, -1, -1)  # [B, 4, 8]
    ids = bpe.encode(codes)
    assert torch.equal(bpe.decode(ids), codes.reshape(batch, -1))


def test_padded_form_matches_the_list_form_and_round_trips(bpe):
    codes = _structured_codes(seed=5)
    sequences, padded = bpe.encode(codes), bpe.encode(codes, padded=True)
    assert padded.shape == (len(codes), max(len(s) for s in sequences))
    for row, sequence in zip(padded, sequences):
        assert torch.equal(row[: len(sequence)], sequence) and (row[len(sequence) :] == -1).all()
    assert torch.equal(bpe.decode(padded), codes.reshape(len(codes), -1))
    assert torch.equal(bpe.decode(padded.numpy().astype(np.int32)), codes.reshape(len(codes), -1))


def test_threaded_decode_matches_and_names_the_right_sequence(bpe, monkeypatch):
    codes = _structured_codes(n=3000, seed=6)  # 96,000 ids: split between threads
    padded = bpe.encode(codes, padded=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert torch.equal(bpe.decode(padded), codes.reshape(len(codes), -1))
    padded[2500, 0] = 999
    with pytest.raises(ValueError, match="got 999 in sequence 2500"):
        bpe.decode(padded)


def test_merges_never_cross_rows(bpe):
    codes = _structured_codes(seed=3)
    for row_ids in bpe.encode(codes)[:50]:
        lengths = bpe.token_lengths[row_ids]
        ends = lengths.cumsum(0)
        starts = ends - lengths
        assert ((starts // 8) == ((ends - 1) // 8)).all()  # every token lies inside one row of 8


def test_save_and_load_give_the_same_encoder(bpe, tmp_path):
    path = bpe.save(tmp_path)
    assert path.name == "visual_bpe.json" and path.read_text().startswith("{")
    loaded = VisualBPE.load(tmp_path)
    codes = _structured_codes(seed=4)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(codes), bpe.encode(codes)))
    assert loaded.merges == bpe.merges


def test_codebooks_of_two_to_the_eighteen_map_and_round_trip():
    k = 2**18
    rng = np.random.default_rng(0)
    base = rng.integers(0, k, (8, 16))
    codes = torch.from_numpy(np.concatenate([base[rng.integers(0, 8, 40)], rng.integers(0, k, (40, 16))]))
    bpe = VisualBPE.train(codes, vocab_size=k + 20, codebook_size=k)
    assert bpe.num_merges == 20
    extremes = torch.tensor([[0, k - 1] * 8])
    for sample in (codes, extremes):
        assert torch.equal(bpe.decode(bpe.encode(sample)), sample)


def test_one_dimensional_sequences_round_trip():
    codes = torch.randint(0, 32, (100, 20))
    bpe = VisualBPE.train(codes, vocab_size=60, codebook_size=32)
    assert bpe.row_length is None
    assert torch.equal(bpe.decode(bpe.encode(codes)), codes)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda b: b.encode(torch.full((1, 4, 8), 16)), ValueError, r"codes must lie in \[0, 16\)"),
        (lambda b: b.encode(torch.zeros(1, 4, 8).float()), TypeError, "codes must be integers"),
        (lambda b: b.encode(torch.zeros(2, 30, dtype=torch.long)), ValueError, "not a whole number of rows of 8"),
        (lambda b: b.decode([torch.tensor([56])]), ValueError, r"BPE ids must lie in \[0, 56\)"),
        (lambda b: b.decode([torch.tensor([1, 2]), torch.tensor([3])]), ValueError, "different numbers of codes"),
        (lambda b: b.decode(torch.tensor([[1, -1, 2]])), ValueError, "sequence 0 has id 2 after its -1 padding"),
        (lambda b: b.decode(torch.tensor([[0] * 32, [0] * 31 + [-7]])), ValueError, r"got -7 in sequence 1"),
        (lambda b: b.decode(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, r"must be \[B, L\]"),
        (lambda b: b.decode(torch.zeros(1, 32)), TypeError, "BPE ids must be integers"),
        (
            lambda b: VisualBPE.train(torch.zeros(2, 4, dtype=torch.long), 10, 16),
            ValueError,
            "must exceed codebook_size",
        ),
    ],
)
def test_bad_input_is_named(bpe, call, error, message):
    with pytest.raises(error, match=message):
        call(bpe)
