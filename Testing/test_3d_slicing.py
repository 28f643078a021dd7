"""Slices of a volume along any axis: images, prompts in mm and voxels, masks back in the volume."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from test_3d_fakes import RESECT_CASE3
from ultrasam.geometry import Geometry, Volume
from ultrasam.prompts3d import SliceBox, VolumePrompts, slice_prompts
from ultrasam.slicing import VolumeSlices, axis_index
from ultrasam.volume_io import read_volume

# Continuous ITK indices (i, j, k) of test points in the 256 x 256 x 288 RESECT grid.
RESECT_INDICES = [(100.3, 50.7, 200.2), (12.0, 240.4, 3.6), (128.49, 128.51, 143.5001), (0.2, 0.0, 287.4)]


@pytest.fixture(scope="module")
def resect():
    return read_volume(RESECT_CASE3), sitk.ReadImage(str(RESECT_CASE3))


@pytest.fixture(scope="module")
def resect_slices(resect):
    """{axis: VolumeSlices of RESECT Case 3}, built once per axis letter or number."""
    built = {}

    def slices(axis):
        if axis_index(axis) not in built:
            built[axis_index(axis)] = VolumeSlices(resect[0], axis)
        return built[axis_index(axis)]

    return slices


def ras_of_itk_index(image: sitk.Image, index) -> np.ndarray:
    """RAS position of a continuous ITK index, computed by SimpleITK (LPS) and flipped by hand."""
    left, posterior, superior = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
    return np.array([-left, -posterior, superior])


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("index", RESECT_INDICES)
def test_ras_point_on_oblique_volume_prompts_the_hand_computed_slice_and_pixel(resect, resect_slices, axis, index):
    image = resect[1]
    ras = ras_of_itk_index(image, index)
    # Expected, from SimpleITK alone: the continuous index of the point (given back in LPS).
    i, j, k = image.TransformPhysicalPointToContinuousIndex([-ras[0], -ras[1], ras[2]])
    expected = {0: (k, (i, j)), 1: (j, (i, k)), 2: (i, (j, k))}[axis]
    slices = resect_slices(axis)
    prompts = slice_prompts(slices, VolumePrompts([ras], [1], frame="ras"))
    assert list(prompts) == [int(np.rint(expected[0]))]
    np.testing.assert_allclose(prompts[int(np.rint(expected[0]))].points_xy[0], expected[1], atol=1e-6)


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_mask_pixel_lands_on_the_voxel_under_the_point(resect, resect_slices, axis):
    image = resect[1]
    ras = ras_of_itk_index(image, RESECT_INDICES[0])
    slices = resect_slices(axis)
    (index,), xy = slices.locate([ras], "ras")
    x, y = np.rint(xy[0]).astype(int)
    mask = np.zeros(slices.image_shape, bool)
    mask[y, x] = True
    kji = np.argwhere(slices.to_volume({int(index): mask}))
    assert len(kji) == 1
    centre_lps = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in kji[0][::-1]]))
    point_lps = ras * [-1, -1, 1]
    # The voxel is the one containing the point: within half a voxel along each voxel axis.
    offset = np.reshape(image.GetDirection(), (3, 3)).T @ (point_lps - centre_lps) / image.GetSpacing()
    assert np.all(np.abs(offset) <= 0.5 + 1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_images_are_the_numpy_slices_under_one_window(resect, resect_slices, axis):
    array = sitk.GetArrayFromImage(resect[1])  # (K, J, I)
    slices = resect_slices(axis)
    assert slices.window == (0.0, 255.0)  # RESECT's float values lie in 0..255: kept as they are
    for index in (0, slices.num_slices // 2, slices.num_slices - 1):
        expected = np.clip(np.rint(np.take(array, index, axis=axis)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(slices.image(index), expected)


def test_one_window_for_all_slices():
    voxels = np.zeros((3, 4, 5), np.float32)
    voxels[0] = 1000.0  # a bright slice must not rescale the dark ones
    voxels[1] = np.linspace(0, 500, 20).reshape(4, 5)
    voxels[2, 0, 0] = 500.0
    slices = VolumeSlices(Volume(voxels), 0, window=(0.0, 1000.0))
    assert slices.image(0).max() == 255 and slices.image(2)[0, 0] == 128 and slices.image(1).max() == 128


ANISOTROPIC = Geometry(origin_lps=[10.0, -20.0, 5.0], spacing=[0.5, 1.0, 2.0])


@pytest.mark.parametrize(
    "axis, pixel_mm, slice_mm, shape",
    [(0, (0.5, 1.0), 2.0, (6, 8)), ("j", (0.5, 2.0), 1.0, (4, 8)), (2, (1.0, 2.0), 0.5, (4, 6))],
)
def test_anisotropic_spacing_and_display_aspect(axis, pixel_mm, slice_mm, shape):
    slices = VolumeSlices(Volume(np.zeros((4, 6, 8), np.uint8), ANISOTROPIC), axis)
    assert slices.pixel_spacing == pixel_mm and slices.slice_spacing == slice_mm
    assert slices.image_shape == shape and slices.display_aspect == pixel_mm[1] / pixel_mm[0]


@pytest.mark.parametrize("axis, slice_index, xy", [(0, 2, (3, 4)), (1, 4, (3, 2)), (2, 3, (4, 2))])
def test_mm_prompt_lands_on_the_hand_computed_pixel(axis, slice_index, xy):
    # Voxel (i, j, k) = (3, 4, 2): LPS = origin + spacing * ijk = (11.5, -16, 9); RAS flips L and P.
    slices = VolumeSlices(Volume(np.zeros((4, 6, 8), np.uint8), ANISOTROPIC), axis)
    (index,), found = slices.locate([[-11.5 - 0.2, 16.0 + 0.4, 9.0 + 0.9]], "ras")
    assert index == slice_index
    np.testing.assert_allclose(np.rint(found[0]), xy)


def test_points_outside_the_volume_are_refused_with_the_reason():
    slices = VolumeSlices(Volume(np.zeros((4, 6, 8), np.uint8), ANISOTROPIC), 0)
    with pytest.raises(ValueError, match="outside the volume"):
        slices.locate([[0.0, 0.0, 0.0]], "ras")


def test_box_corners_must_share_a_slice_and_one_box_per_slice():
    slices = VolumeSlices(Volume(np.zeros((4, 6, 8), np.uint8)), 0)
    with pytest.raises(ValueError, match="one slice"):
        slice_prompts(slices, VolumePrompts(boxes=[SliceBox([1, 1, 0], [3, 3, 2], "ijk")]))
    box = SliceBox(np.array([1.0, 1.0, 2.0]), np.array([3.0, 4.0, 2.0]), "ijk")
    with pytest.raises(ValueError, match="two boxes"):
        slice_prompts(slices, VolumePrompts(boxes=[box, box]))
    prompts = slice_prompts(slices, VolumePrompts([[2, 2, 2], [5, 1, 2]], [1, 0], "ijk", boxes=[box]))
    np.testing.assert_array_equal(prompts[2].box_xyxy, [1, 1, 3, 4])
    np.testing.assert_array_equal(prompts[2].labels, [1, 0])


@pytest.mark.parametrize("name, expected", [(0, 0), ("k", 0), ("J", 1), (2, 2), ("i", 2)])
def test_axis_names(name, expected):
    assert axis_index(name) == expected


@pytest.mark.parametrize("bad", [3, -1, "x", True, 1.0])
def test_unknown_axis_is_refused(bad):
    with pytest.raises(ValueError, match="numpy axis"):
        axis_index(bad)


def test_slices_are_a_snapshot_of_the_volume():
    volume = Volume(np.zeros((2, 3, 4), np.uint8))
    slices = VolumeSlices(volume, 0)
    key = slices.content_key
    volume.voxels[0, 0, 0] = 9
    assert slices.image(0)[0, 0] == 0 and VolumeSlices(volume, 0).content_key != key
