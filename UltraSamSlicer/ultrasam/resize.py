"""Image resizes into a model's input, each exactly as its reference pipeline does it.

UltraSam's, as its mmdet pipeline does it (``FixScaleResize``).

With ``scale=(S, S), keep_ratio=True`` (UltraSam's configs, S = 1024), mmdet 3.x's
``FixScaleResize`` calls its own ``imrescale``: the scale factor is ``S / long_side`` and each
side becomes ``int(side * factor)``, truncated (mmdet's ``_fixed_scale_size``; mmcv's rounds), so
958 x 533 becomes 1023 x 569. The pixels come from ``mmcv.imresize`` with the cv2 backend:
``cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)`` on the uint8 image. OpenCV's
fixed-point bilinear differs from other bilinear implementations by one grey level on about 10 % of
pixels, which moves UltraSam's masks and scores measurably, so this module uses OpenCV itself.
(Read from mmdet's ``mmdet/datasets/transforms/transforms.py`` and mmcv 2.1's
``mmcv/image/geometric.py``.)

The fine-tuning pipeline's (``ultrasam_training.prepare``): the same sizes, with torch's bilinear
filter (no antialiasing) rounded to whole grey levels, so it runs on any device in a batch. The
"refine" inference rule feeds a model fine-tuned here these same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OPENCV_MISSING = ("UltraSam's image resize needs OpenCV (cv2.resize, as UltraSam was trained with); "
                  "install it: pip install opencv-python-headless")


def fix_scale_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) of an (height, width) image whose long side is resized to ``side``, truncating."""
    factor = side / max(height, width)
    return int(height * factor), int(width * factor)


def resize_like_mmdet(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) uint8 -> (h, w[, C]) uint8 with OpenCV's bilinear filter; ``size`` is (h, w)."""
    try:
        import cv2
    except ImportError:
        raise ImportError(OPENCV_MISSING) from None
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_bilinear(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) grey levels of any dtype -> (B, C, h, w) float32 grey levels, rounded to whole
    values as a uint8 image would hold them; ``size`` is (h, w). Runs on ``pixels``' device."""
    resized = F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False)
    return resized.round_().clamp_(0, 255)
