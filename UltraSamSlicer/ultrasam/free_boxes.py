"""Boxes on tissue without an object: a model that follows its box keeps its answer inside them.

A box drawn where no annotated object is tells whether a model segments what it is pointed at or
the most salient thing nearby. Training uses such boxes as negatives (the answer must not leave
the box: ``ultrasam_training.prompts.random_free_box``) and ``ultrasam evaluate`` places one
beside every object.

Frames: (H, W) bool masks indexed ``[row, column]``; boxes ``box_xyxy = (x0, y0, x1, y1)`` on
pixel edges in the ``xy`` frame, so a box covering columns ``c .. c + w - 1`` and rows
``r .. r + h - 1`` is ``(c - 0.5, r - 0.5, c + w - 0.5, r + h - 0.5)``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _window_sums(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum of ``mask`` over every ``height`` x ``width`` window lying in it: (H - h + 1, W - w + 1)."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]


def free_corners(objects: np.ndarray, size_hw: tuple[int, int], margin: int) -> np.ndarray:
    """Every placement of an ``size_hw`` pixel box inside the image whose pixels all lie more than
    ``margin`` pixels (Chebyshev) from every object pixel.

    Args:
        objects: (H, W) bool, True on any object.
        size_hw: (h, w) box size in pixels, both >= 1.
        margin: pixels of clearance, >= 0.

    Returns:
        (K, 2) int array of the placements' top-left pixels as (row, column); K may be 0.
    """
    height, width = size_hw
    if height < 1 or width < 1:
        raise ValueError(f"a box needs at least one pixel a side, got {size_hw}")
    if height > objects.shape[0] or width > objects.shape[1]:
        return np.zeros((0, 2), int)
    side = 2 * margin + 1
    padded = np.pad(objects, margin)
    near = _window_sums(padded, side, side) > 0  # (H, W): within margin of an object
    return np.argwhere(_window_sums(near, height, width) == 0)


def corner_box(corner_rc: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(4,) ``box_xyxy`` of the ``size_hw`` box whose top-left pixel is ``corner_rc`` = (row, column)."""
    row, column = (float(v) for v in corner_rc)
    return np.array([column - 0.5, row - 0.5, column + size_hw[1] - 0.5, row + size_hw[0] - 0.5])


def nearest_free_box(objects: np.ndarray, box_xyxy: np.ndarray, margin: int) -> Optional[np.ndarray]:
    """``box_xyxy`` moved the shortest distance to where it keeps ``margin`` pixels from every
    object pixel, or None where it fits nowhere. The nearest place is the hardest test: a model
    drawn to the object it was moved off fills the box's near side or leaves it."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    size = (max(1, round(y1 - y0)), max(1, round(x1 - x0)))
    corners = free_corners(objects, size, margin)
    if len(corners) == 0:
        return None
    start = np.array([y0 + 0.5, x0 + 0.5])
    return corner_box(corners[np.argmin(((corners - start) ** 2).sum(axis=1))], size)
