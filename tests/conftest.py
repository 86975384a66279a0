"""Shared fixtures: tiny seeded models and real images from installed packages (no network)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

WITHOUT_VQAR = """import sys
class NoVqar:
    def find_spec(self, name, path=None, target=None):
        if name == "vqar" or name.startswith("vqar."):
            raise ImportError("vqar is not installed")
sys.meta_path.insert(0, NoVqar())
"""


def run_without_vqar(code: str, timeout: int = 240) -> str:
    """Run Python `code` in a fresh interpreter where `import vqar` fails, as for a user of plain
    transformers; returns its stdout (the run must succeed)."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_VQAR + code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


CPU_PRESETS = ["vq-cpu", "fsq-cpu", "lfq-cpu", "bsq-cpu"]
GPU_PRESETS = ["vqgan-f16-16k", "lfq-f16-256k", "fsq-f16-64k", "bsq-f16-18bit"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # shared 2-core machines: one thread is faster and repeatable
    yield


@pytest.fixture(scope="session")
def photo_batch() -> torch.Tensor:
    """Four real 32x32 photographs from scikit-image, [4, 3, 32, 32] in [-1, 1]."""
    from PIL import Image
    from skimage import data

    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        pil = Image.fromarray(getattr(data, name)()).convert("RGB").resize((32, 32), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    return torch.stack(images).float() / 127.5 - 1


TINY_F2 = dict(
    resolution=16,
    channels=8,
    channel_multipliers=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    mid_attention=False,
    latent_channels=2,
    quantizer={"kind": "fsq", "levels": [5, 5]},
)


def tokenize_digits_with_tiny_tokenizer(root):
    """A tiny untrained f2 tokenizer (8x8 tokens, 25 codes) in root/tokenizer, digits encoded into root/tokens."""
    from vqar import TokenizerConfig, VQTokenizer
    from vqar.training.encode_dataset import TokenizeArgs, tokenize_dataset

    torch.manual_seed(0)
    VQTokenizer(TokenizerConfig(**TINY_F2)).save_pretrained(root / "tokenizer")
    tokenize_dataset(TokenizeArgs(tokenizer=str(root / "tokenizer"), data="digits", output=str(root / "tokens")))
    return root / "tokens"


@pytest.fixture
def no_hang():
    """Fail a test that takes more than a minute instead of letting it hang the suite."""

    class Hung(BaseException):  # not an OSError or Exception: no handler in the code under test swallows it
        pass

    def timeout(signum, frame):
        raise Hung("the run hung for a minute")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
