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


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The image encoder's numeric mode: bf16 autocast for "bfloat16" (CUDA or CPU), none for "float32".

    "auto" here means bf16 on CUDA GPUs that support it and fp32 elsewhere; the predictor resolves
    "auto" on a CPU by timing the encoder first (:func:`ultrasam.precision.resolve_precision`),
    because the CPU's flags do not tell whether bf16 pays (docs/BENCHMARKS.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
