"""Sampling from the prior: legal ids only, batched CFG, seeds, prefixes and the KV cache."""

import pytest
import torch

from vqar import VQTokenizer
from vqar.ar import VocabLayout, build_prior
from vqar.generation import SamplingConfig, build_prompts, generate_ids, generate_images, guide, sample_tokens

LAYOUT = VocabLayout.create(codebook_size=125, tokens_per_image=16, grid=[4, 4], class_names=list("0123456789"))


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return build_prior(LAYOUT, size="tiny").eval()


@pytest.fixture
def prior_preferring_illegal_ids(prior):
    """The same prior, but every non-image id gets +50 on its logit: unconstrained it would always win."""
    bias = torch.zeros(LAYOUT.ids.vocab_size)
    bias[LAYOUT.ids.image_vocab_size :] = 50.0
    handle = prior.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    yield prior
    handle.remove()


def test_only_image_ids_are_ever_sampled(prior_preferring_illegal_ids):
    prior = prior_preferring_illegal_ids
    prompts = build_prompts(LAYOUT, classes=list(range(10)) * 6)
    unconstrained = prior.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=16,
        do_sample=True,
        pad_token_id=LAYOUT.ids.pad,
        suppress_tokens=None,  # the prior's generation_config bans non-image ids for plain generate() too
    )
    assert (unconstrained[:, 2:] >= LAYOUT.ids.image_vocab_size).all()  # what the constraint prevents
    for cfg_scale in (1.0, 3.0):
        sampling = SamplingConfig(temperature=2.0, cfg_scale=cfg_scale, seed=int(cfg_scale))
        ids = generate_ids(prior, LAYOUT, prompts, sampling)
        assert ids.shape == (60, 4, 4)
        assert 0 <= ids.min() and ids.max() < LAYOUT.ids.image_vocab_size


def _two_pass_cfg_reference(prior, prompts, cfg_scale):
    """CFG as transformers' guidance_scale does it: two separate forward passes per step, no cache."""
    cond, uncond = prompts.clone(), prompts.clone()
    uncond[:, 0] = LAYOUT.ids.null_class
    for _ in range(LAYOUT.tokens.tokens_per_image - prompts.shape[1] + 2):
        logits_cond = prior(input_ids=cond).logits[:, -1, : LAYOUT.ids.image_vocab_size]
        logits_uncond = prior(input_ids=uncond).logits[:, -1, : LAYOUT.ids.image_vocab_size]
        token = (logits_uncond + cfg_scale * (logits_cond - logits_uncond)).argmax(-1, keepdim=True)
        cond, uncond = torch.cat([cond, token], 1), torch.cat([uncond, token], 1)
    return cond[:, 2:].reshape(-1, 4, 4)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_batched_cfg_equals_two_pass_reference(prior, with_prefix):
    prefix = torch.randint(0, 125, (1, 5)) if with_prefix else None
    prompts = build_prompts(LAYOUT, classes=[1, 5, 9], prefix=prefix)
    with torch.inference_mode():
        reference = _two_pass_cfg_reference(prior, prompts, 2.5)
    assert torch.equal(generate_ids(prior, LAYOUT, prompts, SamplingConfig(temperature=0, cfg_scale=2.5)), reference)


def test_guide_is_uncond_plus_scaled_difference():
    scores = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # [cond; uncond]
    assert guide(scores, 3.0).tolist() == [[4.0, -2.0]]


def test_same_seed_same_images_other_seed_other_images(prior):
    prompts = build_prompts(LAYOUT, classes=[0, 1, 2, 3])
    first = generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=7, top_p=0.9))
    assert torch.equal(first, generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=7, top_p=0.9)))
    assert not torch.equal(first, generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=8, top_p=0.9)))


def test_kv_cache_generation_equals_no_cache(prior):
    prompts = build_prompts(LAYOUT, classes=[3, 4], prefix=torch.randint(0, 125, (2, 4)))
    greedy = SamplingConfig(temperature=0)
    assert torch.equal(
        generate_ids(prior, LAYOUT, prompts, greedy, use_cache=True),
        generate_ids(prior, LAYOUT, prompts, greedy, use_cache=False),
    )


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_prefix_completion_keeps_the_prefix(prior, cfg_scale):
    rows = torch.randint(0, 125, (1, 2, 4))  # the first two rows of a 4x4 grid
    prompts = build_prompts(LAYOUT, classes=[6], num_images=5, prefix=rows)
    ids = generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=0, cfg_scale=cfg_scale))
    assert torch.equal(ids[:, :2], rows.expand(5, -1, -1))
    assert not (ids[:, 2:] == ids[:1, 2:]).all()  # the rest is sampled, not copied


def test_unconditional_and_raw_prompt_ids(prior):
    uncond = build_prompts(LAYOUT, num_images=3)
    assert (uncond[:, 0] == LAYOUT.ids.null_class).all()
    raw = torch.tensor([[LAYOUT.ids.class_token(2).item(), LAYOUT.ids.boi, 7, 8]])
    ids = generate_ids(prior, LAYOUT, build_prompts(LAYOUT, prompt_ids=raw), SamplingConfig(seed=1))
    assert ids.reshape(1, -1)[0, :2].tolist() == [7, 8]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50)
    greedy = logits.argmax(-1)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(logits, SamplingConfig(top_k=1), generator), greedy)
    assert torch.equal(sample_tokens(logits, SamplingConfig(top_p=1e-6), generator), greedy)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=[10]), r"class index must lie in \[0, 10\), got 10"),
        (dict(classes=["x"]), "unknown class 'x'"),
        (dict(num_images=0), "give classes or num_images"),
        (dict(classes=[1], prefix=torch.zeros(1, 16, dtype=torch.long)), "prefix of 16 tokens leaves nothing"),
        (dict(classes=[1], prefix=torch.zeros(1, 2, 3, dtype=torch.long)), r"prefix rows must be \[B, r, 4\]"),
        (dict(classes=[1], prefix=torch.full((1, 3), 200)), r"image ids must lie in \[0, 125\)"),
        (dict(prompt_ids=torch.tensor([[139, 125]])), r"prompt ids must lie in \[0, 139\)"),
        (dict(prompt_ids=torch.tensor([[5, 125]])), "must be a class token or the null class"),
        (dict(prompt_ids=torch.tensor([[130, 126]])), "must be begin-of-image"),
    ],
)
def test_bad_prompts_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_prompts(LAYOUT, **kwargs)


def test_bad_sampling_options_are_named():
    with pytest.raises(ValueError, match="top_p must lie in"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1)


def test_generate_images_refuses_a_mismatched_tokenizer_and_decodes_a_matching_one(prior):
    prompts = build_prompts(LAYOUT, classes=[0])
    with pytest.raises(ValueError, match="tokenizer does not match the prior"):
        generate_images(prior, VQTokenizer.from_preset("fsq-cpu", resolution=16), LAYOUT, prompts)
    matching = VQTokenizer.from_preset(
        "fsq-cpu", resolution=16, quantizer={"kind": "fsq", "levels": [5, 5, 5]}, latent_channels=3
    ).eval()
    images = generate_images(prior, matching, LAYOUT, prompts, SamplingConfig(seed=0))
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1
