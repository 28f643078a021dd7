"""Prompts placed in a volume, turned into 2D prompts on the slices they touch.

Three kinds, in any mix, on any number of slices:

- points (positive or negative) given in ijk, ras or lps; each prompts its nearest slice;
- 2D boxes, each given by two opposite corners lying on one slice;
- 3D ROIs: oriented boxes (centre, axes, half-sizes, like a Slicer markups ROI), which give a 2D
  box on every slice they cross: the bounds, in slice pixels, of the polygon where the slice
  plane cuts the box.

Slice pixels follow :mod:`ultrasam.slicing`: ``xy`` with integer values at pixel centres, so a box
covering whole pixels ``x0..x1`` is ``(x0 - 0.5, ..., x1 + 0.5, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ultrasam.predictor import Prompt2D
from ultrasam.slicing import VolumeSlices

# The 12 edges of a box whose 8 corners are numbered by the bits (x, y, z) of the corner index.
_BOX_EDGES = np.array([(a, a | 1 << bit) for a in range(8) for bit in range(3) if not a & 1 << bit])
_EPS = 1e-6


@dataclass(frozen=True)
class Roi:
    """An oriented 3D box, as a Slicer markups ROI describes one.

    Attributes:
        center: (3,) centre in ``frame``.
        axes: (3, 3) orthonormal; column c is the direction of the box's c-th axis in ``frame``.
        half_sizes: (3,) half the box's extent along each of its axes (mm, or voxels for ijk).
        frame: "ras", "lps" or "ijk".
    """

    center: np.ndarray
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))
    half_sizes: np.ndarray = field(default_factory=lambda: np.ones(3))
    frame: str = "ras"

    def __post_init__(self) -> None:
        for name, shape in (("center", (3,)), ("axes", (3, 3)), ("half_sizes", (3,))):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"ROI {name} must have shape {shape}, got {value.shape}")
            object.__setattr__(self, name, value)
        if np.any(self.half_sizes <= 0):
            raise ValueError(f"ROI half-sizes must be positive, got {self.half_sizes.tolist()}")

    def corners(self) -> np.ndarray:
        """(8, 3) corners in ``frame``; corner n has sign +1 along axis c where bit c of n is set."""
        signs = np.array([[1.0 if n >> c & 1 else -1.0 for c in range(3)] for n in range(8)])
        return self.center + (signs * self.half_sizes) @ self.axes.T


@dataclass(frozen=True)
class SliceBox:
    """A 2D box drawn on one slice, given by two opposite (3,) corners in ``frame``."""

    corner_a: np.ndarray
    corner_b: np.ndarray
    frame: str = "ras"


@dataclass
class VolumePrompts:
    """Everything the user placed in one volume for one object.

    Attributes:
        points: (N, 3) positions in ``frame``.
        labels: (N,) 1 for positive, 0 for negative points.
        frame: frame of ``points``: "ras", "lps" or "ijk".
        boxes: 2D boxes on single slices.
        rois: 3D boxes, each prompting every slice it crosses.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    frame: str = "ras"
    boxes: Sequence[SliceBox] = ()
    rois: Sequence[Roi] = ()

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 3)
        self.labels = np.asarray(self.labels, dtype=int).reshape(-1)
        if len(self.points) != len(self.labels):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels; give one label per point")
        if not np.isin(self.labels, (0, 1)).all():
            raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(self.labels))}")

    def is_empty(self) -> bool:
        return len(self.points) == 0 and not self.boxes and not self.rois


def roi_boxes(slices: VolumeSlices, roi: Roi) -> dict[int, np.ndarray]:
    """2D box of ``roi`` on every slice whose plane cuts it.

    The box is the (x0, y0, x1, y1) bounds of the intersection polygon of the slice plane with the
    box (in ijk the ROI is a parallelepiped), clipped to the image. Slices the box only grazes
    (zero-area intersection) or whose cut lies wholly outside the image get none.

    Returns:
        {slice index: (4,) box_xyxy in slice pixels}.
    """
    position, xy = slices.ijk_to_slice(slices.volume.geometry.to_ijk(roi.corners(), roi.frame))
    first = max(int(np.ceil(position.min() - _EPS)), 0)
    last = min(int(np.floor(position.max() + _EPS)), slices.num_slices - 1)
    planes = np.arange(first, last + 1, dtype=np.float64)[:, None]  # (M, 1)
    offset = position[None, :] - planes  # (M, 8) signed distance of each corner to each plane
    on_plane = np.abs(offset) <= _EPS
    a, b = _BOX_EDGES[:, 0], _BOX_EDGES[:, 1]
    crossing = offset[:, a] * offset[:, b] < 0  # (M, 12) edges with ends strictly either side
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(crossing, offset[:, a] / (offset[:, a] - offset[:, b]), 0.0)[..., None]
    cut = xy[a] + t * (xy[b] - xy[a])  # (M, 12, 2)
    points = np.concatenate([np.broadcast_to(xy, offset.shape + (2,)), cut], axis=1)
    valid = np.concatenate([on_plane, crossing], axis=1)[..., None]
    low = np.where(valid, points, np.inf).min(axis=1)  # (M, 2)
    high = np.where(valid, points, -np.inf).max(axis=1)
    height, width = slices.image_shape
    limit = np.array([width - 0.5, height - 0.5])
    boxes = {}
    for index, lo, hi in zip(range(first, last + 1), low, high):
        if np.any(hi - lo <= _EPS) or np.any(hi <= -0.5 + _EPS) or np.any(lo >= limit - _EPS):
            continue
        boxes[index] = np.concatenate([np.maximum(lo, -0.5), np.minimum(hi, limit)])
    return boxes


def slice_prompts(slices: VolumeSlices, prompts: VolumePrompts) -> dict[int, Prompt2D]:
    """Group ``prompts`` into one 2D prompt per slice they touch (the key slices).

    Returns:
        {slice index: Prompt2D with points_xy (N, 2), labels (N,) and/or box_xyxy (4,)}.

    Raises:
        ValueError: a point or box lies outside the volume, a box's corners are on different
            slices, or one slice receives two boxes (SAM takes one box per object and slice).
    """
    boxes: dict[int, np.ndarray] = {}
    for box in prompts.boxes:
        _add_box(boxes, *_slice_box(slices, box))
    for roi in prompts.rois:
        for index, box_xyxy in roi_boxes(slices, roi).items():
            _add_box(boxes, index, box_xyxy)
    points: dict[int, list[int]] = {}
    indices, xy = (slices.locate(prompts.points, prompts.frame) if len(prompts.points) else ([], None))
    for n, index in enumerate(indices):
        points.setdefault(int(index), []).append(n)
    keys = sorted(set(boxes) | set(points))
    return {
        index: Prompt2D(
            points_xy=xy[points[index]] if index in points else None,
            labels=prompts.labels[points[index]] if index in points else None,
            box_xyxy=boxes.get(index),
        )
        for index in keys
    }


def _slice_box(slices: VolumeSlices, box: SliceBox) -> tuple[int, np.ndarray]:
    """Slice index and (4,) box_xyxy of a box given by two corners on one slice."""
    indices, xy = slices.locate(np.stack([box.corner_a, box.corner_b]), box.frame)
    if indices[0] != indices[1]:
        raise ValueError(
            f"box corners {np.round(box.corner_a, 3).tolist()} and {np.round(box.corner_b, 3).tolist()} "
            f"({box.frame}) fall on slices {indices[0]} and {indices[1]} along axis {slices.axis}; a 2D "
            "box must lie on one slice: use a 3D ROI to prompt several slices"
        )
    return int(indices[0]), np.concatenate([xy.min(axis=0), xy.max(axis=0)])


def _add_box(boxes: dict[int, np.ndarray], index: int, box_xyxy: np.ndarray) -> None:
    if index in boxes:
        raise ValueError(
            f"slice {index} has two boxes; SAM takes one box per object and slice: "
            "remove one box or ROI, or segment the objects separately"
        )
    boxes[index] = box_xyxy
