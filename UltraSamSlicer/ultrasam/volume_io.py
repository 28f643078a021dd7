"""Read images and volumes with their geometry; write masks in the input's geometry.

Everything goes through SimpleITK, so NIfTI, NRRD, MHA/MHD, DICOM series and PNG/JPG share one
path. A 2D image becomes a :class:`~ultrasam.geometry.Volume` with one slice (K == 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ultrasam.atomic import AtomicGroup, atomic_group, check_writable
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
    if full_suffix(path) in (".nii", ".nii.gz") and voxels.dtype.kind == "f":
        _restore_nifti_nonfinite(path, voxels)
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
    group: AtomicGroup | None = None,
) -> Path:
    """Write a binary (K, J, I) mask in ``geometry``, atomically (no partial file on failure).

    The format follows the suffix: ``.png`` (2D only, 0/255), ``.nii[.gz]``, ``.nrrd``, ``.mha``
    (uint8 label map, 1 = object), or ``.seg.nrrd`` (a Slicer segmentation with one segment).
    With ``group``, the file replaces ``path`` only when every file of the group is written.
    A failed write raises :class:`~ultrasam.atomic.WriteError` naming ``path``.
    """
    path = Path(path)
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (K, J, I), got shape {mask.shape}")
    suffix = check_mask_format(path, mask.shape[0])
    if suffix == ".png":
        image = sitk.GetImageFromArray(mask[0].astype(np.uint8) * 255)
    else:
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetOrigin(geometry.origin_lps.tolist())
        image.SetSpacing(geometry.spacing.tolist())
        image.SetDirection(geometry.direction_lps.flatten().tolist())
        if suffix == ".seg.nrrd":
            _add_segmentation_header(image, mask, segment_name, color)
    if group is None:
        with atomic_group() as group:
            _write_verified(image, path, suffix, group)
    else:
        _write_verified(image, path, suffix, group)
    return path


def check_mask_format(path: str | os.PathLike, slices: int) -> str:
    """The suffix of ``path`` if it can hold a mask of ``slices`` slices; else a ValueError."""
    suffix = full_suffix(path)
    if suffix not in MASK_SUFFIXES:
        raise ValueError(f"{path}: cannot write a mask as {suffix!r}; use one of {', '.join(MASK_SUFFIXES)}")
    if suffix == ".png" and slices != 1:
        raise ValueError(f"{path}: PNG holds one 2D mask; this one has {slices} slices, write NIfTI/NRRD")
    return suffix


def check_mask_path(path: str | os.PathLike, slices: int) -> None:
    """Refuse, before any work, a mask path whose format or folder cannot take the result."""
    check_mask_format(path, slices)
    check_writable(path)


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


# NIfTI-1 float datatypes (codes 16, 64) and their numpy types; byte order comes from sizeof_hdr.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _restore_nifti_nonfinite(path: Path, voxels: np.ndarray) -> None:
    """Put back the NaN and infinities that SimpleITK's NIfTI reader turns into 0, so that a
    volume of NaN is seen for what it is (content_checks) instead of as a black image."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(348)
            order = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
            code = int(np.frombuffer(header[70:72], f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], f"{order}f4")[0])
            if code not in _NIFTI_FLOATS:
                return
            stream.read(max(offset - 348, 0))
            dtype = np.dtype(f"{order}{_NIFTI_FLOATS[code]}")
            raw = np.frombuffer(stream.read(voxels.size * dtype.itemsize), dtype)
    except (OSError, EOFError, ValueError, IndexError):
        return  # SimpleITK read it; keep what it gave
    if raw.size != voxels.size:
        return
    raw = raw.reshape(voxels.shape)
    bad = ~np.isfinite(raw)
    voxels[bad] = raw[bad]


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


def _write_verified(image: sitk.Image, path: Path, suffix: str, group: AtomicGroup) -> None:
    # SimpleITK's writers return without error on a full disk, so the file is read back.
    expected = sitk.GetArrayFromImage(image)

    def same_voxels(written: Path) -> None:
        try:
            same = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), expected)
        except RuntimeError:
            same = False
        if not same:
            raise ValueError(f"{written.stat().st_size} bytes reached the disk and do not read back as the mask; "
                             "is the disk full?")

    temporary = group.add(path, suffix, check=same_voxels)
    sitk.WriteImage(image, str(temporary), useCompression=suffix != ".png")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
