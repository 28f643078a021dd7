"""3D ROI boxes (possibly rotated) -> one 2D box per crossed slice, against hand-computed boxes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from test_3d_fakes import RESECT_CASE3
from ultrasam.geometry import Geometry, Volume
from ultrasam.prompts3d import Roi, VolumePrompts, roi_boxes, slice_prompts
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_io import read_volume

# Identity direction, LPS origin (10, -20, 5), voxels 0.5 x 1 x 2 mm: i = (L - 10) / 0.5,
# j = P + 20, k = (S - 5) / 2, with L = -R and P = -A.
GRID = Volume(np.zeros((20, 40, 60), np.uint8), Geometry(origin_lps=[10.0, -20.0, 5.0], spacing=[0.5, 1.0, 2.0]))


def i_of(r):
    return (-r - 10.0) / 0.5


def j_of(a):
    return -a + 20.0


def k_of(s):
    return (s - 5.0) / 2.0


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Columns: the ROI's axes in RAS after turning the RAS frame about ``axis`` by ``degrees``."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    u, v = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[[u, v, u, v], [u, u, v, v]] = [c, s, -s, c]
    return matrix


def test_roi_turned_about_superior_gives_the_same_box_on_every_crossed_axial_slice():
    roi = Roi(center=[-25.0, 0.0, 20.0], axes=rotation(2, 30), half_sizes=[6.0, 4.0, 7.0])
    half_r = 6 * np.cos(np.radians(30)) + 4 * np.sin(np.radians(30))
    half_a = 6 * np.sin(np.radians(30)) + 4 * np.cos(np.radians(30))
    # R in [-25 - half_r, -25 + half_r] -> i, reversed; A in [-half_a, half_a] -> j, reversed.
    expected = [i_of(-25 + half_r), j_of(half_a), i_of(-25 - half_r), j_of(-half_a)]
    boxes = roi_boxes(VolumeSlices(GRID, 0), roi)
    # S in [13, 27] -> k in [4, 11]; both faces lie exactly on slice planes 4 and 11.
    assert sorted(boxes) == list(range(4, 12))
    for box in boxes.values():
        np.testing.assert_allclose(box, expected, atol=1e-9)


def slab_interval(offset: float, phi: float, half_y: float, half_z: float) -> tuple[float, float]:
    """A-range at S offset ``offset`` of a rectangle of half sizes (half_y, half_z) turned by ``phi``
    about R: the intersection of the two slabs |a cos + s sin| <= half_y, |-a sin + s cos| <= half_z."""
    c, s = np.cos(phi), np.sin(phi)
    low = max((-half_y - offset * s) / c, (offset * c - half_z) / s)
    high = min((half_y - offset * s) / c, (offset * c + half_z) / s)
    return low, high


def test_roi_turned_about_right_gives_per_slice_boxes_from_the_slab_intersection():
    phi = np.radians(25)
    centre = np.array([-25.0, 0.0, 24.0])
    roi = Roi(center=centre, axes=rotation(0, 25), half_sizes=[5.0, 6.0, 8.0])
    boxes = roi_boxes(VolumeSlices(GRID, 0), roi)
    expected = {}
    for k in range(GRID.shape_kji[0]):
        offset = 5.0 + 2.0 * k - centre[2]
        low, high = slab_interval(offset, phi, 6.0, 8.0)
        if high > low:
            expected[k] = [i_of(centre[0] + 5), j_of(high), i_of(centre[0] - 5), j_of(low)]
    assert sorted(boxes) == sorted(expected) == list(range(5, 15))
    for k, box in expected.items():
        np.testing.assert_allclose(boxes[k], box, atol=1e-9)


def test_same_roi_on_sagittal_slices_gives_the_turned_rectangles_bounds():
    phi = np.radians(25)
    centre = np.array([-25.0, 0.0, 24.0])
    roi = Roi(center=centre, axes=rotation(0, 25), half_sizes=[5.0, 6.0, 8.0])
    boxes = roi_boxes(VolumeSlices(GRID, "i"), roi)
    half_a = 6 * np.cos(phi) + 8 * np.sin(phi)
    half_s = 6 * np.sin(phi) + 8 * np.cos(phi)
    # Sagittal slices: x = j, y = k. R in [-30, -20] -> i in [20, 40], faces on slice planes.
    assert sorted(boxes) == list(range(20, 41))
    for box in boxes.values():
        np.testing.assert_allclose(box, [j_of(half_a), k_of(24 - half_s), j_of(-half_a), k_of(24 + half_s)], atol=1e-9)


def test_roi_larger_than_the_image_is_clipped_and_slices_outside_are_dropped():
    roi = Roi(center=[-25.0, 0.0, 0.0], axes=rotation(2, 10), half_sizes=[100.0, 100.0, 8.0])
    boxes = roi_boxes(VolumeSlices(GRID, 0), roi)
    assert sorted(boxes) == [0, 1]  # S in [-8, 8] -> k <= 1.5
    for box in boxes.values():
        np.testing.assert_allclose(box, [-0.5, -0.5, 59.5, 39.5])


def test_roi_beside_the_volume_prompts_nothing_and_roi_prompts_merge_with_points():
    beside = Roi(center=[200.0, 0.0, 20.0], half_sizes=[5.0, 5.0, 5.0])
    assert roi_boxes(VolumeSlices(GRID, 0), beside) == {}
    touching = Roi(center=[-4.75, 0.0, 20.0], half_sizes=[5.0, 5.0, 5.0])  # R down to -9.75: i up to -0.5
    assert roi_boxes(VolumeSlices(GRID, 0), touching) == {}
    inside = Roi(center=[-25.0, 0.0, 21.0], half_sizes=[5.0, 5.0, 4.0])  # S 17..25 -> k 6..10
    prompts = slice_prompts(VolumeSlices(GRID, 0), VolumePrompts([[30, 20, 8]], [1], "ijk", rois=[inside]))
    assert sorted(prompts) == [6, 7, 8, 9, 10]
    assert prompts[8].points_xy.tolist() == [[30.0, 20.0]] and prompts[7].points_xy is None
    np.testing.assert_allclose(prompts[8].box_xyxy, [i_of(-20), j_of(5), i_of(-30), j_of(-5)])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_roi_aligned_with_the_oblique_voxel_grid_is_a_box_of_constant_voxel_size(axis):
    image = sitk.ReadImage(str(RESECT_CASE3))
    spacing = np.array(image.GetSpacing())
    centre_index = np.array([128.3, 100.2, 150.7])
    centre_lps = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    axes_ras = np.diag([-1.0, -1.0, 1.0]) @ np.reshape(image.GetDirection(), (3, 3))
    half_mm = np.array([8.0, 6.0, 10.0])
    roi = Roi(center=centre_lps * [-1, -1, 1], axes=axes_ras, half_sizes=half_mm)
    low, high = centre_index - half_mm / spacing, centre_index + half_mm / spacing  # (i, j, k)
    across = {0: 2, 1: 1, 2: 0}[axis]
    x_c, y_c = {0: (0, 1), 1: (0, 2), 2: (1, 2)}[axis]
    boxes = roi_boxes(VolumeSlices(read_volume(RESECT_CASE3), axis), roi)
    assert sorted(boxes) == list(range(int(np.ceil(low[across])), int(np.floor(high[across])) + 1))
    for box in boxes.values():
        np.testing.assert_allclose(box, [low[x_c], low[y_c], high[x_c], high[y_c]], atol=1e-4)
