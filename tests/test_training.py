"""The tokenizer trainer: recipes, loss switches, odd data, resume, and multi-process launch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqar import VQTokenizer
from vqar.data import load_source
from vqar.losses import LossConfig, TokenizerLoss, adaptive_weight
from vqar.training.checkpoints import complete_checkpoints
from vqar.training.recipes import TrainConfig, parse_recipe
from vqar.training.train_tokenizer import DataArgs, TokenizerModelArgs, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
TYPES = (TokenizerModelArgs, DataArgs, LossConfig, TrainConfig)
TINY_FSQ = {
    "channels": 8,
    "channel_multipliers": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "mid_attention": False,
    "latent_channels": 4,
    "quantizer": {"kind": "fsq", "levels": [5, 5, 5, 5]},
}


def tiny_args(output_dir, tokenizer=TINY_FSQ, **overrides) -> list[str]:
    options = {
        "data": "digits",
        "resolution": 16,
        "tokenizer": json.dumps(tokenizer),
        "max_steps": 4,
        "batch_size": 8,
        "perceptual_weight": 0,
        "adversarial_weight": 0,
        "output_dir": str(output_dir),
        "log_with": "none",
        "eval_every": 0,
        "save_every": 0,
        "eval_fraction": 0.05,
        "learning_rate": 1e-3,
        "disc_layers": 2,
    }
    options.update(overrides)
    return [f"--{k}={v}" for k, v in options.items()]


def run(argv: list[str]) -> dict:
    return train_tokenizer(*parse_recipe(argv, TYPES))


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "tokenizer" / "model.safetensors")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- recipes --------------------------------------------------------------------------------


def test_recipe_fields_are_overridden_from_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: vq-cpu\ndata: photos\nmax_steps: 100\ntokenizer: {channels: 16}\nrandom_flip: true\n")
    model, data, loss, train = parse_recipe(
        [
            str(recipe),
            "--max_steps",
            "7",
            "--data",
            "digits",
            "--tokenizer",
            '{"channels": 8}',
            "--random_flip",
            "false",
        ],
        TYPES,
    )
    assert (train.max_steps, data.data, model.tokenizer, data.random_flip) == (7, "digits", {"channels": 8}, False)
    assert model.preset == "vq-cpu"  # from the recipe, not overridden
    assert loss.regression == "l1"  # the dataclass default


def test_a_dict_on_the_command_line_merges_into_the_recipes_and_the_run_records_the_merge(tmp_path):
    recipe = REPO / "recipes" / "quickstart-digits.yaml"
    override = '{"layout": "multiscale", "scales": [1, 2, 4, 8], "quantizer": {"levels": [4, 4, 4]}}'
    argv = [str(recipe), "--tokenizer", override, "--max_steps=2", f"--output_dir={tmp_path}", "--batch_size=8"]
    argv += ["--log_with=none", "--eval_every=0", "--save_every=0"]
    model, *_ = parse_recipe(argv, TYPES)
    recipe_tokenizer = yaml.safe_load(recipe.read_text())["tokenizer"]
    assert model.tokenizer["channel_multipliers"] == recipe_tokenizer["channel_multipliers"]  # kept
    assert model.tokenizer["layout"] == "multiscale" and model.tokenizer["scales"] == [1, 2, 4, 8]
    assert model.tokenizer["quantizer"] == {"kind": "fsq", "levels": [4, 4, 4]}  # nested dicts merge too
    run(argv)  # a latent of side 8 for scales ending at 8: the recipe's channel_multipliers were kept
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert saved["tokenizer"] == model.tokenizer


def test_recipe_with_unknown_field_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 100\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['max_step'\]"):
        parse_recipe([str(recipe)], TYPES)


def test_run_writes_tokenizer_metrics_samples_and_resolved_recipe(tmp_path):
    metrics = run(tiny_args(tmp_path, max_steps=3))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("psnr", "ssim", "codebook_usage", "code_perplexity", "steps", "seconds"):
        assert key in saved and saved[key] == metrics[key]
    assert saved["steps"] == 3 and 0 < saved["codebook_usage"] <= 1
    assert saved["lpips"] is None and "LPIPS" in saved["lpips_missing_reason"]
    assert (tmp_path / "tokenizer" / "config.json").is_file()
    assert list((tmp_path / "samples").glob("step-000003.png"))
    assert "max_steps: 3" in (tmp_path / "recipe.yaml").read_text()


# -- losses ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    return images, (images + 0.1 * torch.randn_like(images)).clamp(-1, 1)


@pytest.mark.parametrize(
    "weights, present, absent",
    [
        (
            dict(perceptual_weight=0, adversarial_weight=0),
            {"loss/regression"},
            {"loss/perceptual", "loss/generator_gan"},
        ),
        (dict(perceptual_weight=1, adversarial_weight=0), {"loss/perceptual"}, {"loss/generator_gan"}),
        (dict(perceptual_weight=0, adversarial_weight=0.1, disc_start=0), {"loss/generator_gan"}, {"loss/perceptual"}),
    ],
)
def test_each_loss_term_switches_on_and_off(pair, weights, present, absent):
    images, reconstruction = pair
    loss_fn = TokenizerLoss(LossConfig(perceptual_random_backbone=True, perceptual_net="alex", **weights))
    reconstruction = reconstruction.clone().requires_grad_()
    last_layer = torch.nn.Parameter(torch.ones(()))
    _, logs = loss_fn.generator_loss(images, reconstruction * last_layer, torch.tensor(0.5), 10, last_layer)
    assert present <= logs.keys() and not (absent & logs.keys())


def test_regression_kind_and_bottleneck_weight_change_the_loss(pair):
    images, reconstruction = pair
    l1 = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0, regression="l1"))
    l2 = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0, regression="l2", bottleneck_weight=0))
    loss1, _ = l1.generator_loss(images, reconstruction, torch.tensor(0.5), 0, None)
    loss2, _ = l2.generator_loss(images, reconstruction, torch.tensor(0.5), 0, None)
    torch.testing.assert_close(loss1, (images - reconstruction).abs().mean() + 0.5)
    torch.testing.assert_close(loss2, (images - reconstruction).pow(2).mean())


def test_discriminator_is_not_applied_before_disc_start(pair):
    images, reconstruction = pair
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0.1, disc_start=5))
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    _, logs = loss_fn.generator_loss(images, reconstruction, torch.tensor(0.0), 4, None)
    assert not calls and "loss/generator_gan" not in logs
    last_layer = torch.nn.Parameter(torch.ones(()))
    loss_fn.generator_loss(images, reconstruction.requires_grad_() * last_layer, torch.tensor(0.0), 5, last_layer)
    assert calls


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    layer = torch.nn.Parameter(torch.randn(4, 4))
    rec_loss, gan_loss = (layer * 3).sum(), (layer * 0.5).sum()  # gradients 3 and 0.5 everywhere
    weight = adaptive_weight(rec_loss, gan_loss, layer)
    torch.testing.assert_close(weight, torch.tensor(3 / 0.5), rtol=1e-3, atol=0)
    assert adaptive_weight(rec_loss, 2 * gan_loss, layer) < weight  # a stronger GAN gradient is damped


def test_lecam_and_non_saturating_losses_run(pair):
    images, reconstruction = pair
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0, disc_loss="non_saturating", lecam_weight=0.01))
    loss, logs = loss_fn.discriminator_loss(images, reconstruction)
    assert torch.isfinite(loss) and "disc/lecam" in logs


def test_disc_start_changes_nothing_in_training_before_it(tmp_path):
    without = run(tiny_args(tmp_path / "a"))
    with_disc = run(tiny_args(tmp_path / "b", adversarial_weight=0.5, disc_start=100))
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert without["psnr"] == with_disc["psnr"]
    gan_on = tiny_args(tmp_path / "c", adversarial_weight=0.5, disc_start=1, adaptive_weight=False)
    run(gan_on)
    changed = final_weights(tmp_path / "c")
    assert any(not torch.equal(changed[k], v) for k, v in final_weights(tmp_path / "a").items())


# -- resume ---------------------------------------------------------------------------------

TINY_VQ = {
    **TINY_FSQ,
    "quantizer": {"kind": "vq", "codebook_size": 32, "kmeans_init": True, "dead_code_threshold": 0.5},
}


def test_resume_after_interruption_is_bit_identical(tmp_path):
    options = dict(
        max_steps=6,
        save_every=3,
        adversarial_weight=0.5,
        disc_start=2,
        lecam_weight=0.01,
        ema_decay=0.9,
        warmup_steps=2,
        keep_checkpoints=5,
    )
    run(tiny_args(tmp_path / "full", TINY_VQ, **options))
    steps = [p.name for p in complete_checkpoints(tmp_path / "full")]
    assert steps == ["step-000003", "step-000006"]

    # An interrupted run: only the step-3 checkpoint survived, plus a half-written step-6.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", interrupted / "checkpoints" / "step-000003")
    (interrupted / "checkpoints" / ".partial-step-000006").mkdir()
    (interrupted / "checkpoints" / "step-000006").mkdir()  # no trainer_state.json: incomplete
    run(tiny_args(interrupted, TINY_VQ, resume="latest", **options))
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(interrupted))
    discriminator = "checkpoints/step-000006/model_1.safetensors"
    assert_same_weights(load_file(tmp_path / "full" / discriminator), load_file(interrupted / discriminator))


# -- recipes shipped in recipes/ ------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("imagenet-*.yaml")))
def test_gpu_recipes_run_two_tiny_steps(recipe, tmp_path):
    tiny = {k: v for k, v in TINY_FSQ.items() if k != "quantizer"}  # keep the recipe's quantizer
    tiny["channel_multipliers"] = [1, 2, 2]  # 32 px (AlexNet's LPIPS needs it) -> 8x8 tokens
    overrides = tiny_args(
        tmp_path,
        tiny,
        max_steps=2,
        batch_size=2,
        disc_start=1,
        mixed_precision="no",
        resolution=32,
        num_workers=0,
        perceptual_net="alex",
        perceptual_random_backbone=True,
    )
    overrides = [o for o in overrides if not o.startswith(("--perceptual_weight", "--adversarial_weight"))]
    metrics = run([str(REPO / "recipes" / recipe), *overrides])
    assert metrics["steps"] == 2 and np.isfinite(metrics["psnr"])


def test_two_process_cpu_launch_gives_two_ranks_with_identical_weights(tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    config = REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        str(launcher),
        "launch",
        "--config_file",
        str(config),
        "--main_process_port",
        "29533",
        "-m",
        "vqar",
        "train-tokenizer",
        *tiny_args(tmp_path, max_steps=3, save_every=2),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["weights_identical_across_ranks"] is True
    assert (tmp_path / "checkpoints" / "step-000002" / "rng_state_1.safetensors").is_file()  # rank 1's RNG


def test_parquet_source_streams_into_training(tmp_path):
    digits = load_source("digits").select(range(200))
    digits.to_parquet(str(tmp_path / "digits.parquet"))
    streamed = load_source(str(tmp_path / "digits.parquet"), streaming=True)
    assert next(iter(streamed))["label"] == digits[0]["label"]
    metrics = run(
        tiny_args(
            tmp_path / "out", data=tmp_path / "digits.parquet", streaming=True, eval_size=20, max_steps=4, save_every=2
        )
    )
    assert metrics["steps"] == 4 and metrics["eval_images"] == 20


# -- the GAN phase --------------------------------------------------------------------------


def test_the_gan_phase_reports_discriminator_accuracy_and_the_adaptive_weight(tmp_path):
    metrics = run(tiny_args(tmp_path, adversarial_weight=0.5, disc_start=1, lecam_weight=0.01, log_every=1))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("disc_accuracy_real", "disc_accuracy_fake"):
        assert 0 <= saved[key] <= 1 and saved[key] == metrics[key]
    assert saved["adaptive_weight"] > 0


def test_the_adversarial_term_ramps_up_over_the_warm_up():
    loss = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0.1, disc_start=10, disc_warmup_steps=4))
    assert [loss.gan_ramp(step) for step in (0, 9, 10, 11, 13, 50)] == [0, 0, 0.25, 0.5, 1, 1]
    no_warmup = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0.1, disc_start=10))
    assert [no_warmup.gan_ramp(step) for step in (9, 10)] == [0, 1]


def test_training_warns_of_a_collapsed_codebook_and_of_a_gan_that_costs_psnr(caplog):
    from types import SimpleNamespace

    from vqar import VQTokenizer
    from vqar.training.train_tokenizer import _warn_about_health

    tokenizer = VQTokenizer.from_preset("fsq-cpu", resolution=16)  # 1,000 codes, 16 tokens per image
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0.1, disc_start=100))
    run = SimpleNamespace(unwrapped=tokenizer, min_codebook_usage=0.1, loss_fn=loss_fn, psnr_before_gan=None)
    healthy = {"eval_images": 100, "codebook_usage": 0.5, "code_perplexity": 300.0}  # 1,600 tokens: all 1,000 reachable
    with caplog.at_level("WARNING"):
        _warn_about_health(run, healthy | {"psnr": 25.0}, step=50)
        _warn_about_health(run, healthy | {"psnr": 24.5}, step=150)  # -0.5 dB: the usual GAN trade
        assert not caplog.records
        _warn_about_health(run, healthy | {"psnr": 23.5, "disc_accuracy_real": 1.0, "disc_accuracy_fake": 0.9}, 200)
        _warn_about_health(run, healthy | {"psnr": 25.0, "codebook_usage": 0.05, "code_perplexity": 20.0}, 250)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "PSNR fell from 25.00 to 23.50 dB since the discriminator started (step 100)" in messages[0]
    assert "100% / 90%" in messages[0]
    assert "codebook collapsed: the held-out images use 5.00% of the codes" in messages[1]


def test_compile_wraps_the_model_but_ema_and_saving_see_the_module_itself(tmp_path):
    from vqar.training.train_tokenizer import setup

    torch.set_num_threads(1)
    model_args, data_args, loss, _ = parse_recipe(tiny_args(tmp_path), TYPES)
    for compile in (False, True):  # one process may change its mind: accelerate's state is per process
        run = setup(model_args, data_args, loss, TrainConfig(output_dir=str(tmp_path), compile=compile, ema_decay=0.9))
        assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule) == compile
        assert not isinstance(run.unwrapped, torch._dynamo.eval_frame.OptimizedModule)
        assert set(run.ema.shadow) <= set(run.unwrapped.state_dict())  # no "_orig_mod." prefixes


# -- fine-tuning ------------------------------------------------------------------------------


def _encoded_digits(folder) -> torch.Tensor:
    from vqar.data import ImageDataset, ImageTransform, collate_images

    images = ImageDataset(load_source("digits"), ImageTransform(16))
    pixels = collate_images(images.__getitems__(list(range(32))))["pixels"]
    return VQTokenizer.from_pretrained(folder).eval().encode(pixels)


def test_a_decoder_only_fine_tune_keeps_every_code_and_the_priors_of_its_base(tmp_path):
    base = tmp_path / "base" / "tokenizer"
    run(tiny_args(tmp_path / "base", TINY_VQ, max_steps=3, adversarial_weight=0.5, disc_start=0))
    run(tiny_args(tmp_path / "tuned", init_from=base, train="decoder", max_steps=3, ema_decay=0.9))
    before, after = final_weights(tmp_path / "base"), final_weights(tmp_path / "tuned")
    for name in before:
        assert torch.equal(before[name], after[name]) != name.startswith("decoder."), name
    assert torch.equal(_encoded_digits(base), _encoded_digits(tmp_path / "tuned" / "tokenizer"))
    tuned = VQTokenizer.from_pretrained(tmp_path / "tuned" / "tokenizer")
    assert tuned.fingerprint == VQTokenizer.from_pretrained(base).fingerprint


def test_a_decoder_fine_tune_of_an_old_tokenizer_still_serves_the_priors_trained_on_it(tmp_path):
    from vqar.ar import load_prior

    legacy = REPO / "tests" / "fixtures" / "legacy"
    run(tiny_args(tmp_path, init_from=legacy / "grid-tokenizer", train="decoder", max_steps=2))
    tuned = VQTokenizer.from_pretrained(tmp_path / "tokenizer")
    _, layout = load_prior(str(legacy / "grid-prior"))
    layout.check_tokenizer(tuned)  # the prior recorded the base's scheme-1 fingerprint


def test_fine_tuning_the_encoder_changes_the_codes_meaning_and_freezing_needs_a_base(tmp_path):
    base = tmp_path / "base" / "tokenizer"
    run(tiny_args(tmp_path / "base", max_steps=2))
    run(tiny_args(tmp_path / "tuned", init_from=base, train="encoder,decoder", max_steps=2))
    tuned = VQTokenizer.from_pretrained(tmp_path / "tuned" / "tokenizer")
    assert not tuned.has_codes_of(VQTokenizer.from_pretrained(base).fingerprint)
    with pytest.raises(ValueError, match="--init_from"):
        run(tiny_args(tmp_path / "fresh", train="decoder"))
    with pytest.raises(ValueError, match="encoder, quantizer, decoder"):
        run(tiny_args(tmp_path / "typo", init_from=base, train="decodr"))
