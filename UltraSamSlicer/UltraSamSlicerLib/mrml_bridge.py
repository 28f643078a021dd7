"""Translate between Slicer's MRML nodes and the Qt-free ``ultrasam`` core.

Imports ``slicer`` (MRML, VTK) and never ``qt``, so it runs in the pytest suite with the
``slicer-core`` wheel as well as inside Slicer.

Frames:
- ``ijk``: continuous voxel index of the grid a :class:`ultrasam.geometry.Volume` holds; numpy
  arrays are ``[k, j, i]``.
- ``local``: a node's own RAS frame (what ``GetIJKToRASMatrix`` reports).
- ``world``: Slicer's scene RAS, after every parent transform. Clicks in views, markups
  ``...World`` positions and the views themselves live here, so every :class:`Volume` this
  module builds carries the ijk -> **world** RAS mapping in its ``Geometry``.

A node under a non-linear transform has no single ijk -> world matrix: such inputs raise
:class:`BridgeError` asking the user to harden the transform, rather than prompting a wrong voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from ultrasam.geometry import Geometry, Volume

# Attribute a markups node carries to say its points are negative prompts ("0") or positive ("1").
PROMPT_LABEL_ATTRIBUTE = "UltraSam.PromptLabel"

# A view counts as aligned with a volume axis when its normal is within this angle (cosine).
ALIGNED_COSINE = np.cos(np.radians(0.5))


class BridgeError(ValueError):
    """A scene configuration the bridge cannot translate faithfully; the message says what to do."""


@dataclass(frozen=True)
class RoiBox:
    """An oriented 3D box in world RAS (a markups ROI, possibly rotated); the fields of
    :class:`ultrasam.prompts3d.Roi`, kept here so that the bridge loads without torch.

    Attributes:
        center_ras: (3,) centre in world RAS mm.
        axes_ras: (3, 3) unit box axes as columns, in world RAS.
        half_size: (3,) half edge lengths in mm along those axes.
    """

    center_ras: np.ndarray
    axes_ras: np.ndarray
    half_size: np.ndarray


@dataclass(frozen=True)
class ViewSlice:
    """The volume slice a slice view shows.

    Attributes:
        axis: numpy axis of the (K, J, I) voxel array the view cuts across (0 = k, 1 = j, 2 = i).
        index: slice index along that axis (nearest voxel centre to the view plane).
    """

    axis: int
    index: int


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4x4 vtkMatrix4x4 -> (4, 4) float array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """(4, 4) array -> vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def local_to_world(transform_node: slicer.vtkMRMLTransformNode | None) -> np.ndarray:
    """4x4 matrix from the frame under ``transform_node`` to world RAS (identity for None).

    Raises:
        BridgeError: the transform chain contains a non-linear transform.
    """
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise BridgeError(
            f"'{transform_node.GetName()}' is a non-linear transform: harden it on the volume "
            "(Data module, right-click > Harden transform) or remove it, then try again"
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


def _geometry(ijk_to_world: np.ndarray, what: str) -> Geometry:
    try:
        return Geometry.from_ijk_to_ras(ijk_to_world)
    except ValueError as error:
        raise BridgeError(
            f"{what}: its voxel grid is sheared or mirrored-scaled in world space ({error}); "
            "harden or remove the parent transform, or resample the volume (Resample Scalar Volume)"
        ) from error


def volume_from_node(volume_node: slicer.vtkMRMLVolumeNode) -> Volume:
    """A scalar or RGB volume node -> :class:`Volume` (voxels copied, geometry ijk -> world RAS).

    Voxels are (K, J, I), or (K, J, I, 3) for a vector (RGB) volume. The copy keeps the volume
    as it was read while the scene changes.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise BridgeError("the volume node has no image data: load a volume and select it as source")
    voxels = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    ijk_to_local = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_local)
    ijk_to_world = local_to_world(volume_node.GetParentTransformNode()) @ matrix_to_numpy(ijk_to_local)
    name = volume_node.GetName() or ""
    return Volume(voxels, _geometry(ijk_to_world, f"volume '{name}'"), name)


def oriented_image_ijk_to_local(image: slicer.vtkOrientedImageData) -> np.ndarray:
    """4x4 matrix from array index ijk (0 at the extent's first voxel) to the image's frame."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)  # despite the name: image's own frame, see vtkOrientedImageData.h
    shift = np.eye(4)
    shift[:3, 3] = image.GetExtent()[0::2]
    return matrix_to_numpy(matrix) @ shift


def volume_from_oriented_image(
    image: slicer.vtkOrientedImageData,
    transform_node: slicer.vtkMRMLTransformNode | None = None,
    name: str = "",
) -> Volume:
    """A vtkOrientedImageData (e.g. the Segment Editor's source image, already resampled to the
    segmentation's grid) -> :class:`Volume` whose ijk 0 is the first voxel of the image extent.

    Args:
        image: scalar image data with its own ijk -> frame matrix.
        transform_node: parent transform of the node the image belongs to (the segmentation node
            for the Segment Editor's images), so that the geometry maps ijk to world RAS.
    """
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        raise BridgeError("the source image is empty: select a source volume in the Segment Editor")
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    components = image.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels = np.array(flat.reshape(shape_kji + ((components,) if components > 1 else ())), copy=True)
    ijk_to_world = local_to_world(transform_node) @ oriented_image_ijk_to_local(image)
    return Volume(voxels, _geometry(ijk_to_world, f"image '{name}'"), name)


def markups_prompts(markups_node: slicer.vtkMRMLMarkupsNode) -> tuple[np.ndarray, np.ndarray]:
    """The placed control points of a markups node as point prompts.

    Points not yet placed (preview or missing) are skipped. Labels come from the node's
    ``UltraSam.PromptLabel`` attribute ("0" negative, otherwise positive): markups points have no
    per-point sign of their own, so positive and negative prompts live in two nodes.

    Returns:
        points_ras: (N, 3) world RAS mm.
        labels: (N,) int, 1 positive / 0 negative (SAM's convention).
    """
    points = []
    position = [0.0, 0.0, 0.0]
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue
        markups_node.GetNthControlPointPositionWorld(index, position)
        points.append(list(position))
    label = 0 if markups_node.GetAttribute(PROMPT_LABEL_ATTRIBUTE) == "0" else 1
    points_ras = np.array(points, dtype=float).reshape(-1, 3)
    return points_ras, np.full(len(points_ras), label, dtype=np.int64)


def roi_box(roi_node: slicer.vtkMRMLMarkupsROINode) -> RoiBox:
    """A markups ROI (any rotation, any linear parent transform) -> :class:`RoiBox` in world RAS."""
    if roi_node.GetNumberOfControlPoints() == 0:
        raise BridgeError(f"ROI '{roi_node.GetName()}' is not placed yet: place it in a view first")
    matrix = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())  # box frame -> world, transforms included
    scaled_axes = matrix[:3, :3] * (np.array(roi_node.GetSize()) / 2.0)
    half_size = np.linalg.norm(scaled_axes, axis=0)
    if np.any(half_size <= 0):
        raise BridgeError(f"ROI '{roi_node.GetName()}' has zero size along an axis: resize it")
    return RoiBox(matrix[:3, 3].copy(), scaled_axes / half_size, half_size)


def view_slice(slice_to_ras: np.ndarray, volume: Volume) -> ViewSlice | None:
    """Which slice of ``volume`` a slice view shows, or None when the view is oblique to its grid.

    Args:
        slice_to_ras: (4, 4) the view's ``vtkMRMLSliceNode.GetSliceToRAS()`` (world RAS); column 2
            is the plane normal and column 3 a point on the plane.
        volume: geometry ijk -> world RAS.

    Returns:
        The numpy axis the normal is parallel to and the nearest slice index, or None when the
        normal lies more than 0.5 degree off every voxel axis or the plane misses the volume.
    """
    normal_ijk = np.linalg.inv(volume.geometry.ijk_to_ras_matrix()[:3, :3]) @ slice_to_ras[:3, 2]
    # Compare directions in physical space: scale each ijk component by its voxel size.
    physical = normal_ijk * volume.geometry.spacing
    cosines = np.abs(physical) / np.linalg.norm(physical)
    ijk_axis = int(np.argmax(cosines))
    if cosines[ijk_axis] < ALIGNED_COSINE:
        return None
    axis = 2 - ijk_axis
    index = int(np.rint(volume.geometry.ras_to_ijk(slice_to_ras[:3, 3])[ijk_axis]))
    if not 0 <= index < volume.shape_kji[axis]:
        return None
    return ViewSlice(axis, index)


def aligned_slice_to_ras(slice_to_ras: np.ndarray, volume: Volume) -> np.ndarray:
    """The view pose nearest to ``slice_to_ras`` that shows a whole slice of ``volume``.

    Each view axis (x, y: screen right and up) is turned onto the signed voxel axis of ``volume``
    closest to it, the normal becomes x cross y, and the plane is moved along the normal onto the
    nearest slice centre; the point under the view's centre otherwise stays.

    Args:
        slice_to_ras: (4, 4) the view's ``GetSliceToRAS()`` (world RAS).
        volume: geometry ijk -> world RAS (orthogonal axes: :class:`Geometry` refuses shear).

    Returns:
        (4, 4) SliceToRAS for which :func:`view_slice` finds a slice.
    """
    ijk_to_ras = volume.geometry.ijk_to_ras_matrix()
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)  # unit i, j, k in world
    view = slice_to_ras[:3, :3] / np.linalg.norm(slice_to_ras[:3, :3], axis=0)
    free = [0, 1, 2]
    turned = []
    for column in (0, 1):  # x first: it keeps its axis when x and y are closest to the same one
        dots = axes[:, free].T @ view[:, column]
        best = int(np.argmax(np.abs(dots)))
        turned.append(axes[:, free[best]] * np.sign(dots[best]))
        free.pop(best)
    normal_axis = free[0]
    ijk = volume.geometry.ras_to_ijk(slice_to_ras[:3, 3])
    ijk[normal_axis] = np.clip(np.rint(ijk[normal_axis]), 0, volume.shape_kji[2 - normal_axis] - 1)
    aligned = np.eye(4)
    aligned[:3, 0], aligned[:3, 1] = turned
    aligned[:3, 2] = np.cross(turned[0], turned[1])
    aligned[:3, 3] = (ijk_to_ras @ np.append(ijk, 1.0))[:3]
    return aligned


def ijk_to_node_frame(volume: Volume, node: slicer.vtkMRMLTransformableNode) -> np.ndarray:
    """4x4 matrix from ``volume``'s ijk to the frame of ``node`` (under its parent transforms)."""
    return np.linalg.inv(local_to_world(node.GetParentTransformNode())) @ volume.geometry.ijk_to_ras_matrix()


def mask_to_oriented_image(mask: np.ndarray, ijk_to_frame: np.ndarray) -> slicer.vtkOrientedImageData:
    """A (K, J, I) mask -> uint8 vtkOrientedImageData (1 inside) on the grid ``ijk_to_frame``."""
    mask = np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_frame))
    return image


def nonzero_extent(mask: np.ndarray, origin_ijk: tuple[int, int, int] = (0, 0, 0)) -> list[int] | None:
    """VTK extent [i0, i1, j0, j1, k0, k1] of the nonzero voxels of a (K, J, I) mask, offset by
    ``origin_ijk`` (the first voxel of the image extent); None when the mask is empty."""
    nonzero = np.nonzero(mask)
    if len(nonzero[0]) == 0:
        return None
    extent = []
    for array_axis, offset in zip((2, 1, 0), origin_ijk):
        extent += [int(nonzero[array_axis].min()) + offset, int(nonzero[array_axis].max()) + offset]
    return extent


def paint_labelmap(
    labelmap: slicer.vtkOrientedImageData, mask: np.ndarray, ijk_to_frame: np.ndarray
) -> list[int] | None:
    """Make ``labelmap`` (e.g. the effect's modifier labelmap) hold ``mask``, on its own grid.

    Args:
        labelmap: target; keeps its geometry and extent, gets 1 where the mask is, 0 elsewhere.
        mask: (K, J, I) on the grid ``ijk_to_frame`` (ijk -> the labelmap's frame).

    Returns:
        The extent [i0, i1, j0, j1, k0, k1] of the painted voxels in the labelmap's extent
        coordinates, None when nothing was painted.
    """
    image = mask_to_oriented_image(mask, ijk_to_frame)
    # Nearest-neighbour resampling; an exact copy when both grids are the same.
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, labelmap, labelmap):
        raise BridgeError("could not resample the mask to the segmentation's grid; see the application log")
    extent = labelmap.GetExtent()
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    painted = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(shape_kji)
    return nonzero_extent(painted, (extent[0], extent[2], extent[4]))


def write_mask_to_segment(
    mask: np.ndarray,
    volume: Volume,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
) -> None:
    """Replace a segment's content by ``mask`` (outside the Segment Editor: no undo, no masking).

    Args:
        mask: (K, J, I) on the grid of ``volume`` (ijk -> world RAS).
        segmentation_node: target; its parent transform is taken into account.
        segment_id: an existing segment of that node.
    """
    if tuple(mask.shape[:3]) != volume.shape_kji:
        raise BridgeError(f"mask shape {tuple(mask.shape)} differs from the volume's {volume.shape_kji}")
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise BridgeError(f"segment '{segment_id}' does not exist in '{segmentation_node.GetName()}'")
    image = mask_to_oriented_image(mask, ijk_to_node_frame(volume, segmentation_node))
    # Replace over the whole grid: a smaller extent would keep old voxels outside it.
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, list(image.GetExtent()))
    if not ok:
        raise BridgeError(f"Slicer refused to write segment '{segment_id}'; see the application log")
