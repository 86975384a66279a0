import pytest
import torch

from vqar.quantizers import QuantizerConfig, build_quantizer

KIND_CONFIGS = {
    "vq": dict(kind="vq", codebook_size=64, code_dim=8),
    "vq-cosine": dict(kind="vq", codebook_size=64, code_dim=8, use_cosine=True),
    "vq-learned": dict(kind="vq", codebook_size=64, ema_update=False),
    "vq-kmeans": dict(kind="vq", codebook_size=16, kmeans_init=True, dead_code_threshold=1.0),
    "fsq": dict(kind="fsq", levels=[8, 5, 5]),
    "lfq": dict(kind="lfq", codebook_size=256),
    "bsq": dict(kind="bsq", codebook_size=256),
}


@pytest.mark.parametrize("name", KIND_CONFIGS)
def test_output_shapes_range_and_loss(name):
    quantizer = build_quantizer(KIND_CONFIGS[name], dim=16).train()
    latents = torch.randn(3, 20, 16, requires_grad=True)
    out = quantizer(latents)
    assert out.quantized.shape == (3, 20, 16) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (3, 20) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < quantizer.codebook_size
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert 0 < out.code_stats.usage <= 1
    assert 1 <= out.code_stats.perplexity <= quantizer.codebook_size
    out.quantized.sum().backward()  # gradients reach the encoder through the bottleneck
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.parametrize("name", KIND_CONFIGS)
def test_indices_to_codes_inverts_forward_in_eval(name):
    quantizer = build_quantizer(KIND_CONFIGS[name], dim=16)
    quantizer.train()(torch.randn(4, 32, 16))  # k-means init and EMA updates happen in training
    quantizer.eval()
    out = quantizer(torch.randn(2, 50, 16))
    torch.testing.assert_close(quantizer.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["vq", "fsq", "lfq", "bsq"])
def test_quantization_runs_in_fp32_under_autocast(name):
    quantizer = build_quantizer(KIND_CONFIGS[name], dim=16).eval()
    latents = torch.randn(2, 30, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = quantizer(latents)
    reference = quantizer(latents.float())
    assert under_autocast.quantized.dtype == torch.float32
    assert torch.equal(under_autocast.indices, reference.indices)
    torch.testing.assert_close(under_autocast.quantized, reference.quantized, rtol=0, atol=0)


def test_fsq_has_no_loss_and_codebook_is_product_of_levels():
    quantizer = build_quantizer(dict(kind="fsq", levels=[8, 5, 5, 5]), dim=4).train()
    assert quantizer.codebook_size == 1000
    assert quantizer(torch.randn(2, 10, 4)).loss == 0


def test_eval_mode_has_no_bottleneck_loss_for_lfq():
    quantizer = build_quantizer(KIND_CONFIGS["lfq"], dim=8).eval()
    assert quantizer(torch.randn(2, 10, 8)).loss == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kind="rvq"), "quantizer kind must be one of"),
        (dict(kind="fsq", levels=[2, 5]), "level of 2"),
        (dict(kind="fsq", levels=[]), "fsq needs levels"),
        (dict(kind="fsq", levels=[8, 5], codebook_size=64), "prod\\(levels\\) = 40"),
        (dict(kind="lfq", codebook_size=1000), "power of two"),
        (dict(kind="bsq"), "power of two"),
        (dict(kind="vq"), "vq needs codebook_size"),
        (dict(kind="vq", codebook_size=8, use_cosine=True, ema_update=False), "use_cosine"),
        (dict(kind="vq", codebook_size=8, ema_decay=1.5), "ema_decay"),
        (dict(kind="vq", codebook_size=8, codebook_sz=3), "unknown quantizer option\\(s\\) \\['codebook_sz'\\]"),
    ],
)
def test_bad_config_names_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig.from_dict(options)


def test_wrong_latent_width_is_named():
    quantizer = build_quantizer(KIND_CONFIGS["fsq"], dim=16)
    with pytest.raises(ValueError, match=r"latents \[B, N, 16\], got \(2, 5, 8\)"):
        quantizer(torch.randn(2, 5, 8))
