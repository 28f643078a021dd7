"""Boxes clear of every object, against a brute-force search and hand-placed objects."""

from __future__ import annotations

import numpy as np
import pytest

from ultrasam.free_boxes import corner_box, free_corners, nearest_free_box


def _clear_by_brute_force(objects: np.ndarray, size_hw: tuple[int, int], margin: int) -> set[tuple[int, int]]:
    """Every top-left (row, column) whose box pixels are all > margin (Chebyshev) from every object pixel."""
    rows, cols = np.nonzero(objects)
    clear = set()
    for r in range(objects.shape[0] - size_hw[0] + 1):
        for c in range(objects.shape[1] - size_hw[1] + 1):
            # distance from the box to each object pixel, per axis (0 inside the box's span)
            dy = np.maximum(0, np.maximum(r - rows, rows - (r + size_hw[0] - 1)))
            dx = np.maximum(0, np.maximum(c - cols, cols - (c + size_hw[1] - 1)))
            if len(rows) == 0 or np.maximum(dy, dx).min() > margin:
                clear.add((r, c))
    return clear


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("margin", [0, 2])
def test_free_corners_match_a_brute_force_search(seed, margin):
    rng = np.random.default_rng(seed)
    objects = np.zeros((23, 31), bool)
    for _ in range(3):
        r, c = rng.integers(0, 20), rng.integers(0, 28)
        objects[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = True
    size = (int(rng.integers(1, 7)), int(rng.integers(1, 9)))
    found = {tuple(corner) for corner in free_corners(objects, size, margin)}
    assert found == _clear_by_brute_force(objects, size, margin)


def test_a_box_larger_than_the_image_fits_nowhere_and_an_empty_size_is_refused():
    assert free_corners(np.zeros((5, 5), bool), (6, 2), 0).shape == (0, 2)
    with pytest.raises(ValueError, match="at least one pixel"):
        free_corners(np.zeros((5, 5), bool), (0, 2), 0)


def test_corner_box_lies_on_the_pixel_edges():
    assert corner_box(np.array([2, 3]), (4, 5)).tolist() == [2.5, 1.5, 7.5, 5.5]  # columns 3..7, rows 2..5


def test_the_nearest_free_box_moves_the_shortest_way_and_keeps_its_size():
    objects = np.zeros((40, 60), bool)
    objects[10:20, 10:20] = True  # one object, columns and rows 10..19
    box = np.array([9.5, 9.5, 19.5, 19.5])  # its tight box, 10 x 10
    moved = nearest_free_box(objects, box, margin=3)
    # 13 pixels right or 13 down (the object's side plus the margin) are the shortest moves
    assert (moved[2] - moved[0], moved[3] - moved[1]) == (10.0, 10.0)
    shift = np.hypot(moved[0] - box[0], moved[1] - box[1])
    assert shift == 13.0
    c0, r0 = int(moved[0] + 0.5), int(moved[1] + 0.5)
    assert not objects[max(0, r0 - 3):r0 + 13, max(0, c0 - 3):c0 + 13].any()
    assert nearest_free_box(np.ones((40, 60), bool), box, margin=0) is None
