"""`vqar evaluate`: every column present and finite, the codec reference at the matched rate."""

import json
import math

import pytest
import torch
from conftest import tokenize_digits_with_tiny_tokenizer

from vqar import VQTokenizer
from vqar.codecs import CodecAtRate
from vqar.evaluation import (
    EvaluateArgs,
    evaluate_tokenizer,
    flat_colour_error,
    format_table,
    prior_bits_per_image,
)
from vqar.layouts import GridLayout
from vqar.tokenizer.modeling import TokenizerOutput
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_prior import PriorArgs, train_prior


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tokens = tokenize_digits_with_tiny_tokenizer(root)
    options = {
        "tokens": tokens,
        "size": "tiny",
        "output_dir": root / "ar",
        "max_steps": 2,
        "batch_size": 16,
        "log_with": "none",
        "eval_every": 0,
        "save_every": 0,
    }
    train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
    args = EvaluateArgs(
        tokenizer=str(root / "tokenizer"),
        prior=str(root / "ar" / "prior"),
        data="digits",
        holdout=0.1,
        output=str(root / "report"),
    )
    return evaluate_tokenizer(args), root / "report"


def test_every_column_is_present_and_finite(report):
    report, _ = report
    for key in (
        "tokens_per_image",
        "bits_per_image",
        "bits_per_pixel",
        "tsr",
        "psnr",
        "ssim",
        "codebook_usage",
        "code_perplexity",
        "dead_codes",
        "flat_colour_error",
        "prior_bits_per_image",
    ):
        assert math.isfinite(report[key]), key
    assert report["tokens_per_image"] == 64 and report["bits_per_image"] == pytest.approx(64 * math.log2(25))
    assert report["bits_per_pixel"] == pytest.approx(report["bits_per_image"] / 256)
    assert report["tsr"] == pytest.approx(3 * 256 / (64 * 2))
    assert 0 < report["prior_bits_per_image"] < 64 * math.log2(39)
    assert report["images"] == 180
    assert "psnr_at_tokens" not in report  # only variable-length 1d tokenizers have prefixes
    for missing in ("lpips", "rfid"):  # no weights on this machine: null, with the reason
        assert report[missing] is None and "weights" in report[f"{missing}_missing_reason"]


def test_codec_reference_lands_near_the_target_rate(report):
    report, _ = report
    for name in ("jpeg", "webp"):
        codec = report[name]
        assert 1 <= codec["quality"] <= 100 and math.isfinite(codec["psnr"]) and 0 < codec["ssim"] <= 1
    import torch

    images = torch.rand(8, 3, 32, 32) * 2 - 1
    for target in (2000.0, 6000.0):
        codec = CodecAtRate("JPEG", target)
        for batch in images.split(3):  # streamed: the quality is chosen once, on the images first shown
            codec.add(batch)
        summary = codec.summary()
        assert codec.samples().shape == images.shape and codec.n == 8
        # the chosen quality is the closest one: its neighbours are no closer
        assert abs(summary["bits_per_image"] - target) < 0.35 * target or summary["quality"] in (1, 100)


def test_report_files(report):
    report, folder = report
    assert json.loads((folder / "report.json").read_text())["psnr"] == report["psnr"]
    text = (folder / "report.md").read_text()
    assert "| tokenizer |" in text and "jpeg q=" in text and "rfid_missing_reason" in text
    assert (folder / "samples.png").is_file()
    assert "jpeg at the prior's rate q=" in text
    assert format_table(report).count("\n") == 6  # header, rule, tokenizer, codecs at both rates


def test_codecs_at_the_prior_rate_land_near_it(report):
    report, _ = report
    for name in ("jpeg", "webp"):
        codec = report[f"{name}_at_prior_rate"]
        assert codec["quality"] == 1 or codec["bits_per_image"] <= 1.35 * report["prior_bits_per_image"]


def test_a_grid_larger_than_the_priors_is_coded_tile_by_tile(report):
    _, folder = report
    root = folder.parent
    tokenizer = VQTokenizer.from_pretrained(root / "tokenizer")
    indices = torch.randint(0, tokenizer.codebook_size, (3, 16, 16))  # 32 px images: four 8x8 tiles each
    whole = prior_bits_per_image(str(root / "ar" / "prior"), tokenizer, indices, batch_size=5)
    tiles = [indices[:, i : i + 8, j : j + 8] for i in (0, 8) for j in (0, 8)]
    by_tile = sum(prior_bits_per_image(str(root / "ar" / "prior"), tokenizer, t, batch_size=5) for t in tiles)
    assert whole == pytest.approx(by_tile, rel=1e-5)
    assert torch.equal(GridLayout(8, 8).tiles_of(indices)[1], indices[0, :8, 8:].flatten())  # image 0, top right
    with pytest.raises(ValueError, match="12x12 tokens do not cut into whole tiles"):
        GridLayout(8, 8).tiles_of(indices[:, :12, :12])


def test_flat_colour_error_is_the_worst_mean_colour_shift_in_8_bit_levels(monkeypatch):
    tokenizer = VQTokenizer.from_preset("fsq-cpu")
    shift = torch.tensor([0.0, -0.4, -0.6])[:, None, None]  # white comes back orange: G and B pulled down
    monkeypatch.setattr(tokenizer, "forward", lambda pixels: TokenizerOutput(reconstruction=pixels + shift))
    assert flat_colour_error(tokenizer) == pytest.approx(0.6 * 127.5, rel=1e-4)  # clamped at -1 for dark blue
    monkeypatch.setattr(tokenizer, "forward", lambda pixels: TokenizerOutput(reconstruction=pixels))
    assert flat_colour_error(tokenizer) == pytest.approx(0, abs=1e-3)


def test_no_batch_outlives_its_step(monkeypatch):
    """Memory flat in the number of images: neither the kept samples nor the codec's sample grid may hold a
    reference into a streamed batch (a slice of one keeps the whole batch's memory alive)."""
    from conftest import TINY_F2

    from vqar import TokenizerConfig
    from vqar.evaluation import reconstruction_metrics

    def users(storage) -> int:  # references to a tensor's memory other than `storage` itself
        return torch._C._storage_Use_Count(storage._cdata) - 1

    monkeypatch.setattr("vqar.codecs.PROBE", 4)  # the codec holds its probe images until it chose a quality
    tokenizer = VQTokenizer(TokenizerConfig(**TINY_F2))
    codec = CodecAtRate("JPEG", 2000.0, keep=3)
    seen, held = [], []

    def batches():
        for step in range(6):
            # the previous batch is still the loop's; every earlier one must be gone
            held.append(sum(users(storage) > 0 for storage in seen[: 2 * max(0, step - 1)]))
            pixels = torch.rand(4, 3, 16, 16) * 2 - 1
            seen.append(pixels.untyped_storage())
            yield pixels

    def measure(pixels, reconstructions, indices):
        seen.append(reconstructions.untyped_storage())
        codec.add(pixels)

    measured = reconstruction_metrics(tokenizer, batches(), keep=3, on_batch=measure)
    codec.summary()
    assert len(measured.originals) == 3 and len(codec.samples()) == 3
    assert held == [0] * 6
