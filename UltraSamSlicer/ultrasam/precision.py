"""The image encoder's precision on a CPU, chosen by timing the encoder rather than by CPU flags.

bf16 autocast runs SAM's encoder 2.2x faster than fp32 on one CPU with AVX512-BF16 and 1.3x
slower on another CPU that reports the same flag (docs/BENCHMARKS.md), so the flags cannot decide.
:func:`resolve_precision` times a short run of the encoder in fp32 and in bf16 the first time a
model shape runs on a machine, and keeps the answer in ``<cache_dir>/cpu_precision.json``
(:func:`ultrasam.user_cache.cache_dir`), keyed by the machine (CPU model and flags, torch version,
threads) and the encoder's parameter shapes. Later runs read the answer and time nothing.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from ultrasam.atomic import write_text_atomic
from ultrasam.device import autocast_for, check_precision
from ultrasam.user_cache import cache_dir

CACHE_NAME = "cpu_precision.json"
# bf16 must beat fp32 by this factor: fp32 is exact, bf16 moves a few boundary pixels.
BF16_MARGIN = 0.9

Timer = Callable[[str], float]  # "float32" | "bfloat16" -> seconds of one run of the encoder


def resolve_precision(precision: str, device: torch.device, encoder: nn.Module, timer: Timer | None = None,
                      cache_file: str | Path | None = None) -> str:
    """The concrete precision, "float32" or "bfloat16", for the image encoder on ``device``.

    "auto" means bf16 on CUDA GPUs that support it, fp32 on other accelerators, and on a CPU the
    faster of the two by a timed run (bf16 only when it takes under ``BF16_MARGIN`` of fp32's time),
    cached per machine and encoder shape in ``cache_file`` (default: the user cache folder).

    Args:
        encoder: the image encoder as it will run (fused attention already applied), on ``device``.
        timer: seconds of one encoder run in a precision; default :func:`encoder_timer`.
    """
    if check_precision(precision) != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type != "cpu":
        return "float32"
    path = Path(cache_file) if cache_file else cache_dir() / CACHE_NAME
    key = f"{machine_key()}/{encoder_key(encoder)}"
    choices = _read_choices(path)
    if key in choices:
        return choices[key]["precision"]
    seconds = time_both(timer or encoder_timer(encoder, device))
    choice = "bfloat16" if seconds["bfloat16"] < BF16_MARGIN * seconds["float32"] else "float32"
    choices[key] = {"precision": choice, "seconds": seconds, "cpu": cpu_description()[0],
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        write_text_atomic(path, json.dumps(choices, indent=2) + "\n")
    except OSError as error:  # a read-only home: keep the answer for this run only
        warnings.warn(f"could not remember the CPU precision choice in {path}: {error}")
    return choice


def time_both(timer: Timer) -> dict[str, float]:
    """Seconds of one run in each precision, each after one untimed run (kernel selection)."""
    for precision in ("float32", "bfloat16"):
        timer(precision)
    return {precision: timer(precision) for precision in ("float32", "bfloat16")}


def encoder_timer(encoder: nn.Module, device: torch.device) -> Timer:
    """A :data:`Timer` of a short, representative part of ``encoder`` on one input image.

    For segment_anything's ViT that is the patch embedding and the blocks up to the first global
    one (windowed and global blocks in the encoder's own 2:1 ratio, a quarter of ViT-B); any other
    encoder runs whole.
    """
    size = getattr(encoder, "img_size", 1024)
    image = torch.randn(1, 3, size, size, device=device)

    def run(precision: str) -> float:
        with torch.inference_mode(), autocast_for(device, precision):
            start = time.perf_counter()
            _probe(encoder, image)
            return time.perf_counter() - start

    return run


def _probe(encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(encoder, ImageEncoderViT):
        return encoder(image)
    tokens = encoder.patch_embed(image)
    if encoder.pos_embed is not None:
        tokens = tokens + encoder.pos_embed
    for block in encoder.blocks:
        tokens = block(tokens)
        if getattr(block, "window_size", 0) == 0:  # the first global block ends the probe
            break
    return tokens


def machine_key() -> str:
    """A short digest of what decides the encoder's speed here: CPU model and flags, torch, threads."""
    name, flags = cpu_description()
    text = f"{name}|{' '.join(sorted(flags.split()))}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def encoder_key(encoder: nn.Module) -> str:
    """A short digest of the encoder's input size and parameter names and shapes."""
    shapes = [(name, tuple(tensor.shape)) for name, tensor in encoder.state_dict().items()]
    text = f"{getattr(encoder, 'img_size', None)}|{shapes}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def cpu_description() -> tuple[str, str]:
    """(CPU model name, its feature flags) from /proc/cpuinfo, or what ``platform`` knows."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            found.setdefault(field.strip(), value.strip())  # the first core's entry
    except OSError:
        pass
    name = found.get("model name") or platform.processor() or platform.machine()
    return name, found.get("flags") or found.get("Features", "")


def _read_choices(path: Path) -> dict:
    """The cached choices; an absent, unreadable or foreign file counts as empty (it is rewritten)."""
    try:
        choices = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(choices, dict):
        return {}
    return {key: value for key, value in choices.items()
            if isinstance(value, dict) and value.get("precision") in ("float32", "bfloat16")}
