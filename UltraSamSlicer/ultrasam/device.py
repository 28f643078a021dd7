"""Device choice and the precision used on it."""

from __future__ import annotations

import contextlib

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
    """The image encoder's numeric mode.

    "auto": bf16 autocast on CUDA GPUs that support it (UltraSam's encoder keeps mask IoU >= 0.99
    against fp32 there), fp32 elsewhere; "float32": always fp32; "bfloat16": bf16 autocast on any
    device that has it (CUDA, or a CPU with native bf16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bfloat16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
