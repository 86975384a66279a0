import pytest
import torch

from vqar.quantizers import QuantizerConfig, build_quantizer

KIND_CONFIGS = {
    "vq": dict(kind="vq", codebook_size=64, code_dim=8),
    "vq-cosine": dict(kind="vq", codebook_size=64, code_dim=8, use_cosine=True),
    "vq-learned": dict(kind="vq", codebook_size=64, ema_update=False),
    "vq-kmeans": dict(kind="vq", codebook_size=16, kmeans_init=True, dead_code_threshold=1.0),
    "fsq": dict(kind="fsq", levels=[8, 5, 5]),
    "fsq-standardized": dict(kind="fsq", levels=[8, 5, 5], standardize=True),
    "fsq-entropy": dict(kind="fsq", levels=[8, 5, 5], standardize=True, fsq_entropy_weight=0.1),
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
        (dict(kind="lfq", codebook_size=256, standardize=True), "standardize is an fsq option"),
        (dict(kind="vq", codebook_size=8, fsq_entropy_weight=0.1), "fsq_entropy_weight is an fsq option"),
        (dict(kind="fsq", levels=[8, 8, 8, 5, 5, 5], fsq_entropy_weight=0.1), "at most 16384 codes"),
        (dict(kind="fsq", levels=[8, 5], fsq_entropy_weight=-1.0), "fsq_entropy_weight must be >= 0"),
        (dict(kind="vq", codebook_size=8, codebook_sz=3), "unknown quantizer option\\(s\\) \\['codebook_sz'\\]"),
    ],
)
def test_bad_config_names_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig.from_dict(options)


def _level_shares(quantizer, latents: torch.Tensor) -> torch.Tensor:
    """[D, levels]: the share of tokens at each level of each FSQ channel (all levels equal here)."""
    half = quantizer.config.levels[0] // 2
    codes = quantizer(latents).quantized * half + half  # FSQ codes k / half for k in [-half, half)
    return torch.stack([torch.bincount(c.round().long(), minlength=2 * half) for c in codes.flatten(0, 1).T]) / (
        codes.shape[0] * codes.shape[1]
    )


def test_standardized_fsq_fills_every_level_where_drifted_latents_pile_up_at_the_top():
    # The 1D tokenizer's latents drift to a mean of about 1.5 (std 1.2): tanh's flat top end, where
    # they get no gradient back; most tokens then share the top level and most codes are never used.
    def drifted():
        return torch.randn(32, 64, 3) * 1.2 + 1.5

    plain = build_quantizer(dict(kind="fsq", levels=[8, 8, 8]), dim=3)
    standardized = build_quantizer(dict(kind="fsq", levels=[8, 8, 8], standardize=True), dim=3).train()
    for _ in range(50):  # training batches set the running statistics used after training
        standardized(drifted())
    latents = drifted()
    assert (_level_shares(plain.eval(), latents)[:, -1] > 0.4).all()
    shares = _level_shares(standardized.eval(), latents)
    assert (shares > 0.02).all() and (shares < 0.25).all(), shares  # half-width end levels: 4-8 %, 12-20 % inside
    assert standardized(latents).code_stats.usage > max(0.8, 2 * plain(latents).code_stats.usage)
    in_bf16 = standardized.to(torch.bfloat16)(latents.bfloat16())  # a model cast to bf16 still quantizes
    assert in_bf16.quantized.dtype == torch.float32 and in_bf16.indices.shape == (32, 64)


def test_fsq_bound_before_rounding_rounds_to_vector_quantize_pytorchs_codes():
    # The entropy penalty's soft assignments start from this bound: it must be FSQ's own
    from vqar.quantizers import _fsq_bounded

    quantizer = build_quantizer(dict(kind="fsq", levels=[8, 5, 6, 3]), dim=4).eval()
    latents = torch.randn(2, 500, 4) * 3
    half_width = torch.tensor([4.0, 2.0, 3.0, 1.0])
    soft = _fsq_bounded(latents.reshape(-1, 4), torch.tensor([8.0, 5.0, 6.0, 3.0]))
    assert torch.equal(torch.round(soft * half_width) / half_width, quantizer(latents).quantized.reshape(-1, 4))


def test_fsq_entropy_penalty_spreads_correlated_latents_over_the_joint_codes():
    # Three channels that move together reach only the diagonal of the 8x8x8 codes; each channel
    # alone still uses all its levels, so only a penalty over the joint codes can see it.
    torch.manual_seed(0)
    quantizer = build_quantizer(dict(kind="fsq", levels=[8, 8, 8], fsq_entropy_weight=1.0), dim=3).train()
    latents = torch.nn.Parameter(torch.randn(1, 512, 1).repeat(1, 1, 3) + 0.01 * torch.randn(1, 512, 3))
    before = quantizer(latents).code_stats.usage
    optimizer = torch.optim.Adam([latents], lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        quantizer(latents).loss.backward()
        optimizer.step()
    assert before < 0.05 and quantizer(latents).code_stats.usage > 5 * before
    assert quantizer.eval()(latents).loss == 0  # a training loss only


def test_wrong_latent_width_is_named():
    quantizer = build_quantizer(KIND_CONFIGS["fsq"], dim=16)
    with pytest.raises(ValueError, match=r"latents \[B, N, 16\], got \(2, 5, 8\)"):
        quantizer(torch.randn(2, 5, 8))


def test_own_projections_on_a_grid_are_the_published_1x1_convs_to_the_bit():
    # taming's and LlamaGen's quant_conv / post_quant_conv are 1x1 Conv2d over [B, D, h, w]; oneDNN
    # chooses its kernel by spatial shape, so only the same operation on the same grid gives their bits.
    torch.set_num_threads(2)  # as converted models run (with one thread the kernels happen to agree here)
    quantizer = build_quantizer(dict(kind="vq", implementation="vqar", codebook_size=64, project=True), dim=256).eval()
    project_in = quantizer.inner.project_in
    conv = torch.nn.Conv2d(256, 256, 1)
    with torch.no_grad():
        conv.weight.copy_(project_in.weight[..., None])
        conv.bias.copy_(project_in.bias)
    latents = torch.randn(2, 256, 16, 16)
    tokens = latents.flatten(2).transpose(1, 2)  # [B, N, D], as the tokenizer hands them over
    expected = conv(latents).flatten(2).transpose(1, 2)
    assert torch.equal(project_in(tokens, (16, 16)), expected)
    indices = quantizer(tokens, grid=(16, 16)).indices
    codes = quantizer.inner.codebook[indices].transpose(1, 2).reshape(2, 256, 16, 16).contiguous()
    post = quantizer.inner.project_out
    expected_out = torch.nn.functional.conv2d(codes, post.weight[..., None], post.bias).flatten(2).transpose(1, 2)
    assert torch.equal(quantizer.indices_to_codes(indices, grid=(16, 16)), expected_out)
