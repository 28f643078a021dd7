"""Map scanner intensities to the 8-bit range UltraSam was trained on.

US-43d stored every slice as an 8-bit PNG without windowing, so the model expects 0..255 grey
values. The rule, in order:

1. ``uint8`` data is used as it is (window 0..255).
2. Data whose values already lie in 0..255 (float or 16-bit volumes written from 8-bit scanner
   output, as the RESECT volumes are) keeps its values: window 0..255.
3. Anything else is windowed to its 0.5th..99.5th percentile over finite voxels, which ignores a
   few saturated or padding voxels; the window is returned so it can be shown and reused.

One window is computed per volume (never per slice), so neighbouring slices stay comparable.
"""

from __future__ import annotations

import numpy as np

Window = tuple[float, float]

ROBUST_PERCENTILES = (0.5, 99.5)


def choose_window(voxels: np.ndarray) -> Window:
    """Return the (low, high) intensity window the rule above picks for ``voxels``."""
    if voxels.dtype == np.uint8:
        return (0.0, 255.0)
    finite = voxels[np.isfinite(voxels)] if np.issubdtype(voxels.dtype, np.floating) else voxels
    if finite.size == 0:
        raise ValueError("the image has no finite voxel values; check the file is not empty or corrupt")
    low, high = float(finite.min()), float(finite.max())
    if low >= 0.0 and high <= 255.0:
        return (0.0, 255.0)
    low, high = (float(v) for v in np.percentile(finite, ROBUST_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return (low, high)


def to_uint8(voxels: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, Window]:
    """Scale ``voxels`` (any shape, any real dtype) into uint8 through ``window``.

    Args:
        voxels: intensities; NaN and infinities map to 0.
        window: (low, high) mapped to 0 and 255; chosen by :func:`choose_window` when None.

    Returns:
        The uint8 array (same shape) and the window used.
    """
    if window is None:
        window = choose_window(voxels)
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"intensity window must have high > low, got {window}")
    if voxels.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return voxels, (low, high)
    scaled = (np.nan_to_num(voxels.astype(np.float32), nan=low, posinf=high, neginf=low) - low)
    scaled *= 255.0 / (high - low)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), (low, high)
