import json

import pytest
import torch
from conftest import CPU_PRESETS, GPU_PRESETS
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from vqar import TokenizerConfig, VQTokenizer, list_presets


def _train_briefly(tokenizer, images, steps=2):
    """A few optimiser steps so EMA codebooks, k-means flags and weights leave their init."""
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=1e-3)
    tokenizer.train()
    for _ in range(steps):
        out = tokenizer(images)
        loss = (out.reconstruction - images).abs().mean() + out.bottleneck_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tokenizer.eval()


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_encode_decode_shapes_and_range(preset, photo_batch):
    tokenizer = VQTokenizer.from_preset(preset).eval()
    f = tokenizer.downsample_factor
    indices = tokenizer.encode(photo_batch)
    assert indices.shape == (4, 32 // f, 32 // f) and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < tokenizer.codebook_size
    assert tokenizer.decode(indices).shape == photo_batch.shape
    out = tokenizer(photo_batch)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.reconstruction, tokenizer.decode(indices), rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_save_load_is_bit_identical(preset, photo_batch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = _train_briefly(VQTokenizer.from_preset(preset), photo_batch)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()

    for (name, a), (_, b) in zip(tokenizer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(tokenizer.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs after reload"
    indices = tokenizer.encode(photo_batch)
    assert torch.equal(loaded.encode(photo_batch), indices)
    assert torch.equal(loaded.decode(indices), tokenizer.decode(indices))


def test_auto_classes_load_the_tokenizer(tmp_path, photo_batch):
    tokenizer = VQTokenizer.from_preset("fsq-cpu").eval()
    tokenizer.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TokenizerConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VQTokenizer)
    assert torch.equal(loaded.encode(photo_batch), tokenizer.encode(photo_batch))


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_full_size_presets_round_trip(preset, tmp_path):
    tokenizer = VQTokenizer.from_preset(preset).eval()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1  # f16: a 4x4 grid, enough to exercise every layer
    indices = tokenizer.encode(pixels)
    assert indices.shape == (1, 4, 4)
    assert 0 <= indices.min() and indices.max() < tokenizer.codebook_size
    assert tokenizer.decode(indices).shape == (1, 3, 64, 64)
    tokenizer.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.encode(pixels), indices)
    assert torch.equal(loaded.decode(indices), tokenizer.decode(indices))


@pytest.mark.parametrize(
    "preset, codebook_size, factor",
    [
        ("vqgan-f16-16k", 16384, 16),
        ("lfq-f16-256k", 2**18, 16),
        ("fsq-f16-64k", 64000, 16),
        ("bsq-f16-18bit", 2**18, 16),
        ("fsq-cpu", 1000, 4),
    ],
)
def test_preset_sizes(preset, codebook_size, factor):
    config = TokenizerConfig(**{k: v for k, v in json.loads(_preset_text(preset)).items() if k[0] != "_"})
    assert config.quantizer_config.num_codes == codebook_size
    assert config.downsample_factor == factor


def _preset_text(name):
    from vqar.tokenizer.catalogue import preset_dir

    return (preset_dir() / f"{name}.json").read_text()


def test_sizes_and_bits_per_image():
    tokenizer = VQTokenizer.from_preset("lfq-cpu", resolution=64)
    assert tokenizer.tokens_per_image == 16 * 16
    assert tokenizer.bits_per_image == 256 * 10


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="available presets: .*fsq-cpu"):
        VQTokenizer.from_preset("fsq-tiny")
    assert set(CPU_PRESETS + GPU_PRESETS) <= set(list_presets())


@pytest.fixture(scope="module")
def tiny():
    return VQTokenizer.from_preset("fsq-cpu").eval()


@pytest.mark.parametrize(
    "pixels, error, message",
    [
        (torch.zeros(2, 1, 32, 32), ValueError, r"\[B, 3, H, W\], got \(2, 1, 32, 32\)"),
        (torch.zeros(3, 32, 32), ValueError, r"\[B, 3, H, W\], got \(3, 32, 32\)"),
        (torch.zeros(1, 3, 30, 32), ValueError, "multiples of the downsampling factor 4, got 30x32"),
        (torch.full((1, 3, 32, 32), 255.0), ValueError, r"must lie in \[-1, 1\], got values in \[255, 255\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floats in \\[-1, 1\\], got dtype torch.uint8"),
        ([[0.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_pixels_are_named(tiny, pixels, error, message):
    with pytest.raises(error, match=message):
        tiny.encode(pixels)
    with pytest.raises(error, match=message):
        tiny(pixels)


@pytest.mark.parametrize(
    "indices, error, message",
    [
        (torch.full((1, 4, 4), 1000), ValueError, r"\[0, 1000\), got values in \[1000, 1000\]"),
        (torch.full((1, 4, 4), -1), ValueError, r"\[0, 1000\), got values in \[-1, -1\]"),
        (torch.zeros(1, 4, 4), TypeError, "integer tensor, got dtype torch.float32"),
        (torch.zeros(16, dtype=torch.long), ValueError, r"\[B, h, w\], got \(16,\)"),
        (torch.zeros(1, 0, 4, dtype=torch.long), ValueError, "must not be empty"),
    ],
)
def test_bad_indices_are_named(tiny, indices, error, message):
    with pytest.raises(error, match=message):
        tiny.decode(indices)


def test_decode_accepts_int32_indices(tiny):
    indices = torch.randint(0, 1000, (1, 4, 4))
    assert torch.equal(tiny.decode(indices.int()), tiny.decode(indices))


def test_mismatched_weights_are_refused_with_tensor_names(tmp_path):
    VQTokenizer.from_preset("fsq-cpu").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "decoder.conv_out.bias"
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=dropped):
        VQTokenizer.from_pretrained(tmp_path)


def test_bad_config_values_are_named():
    with pytest.raises(Exception, match="resolution 30 is not divisible by the downsampling factor 4"):
        TokenizerConfig(resolution=30, channel_multipliers=[1, 2, 2])
    with pytest.raises(ValueError, match="unknown quantizer option"):
        TokenizerConfig(quantizer={"kind": "fsq", "lvls": [5, 5]})


def test_a_tokenizer_loaded_under_inference_mode_has_the_same_fingerprint(tmp_path):
    tokenizer = VQTokenizer.from_preset("fsq-cpu")
    tokenizer.save_pretrained(tmp_path)
    with torch.inference_mode():  # its tensors are inference tensors: they keep no version counter
        loaded = VQTokenizer.from_pretrained(tmp_path)
        assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.fingerprint == tokenizer.fingerprint


@pytest.mark.parametrize("backbone", ["taming", "magvit2"])
def test_inference_computes_in_place_to_the_same_bit(backbone, photo_batch):
    # Without autograd the blocks write swish, residual sums and the adaptive norm into fresh
    # tensors in place (less page-faulting at 256 px); the result must be the autograd path's, bit for bit.
    config = TokenizerConfig(
        resolution=32,
        channels=32,
        channel_multipliers=[1, 2],
        num_res_blocks=2,
        attn_resolutions=[16],
        latent_channels=8,
        conv_backbone=backbone,
        quantizer={"kind": "fsq", "levels": [5, 5, 5, 5, 5, 5, 5, 5]},
    )
    tokenizer = VQTokenizer(config).eval()
    images = photo_batch.clone()
    with torch.enable_grad():
        latents = tokenizer.encoder(images)
        pixels = tokenizer.decoder(latents)
    with torch.no_grad():
        assert torch.equal(tokenizer.encoder(images), latents)
        assert torch.equal(tokenizer.decoder(latents), pixels)
    assert torch.equal(images, photo_batch)  # inputs are never written to


def test_group_norms_keep_tamings_32_groups_and_give_narrow_widths_several_channels_a_group():
    from vqar.tokenizer.blocks import group_norm

    assert [group_norm(c).num_groups for c in (32, 64, 128)] == [32, 32, 32]  # the old rule: gcd(32, C)
    assert [group_norm(c, 4).num_groups for c in (32, 64, 128, 256, 512)] == [8, 16, 32, 32, 32]
    assert [group_norm(c, 8).num_groups for c in (8, 32, 64)] == [1, 4, 8]


@pytest.mark.parametrize("preset", [*CPU_PRESETS, "multiscale-digits"])
def test_a_decoded_images_colour_follows_its_codes(preset):
    # A GroupNorm of one channel per group normalises each feature's image-wide level away, so the
    # decoder's last norm fixed every reconstruction's overall colour whatever the codes said: it
    # painted its training photos' palette (white came back orange). In the shipped presets the
    # mean colour of a decoded image must move with the latents as its pixels do.
    tokenizer = VQTokenizer.from_preset(preset).eval()
    width = tokenizer.config.latent_channels
    latents = torch.randn(16, width, 8, 8) + 2 * torch.randn(16, width, 1, 1)  # each image its own levels
    with torch.no_grad():
        pixels = tokenizer.decoder(latents)  # [16, 3, 8f, 8f]
    image_colour_spread = pixels.mean((2, 3)).std(0).mean()
    pixel_spread = pixels.std((0, 2, 3)).mean()
    assert image_colour_spread > 0.2 * pixel_spread
