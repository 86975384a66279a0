"""The 1D (TiTok-style) tokenizer: shapes, save/load, prefix decoding, training, and the prior on 1D tokens."""

import json
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_tokenizer import _preset_text, _train_briefly
from test_training import TYPES, tiny_args

from vqar import TokenizerConfig, VQTokenizer
from vqar.ar import load_prior
from vqar.evaluation import EvaluateArgs, evaluate_tokenizer
from vqar.generation import SamplingConfig, build_prompts, generate_ids, generate_images
from vqar.tokenizer.vit import quadtree_regions
from vqar.tokens import load_tokens
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior
from vqar.training.train_tokenizer import train_tokenizer

QUANTIZERS = {
    "vq": {"kind": "vq", "codebook_size": 32, "code_dim": 4},
    "fsq": {"kind": "fsq", "levels": [5, 5, 3]},
    "fsq-standardized": {"kind": "fsq", "levels": [5, 5, 3], "standardize": True},
    "fsq-entropy": {"kind": "fsq", "levels": [5, 5, 3], "standardize": True, "fsq_entropy_weight": 0.1},
    "lfq": {"kind": "lfq", "codebook_size": 32},
    "bsq": {"kind": "bsq", "codebook_size": 32},
}
TINY_1D = dict(
    layout="1d",
    resolution=32,
    patch_size=8,
    num_latent_tokens=8,
    vit_width=32,
    vit_depth=1,
    vit_heads=2,
    conv_channels=8,
    nested_dropout=True,
    latent_channels=3,
)


def tiny_1d(kind="fsq", **overrides) -> VQTokenizer:
    latent = {"vq": 4, "fsq": 3, "lfq": 5, "bsq": 5}[QUANTIZERS[kind]["kind"]]
    return VQTokenizer(
        TokenizerConfig(**{**TINY_1D, "latent_channels": latent, "quantizer": QUANTIZERS[kind], **overrides})
    )


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_shapes_for_every_quantizer(kind, photo_batch):
    tokenizer = tiny_1d(kind).eval()
    indices = tokenizer.encode(photo_batch)
    assert indices.shape == (4, 8) and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < tokenizer.codebook_size
    assert tokenizer.token_shape == (8,) and tokenizer.tokens_per_image == 8
    assert tokenizer.decode(indices).shape == photo_batch.shape
    out = tokenizer(photo_batch)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.reconstruction, tokenizer.decode(indices), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_save_load_is_bit_identical(kind, photo_batch, tmp_path):
    tokenizer = _train_briefly(tiny_1d(kind), photo_batch)
    tokenizer.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.layout == "1d" and loaded.config.num_latent_tokens == 8
    for (name, a), b in zip(tokenizer.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    indices = tokenizer.encode(photo_batch)
    assert torch.equal(loaded.encode(photo_batch), indices)
    assert torch.equal(loaded.decode(indices[:, :3]), tokenizer.decode(indices[:, :3]))


def test_every_prefix_decodes_and_is_the_forward_pass_with_that_many_tokens(photo_batch):
    tokenizer = _train_briefly(tiny_1d(), photo_batch)
    indices = tokenizer.encode(photo_batch)
    images = []
    for k in range(1, 9):
        image = tokenizer.decode(indices[:, :k])
        assert image.shape == photo_batch.shape and torch.isfinite(image).all()
        torch.testing.assert_close(image, tokenizer(photo_batch, num_tokens=k).reconstruction, rtol=0, atol=1e-4)
        images.append(image)
    # every further token changes the image: the decoder reads it, not a fixed-length window
    assert all((a - b).abs().max() > 1e-5 for a, b in zip(images, images[1:]))


def test_quadtree_regions_go_from_the_whole_image_to_single_patches_and_repeat():
    regions = quadtree_regions(30, 4).reshape(30, 4, 4)
    assert regions[0].eq(1).all()  # token 0: the whole image
    assert regions[1:5].sum(0).eq(1).all() and regions[1, :2, :2].eq(1).all() and regions[4, 2:, 2:].eq(1).all()
    assert regions[5:21].sum(0).eq(1).all() and regions[5:21].sum((1, 2)).eq(1).all()  # then every patch alone
    assert torch.equal(regions[21], regions[0]) and torch.equal(regions[22:26], regions[1:5])  # and again
    uneven = quadtree_regions(5, 3).reshape(5, 3, 3)  # a side that is not a power of two still splits
    assert uneven[1:5].sum(0).eq(1).all() and uneven[1:5].sum((1, 2)).tolist() == [1, 2, 2, 4]


def test_each_token_starts_out_drawing_its_own_region():
    # Without region mixing every token of a fresh decoder paints the whole image alike and
    # training never gets past the mean colour (issue 5); with it, token 1 (the top-left
    # quadrant) changes that quadrant several times more than the opposite one.
    ratios = []
    for seed in range(5):
        torch.manual_seed(seed)
        decoder = tiny_1d().eval().decoder
        latents = torch.randn(2, 8, 3)
        nudged = latents.clone()
        nudged[:, 1] += 1.0
        with torch.no_grad():
            change = (decoder(nudged) - decoder(latents)).abs().mean((0, 1))  # [32, 32]
        ratios.append((change[:16, :16].mean() / change[16:, 16:].mean()).item())
    assert min(ratios) > 2, ratios


def test_nested_dropout_keeps_a_random_leading_prefix_in_training_only(photo_batch):
    tokenizer = tiny_1d().train()
    quantized = torch.zeros(256, 8, 3)
    keep = tokenizer._nested_dropout_mask(quantized)
    kept = keep.sum(1)
    assert keep.shape == (256, 8) and kept.min() == 1 and kept.max() == 8
    assert torch.equal(keep, torch.arange(8) < kept[:, None])  # always a prefix
    assert len(kept.unique()) == 8  # every length is drawn
    assert tokenizer.eval()._nested_dropout_mask(quantized) is None
    assert tiny_1d(nested_dropout=False).train()._nested_dropout_mask(quantized) is None


def test_a_nested_dropout_share_below_one_trains_the_other_images_on_every_token():
    torch.manual_seed(0)
    quantized = torch.zeros(4000, 8, 3)

    def whole(share: float) -> torch.Tensor:  # [B] bool: the images that train on all L tokens
        return tiny_1d(nested_dropout_share=share).train()._nested_dropout_mask(quantized).all(1)

    # k = L also comes up by chance, 1 time in 8: a share s gives (1 - s) + s / 8 whole images
    assert whole(1.0).float().mean() == pytest.approx(1 / 8, abs=0.02)
    assert whole(0.5).float().mean() == pytest.approx(0.5 + 0.5 / 8, abs=0.03)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.encode(torch.zeros(1, 3, 16, 16)), "exactly its resolution, 32x32"),
        (lambda t: t.decode(torch.zeros(1, 9, dtype=torch.long)), r"\[B, k\] with 1 <= k <= 8"),
        (lambda t: t.decode(torch.zeros(1, 0, dtype=torch.long)), "must not be empty"),
        (lambda t: t.decode(torch.zeros(1, 2, 4, dtype=torch.long)), r"\[B, k\]"),
        (lambda t: t.decode(torch.full((1, 4), 75)), r"must lie in \[0, 75\)"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_1d().eval())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layout", "2d", "layout must be one of"),
        ("patch_size", 7, "not divisible by patch_size 7"),
        ("vit_heads", 3, "not divisible by vit_heads 3"),
        ("num_latent_tokens", 0, "num_latent_tokens must be >= 1"),
        ("nested_dropout_share", 0.0, r"nested_dropout_share must lie in \(0, 1\]"),
        ("nested_dropout_share", 1.5, r"nested_dropout_share must lie in \(0, 1\]"),
    ],
)
def test_bad_config_is_named(field, value, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        TokenizerConfig(**{**TINY_1D, "quantizer": QUANTIZERS["fsq"], field: value})


def test_presets_build(tmp_path):
    cpu = VQTokenizer.from_preset("titok-1d-cpu")
    assert cpu.tokens_per_image == 256 and cpu.codebook_size == 1000 and cpu.config.nested_dropout
    # the rate of fsq-cpu's 16x16 grid at 64 px, which the 1D recipe is compared with
    assert round(cpu.tokens_per_image * math.log2(cpu.codebook_size)) == 2551
    config = TokenizerConfig.from_dict({k: v for k, v in json.loads(_preset_text("titok-l-32")).items() if k[0] != "_"})
    assert (config.num_latent_tokens, config.resolution, config.vit_width, config.vit_depth) == (32, 256, 1024, 24)


# -- the trainer and the prior, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def trained_1d(tmp_path_factory):
    """A tiny 1d tokenizer trained by the trainer on digits, and the digits tokenized with it."""
    root = tmp_path_factory.mktemp("one_d")
    config = {k: v for k, v in TINY_1D.items() if k != "resolution"} | {"patch_size": 4, "quantizer": QUANTIZERS["fsq"]}
    metrics = train_tokenizer(*parse_recipe(tiny_args(root / "run", tokenizer=config, max_steps=3), TYPES))
    tokens = root / "tokens"
    tokenize_dataset(TokenizeArgs(tokenizer=str(root / "run" / "tokenizer"), data="digits", output=str(tokens)))
    return root, metrics, tokens


def test_trainer_trains_a_1d_tokenizer_and_reports_psnr_by_prefix(trained_1d):
    root, metrics, _ = trained_1d
    assert set(metrics["psnr_at_tokens"]) == {"2", "4", "8"}
    assert metrics["psnr_at_tokens"]["8"] == pytest.approx(metrics["psnr"])
    assert VQTokenizer.from_pretrained(root / "run" / "tokenizer").config.layout == "1d"


def test_evaluate_reports_psnr_by_prefix(trained_1d, tmp_path):
    root, _, _ = trained_1d
    args = EvaluateArgs(tokenizer=str(root / "run" / "tokenizer"), data="digits", holdout=0.1, output=str(tmp_path))
    report = evaluate_tokenizer(args)
    assert set(report["psnr_at_tokens"]) == {"2", "4", "8"}
    assert report["psnr_at_tokens"]["8"] == pytest.approx(report["psnr"], abs=1e-3)
    assert len(set(report["psnr_at_tokens"].values())) == 3  # shorter prefixes decode to other images
    assert "PSNR from the leading k tokens: k=2:" in (tmp_path / "report.md").read_text()


def test_tokenized_1d_dataset_has_sequences_and_no_grid(trained_1d):
    _, _, tokens = trained_1d
    dataset, manifest = load_tokens(tokens)
    assert manifest.grid is None and manifest.tokens_per_image == 8
    assert len(dataset["train"][0]["tokens"]) == 8


def _train_prior(tokens, output, **overrides):
    options = {
        "tokens": tokens,
        "size": "tiny",
        "output_dir": output,
        "max_steps": 3,
        "batch_size": 16,
        "log_with": "none",
        "eval_every": 0,
        "save_every": 0,
        **overrides,
    }
    return train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))


@pytest.mark.parametrize("num_tokens", [None, 3])
def test_prior_trains_and_generates_on_1d_tokens(trained_1d, tmp_path, num_tokens):
    root, _, tokens = trained_1d
    metrics = _train_prior(tokens, tmp_path, **({"num_tokens": num_tokens} if num_tokens else {}))
    k = num_tokens or 8
    assert metrics["bits_per_image"] == pytest.approx(metrics["bits_per_token"] * k)
    prior, layout = load_prior(tmp_path / "prior")
    assert layout.tokens.to_fields()["grid"] is None and layout.tokens.tokens_per_image == k
    tokenizer = VQTokenizer.from_pretrained(root / "run" / "tokenizer").eval()
    sampling = SamplingConfig(cfg_scale=2.0, seed=0)
    images = generate_images(prior, tokenizer, layout, build_prompts(layout, classes=[3, 7]), sampling)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    prefix = tokenizer.encode(torch.zeros(1, 3, 16, 16))[:, :2]
    completed = generate_ids(prior, layout, build_prompts(layout, classes=[1, 2], prefix=prefix), sampling)
    assert completed.shape == (2, k) and torch.equal(completed[:, :2], prefix.expand(2, -1))


def test_num_tokens_is_refused_for_grid_tokens(tmp_path):
    from conftest import tokenize_digits_with_tiny_tokenizer

    tokens = tokenize_digits_with_tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="num_tokens=3 needs a 1d tokenizer"):
        _train_prior(tokens, tmp_path / "out", num_tokens=3)
