"""Voxel and physical coordinates of a volume.

Frames used throughout the project:

- ``ijk``: continuous voxel index, ``i`` the fastest-varying (column) axis. Integer values are
  voxel centres. A numpy voxel array is indexed ``[k, j, i]``.
- ``lps``: physical millimetres in the DICOM/ITK patient frame (what SimpleITK and NIfTI readers
  report).
- ``ras``: physical millimetres in Slicer's world frame; ``ras = diag(-1, -1, 1) @ lps``.

The mapping is ITK's: ``lps = origin + direction @ diag(spacing) @ ijk``, where the columns of
``direction`` are the unit vectors of the i, j and k axes in LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

FRAMES = ("ijk", "ras", "lps")


def _as_points(points: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return ``points`` as an (N, 3) float array and whether the input was a single point."""
    array = np.asarray(points, dtype=np.float64)
    single = array.ndim == 1
    array = np.atleast_2d(array)
    if array.shape[-1] != 3:
        raise ValueError(f"expected 3D points of shape (3,) or (N, 3), got {array.shape}")
    return array, single


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Flip (N, 3) or (3,) LPS points to RAS (and back: the map is its own inverse)."""
    array, _ = _as_points(points)
    result = array @ LPS_TO_RAS.T
    return result[0] if np.ndim(points) == 1 else result


ras_to_lps = lps_to_ras


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(4,) box_xyxy around the pixels of a non-empty (H, W) mask, at the pixel edges:
    (x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5) in the slice frame ``xy``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0] - 0.5, rows[0] - 0.5, cols[-1] + 0.5, rows[-1] + 0.5])


LEFT_BOX = 0.95  # a mask with less of itself inside its box prompt has left it (issue 16's bar)


def share_inside_box(mask: np.ndarray, box_xyxy: Sequence[float]) -> float:
    """Share of the (H, W) bool mask's pixels whose centre lies in ``box_xyxy`` (1.0 when empty)."""
    total = int(mask.sum())
    if total == 0:
        return 1.0
    x0, y0, x1, y1 = map(float, box_xyxy)
    y, x = np.ogrid[: mask.shape[0], : mask.shape[1]]
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return int(np.logical_and(mask, inside).sum()) / total


def points_in_mask(mask: np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """(N,) bool: whether the pixel of each click (N, 2) in the slice frame ``xy`` is in the (H, W)
    mask. Integer xy are pixel centres; a click on the image's outer half pixel counts as the edge pixel."""
    limits = [mask.shape[1] - 1, mask.shape[0] - 1]
    columns, rows = np.clip(np.rint(np.reshape(points_xy, (-1, 2))), 0, limits).astype(int).T
    return mask[rows, columns]


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in physical space.

    Attributes:
        origin_lps: (3,) LPS position of voxel (0, 0, 0) in mm.
        spacing: (3,) voxel size along i, j, k in mm, all positive.
        direction_lps: (3, 3) orthonormal matrix; column c is the LPS direction of axis c (i, j, k).
    """

    origin_lps: np.ndarray = field(default_factory=lambda: np.zeros(3))
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        origin = np.asarray(self.origin_lps, dtype=np.float64).reshape(3)
        spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        direction = np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise ValueError(f"voxel spacing must be positive and finite, got {spacing.tolist()}")
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
            raise ValueError(
                "direction matrix is not orthonormal (|det| != 1): "
                f"{direction.round(4).tolist()}; fix the file's header before segmenting it"
            )
        object.__setattr__(self, "origin_lps", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction_lps", direction)

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> "Geometry":
        """Build from a 4x4 IJK-to-RAS matrix (Slicer's ``GetIJKToRASMatrix``)."""
        matrix = np.asarray(matrix, dtype=np.float64)
        linear_lps = LPS_TO_RAS @ matrix[:3, :3]
        spacing = np.linalg.norm(linear_lps, axis=0)
        return cls(LPS_TO_RAS @ matrix[:3, 3], spacing, linear_lps / spacing)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking ijk to LPS."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_lps * self.spacing
        matrix[:3, 3] = self.origin_lps
        return matrix

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix taking ijk to RAS (Slicer's IJKToRAS)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps_matrix()

    def ijk_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) or (3,) ijk -> LPS mm."""
        return self._apply(self.ijk_to_lps_matrix(), ijk)

    def lps_to_ijk(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) or (3,) LPS mm -> continuous ijk."""
        return self._apply(np.linalg.inv(self.ijk_to_lps_matrix()), lps)

    def ijk_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) or (3,) ijk -> RAS mm."""
        return self._apply(self.ijk_to_ras_matrix(), ijk)

    def ras_to_ijk(self, ras: np.ndarray) -> np.ndarray:
        """(N, 3) or (3,) RAS mm -> continuous ijk."""
        return self._apply(np.linalg.inv(self.ijk_to_ras_matrix()), ras)

    def to_ijk(self, points: np.ndarray, frame: str) -> np.ndarray:
        """Convert points given in ``frame`` ("ijk", "ras" or "lps") to continuous ijk."""
        if frame == "ijk":
            return np.asarray(points, dtype=np.float64)
        if frame == "ras":
            return self.ras_to_ijk(points)
        if frame == "lps":
            return self.lps_to_ijk(points)
        raise ValueError(f"unknown coordinate frame {frame!r}; use one of {FRAMES}")

    def is_close(self, other: "Geometry", tolerance: float = 1e-5) -> bool:
        """True when both grids map every voxel to the same place within ``tolerance`` mm."""
        return bool(np.allclose(self.ijk_to_lps_matrix(), other.ijk_to_lps_matrix(), atol=tolerance))

    @staticmethod
    def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
        array, single = _as_points(points)
        result = array @ matrix[:3, :3].T + matrix[:3, 3]
        return result[0] if single else result


@dataclass
class Volume:
    """Voxels plus geometry.

    Attributes:
        voxels: (K, J, I) scalar array, or (K, J, I, 3) for RGB ultrasound. A 2D image is a volume
            with K == 1.
        geometry: placement of the voxel grid.
        name: a label for messages and outputs (usually the file name).
    """

    voxels: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    name: str = ""

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """Grid size in numpy order (K, J, I), without any colour channel."""
        return tuple(int(n) for n in self.voxels.shape[:3])  # type: ignore[return-value]

    @property
    def is_rgb(self) -> bool:
        return self.voxels.ndim == 4

    def contains_ijk(self, ijk: np.ndarray) -> np.ndarray:
        """(N,) bool: which (N, 3) ijk points lie inside the grid (within half a voxel)."""
        array, _ = _as_points(ijk)
        upper = np.array(self.shape_kji[::-1], dtype=np.float64) - 0.5
        return np.all((array >= -0.5) & (array <= upper), axis=1)
