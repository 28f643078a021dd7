"""Voxel <-> physical conversions against hand-computed and SimpleITK-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ultrasam.geometry import Geometry, lps_to_ras
from ultrasam.resources import SAMPLE_VOLUME


def test_axis_aligned():
    geometry = Geometry(origin_lps=[10.0, 20.0, 30.0], spacing=[0.5, 0.5, 2.0])
    # voxel (4, 6, 3): LPS = (10 + 2, 20 + 3, 30 + 6) = (12, 23, 36); RAS = (-12, -23, 36)
    assert np.allclose(geometry.ijk_to_lps([4, 6, 3]), [12, 23, 36])
    assert np.allclose(geometry.ijk_to_ras([4, 6, 3]), [-12, -23, 36])
    assert np.allclose(geometry.ras_to_ijk([-12, -23, 36]), [4, 6, 3])
    assert np.allclose(geometry.to_ijk(np.array([[12, 23, 36]]), "lps"), [[4, 6, 3]])


def test_flipped_axes():
    # i runs toward Right (LPS -x), j toward Anterior (LPS -y): RAS = identity directions.
    geometry = Geometry(origin_lps=[-1.5, -1.5, 1.5], spacing=[1.5, 1.5, 1.5],
                        direction_lps=np.diag([-1.0, -1.0, 1.0]))
    # RAS of voxel (2, 3, 4) = origin_ras + 1.5 * ijk = (1.5 + 3, 1.5 + 4.5, 1.5 + 6)
    assert np.allclose(geometry.ijk_to_ras([2, 3, 4]), [4.5, 6.0, 7.5])
    assert np.allclose(geometry.ras_to_ijk([4.5, 6.0, 7.5]), [2, 3, 4])


def test_oblique_rotation_by_hand():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry(origin_lps=[0, 0, 0], spacing=[2.0, 1.0, 1.0], direction_lps=rotation)
    # voxel (1, 0, 0) lies 2 mm along the rotated i axis: LPS (2 cos 30, 2 sin 30, 0) = (1.732, 1, 0)
    assert np.allclose(geometry.ijk_to_lps([1, 0, 0]), [np.sqrt(3), 1.0, 0.0])
    assert np.allclose(geometry.ras_to_ijk([-np.sqrt(3), -1.0, 0.0]), [1, 0, 0])


def test_oblique_resect_matches_simpleitk():
    image = sitk.ReadImage(str(SAMPLE_VOLUME))
    geometry = Geometry(image.GetOrigin(), image.GetSpacing(), np.reshape(image.GetDirection(), (3, 3)))
    assert not np.allclose(np.abs(geometry.direction_lps), np.eye(3), atol=0.1)  # really oblique
    rng = np.random.default_rng(0)
    for ijk in rng.uniform(0, 250, size=(5, 3)):
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
        assert np.allclose(geometry.ijk_to_lps(ijk), lps, atol=1e-4)
        assert np.allclose(geometry.ras_to_ijk(lps_to_ras(lps)), ijk, atol=1e-4)


def test_from_slicer_ijk_to_ras_matrix():
    geometry = Geometry([5, -3, 2], [0.4, 0.5, 0.6], np.linalg.qr(np.arange(9.0).reshape(3, 3) + np.eye(3))[0])
    rebuilt = Geometry.from_ijk_to_ras(geometry.ijk_to_ras_matrix())
    assert geometry.is_close(rebuilt, 1e-9)


@pytest.mark.parametrize("spacing, direction, message", [
    ([1, 0, 1], np.eye(3), "positive"),
    ([1, 1, 1], np.diag([1.0, 2.0, 1.0]), "orthonormal"),
])
def test_bad_geometry(spacing, direction, message):
    with pytest.raises(ValueError, match=message):
        Geometry([0, 0, 0], spacing, direction)
