"""Real training processes, killed: SIGKILL at random moments and mid-checkpoint always resumes
to the uninterrupted result; SIGTERM and SIGINT save a checkpoint and exit; a full disk leaves the
previous checkpoint intact."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import final_weights, run, tiny_args

from vqar.training.checkpoints import complete_checkpoints
from vqar.training.optim import EMA

STEPS = dict(max_steps=12, save_every=2, keep_checkpoints=10, ema_decay=0.9, warmup_steps=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def start(output_dir, **overrides) -> subprocess.Popen:
    """`python -m vqar train-tokenizer` on a tiny digits config, as a user runs it."""
    command = [
        sys.executable,
        "-c",
        "import torch, sys; torch.set_num_threads(1); from vqar.cli import main; sys.exit(main(sys.argv[1:]))",
        "train-tokenizer",
        *tiny_args(output_dir, **{**STEPS, **overrides}),
    ]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def wait_for(condition, process: subprocess.Popen, timeout: float = 240, poll: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the training process ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(poll)


def partial_checkpoint(output_dir: Path):
    root = output_dir / "checkpoints"
    return lambda: root.is_dir() and any(p.name.startswith(".partial-") for p in root.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(start(out))
    return final_weights(out)


def test_sigkill_mid_checkpoint_and_at_random_moments_resumes_to_the_same_result(uninterrupted, tmp_path):
    rng = random.Random(0)
    kills = 0
    # 1: killed while a checkpoint folder is being written
    process = start(tmp_path)
    wait_for(partial_checkpoint(tmp_path), process)
    process.kill()
    process.wait()
    kills += 1
    assert all((p / "trainer_state.json").is_file() for p in complete_checkpoints(tmp_path))
    # 2, 3: resumed, then killed at a random moment once it has made progress
    for _ in range(2):
        newest = len(complete_checkpoints(tmp_path))
        process = start(tmp_path, resume="latest")
        try:
            wait_for(lambda newest=newest: len(complete_checkpoints(tmp_path)) > newest, process)
        except AssertionError:  # it finished first: nothing left to interrupt
            break
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next steps or the next checkpoint
        process.kill()
        process.wait()
        kills += 1
    finish(start(tmp_path, resume="latest"))
    resumed = final_weights(tmp_path)
    assert kills >= 2, "the run finished before it could be interrupted twice"
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit(tmp_path, signum):
    process = start(tmp_path, max_steps=100_000, save_every=100_000)
    wait_for(lambda: (tmp_path / "recipe.yaml").is_file(), process, poll=0.05)
    time.sleep(3.0)  # into the steps
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-3000:]
    assert f"received {signal.Signals(signum).name}: saved" in output
    (checkpoint,) = complete_checkpoints(tmp_path)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step >= 1 and checkpoint.name == f"step-{step:06d}"
    finish(start(tmp_path, max_steps=step + 2, save_every=100_000, resume="latest"))
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == step + 2


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    real_save = EMA.save

    def save_until_the_disk_fills(self, path):
        if "step-000004" in str(path):
            Path(path).write_bytes(b"\0" * 1000)  # half a file, then the device is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, path)

    monkeypatch.setattr(EMA, "save", save_until_the_disk_fills)
    with pytest.raises(
        OSError, match=r"could not write checkpoint step-000004 \(No space left on device\).*step-000002, is untouched"
    ):
        run(tiny_args(tmp_path, **STEPS))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000002"]
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))  # the half-written folder is gone
    monkeypatch.setattr(EMA, "save", real_save)
    metrics = run(tiny_args(tmp_path, **STEPS, resume="latest"))
    assert metrics["steps"] == STEPS["max_steps"]


def test_a_stop_signal_is_honoured_between_batches_that_make_no_step(tmp_path, monkeypatch, no_hang):
    import threading

    from vqar.losses import TokenizerLoss

    real = TokenizerLoss.generator_loss

    def always_nan(self, *args, **kwargs):  # every step is skipped: no step ever completes
        loss, logs = real(self, *args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(TokenizerLoss, "generator_loss", always_nan)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            run(tiny_args(tmp_path, max_steps=10, max_bad_steps=100_000))
    finally:
        timer.cancel()
    assert stopped.value.code == 128 + signal.SIGTERM
    (checkpoint,) = complete_checkpoints(tmp_path)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 0
