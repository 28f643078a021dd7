"""Cut 3D and 2D+time data sets into US-43d training images, as UltraSam's converters did.

A volume and its label volume (same grid) are sliced along one numpy axis of the (K, J, I) array
(``ultrasam.slicing``'s convention: a slice is the plain numpy slice, rows and columns in array
order); slices whose mask is empty are skipped. Intensities go to 8 bits with
``ultrasam.intensity.to_uint8`` (one window per volume; uint8 data is kept as it is).

Published layouts (``LAYOUTS``) follow UltraSam's converter for each data set:

=========  ==========  ======================================================================
name       slicing     files, pairing and special rules
=========  ==========  ======================================================================
segthy     axial (k)   ``*.nii``; label paths contain "label"; image stem minus its last 3
                       characters (``_US``) = label stem; rotated 180 degrees
regpro     sagittal    ``*.nii.gz`` under ``images``/``labels`` folders, MR files skipped;
           (i)         labels are 4D (one channel per structure, each split on its own);
                       rotated 180 degrees
microseg   axial (k)   ``micro_ultrasound_scans`` / ``expert_annotations``, paired by the last
                       ``_`` field of the stem; mask cleared where the image is 0; rotated
volume     chosen      any NIfTI/NRRD/MHA: ``--images`` and ``--labels`` folders paired by stem
frames     k (time)    2D+time sequences (CAMUS, CardiacUDC, EchoCP): frame by frame
=========  ==========  ======================================================================

"Rotated 180 degrees" is UltraSam's ``imflip(direction="diagonal")``: those scanners store the
probe at the bottom, and the published images show it at the top.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ultrasam.intensity import to_uint8
from ultrasam.slicing import axis_index
from ultrasam.volume_io import full_suffix
from ultrasam_data.writer import CocoWriter

VOLUME_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class VolumePair:
    """An image volume, its label volume, and the group (volume id) its slices belong to."""

    image: Path
    label: Path
    group: str


@dataclass(frozen=True)
class VolumeLayout:
    """How a volume data set is sliced and how its files pair up.

    Attributes:
        axis: numpy axis of the (K, J, I) array to slice along.
        rotate180: turn every slice (image and mask) by 180 degrees.
        clear_outside: set the mask to 0 where the image is 0 (outside the field of view).
        suffixes: file endings of the volumes.
        is_label: relative path -> whether the file is a label volume.
        pair_key: (file stem, is_label) -> the key that pairs an image with its label.
        skip: relative path -> whether to ignore the file.
    """

    axis: int
    rotate180: bool = False
    clear_outside: bool = False
    suffixes: tuple[str, ...] = VOLUME_FILE_SUFFIXES
    is_label: Callable[[Path], bool] = lambda path: "label" in path.as_posix().lower()
    pair_key: Callable[[str, bool], str] = lambda stem, is_label: stem
    skip: Callable[[Path], bool] = lambda path: False


def _any_part(path: Path, word: str) -> bool:
    return any(word in part.lower() for part in path.parts[:-1])


LAYOUTS = {
    "segthy": VolumeLayout(axis=0, rotate180=True, suffixes=(".nii",),
                           pair_key=lambda stem, is_label: stem if is_label else stem[:-3]),
    "regpro": VolumeLayout(axis=2, rotate180=True, suffixes=(".nii.gz",),
                           is_label=lambda path: _any_part(path, "label"),
                           skip=lambda path: _any_part(path, "mr")),
    "microseg": VolumeLayout(axis=0, rotate180=True, clear_outside=True, suffixes=(".nii.gz",),
                             is_label=lambda path: _any_part(path, "expert_annotations"),
                             pair_key=lambda stem, is_label: stem.split("_")[-1],
                             skip=lambda path: not (_any_part(path, "expert_annotations")
                                                    or _any_part(path, "micro_ultrasound_scans"))),
}


def file_stem(path: Path) -> str:
    """File name without its (possibly double) suffix: ``obs000.nii.gz`` -> ``obs000``."""
    return path.name[: len(path.name) - len(full_suffix(path))]


def find_pairs(root: str | os.PathLike, layout: VolumeLayout) -> list[VolumePair]:
    """Pair every image volume under ``root`` with its label volume, following ``layout``.

    Raises:
        ValueError: nothing found, or an image without a label (the message lists them).
    """
    root = Path(root)
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or full_suffix(path) not in layout.suffixes or layout.skip(relative):
            continue
        is_label = layout.is_label(relative)
        (labels if is_label else images)[layout.pair_key(file_stem(path), is_label)] = path
    return _pairs(images, labels, root)


def pair_folders(image_dir: str | os.PathLike, label_dir: str | os.PathLike,
                 label_suffix: str = "") -> list[VolumePair]:
    """Pair volumes of two folders by file stem; label stems may end with ``label_suffix``."""
    def volumes(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and full_suffix(p) in VOLUME_FILE_SUFFIXES)

    images = {file_stem(p): p for p in volumes(Path(image_dir))}
    labels = {file_stem(p).removesuffix(label_suffix): p for p in volumes(Path(label_dir))}
    return _pairs(images, labels, Path(image_dir))


def _pairs(images: dict[str, Path], labels: dict[str, Path], where: Path) -> list[VolumePair]:
    if not images:
        raise ValueError(f"{where}: no image volumes found; check the folder and the data set layout")
    unmatched = sorted(str(images[key]) for key in images.keys() - labels.keys())
    if unmatched:
        raise ValueError(f"no label volume for {len(unmatched)} image(s): {', '.join(unmatched[:5])}; "
                         "check the label folder / file name suffix")
    return [VolumePair(images[key], labels[key], key) for key in sorted(images)]


def read_array(path: Path) -> np.ndarray:
    """Voxels in numpy order: (K, J, I), or (C, K, J, I) for a 4D file (channels or time last in ITK)."""
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot be read as a volume ({str(error).strip().splitlines()[-1]})") from None


def label_channels(labels: np.ndarray, image_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """(C, K, J, I) label channels from a 3D label map or a 4D stack, checked against the image."""
    channels = labels[np.newaxis] if labels.ndim == 3 else labels
    if channels.ndim != 4 or channels.shape[1:] != tuple(image_shape):
        raise ValueError(f"{path}: labels of shape {labels.shape} do not match the image {tuple(image_shape)}; "
                         "labels must be on the image's voxel grid (resample them first)")
    return channels


def slice_volume(writer: CocoWriter, voxels: np.ndarray, channels: np.ndarray, axis: int | str, group: str,
                 source: str = "", rotate180: bool = False, clear_outside: bool = False) -> int:
    """Write every slice with a non-empty mask of one volume.

    Args:
        voxels: (K, J, I) scalars or (K, J, I, 3) RGB, any dtype (mapped to uint8 with one window).
        channels: (C, K, J, I) label maps; each channel's labels are split into instances on its own.
        axis: numpy axis (0, 1, 2) or ijk letter ("k", "j", "i") to slice along.

    Returns:
        The number of slices written.
    """
    axis = axis_index(axis)
    image8, _ = to_uint8(voxels)
    image_slices = np.moveaxis(image8, axis, 0)
    label_slices = np.moveaxis(channels, axis + 1, 0)  # (S, C, H, W)
    written = 0
    for index, (image, layers) in enumerate(zip(image_slices, label_slices)):
        if not layers.any():
            continue
        if clear_outside:
            outside = voxels_slice(voxels, axis, index) == 0
            layers = np.where(outside, 0, layers)
        if rotate180:
            image, layers = image[::-1, ::-1], layers[:, ::-1, ::-1]
        written += writer.add(np.ascontiguousarray(image), list(layers), group, source, index) > 0
    return written


def voxels_slice(voxels: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(H, W) slice of the raw voxels (any channel non-zero counts as inside for RGB)."""
    plane = np.take(voxels, index, axis=axis)
    return plane.max(axis=-1) if voxels.ndim == 4 else plane


def convert_volumes(pairs: Iterable[VolumePair], writer: CocoWriter, axis: int | str,
                    rotate180: bool = False, clear_outside: bool = False) -> int:
    """Slice every pair into ``writer``; returns the number of images written."""
    pairs = list(pairs)
    written = 0
    for pair in tqdm(pairs, desc=writer.dataset, unit="volume"):
        voxels = read_array(pair.image)
        if voxels.ndim != 3:
            raise ValueError(f"{pair.image}: expected a 3D volume or 2D+time sequence, got shape {voxels.shape}")
        channels = label_channels(read_array(pair.label), voxels.shape, pair.label)
        written += slice_volume(writer, voxels, channels, axis, pair.group, pair.image.name, rotate180, clear_outside)
    return written


def convert_layout(name: str, root: str | os.PathLike, writer: CocoWriter) -> int:
    """Convert a published 3D data set (``segthy``, ``regpro``, ``microseg``) found under ``root``."""
    layout = LAYOUTS[name]
    return convert_volumes(find_pairs(root, layout), writer, layout.axis, layout.rotate180, layout.clear_outside)
