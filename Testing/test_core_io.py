"""Reading images and volumes, writing masks in the input's geometry, intensity windows."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_path
from ultrasam.geometry import Geometry
from ultrasam.intensity import to_uint8
from ultrasam.volume_io import ImageReadError, read_image, read_volume, write_mask

def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = Geometry(origin_lps=[75.2, 54.6, -29.3], spacing=[0.4, 0.5, 0.7],
                   direction_lps=_rotation([1, 2, 3], 50) @ np.diag([1, -1, 1]))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_mask_roundtrip_keeps_geometry(tmp_path, suffix):
    geometry = OBLIQUE
    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 2:5, 3:6] = True
    path = write_mask(mask, geometry, tmp_path / f"mask{suffix}")
    back = read_volume(path)
    assert np.array_equal(back.voxels.astype(bool), mask)
    assert back.geometry.is_close(geometry, 1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_seg_nrrd_header(tmp_path):
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 1:3, 2] = True
    path = write_mask(mask, Geometry(), tmp_path / "out.seg.nrrd", segment_name="gland")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetMetaData("Segment0_Name") == "gland"
    assert reader.GetMetaData("Segment0_Extent") == "2 2 1 2 1 1"


def test_png_roundtrip(tmp_path):
    mask = np.zeros((1, 4, 6), bool)
    mask[0, 1:3, 2:5] = True
    path = write_mask(mask, Geometry(), tmp_path / "mask.png")
    assert np.array_equal(np.asarray(Image.open(path)) > 0, mask[0])
    with pytest.raises(ValueError, match="PNG holds one 2D mask"):
        write_mask(np.zeros((2, 4, 6)), Geometry(), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_rgb_and_grey_images(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((10, 12), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "grey.png"), rgb[..., 0])
    volume = read_volume(tmp_path / "rgb.png")
    assert volume.shape_kji == (1, 10, 12) and volume.is_rgb


def test_dicom_series(tmp_path):
    voxels = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing([0.5, 0.6, 2.0])
    image.SetOrigin([1.0, 2.0, 3.0])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        slice_image = image[:, :, k]
        for key, value in {"0020|000e": "1.2.3.4", "0020|0013": str(k + 1), "0008|0060": "US",
                           "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.6\\0.5"}.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(tmp_path / f"slice{k}.dcm"))
        writer.Execute(slice_image)
    volume = read_volume(tmp_path)
    assert volume.shape_kji == (3, 4, 5)
    assert np.array_equal(volume.voxels, voxels)
    assert np.allclose(volume.geometry.origin_lps, [1, 2, 3])
    assert np.allclose(volume.geometry.spacing, [0.5, 0.6, 2.0])


def test_4d_needs_a_frame():
    path = shared_path("mrus3d", "labels", "obs000.nii.gz")
    with pytest.raises(ImageReadError, match="4D series with 6 frames; choose one with --time-frame 0..5"):
        read_volume(path)
    gland = read_volume(path, frame=0)
    assert gland.shape_kji == (44, 63, 47)
    with pytest.raises(ImageReadError, match="frame 9 does not exist"):
        read_volume(path, frame=9)


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable image"),
    (b"hello, not an image", "not a readable image"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_volume(tmp_path / "nothing.nrrd")


def test_intensity_windows():
    as_bytes = np.array([0, 7, 255], np.uint8)
    assert to_uint8(as_bytes)[0] is as_bytes
    float_bytes = np.array([0.0, 81.2, 215.6], np.float32)  # RESECT-like: already 0..255
    values, window = to_uint8(float_bytes)
    assert window == (0.0, 255.0) and values.tolist() == [0, 81, 216]
    sixteen = np.linspace(0, 4000, 1001).astype(np.uint16)
    values, (low, high) = to_uint8(sixteen)
    assert low == pytest.approx(20.0) and high == pytest.approx(3980.0)
    assert values[0] == 0 and values[-1] == 255 and values[500] == 128
    with_nan = np.array([np.nan, 100.0, 300.0])
    assert to_uint8(with_nan, (100.0, 300.0))[0].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(sixteen, (5.0, 5.0))
