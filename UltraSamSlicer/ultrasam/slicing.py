"""A volume seen as a stack of 2D slices along one of its voxel axes.

The slicing axis is named by the **numpy axis** of the ``(K, J, I)`` voxel array, or by the ijk
letter of the voxel index that is constant on a slice:

====  ======  ===========================  ===============  ===============
axis  letter  slice ``s`` (numpy)          image column x   image row y
====  ======  ===========================  ===============  ===============
0     ``k``   ``voxels[s, :, :]``          i                j
1     ``j``   ``voxels[:, s, :]``          i                k
2     ``i``   ``voxels[:, :, s]``          j                k
====  ======  ===========================  ===============  ===============

A slice image is the plain numpy slice of the voxel array, never resampled or flipped, which is
how US-43d cut its 3D sources into training images. Mapping between ``(s, xy)`` and ``ijk`` is
therefore a permutation of coordinates, exact whatever the direction matrix; physical frames
(ras, lps) go through :class:`~ultrasam.geometry.Geometry`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cached_property

import numpy as np

from ultrasam.geometry import Volume
from ultrasam.intensity import Window, to_uint8

AXIS_LETTERS = {"k": 0, "j": 1, "i": 2}


def axis_index(axis: int | str) -> int:
    """Numpy axis (0, 1 or 2) of a slicing axis given as that number or as "k", "j", "i"."""
    if isinstance(axis, str) and axis.lower() in AXIS_LETTERS:
        return AXIS_LETTERS[axis.lower()]
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis <= 2:
        return int(axis)
    raise ValueError(
        f"unknown slicing axis {axis!r}; use the numpy axis 0, 1, 2 of the (K, J, I) array "
        "or the ijk letter k, j, i that is constant on a slice"
    )


class VolumeSlices:
    """A :class:`Volume` as 2D uint8 slices along one axis, with one intensity window for all.

    Attributes:
        volume: the volume being sliced.
        axis: numpy axis of the (K, J, I) array the slices are stacked along.
        window: (low, high) intensity window mapped to 0..255 for every slice.
    """

    def __init__(self, volume: Volume, axis: int | str, window: Window | None = None) -> None:
        self.volume = volume
        self.axis = axis_index(axis)
        self._uint8, self.window = to_uint8(volume.voxels, window)
        if self._uint8 is volume.voxels:
            self._uint8 = volume.voxels.copy()  # a snapshot: later edits of the volume are not seen
        in_plane = [a for a in range(3) if a != self.axis]
        # ijk component = 2 - numpy axis (ijk is the reverse of numpy's k, j, i order).
        self._slice_c, self._y_c, self._x_c = 2 - self.axis, 2 - in_plane[0], 2 - in_plane[1]

    @property
    def num_slices(self) -> int:
        return self.volume.shape_kji[self.axis]

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of every slice image."""
        shape = [n for a, n in enumerate(self.volume.shape_kji) if a != self.axis]
        return shape[0], shape[1]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """Physical size in mm of one slice pixel along x (column) and y (row)."""
        spacing = self.volume.geometry.spacing
        return float(spacing[self._x_c]), float(spacing[self._y_c])

    @property
    def slice_spacing(self) -> float:
        """Distance in mm between neighbouring slices."""
        return float(self.volume.geometry.spacing[self._slice_c])

    @property
    def display_aspect(self) -> float:
        """Height / width of one pixel: stretch rows by this to show a slice with its physical shape."""
        x_mm, y_mm = self.pixel_spacing
        return y_mm / x_mm

    @cached_property
    def content_key(self) -> str:
        """Digest of the slice images: 8-bit voxels, their shape, the axis and the window."""
        digest = hashlib.blake2b(np.ascontiguousarray(self._uint8).tobytes(), digest_size=16)
        digest.update(repr((self._uint8.shape, self.axis, self.window)).encode())
        return digest.hexdigest()

    def image(self, index: int) -> np.ndarray:
        """uint8 slice ``index``: (H, W), or (H, W, 3) for an RGB volume."""
        self._check_index(index)
        return np.ascontiguousarray(np.take(self._uint8, index, axis=self.axis))

    def ijk_to_slice(self, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) continuous ijk -> ((N,) continuous slice coordinate, (N, 2) slice xy)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk[:, self._slice_c], ijk[:, [self._x_c, self._y_c]]

    def slice_to_ijk(self, index: float | np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Slice coordinate(s) (scalar or (N,)) and (N, 2) slice xy -> (N, 3) continuous ijk."""
        xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        ijk = np.empty((len(xy), 3))
        ijk[:, self._slice_c] = index
        ijk[:, self._x_c], ijk[:, self._y_c] = xy[:, 0], xy[:, 1]
        return ijk

    def locate(self, points: np.ndarray, frame: str) -> tuple[np.ndarray, np.ndarray]:
        """Slice and pixel of (N, 3) points in ``frame`` ("ijk", "ras" or "lps").

        Returns:
            (N,) int index of the nearest slice and (N, 2) continuous xy on it.

        Raises:
            ValueError: a point lies outside the volume (more than half a voxel off the grid).
        """
        ijk = np.atleast_2d(self.volume.geometry.to_ijk(points, frame))
        outside = ~self.volume.contains_ijk(ijk)
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"point {np.atleast_2d(points)[first].round(3).tolist()} ({frame}) lies outside the "
                f"volume {self.volume.name!r} (ijk {ijk[first].round(2).tolist()}, grid "
                f"{list(self.volume.shape_kji[::-1])} voxels i, j, k); check its frame (ras/lps/ijk) "
                "and that it was placed on this volume"
            )
        position, xy = self.ijk_to_slice(ijk)
        return np.rint(position).astype(int), xy

    def slice_mask(self, mask_kji: np.ndarray, index: int) -> np.ndarray:
        """(H, W) slice ``index`` of a (K, J, I) array in this volume's grid."""
        self._check_index(index)
        return np.take(mask_kji, index, axis=self.axis)

    def to_volume(self, masks: Mapping[int, np.ndarray]) -> np.ndarray:
        """Stack per-slice (H, W) masks keyed by slice index into a (K, J, I) uint8 mask (0/1)."""
        volume = np.zeros(self.volume.shape_kji, dtype=np.uint8)
        for index, mask in masks.items():
            self._check_index(index)
            if mask.shape != self.image_shape:
                raise ValueError(f"slice {index}: mask shape {mask.shape} != slice shape {self.image_shape}")
            target = [slice(None)] * 3
            target[self.axis] = index
            volume[tuple(target)] = mask.astype(bool)
        return volume

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_slices:
            raise IndexError(f"slice {index} is outside 0..{self.num_slices - 1} along axis {self.axis}")
