"""Read images and volumes with their geometry; write masks in the input's geometry.

Everything goes through SimpleITK, so NIfTI, NRRD, MHA/MHD, DICOM series and PNG/JPG share one
path. A 2D image becomes a :class:`~ultrasam.geometry.Volume` with one slice (K == 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ultrasam.atomic import atomic_path
from ultrasam.geometry import Geometry, Volume

VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".png")


class ImageReadError(ValueError):
    """The file cannot be read as an image or volume; the message says what to do."""


def full_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix including double ones (``.nii.gz``, ``.seg.nrrd``)."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def read_volume(path: str | os.PathLike, frame: int | None = None) -> Volume:
    """Read a 2D image, a 3D volume, a DICOM series folder, or one frame of a 4D series.

    Args:
        path: a file, or a folder holding one DICOM series.
        frame: which time frame to take from a 4D file; required for 4D input.

    Returns:
        A Volume whose voxels are (K, J, I) scalars or (K, J, I, 3) RGB, with the file's geometry.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    image = _select_frame(image, frame, path)
    voxels = sitk.GetArrayFromImage(image)
    voxels = _normalise_channels(voxels, image.GetNumberOfComponentsPerPixel(), path)
    if image.GetDimension() == 2:
        voxels = voxels[np.newaxis]
    return Volume(voxels=voxels, geometry=_geometry_of(image), name=path.name)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image file as (H, W) or (H, W, 3); refuse volumes with a clear message."""
    volume = read_volume(path)
    if volume.shape_kji[0] != 1:
        raise ImageReadError(
            f"{path}: is a volume with {volume.shape_kji[0]} slices, not a 2D image; "
            "segment it as a volume instead"
        )
    return volume.voxels[0]


def write_mask(
    mask: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    segment_name: str = "UltraSam",
    color: tuple[float, float, float] = (0.9, 0.4, 0.2),
) -> Path:
    """Write a binary (K, J, I) mask in ``geometry``, atomically (no partial file on failure).

    The format follows the suffix: ``.png`` (2D only, 0/255), ``.nii[.gz]``, ``.nrrd``, ``.mha``
    (uint8 label map, 1 = object), or ``.seg.nrrd`` (a Slicer segmentation with one segment).
    """
    path = Path(path)
    suffix = full_suffix(path)
    if suffix not in MASK_SUFFIXES:
        raise ValueError(f"{path}: cannot write a mask as {suffix!r}; use one of {MASK_SUFFIXES}")
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (K, J, I), got shape {mask.shape}")
    if suffix == ".png":
        if mask.shape[0] != 1:
            raise ValueError(f"{path}: PNG holds one 2D mask; this one has {mask.shape[0]} slices, write NIfTI/NRRD")
        image = sitk.GetImageFromArray(mask[0].astype(np.uint8) * 255)
    else:
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetOrigin(geometry.origin_lps.tolist())
        image.SetSpacing(geometry.spacing.tolist())
        image.SetDirection(geometry.direction_lps.flatten().tolist())
        if suffix == ".seg.nrrd":
            _add_segmentation_header(image, mask, segment_name, color)
    _write_atomically(image, path, suffix)
    return path


def _read_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ImageReadError(
            f"{path}: not a readable image or volume ({_first_line(error)}); "
            f"supported: {', '.join(VOLUME_SUFFIXES + IMAGE_SUFFIXES)} files or a DICOM folder"
        ) from None


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(f"{folder}: is a folder without a DICOM series; give a file or a DICOM folder")
    if len(series_ids) > 1:
        raise ImageReadError(
            f"{folder}: holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
            "put one series per folder"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    return reader.Execute()


def _select_frame(image: sitk.Image, frame: int | None, path: Path) -> sitk.Image:
    """Reduce a 4D (x, y, z, t) image to one 3D frame; pass 2D and 3D images through."""
    if image.GetDimension() < 4:
        if frame not in (None, 0):
            raise ImageReadError(f"{path}: has no time frames; drop the frame choice")
        return image
    frames = image.GetSize()[3]
    if frame is None:
        raise ImageReadError(
            f"{path}: is a 4D series with {frames} frames; choose one with --time-frame 0..{frames - 1}"
        )
    if not 0 <= frame < frames:
        raise ImageReadError(f"{path}: frame {frame} does not exist; choose 0..{frames - 1}")
    size = list(image.GetSize())
    size[3] = 0
    return sitk.Extract(image, size, [0, 0, 0, frame])


def _normalise_channels(voxels: np.ndarray, components: int, path: Path) -> np.ndarray:
    """Keep grey as is; RGB(A) to 3 channels; refuse other vector images."""
    if components == 1:
        return voxels
    if components in (3, 4):
        return voxels[..., :3]
    raise ImageReadError(
        f"{path}: has {components} values per voxel; only grey or RGB ultrasound can be segmented"
    )


def _geometry_of(image: sitk.Image) -> Geometry:
    dimension = image.GetDimension()
    origin, spacing, direction = np.zeros(3), np.ones(3), np.eye(3)
    origin[:dimension] = image.GetOrigin()
    spacing[:dimension] = image.GetSpacing()
    direction[:dimension, :dimension] = np.reshape(image.GetDirection(), (dimension, dimension))
    return Geometry(origin, spacing, direction)


def _add_segmentation_header(image: sitk.Image, mask: np.ndarray, name: str, color) -> None:
    """Fields Slicer's segmentation reader needs for a one-segment ``.seg.nrrd``."""
    indices = np.argwhere(mask)
    if len(indices):
        low, high = indices.min(axis=0)[::-1], indices.max(axis=0)[::-1]
        extent = " ".join(f"{a} {b}" for a, b in zip(low, high))
    else:
        extent = "0 -1 0 -1 0 -1"
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segment0_ID": "Segment_1",
        "Segment0_Name": name,
        "Segment0_NameAutoGenerated": "0",
        "Segment0_Color": " ".join(f"{c:g}" for c in color),
        "Segment0_ColorAutoGenerated": "0",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_Extent": extent,
        "Segment0_Tags": "Segmentation.Status:inprogress|",
    }
    for key, value in fields.items():
        image.SetMetaData(key, value)


def _write_atomically(image: sitk.Image, path: Path, suffix: str) -> None:
    with atomic_path(path, suffix) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=suffix != ".png")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
