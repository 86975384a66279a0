"""The decode loops: static cache and Jacobi give what generate() gives, and Jacobi's distribution is exact."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from vqar import samplers
from vqar.ar import VocabLayout, build_prior
from vqar.bpe import VisualBPE
from vqar.generation import JacobiStats, SamplingConfig, build_prompts, generate_ids

LAYOUT = VocabLayout.create(codebook_size=125, tokens_per_image=16, grid=[4, 4], class_names=list("0123456789"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def prior(request):
    torch.manual_seed(0)
    return build_prior(LAYOUT, model_type=request.param, size="tiny").eval()


def _ids(prior, prompts, sampler, layout=LAYOUT, **options):
    return generate_ids(prior, layout, prompts, SamplingConfig(sampler=sampler, **options))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_greedy_ids_are_the_same_from_every_sampler(prior, cfg_scale):
    prompts = build_prompts(LAYOUT, classes=[0, 3, 7], prefix=torch.randint(0, 125, (3, 5)))
    reference = _ids(prior, prompts, "generate", temperature=0, cfg_scale=cfg_scale)
    assert torch.equal(_ids(prior, prompts, "static", temperature=0, cfg_scale=cfg_scale), reference)
    for window in (2, 5, 16):
        jacobi = _ids(prior, prompts, "jacobi", temperature=0, cfg_scale=cfg_scale, jacobi_window=window)
        assert torch.equal(jacobi, reference), f"jacobi_window={window}"


@pytest.mark.parametrize("options", [dict(seed=3), dict(seed=4, cfg_scale=2.0), dict(seed=1, top_k=20, top_p=0.9)])
def test_static_sampling_draws_the_same_ids_as_generate_from_the_same_seed(prior, options):
    prompts = build_prompts(LAYOUT, classes=list(range(10)))
    static = _ids(prior, prompts, "static", **options)
    assert torch.equal(static, _ids(prior, prompts, "generate", **options))
    assert not torch.equal(static, _ids(prior, prompts, "static", **{**options, "seed": 99}))


def test_a_bpe_prior_samples_the_same_ids_static_and_through_generate():
    merges = [(0, 1), (2, 2), (25, 3)]  # a long token (three codes) among them: rows fill unevenly
    bpe = VisualBPE(codebook_size=25, merges=merges, row_length=8)
    layout = VocabLayout.create(
        codebook_size=25, tokens_per_image=64, grid=[8, 8], num_bpe_tokens=3, class_names=list("01")
    )
    torch.manual_seed(0)
    prior = build_prior(layout, size="tiny").eval()
    bias = torch.zeros(layout.ids.vocab_size)
    bias[25:28] = 3.0  # merged tokens often win, so sequences end early and at different lengths
    prior.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    prompts = build_prompts(layout, classes=[0, 1, 1, 0], bpe=bpe)
    for options in (dict(seed=5), dict(seed=6, cfg_scale=1.5)):
        sampling = SamplingConfig(sampler="static", **options)
        static = generate_ids(prior, layout, prompts, sampling, bpe=bpe)
        reference = generate_ids(prior, layout, prompts, SamplingConfig(sampler="generate", **options), bpe=bpe)
        assert static.shape == (4, 8, 8) and torch.equal(static, reference)
    with pytest.raises(ValueError, match='visual-BPE prior samples with "static"'):
        generate_ids(prior, layout, prompts, SamplingConfig(sampler="jacobi"), bpe=bpe)


# -- Jacobi's distribution ----------------------------------------------------------------------

SMALL = VocabLayout.create(codebook_size=8, tokens_per_image=4, grid=[2, 2], class_names=list("ab"))
EXACT = dict(temperature=1.0, top_k=5, cfg_scale=2.0)


@pytest.fixture(scope="module")
def small_prior():
    """A tiny prior with peaked distributions (random init gives nearly uniform ones, where
    every sampler would look right)."""
    torch.manual_seed(1)
    prior = build_prior(SMALL, size="tiny").eval()
    with torch.no_grad():
        prior.lm_head.weight.mul_(3.0)
    return prior


@torch.inference_mode()
def _exact_first_two(prior, sampling: SamplingConfig) -> np.ndarray:
    """P(t1, t2) [K, K] for class 1, computed from the prior's logits exactly as every sampler
    transforms them (image ids, guided, temperature, top-k)."""
    picker = samplers.TokenPicker(SMALL, sampling, None)
    K = SMALL.ids.image_vocab_size

    def next_distribution(image_ids: list[int]) -> torch.Tensor:
        prompt = build_prompts(SMALL, classes=[1])[0].tolist() + image_ids
        rows = torch.tensor([prompt, [SMALL.ids.null_class, *prompt[1:]]])
        scores, _ = picker.scores(prior(input_ids=rows).logits[:, -1])
        return samplers.filtered_logits(scores, sampling).softmax(-1)[0].double()

    first = next_distribution([])
    return np.array([(first[t] * next_distribution([t])).tolist() for t in range(K)])


def _jacobi_first_two(prior, sampling_options: dict, seeds: int, batch: int) -> np.ndarray:
    counts = np.zeros((SMALL.ids.image_vocab_size,) * 2)
    prompts = build_prompts(SMALL, classes=[1] * batch)
    for seed in range(seeds):
        ids = generate_ids(prior, SMALL, prompts, SamplingConfig(sampler="jacobi", seed=seed, **sampling_options))
        first, second = ids.reshape(batch, -1)[:, :2].T.numpy()
        np.add.at(counts, (first, second), 1)
    return counts


def _chi_square_p(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's test over the cells of the joint that can occur; those expecting < 5 draws pooled."""
    counts, probabilities = counts.ravel(), probabilities.ravel()
    assert counts[probabilities == 0].sum() == 0, "a pair outside top-k was sampled"
    possible = probabilities > 0
    counts, expected = counts[possible], probabilities[possible] * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


def test_jacobi_samples_the_first_tokens_from_the_exact_distribution(small_prior):
    exact = _exact_first_two(small_prior, SamplingConfig(**EXACT))
    assert exact.max() < 0.5 and (exact > 0.01).sum() >= 6  # peaked, not degenerate: the test has power
    stats = JacobiStats()
    prompts = build_prompts(SMALL, classes=[1] * 8)
    generate_ids(small_prior, SMALL, prompts, SamplingConfig(sampler="jacobi", seed=0, **EXACT), stats=stats)
    assert stats.forward_passes < SMALL.tokens.tokens_per_image  # drafts are accepted, not only resampled
    counts = _jacobi_first_two(small_prior, EXACT, seeds=300, batch=8)
    assert _chi_square_p(counts, exact) > 1e-3


def test_the_distribution_check_catches_a_sampler_that_is_off(small_prior):
    exact = _exact_first_two(small_prior, SamplingConfig(**EXACT))
    too_hot = _jacobi_first_two(small_prior, {**EXACT, "temperature": 1.5}, seeds=300, batch=8)
    assert _chi_square_p(too_hot, exact) < 1e-3


# -- compile, options, CLI ----------------------------------------------------------------------


def test_a_failing_compiler_warns_once_and_gives_the_same_ids(prior, monkeypatch):
    def broken_compile(function, **options):
        def run(*args, **kwargs):
            raise RuntimeError("no C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(samplers, "_COMPILED", samplers.weakref.WeakKeyDictionary())
    prompts = build_prompts(LAYOUT, classes=[2, 5], prefix=torch.randint(0, 125, (2, 3)))
    with pytest.warns(UserWarning, match="torch.compile is unavailable here .*no C compiler"):
        compiled = _ids(prior, prompts, "static", seed=8, cfg_scale=1.5, compile=True)
    assert torch.equal(compiled, _ids(prior, prompts, "generate", seed=8, cfg_scale=1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call knows: no warning again
        again = _ids(prior, prompts, "static", seed=8, cfg_scale=1.5, compile=True)
    assert torch.equal(again, compiled)


def test_bad_sampler_options_are_named():
    with pytest.raises(ValueError, match="sampler must be static, generate or jacobi, got 'fast'"):
        SamplingConfig(sampler="fast")
    with pytest.raises(ValueError, match="jacobi_window must be >= 2"):
        SamplingConfig(jacobi_window=1)
