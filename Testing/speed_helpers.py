"""Helpers of the speed tests (CPU and CUDA): narrow SAM encoders whose position bias matters, IoU.

Imports nothing beyond torch, numpy and segment_anything, so the CUDA tests run on a GPU machine
without SimpleITK (bench/gpu_check.py).
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT


def randomise_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    """SAM zero-initialises the relative-position tables; trained ones are not zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "rel_pos" in name:
            param.data = torch.randn(param.shape, generator=generator).to(param.device)


def tiny_encoder() -> ImageEncoderViT:
    """SAM-shaped but narrow: 20 x 20 tokens, so windowed blocks (14) pad, plus global blocks."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=320, embed_dim=64, depth=4, num_heads=4, out_chans=32, use_rel_pos=True,
        window_size=14, global_attn_indexes=(1, 3),
    )
    randomise_rel_pos(encoder)
    return encoder.eval()


def iou(a, b) -> float:
    """Intersection over union of two boolean arrays (numpy or torch) of one shape."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a & b).sum() / max((a | b).sum(), 1))
