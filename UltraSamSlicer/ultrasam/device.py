"""Device choice and the precision used on it."""

from __future__ import annotations

import contextlib
import os

import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "float32", "bfloat16")


def choose_device(requested: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" to CUDA, then Apple MPS, then CPU; refuse an unavailable device clearly."""
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA was requested but this PyTorch has no usable GPU "
            f"(torch {torch.__version__}); choose --device cpu or install a CUDA build of PyTorch"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("Apple MPS was requested but is not available here; choose --device cpu")
    if requested.split(":")[0] not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {requested!r}; use one of {DEVICE_CHOICES}")
    return torch.device(requested)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The image encoder's numeric mode for a resolved precision: bf16 autocast for "bfloat16" on
    CUDA GPUs that support it and on CPUs, none for "float32" or elsewhere.

    "auto" is refused: :func:`ultrasam.precision.resolve_precision` turns it into one of the two
    (on a CPU by timing the encoder, because the CPU's flags do not tell whether bf16 pays).
    """
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"autocast needs 'float32' or 'bfloat16', got {precision!r}: resolve 'auto' first")
    bf16_runs = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "float32" or not bf16_runs:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def configure_device(device: str | torch.device, threads: int | None = None) -> None:
    """Process-wide settings that speed SAM up on ``device``.

    CPU: intra-op threads = ``threads`` or the cores this process may use. CUDA: TF32 for fp32
    matmuls and convolutions (bf16 paths are unaffected) and cuDNN autotuning, which pays because
    every encoder input is S x S.
    """
    device = torch.device(device)
    if device.type == "cpu":
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        torch.set_num_threads(threads or len(usable))
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
