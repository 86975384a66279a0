"""Where inference runs and in which precision: `--device` and `--dtype` of every command.

The default device is the best one present — CUDA (the process's own GPU under `accelerate
launch`), then Apple's MPS, then the CPU — as `accelerate` and `transformers` pick it.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """`name` ("cuda", "cuda:1", "cpu", "mps") checked, or the best device present when None / "auto"."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: expected cpu, cuda, cuda:N or mps ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch {torch.__version__}); use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype` fp32 / bf16 / fp16 as a torch dtype; fp16 needs a GPU (CPU kernels are missing or slow)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise ValueError("--dtype fp16 needs a GPU; on the CPU use bf16 (or fp32)")
    return DTYPES[name]
