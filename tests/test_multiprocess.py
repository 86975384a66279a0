"""Every multi-process path, with two CPU processes over gloo (`accelerate launch`, as users run it):
tokenize, prior training with accumulation, the tokenizer's GAN phase with an EMA-codebook VQ on a
stream, a launcher killed mid-run (its workers stop and checkpoint) and the resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_F2

from vqar import TokenizerConfig, VQTokenizer
from vqar.tokens import TokenRows, load_tokens
from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = Path(sys.executable).parent / "accelerate"
CONFIG = REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def launch_command(port: int, *argv) -> list[str]:
    return [str(LAUNCHER), "launch", "--config_file", str(CONFIG), "--main_process_port", str(port), "-m", "vqar"] + [
        str(a) for a in argv
    ]


def launch(port: int, *argv, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(port, *argv), env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mp") / "tokenizer"
    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(folder)
    return folder


def test_two_processes_tokenize_the_same_tokens_in_the_same_order_as_one(tiny_tokenizer, tmp_path):
    # small shards so that each process writes several, and the shard boundaries differ from one process's
    options = ["--tokenizer", tiny_tokenizer, "--data", "digits", "--shard_size", 300, "--num_workers", 1]
    launch(29541, "tokenize", *options, "--output", tmp_path / "two")
    one = tokenize_dataset(
        TokenizeArgs(tokenizer=str(tiny_tokenizer), data="digits", output=str(tmp_path / "one"), shard_size=300)
    )
    (two_data, two), (one_data, _) = load_tokens(tmp_path / "two"), load_tokens(tmp_path / "one")
    assert two.num_images == one.num_images == {"train": 1617, "eval": 180}
    assert two.fingerprint == one.fingerprint
    for split in ("train", "eval"):
        rows_one, rows_two = TokenRows(one_data[split]), TokenRows(two_data[split])
        everything = np.arange(len(rows_one))
        np.testing.assert_array_equal(rows_one.codes(everything), rows_two.codes(everything))
        assert one_data[split]["label"] == two_data[split]["label"]
    assert len(list((tmp_path / "two" / "train").glob("data-*.arrow"))) == 6  # 3 of each process's 808 or 809 rows


def test_two_processes_train_a_prior_to_the_global_batch_with_identical_weights(tiny_tokenizer, tmp_path):
    tokens = tmp_path / "tokens"
    tokenize_dataset(TokenizeArgs(tokenizer=str(tiny_tokenizer), data="digits", output=str(tokens)))
    options = dict(tokens=tokens, size="tiny", output_dir=tmp_path / "prior", max_steps=3, batch_size=8)
    options |= dict(global_batch_size=32, log_with="none", eval_every=2, save_every=2, ema_decay=0.9)
    launch(29542, "train-prior", *[f"--{k}={v}" for k, v in options.items()])
    metrics = json.loads((tmp_path / "prior" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["gradient_accumulation_steps"] == 2  # 32 = 8 x 2 x 2
    assert metrics["weights_identical_across_ranks"] is True and metrics["steps"] == 3
    assert metrics["eval_tokens"] == 180 * 64  # each process its share of the held-out set, summed
    assert (tmp_path / "prior" / "checkpoints" / "step-000002" / "ema.safetensors").is_file()


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the run's own output folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_killed_launcher_stops_its_workers_which_checkpoint_and_the_run_resumes(tmp_path):
    """Two processes: a VQ tokenizer with an EMA codebook, the GAN from step 1, a folder read as a
    stream. SIGKILL reaches only the launcher; its workers must stop (saving a checkpoint) on their own."""
    images = tmp_path / "images"
    write_folder(images, 48)
    output = tmp_path / "run"
    tokenizer = {
        **{k: v for k, v in TINY_F2.items() if k != "resolution"},
        "quantizer": {"kind": "vq", "codebook_size": 32, "code_dim": 2},
    }
    options = dict(
        data=images, streaming="true", eval_size=8, resolution=16, tokenizer=json.dumps(tokenizer), batch_size=4,
        adversarial_weight=0.5, disc_start=1, disc_layers=2, perceptual_weight=0, output_dir=output,
        log_with="none", eval_every=0, save_every=2, max_steps=100_000, learning_rate=1e-3,
    )  # fmt: skip
    argv = ["train-tokenizer", *[f"--{k}={v}" for k, v in options.items()]]
    launcher = subprocess.Popen(
        launch_command(29543, *argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert _wait_for(lambda: (output / "checkpoints" / "step-000004").is_dir(), 240), "no checkpoint came"
        workers = [pid for pid in _processes_with(str(output)) if pid != launcher.pid]
        assert len(workers) >= 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        assert _wait_for(lambda: not _processes_with(str(output)), 60), "the workers outlived their launcher"
    finally:
        for pid in _processes_with(str(output)):
            os.kill(pid, signal.SIGKILL)
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    last = int(checkpoints[-1].name.split("-")[1])
    launch(29544, *argv[:-3], "--max_steps", last + 2, "--resume", "latest", "--learning_rate", "1e-3")
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == last + 2 and metrics["num_processes"] == 2
    assert metrics["weights_identical_across_ranks"] is True  # codebooks, EMA buffers and D included
    assert 0 <= metrics["disc_accuracy_real"] <= 1


def write_folder(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_a_cpu_launch_that_starts_one_process_for_two_says_so_with_the_command_that_works(tmp_path):
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29545"}  # what `accelerate launch --cpu` passes
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "vqar", "train-tokenizer", "--output_dir", str(tmp_path), "--max_steps", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "starts a single process" in lines[0] and "recipes/accelerate/cpu-2proc.yaml" in lines[0]
    assert len(lines) <= 2
