"""Multi-scale residual tokens (VAR) and the next-scale prior: masks, partial decodes, the cache, save/load."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqar import VQTokenizer
from vqar.ar import VocabLayout, build_prior, load_prior, prior_loss
from vqar.generation import SamplingConfig, build_prompts, generate_ids
from vqar.layouts import scale_boundaries
from vqar.next_scale import block_causal_mask, next_scale_logits
from vqar.tokenizer.configuration import TokenizerConfig

SCALES = [1, 2, 3, 4]
LAYOUT = VocabLayout.create(codebook_size=16, tokens_per_image=30, scales=SCALES, class_names=list("012"))


@pytest.fixture(scope="module", params=["vq", "fsq"])
def tokenizer(request):
    torch.manual_seed(0)
    quantizer = {"kind": "vq", "codebook_size": 64} if request.param == "vq" else {"kind": "fsq", "levels": [5, 5, 3]}
    return VQTokenizer.from_preset("multiscale-digits", quantizer=quantizer).eval()


def test_tokens_are_the_scales_coarse_to_fine_and_split_by_scale(tokenizer, photo_batch):
    pixels = F.interpolate(photo_batch[:3], size=16, mode="area")
    indices = tokenizer.encode(pixels)
    assert indices.shape == (3, 1 + 4 + 9 + 16 + 36 + 64) and tokenizer.tokens_per_image == 130
    maps = tokenizer.split_scales(indices)
    assert [tuple(m.shape) for m in maps] == [(3, s, s) for s in (1, 2, 3, 4, 6, 8)]
    assert torch.equal(torch.cat([m.flatten(1) for m in maps], 1), indices)
    assert torch.equal(tokenizer.decode(indices), tokenizer(pixels).reconstruction)


def test_decoding_the_first_k_scales_decodes_their_partial_residual_sum(tokenizer, photo_batch):
    pixels = F.interpolate(photo_batch[:2], size=16, mode="area")
    indices = tokenizer.encode(pixels)
    bottleneck, ends = tokenizer.quantizer, scale_boundaries(tokenizer.token_layout.scales)
    for k in (1, 3, 6):
        partial = torch.zeros(2, tokenizer.config.latent_channels, 8, 8)
        for scale, side in enumerate(
            tokenizer.token_layout.scales[:k]
        ):  # each scale's codes, upsampled and refined, summed
            codes = bottleneck.quantizer.indices_to_codes(indices[:, ends[scale] : ends[scale + 1]])
            codes = codes.transpose(1, 2).reshape(2, -1, side, side)
            if side != 8:
                codes = F.interpolate(codes, size=(8, 8), mode="bicubic")
            partial += bottleneck.phis[bottleneck.phi_of_scale[scale]](codes)
        with torch.no_grad():
            expected = tokenizer.decoder(partial)
        assert torch.allclose(tokenizer.decode(indices[:, : ends[k]]), expected, atol=1e-6)
    coarse, full = tokenizer.decode(indices[:, :5]), tokenizer.decode(indices)
    assert not torch.allclose(coarse, full)  # fewer scales, another (coarser) image
    with pytest.raises(ValueError, match=r"k in \[1, 5, 14, 30, 66, 130\]"):
        tokenizer.decode(indices[:, :7])


def test_the_residual_sum_moves_towards_the_latent_with_every_scale(photo_batch):
    torch.manual_seed(0)
    tokenizer = VQTokenizer.from_preset("multiscale-digits")
    pixels = F.interpolate(photo_batch[:4], size=16, mode="area")
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=2e-3)
    for _ in range(30):  # a few steps of the loss triad's core, so codes and phi mean something
        out = tokenizer(pixels)
        loss = (out.reconstruction - pixels).abs().mean() + out.bottleneck_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokenizer.eval()
    with torch.no_grad():
        latents = tokenizer.encoder(pixels)
    indices = tokenizer.encode(pixels)
    errors = [
        (tokenizer.quantizer.indices_to_latents(indices[:, :end]) - latents).square().mean().item()
        for end in scale_boundaries(tokenizer.token_layout.scales)[1:]
    ]
    assert errors[-1] < errors[0], errors


def test_save_and_load_is_bit_identical(tokenizer, photo_batch, tmp_path):
    pixels = F.interpolate(photo_batch[:2], size=16, mode="area")
    tokenizer.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    indices = tokenizer.encode(pixels)
    assert torch.equal(loaded.encode(pixels), indices)
    assert torch.equal(loaded.decode(indices), tokenizer.decode(indices))
    assert loaded.fingerprint == tokenizer.fingerprint


@pytest.mark.parametrize(
    "scales, message",
    [
        ([1, 3, 2, 8], "must increase strictly"),
        ([1, 2, 2, 8], "must increase strictly"),
        ([1, 2, 4, 6], r"last scale must be the latent's side, 8"),
        ([1, 2, 4, 16], r"last scale must be the latent's side, 8"),
        ([], "non-empty list of positive ints"),
        ([0, 8], "non-empty list of positive ints"),
        (None, "needs scales"),
    ],
)
def test_bad_scales_are_refused_by_name(scales, message):
    with pytest.raises(Exception, match=message):  # a ValueError inside huggingface_hub's validation error
        TokenizerConfig(resolution=16, channel_multipliers=[1, 2], layout="multiscale", scales=scales)


def test_images_of_another_size_are_refused():
    tokenizer = VQTokenizer.from_preset("multiscale-digits")
    with pytest.raises(ValueError, match="exactly its resolution, 16x16"):
        tokenizer.encode(torch.zeros(1, 3, 32, 32))


# -- the next-scale prior ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return build_prior(LAYOUT, size="tiny").eval()


def test_the_mask_is_block_causal():
    mask = block_causal_mask(SCALES)[0, 0]
    assert mask.shape == (31, 31)
    blocks = [0] + [1] + [2] * 4 + [3] * 9 + [4] * 16
    for q in range(31):
        assert mask[q].tolist() == [blocks[k] <= blocks[q] for k in range(31)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_token_sees_a_finer_scale(attention):
    torch.manual_seed(0)
    prior = build_prior(LAYOUT, size="tiny", attn_implementation=attention).eval()
    conditions = LAYOUT.ids.class_token([0, 2])
    codes = torch.randint(0, 16, (2, 30))
    ends = scale_boundaries(SCALES)
    with torch.no_grad():
        base = next_scale_logits(prior, SCALES, LAYOUT.ids.boi, conditions, codes)
        for scale in range(len(SCALES) - 1):  # scale k's codes are the input of scale k + 1's block
            changed = codes.clone()
            changed[:, ends[scale] : ends[scale + 1]] = (codes[:, ends[scale] : ends[scale + 1]] + 1) % 16
            logits = next_scale_logits(prior, SCALES, LAYOUT.ids.boi, conditions, changed)
            coarse = ends[scale + 1]
            assert torch.equal(logits[:, :coarse], base[:, :coarse]), f"a coarser logit saw scale {scale}"
            assert not torch.allclose(logits[:, coarse:], base[:, coarse:])  # finer ones do see it


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_scale_parallel_generation_with_the_cache_equals_without(prior, cfg_scale):
    prompts = build_prompts(LAYOUT, classes=[0, 1, 2, 1])
    greedy = SamplingConfig(temperature=0, cfg_scale=cfg_scale)
    cached = generate_ids(prior, LAYOUT, prompts, greedy)
    assert cached.shape == (4, 30) and cached.max() < 16
    assert torch.equal(cached, generate_ids(prior, LAYOUT, prompts, greedy, use_cache=False))


def test_greedy_generation_takes_the_argmax_of_each_scale_given_the_coarser(prior):
    prompts = build_prompts(LAYOUT, classes=[2])
    codes = generate_ids(prior, LAYOUT, prompts, SamplingConfig(temperature=0))
    with torch.no_grad():
        logits = next_scale_logits(prior, SCALES, LAYOUT.ids.boi, LAYOUT.ids.class_token([2]), codes)
    assert torch.equal(logits[..., :16].argmax(-1), codes)  # teacher-forced on its own output: a fixed point


def test_sampling_options_and_prefixes(prior):
    prompts = build_prompts(LAYOUT, classes=[1, 1, 1])
    first = generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=3, top_k=4, top_p=0.9, cfg_scale=1.5))
    assert torch.equal(
        first, generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=3, top_k=4, top_p=0.9, cfg_scale=1.5))
    )
    assert not torch.equal(
        first, generate_ids(prior, LAYOUT, prompts, SamplingConfig(seed=4, top_k=4, top_p=0.9, cfg_scale=1.5))
    )
    prefix = first[:1, :5]  # the first two scales
    completed = generate_ids(
        prior, LAYOUT, build_prompts(LAYOUT, classes=[0], num_images=3, prefix=prefix), SamplingConfig(seed=0)
    )
    assert torch.equal(completed[:, :5], prefix.expand(3, -1))
    with pytest.raises(ValueError, match=r"completes whole scales: prefix must be \[B, P\] with P in \[0, 1, 5, 14\]"):
        build_prompts(LAYOUT, classes=[0], prefix=first[:1, :6])
    with pytest.raises(ValueError, match='samples scale by scale: sampler "static"'):
        generate_ids(prior, LAYOUT, prompts, SamplingConfig(sampler="jacobi"))


def test_training_on_the_next_scale_loss_fits_a_batch():
    torch.manual_seed(0)
    model = build_prior(LAYOUT, size="tiny")
    codes = torch.randint(0, 16, (8, 30))
    codes[:, 14:] = codes[:, 5:14].repeat(1, 2)[:, :16]  # the finest scale follows from the one before
    sequences = LAYOUT.codec.to_sequence(torch.arange(8) % 3, codes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = prior_loss(model, LAYOUT, sequences)
    for _ in range(40):
        loss = prior_loss(model, LAYOUT, sequences)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first.item()


def test_a_saved_next_scale_prior_loads_with_its_layout(prior, tmp_path):
    prior.save_pretrained(tmp_path)
    loaded, layout = load_prior(str(tmp_path))
    assert layout == LAYOUT and layout.tokens.prior_order == "next-scale"
    prompts = build_prompts(layout, classes=[0, 2])
    greedy = SamplingConfig(temperature=0)
    assert torch.equal(generate_ids(loaded, layout, prompts, greedy), generate_ids(prior, LAYOUT, prompts, greedy))


def test_a_next_scale_prior_refuses_single_scale_tokenizers_and_bpe():
    with pytest.raises(ValueError, match="multiscale tokens have no grid and no visual BPE"):
        VocabLayout.create(codebook_size=16, tokens_per_image=30, scales=SCALES, num_bpe_tokens=4)
    grid_tokenizer = VQTokenizer.from_preset("fsq-cpu")
    layout = VocabLayout.create(codebook_size=1000, tokens_per_image=30, scales=SCALES)
    with pytest.raises(ValueError, match=r"the prior models multiscale tokens at scales \[1, 2, 3, 4\]"):
        layout.check_tokenizer(grid_tokenizer)


# -- both halves through the CLI, on the shipped recipes ---------------------------------------


def test_the_digits_recipes_train_both_halves_and_generate(tmp_path):
    from vqar.cli import main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    fast = ["--max_steps", "3", "--save_every", "0", "--eval_every", "0", "--log_with", "none"]
    main(["train-tokenizer", str(recipes / "multiscale-digits.yaml"), "--output_dir", str(tmp_path / "tok"), *fast])
    main(
        [
            "tokenize",
            "--tokenizer",
            str(tmp_path / "tok" / "tokenizer"),
            "--data",
            "digits",
            "--output",
            str(tmp_path / "tokens"),
        ]
    )
    manifest = json.loads((tmp_path / "tokens" / "vqar_tokens.json").read_text())
    assert manifest["scales"] == [1, 2, 3, 4, 6, 8] and manifest["tokens_per_image"] == 130 and manifest["grid"] is None
    prior_recipe = str(recipes / "multiscale-digits-prior.yaml")
    main(
        [
            "train-prior",
            prior_recipe,
            "--tokens",
            str(tmp_path / "tokens"),
            "--output_dir",
            str(tmp_path / "prior"),
            *fast,
        ]
    )
    config = json.loads((tmp_path / "prior" / "prior" / "config.json").read_text())
    assert config["vqar_vocab"]["scales"] == [1, 2, 3, 4, 6, 8]
    metrics = json.loads((tmp_path / "prior" / "metrics.json").read_text())
    assert 0 < metrics["bits_per_image"] < 130 * 8 * 1.5  # near the 8 bits of a code at the start
    main(
        [
            "generate",
            "--prior",
            str(tmp_path / "prior" / "prior"),
            "--class",
            "3",
            "--cfg-scale",
            "2",
            "--output",
            str(tmp_path / "gen"),
        ]
    )
    assert (tmp_path / "gen" / "grid.png").is_file()
