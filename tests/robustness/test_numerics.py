"""NaN and inf: bad steps are skipped and counted, too many in a row stop training cleanly; the
quantizer always runs in fp32."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import CPU_PRESETS
from test_training import final_weights, run, tiny_args

from vqar import VQTokenizer
from vqar.losses import TokenizerLoss
from vqar.training.checkpoints import complete_checkpoints


@pytest.fixture
def poisoned_steps(monkeypatch):
    """Make the tokenizer's loss NaN on the generator-loss calls whose (0-based) numbers are in the set."""
    bad, calls = set(), [0]
    real = TokenizerLoss.generator_loss

    def generator_loss(self, *args, **kwargs):
        loss, logs = real(self, *args, **kwargs)
        calls[0] += 1
        return (loss * float("nan"), logs) if calls[0] - 1 in bad else (loss, logs)

    monkeypatch.setattr(TokenizerLoss, "generator_loss", generator_loss)
    return bad


def test_nan_steps_are_skipped_counted_and_leave_the_weights_finite(tmp_path, poisoned_steps):
    poisoned_steps.update({1, 2, 5})
    metrics = run(tiny_args(tmp_path, max_steps=5, max_bad_steps=2))
    assert metrics["steps"] == 5 and metrics["skipped_steps"] == 3
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_steps"] == 3


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint_intact(tmp_path, poisoned_steps):
    poisoned_steps.update(range(4, 100))  # diverges after 4 good steps
    with pytest.raises(RuntimeError, match=r"3 consecutive steps .*max_bad_steps=2.*step-000004"):
        run(tiny_args(tmp_path, max_steps=8, save_every=2, max_bad_steps=2))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    good = tmp_path / "checkpoints" / "step-000004"
    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 4
    # and it resumes to the end once the cause is gone
    poisoned_steps.clear()
    metrics = run(tiny_args(tmp_path, max_steps=6, save_every=2, resume="latest"))
    assert metrics["steps"] == 6 and metrics["skipped_steps"] == 0
    assert all((copy / f.name).read_bytes() == f.read_bytes() for f in good.iterdir() if f.is_file())


def test_a_nan_prior_loss_is_skipped(tmp_path, monkeypatch):
    from conftest import tokenize_digits_with_tiny_tokenizer

    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_prior import PriorArgs, train_prior

    tokens = tokenize_digits_with_tiny_tokenizer(tmp_path)
    real = torch.nn.functional.cross_entropy
    calls = [0]

    def cross_entropy(*args, **kwargs):  # the first training step's loss is NaN
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == 1 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    options = {
        "tokens": tokens,
        "size": "tiny",
        "output_dir": tmp_path / "out",
        "max_steps": 3,
        "batch_size": 16,
        "log_with": "none",
        "eval_every": 0,
        "save_every": 0,
    }
    metrics = train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))
    assert metrics["steps"] == 3 and metrics["skipped_steps"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_autocast_never_runs_the_quantizer_below_fp32(preset, dtype, photo_batch):
    tokenizer = VQTokenizer.from_preset(preset)
    seen = []
    inner = tokenizer.quantizer.inner
    inner.register_forward_pre_hook(
        lambda module, args: seen.append(
            (args[0].dtype, torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu"))
        )
    )
    with torch.autocast("cpu", dtype=dtype):
        out = tokenizer(photo_batch)
    assert seen and all(d == torch.float32 and not enabled for d, _, enabled in seen)
    assert torch.isfinite(out.reconstruction.float()).all()


# -- mixed precision ------------------------------------------------------------------------


@pytest.fixture
def scaled_losses(monkeypatch):
    """Multiply the tokenizer's loss by a factor on chosen (0-based) generator-loss calls: {call: factor}."""
    factors, calls = {}, [0]
    real = TokenizerLoss.generator_loss

    def generator_loss(self, *args, **kwargs):
        loss, logs = real(self, *args, **kwargs)
        calls[0] += 1
        return loss * factors.get(calls[0] - 1, 1.0), logs

    monkeypatch.setattr(TokenizerLoss, "generator_loss", generator_loss)
    return factors


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """fp16 as on a GPU: accelerate makes a GradScaler only for GPUs, so give the CPU run the one it would get."""
    from vqar.training import train_tokenizer

    scalers, real = [], train_tokenizer.make_accelerator

    def make_accelerator(train):
        accelerator = real(train)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        accelerator.native_amp = True  # fp16 autocast, scaled backward, unscale before clipping
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(train_tokenizer, "make_accelerator", make_accelerator)
    return scalers


def test_an_fp16_overflow_backs_the_loss_scale_off_and_training_goes_on(tmp_path, scaled_losses, cpu_grad_scaler):
    scaled_losses.update({1: 1e37, 3: 1e37})  # finite losses whose scaled gradients overflow
    metrics = run(tiny_args(tmp_path, max_steps=4, max_bad_steps=0, mixed_precision="fp16"))
    (scaler,) = cpu_grad_scaler
    assert metrics["steps"] == 4 and metrics["skipped_steps"] == 2  # skipped and counted, never fatal
    assert scaler.get_scale() == 2.0**10 / 4  # halved once per overflow
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path).values())


def test_overflows_that_persist_below_the_minimum_loss_scale_stop_training(tmp_path, scaled_losses, monkeypatch):
    from vqar.training import train_tokenizer

    real = train_tokenizer.make_accelerator

    def make_accelerator(train):
        accelerator = real(train)
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0), True
        return accelerator

    monkeypatch.setattr(train_tokenizer, "make_accelerator", make_accelerator)
    scaled_losses.update({i: 1e37 for i in range(1, 100)})
    # scale 2 -> 1 is the scaler's to absorb; 1 -> 0.5 and 0.5 -> 0.25 persist below the floor
    with pytest.raises(
        RuntimeError, match=r"2 consecutive steps had a non-finite loss or gradient \(max_bad_steps=1\)"
    ):
        run(tiny_args(tmp_path, max_steps=8, max_bad_steps=1, mixed_precision="fp16"))


def _resumed_equals_uninterrupted(train, tmp_path, **options):
    """Run to the end, then again from the middle checkpoint: the final weights must be equal."""
    metrics = train(tmp_path / "full", **options)
    resumed = tmp_path / "resumed"
    middle = complete_checkpoints(tmp_path / "full")[0]
    shutil.copytree(middle, resumed / "checkpoints" / middle.name)
    train(resumed, resume="latest", **options)
    return metrics


def test_bf16_tokenizer_training_is_finite_keeps_the_quantizer_in_fp32_and_resumes_exactly(tmp_path, monkeypatch):
    from vqar.quantizers import Quantizer

    seen, real = [], Quantizer._quantize

    def quantize(self, latents, *rest):
        seen.append((latents.dtype, torch.is_autocast_enabled("cpu")))
        return real(self, latents, *rest)

    monkeypatch.setattr(Quantizer, "_quantize", quantize)
    options = dict(max_steps=4, save_every=2, keep_checkpoints=3, mixed_precision="bf16", ema_decay=0.9)
    metrics = _resumed_equals_uninterrupted(lambda out, **o: run(tiny_args(out, **o)), tmp_path, **options)
    assert metrics["skipped_steps"] == 0 and np.isfinite(metrics["psnr"])
    assert seen and all(dtype == torch.float32 and not autocast for dtype, autocast in seen)
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_bf16_prior_training_is_finite_and_resumes_exactly(tmp_path):
    from conftest import tokenize_digits_with_tiny_tokenizer
    from safetensors.torch import load_file

    from vqar.training.recipes import TrainConfig, parse_recipe
    from vqar.training.train_prior import PriorArgs, train_prior

    tokens = tokenize_digits_with_tiny_tokenizer(tmp_path)

    def train(output, **overrides):
        options = {
            "tokens": tokens,
            "size": "tiny",
            "output_dir": output,
            "batch_size": 16,
            "log_with": "none",
            "eval_every": 0,
            "mixed_precision": "bf16",
            **overrides,
        }
        return train_prior(*parse_recipe([f"--{k}={v}" for k, v in options.items()], (PriorArgs, TrainConfig)))

    metrics = _resumed_equals_uninterrupted(train, tmp_path, max_steps=4, save_every=2, keep_checkpoints=3)
    assert metrics["skipped_steps"] == 0 and np.isfinite(metrics["bits_per_image"])
    full, resumed = (load_file(tmp_path / d / "prior" / "model.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
