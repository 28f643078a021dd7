"""Export a user's segmented volumes as training data in the US-43d layout (Qt-free, no Slicer).

The Slicer layer gathers, for each volume, its voxels and geometry (an ``ultrasam`` Volume) and
the segments as a dict ``segment name -> (K, J, I) uint8 mask`` on the volume's voxel grid (the
MRML bridge exports the segmentation with the volume as reference geometry), then calls
:func:`export_segmentations`. Each volume becomes one group, so grouped splits keep all its
slices on one side. Slices are cut exactly as ``ultrasam.slicing`` presents them to the model,
with one 8-bit window per volume; each segment's connected components are separate instances,
and overlapping segments are allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ultrasam.geometry import Geometry, Volume
from ultrasam_data.converters import slice_volume
from ultrasam_data.writer import CocoWriter

DEFAULT_DATASET = "SlicerSegmentations"


@dataclass
class SegmentedVolume:
    """One volume and its segments.

    Attributes:
        volume: voxels (K, J, I) or (K, J, I, 3) and geometry.
        segments: segment name -> (K, J, I) mask (non-zero = inside), on ``volume``'s grid.
        name: the group name (e.g. the volume node's name); ``volume.name`` when empty.
        segments_geometry: the grid the masks were exported on, checked against the volume's
            when given (a mismatch means the masks were not resampled to the volume).
    """

    volume: Volume
    segments: Mapping[str, np.ndarray]
    name: str = ""
    segments_geometry: Geometry | None = field(default=None)


def check_segments(item: SegmentedVolume) -> None:
    """Raise ValueError, saying what to do, when the masks are not on the volume's voxel grid."""
    label = item.name or item.volume.name
    if not item.segments:
        raise ValueError(f"{label}: no segments to export; segment the volume first")
    if item.segments_geometry is not None and not item.segments_geometry.is_close(item.volume.geometry):
        raise ValueError(f"{label}: the segments are on another grid than the volume; export them with the "
                         "volume as reference geometry (resampled to its voxels)")
    for name, mask in item.segments.items():
        if mask.shape != item.volume.shape_kji:
            raise ValueError(f"{label}: segment {name!r} is {mask.shape}, the volume {item.volume.shape_kji}; "
                             "export the segments with the volume as reference geometry")


def export_segmentations(items: Sequence[SegmentedVolume], root: str | os.PathLike,
                         dataset: str = DEFAULT_DATASET, axes: Sequence[int | str] = ("k",),
                         overwrite: bool = False) -> Path:
    """Write every segmented slice of ``items`` along each of ``axes`` as one data set.

    Args:
        items: the volumes to export (each a group).
        root: folder receiving ``<dataset>/images`` and ``<dataset>/annotations``.
        axes: slicing axes (numpy axis 0, 1, 2 or "k", "j", "i"); several give more views.
        overwrite: replace an existing data set of that name (atomically).

    Returns:
        The data set folder.
    """
    for item in items:
        check_segments(item)
    with CocoWriter(root, dataset, overwrite=overwrite, description="segmentations exported from 3D Slicer") as writer:
        for item in items:
            channels = np.stack([np.asarray(mask) != 0 for mask in item.segments.values()]).astype(np.uint8)
            for axis in axes:
                slice_volume(writer, item.volume.voxels, channels, axis, item.name or item.volume.name,
                             source=f"{item.volume.name}, axis {axis}")
    return writer.target
