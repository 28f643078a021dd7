"""How a model wants its input pixels normalised (SAM's mean and std, or LiteMedSAM's min-max) and padded.

SAM, UltraSam, MedSAM and MobileSAM subtract ImageNet's mean and divide by its standard deviation
(``Sam.pixel_mean`` / ``pixel_std``, on 0..255 values). LiteMedSAM was trained on images scaled to
[0, 1] by their own minimum and maximum after resizing (its inference script), before zero padding.
The loader records which one on the model (``model.input_normalisation``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

MEAN_STD = "mean-std"
MIN_MAX = "min-max"
_MIN_RANGE = 1e-8  # LiteMedSAM's floor on max - min (a constant image maps to 0)


def input_normalisation(model: Sam) -> str:
    return getattr(model, "input_normalisation", MEAN_STD)


def normalise(model: Sam, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) float 0..255 pixels, unpadded -> the encoder's normalised input, same shape."""
    if input_normalisation(model) == MIN_MAX:
        low = pixels.amin(dim=(1, 2, 3), keepdim=True)
        high = pixels.amax(dim=(1, 2, 3), keepdim=True)
        return (pixels - low) / (high - low).clamp(min=_MIN_RANGE)
    return (pixels - model.pixel_mean) / model.pixel_std


def encoder_input(model: Sam, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) float 0..255 pixels, resized -> (B, 3, S, S): normalised, then zero-padded at the
    bottom and right to the encoder's S x S (SAM's ``preprocess``; LiteMedSAM pads the same way)."""
    size = model.image_encoder.img_size
    return F.pad(normalise(model, pixels), (0, size - pixels.shape[3], 0, size - pixels.shape[2]))
