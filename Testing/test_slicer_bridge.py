"""The MRML bridge, for real, with Slicer's own MRML and segmentation libraries (slicer-core).

A scene holds an oblique volume under a rotating parent transform, prompts as markups nodes (each
under a transform of its own) and a segmentation. Prompts go through the bridge and the core (the
effect's session: slicing, prompts3d, propagation) to a mask, the mask goes into the segmentation
through the bridge, and Slicer exports it back to a labelmap. Every expectation is computed by hand
from the matrices the test built, never from the code under test; a stand-in predictor returns its
prompt (filled box, or a 3x3 square around each positive point), so the voxels are known exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found has no MRML (not slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UltraSamSlicer"))
from UltraSamSlicerLib import mrml_bridge  # noqa: E402
from ultrasam.session import SegmentationSession  # noqa: E402
from ultrasam.predictor import Prediction  # noqa: E402
from ultrasam.prompts3d import Roi, VolumePrompts  # noqa: E402
from ultrasam.resources import SAMPLE_VOLUME as RESECT_CASE3  # noqa: E402

SHAPE_KJI = (10, 14, 16)
SPACING_IJK = np.array([0.6, 0.9, 1.5])


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def affine(linear: np.ndarray, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = linear, translation
    return m


# Volume: oblique direction (two rotations), anisotropic voxels; parent transform: another rotation.
IJK_TO_LOCAL = affine(rotation(2, 25) @ rotation(0, 15) @ np.diag(SPACING_IJK), [2.0, -3.0, 4.0])
VOLUME_PARENT = affine(rotation(1, 20), [5.0, -7.0, 3.0])
IJK_TO_WORLD = VOLUME_PARENT @ IJK_TO_LOCAL


def world_of_ijk(ijk) -> np.ndarray:
    return (IJK_TO_WORLD @ np.append(np.asarray(ijk, float), 1.0))[:3]


class PromptEcho:
    """SlicePredictor stand-in: the mask is the prompt itself (pixel centres inside the box, or the
    3x3 pixels around each positive point)."""

    def __init__(self, image_shape):
        self.height, self.width = image_shape

    def predict(self, index, prompt, mask_input=None) -> Prediction:
        y, x = np.mgrid[0:self.height, 0:self.width]
        mask = np.zeros((self.height, self.width), bool)
        if prompt.box_xyxy is not None:
            x0, y0, x1, y1 = prompt.box_xyxy
            mask |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        for (px, py), label in zip(prompt.points_xy if prompt.points_xy is not None else [],
                                   prompt.labels if prompt.labels is not None else []):
            if label == 1:
                mask |= (np.abs(x - np.rint(px)) <= 1) & (np.abs(y - np.rint(py)) <= 1)
        return Prediction(mask, 1.0, torch.zeros(1, 1, 256, 256))

    def prefetch(self, indices) -> None:
        pass


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerVolumesLogic()]
    for logic in logics:
        logic.SetMRMLScene(scene)  # the segmentations logic registers the labelmap converters
    yield scene
    scene.Clear(1)


def add_transform(scene, matrix: np.ndarray, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(mrml_bridge.numpy_to_matrix(matrix))
    return node


@pytest.fixture
def volume_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    voxels = np.random.default_rng(0).integers(0, 255, SHAPE_KJI).astype(np.float32)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.SetIJKToRASMatrix(mrml_bridge.numpy_to_matrix(IJK_TO_LOCAL))
    node.SetAndObserveTransformNodeID(add_transform(scene, VOLUME_PARENT, "volume parent").GetID())
    return node


@pytest.fixture
def segmentation_node(scene, volume_node):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.GetSegmentation().AddEmptySegment("object", "object")
    return node


def segment_voxels_world(scene, segmentation_node, volume_node) -> np.ndarray:
    """World RAS centres of the segment's voxels, as Slicer exports them (its own geometry path)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue("object")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, volume_node)
    kji = np.argwhere(slicer.util.arrayFromVolume(labelmap) > 0)
    ijk_to_ras = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(ijk_to_ras)
    to_world = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(labelmap.GetParentTransformNode(), None, to_world)
    matrix = mrml_bridge.matrix_to_numpy(to_world) @ mrml_bridge.matrix_to_numpy(ijk_to_ras)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (ijk1 @ matrix.T)[:, :3]


def expected_world(i_range, j_range, k_range) -> np.ndarray:
    grid = np.array([(i, j, k) for k in k_range for j in j_range for i in i_range], float)
    return np.array([world_of_ijk(p) for p in grid])


def same_points(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> bool:
    key = lambda p: sorted(map(tuple, np.round(p / tol).astype(np.int64)))  # noqa: E731
    return len(a) == len(b) and key(a) == key(b)


def segment(volume, prompts: VolumePrompts, axis: int = 0) -> np.ndarray:
    session = SegmentationSession(volume, None, slice_predictor=lambda s: PromptEcho(s.image_shape))
    session.set_axis(axis)
    return session.run(prompts, propagate=False).mask


def test_volume_node_geometry_includes_parent_transform(volume_node):
    volume = mrml_bridge.volume_from_node(volume_node)
    assert volume.shape_kji == SHAPE_KJI
    np.testing.assert_allclose(volume.geometry.ijk_to_ras_matrix(), IJK_TO_WORLD, atol=1e-9)
    np.testing.assert_allclose(volume.geometry.spacing, SPACING_IJK)
    np.testing.assert_array_equal(volume.voxels, slicer.util.arrayFromVolume(volume_node))


def test_fiducials_segment_the_voxels_around_them(scene, volume_node, segmentation_node):
    target_ijk = (7, 5, 4)
    fiducial_parent = affine(rotation(0, -30), [1.0, 2.0, 3.0])
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "positive")
    points.SetAndObserveTransformNodeID(add_transform(scene, fiducial_parent, "fiducial parent").GetID())
    local = np.linalg.inv(fiducial_parent) @ np.append(world_of_ijk(target_ijk), 1.0)
    points.AddControlPoint(vtk.vtkVector3d(*local[:3]))
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "negative")
    negative.SetAttribute(mrml_bridge.PROMPT_LABEL_ATTRIBUTE, "0")
    negative.AddControlPoint(vtk.vtkVector3d(*world_of_ijk((12, 10, 4))))

    volume = mrml_bridge.volume_from_node(volume_node)
    ras_pos, labels_pos = mrml_bridge.markups_prompts(points)
    ras_neg, labels_neg = mrml_bridge.markups_prompts(negative)
    np.testing.assert_allclose(ras_pos[0], world_of_ijk(target_ijk), atol=1e-6)
    assert labels_pos.tolist() == [1] and labels_neg.tolist() == [0]
    prompts = VolumePrompts(np.r_[ras_pos, ras_neg], np.r_[labels_pos, labels_neg], frame="ras")
    mask = segment(volume, prompts)
    mrml_bridge.write_mask_to_segment(mask, volume, segmentation_node, "object")

    found = segment_voxels_world(scene, segmentation_node, volume_node)
    assert same_points(found, expected_world(range(6, 9), range(4, 7), [4]))


def test_rotated_roi_under_a_transform_segments_its_voxels(scene, volume_node, segmentation_node):
    # An ROI whose axes follow the volume's grid in world space: its ijk extent is known by hand.
    axes = IJK_TO_WORLD[:3, :3] / SPACING_IJK
    center_ijk, half_mm = np.array([8.2, 6.6, 4.3]), np.array([3.1, 2.5, 2.4])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetAndObserveTransformNodeID(add_transform(scene, affine(axes, world_of_ijk(center_ijk)), "roi parent").GetID())
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(*(2 * half_mm))

    box = mrml_bridge.roi_box(roi)
    np.testing.assert_allclose(box.center_ras, world_of_ijk(center_ijk), atol=1e-9)
    np.testing.assert_allclose(box.half_size, half_mm, atol=1e-9)
    volume = mrml_bridge.volume_from_node(volume_node)
    prompts = VolumePrompts(rois=[Roi(box.center_ras, box.axes_ras, box.half_size, "ras")])
    mask = segment(volume, prompts)
    mrml_bridge.write_mask_to_segment(mask, volume, segmentation_node, "object")

    # ijk bounds: centre +- half / spacing = i 3.03..13.37, j 3.82..9.38, k 2.7..5.9
    found = segment_voxels_world(scene, segmentation_node, volume_node)
    assert same_points(found, expected_world(range(4, 14), range(4, 10), range(3, 6)))


def test_segmentation_under_its_own_transform_keeps_voxels_in_place(scene, volume_node):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetAndObserveTransformNodeID(
        add_transform(scene, affine(rotation(2, -40), [-4.0, 1.0, 2.0]), "segmentation parent").GetID())
    segmentation.GetSegmentation().AddEmptySegment("object", "object")
    volume = mrml_bridge.volume_from_node(volume_node)
    mask = np.zeros(SHAPE_KJI, np.uint8)
    mask[1:9, 2:12, 3:14] = 1
    mrml_bridge.write_mask_to_segment(mask, volume, segmentation, "object")
    mask[:] = 0  # a later, smaller mask replaces the earlier one entirely (live preview)
    mask[2, 3, 4] = mask[6, 9, 11] = 1
    mrml_bridge.write_mask_to_segment(mask, volume, segmentation, "object")
    found = segment_voxels_world(scene, segmentation, volume_node)
    expected = np.array([world_of_ijk((4, 3, 2)), world_of_ijk((11, 9, 6))])
    assert same_points(found, expected)


def test_segment_editor_images_map_to_the_same_volume(volume_node, segmentation_node):
    # What the effect reads: the source volume as an oriented image in the segmentation's frame.
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume_node)
    from_image = mrml_bridge.volume_from_oriented_image(image, segmentation_node.GetParentTransformNode())
    from_node = mrml_bridge.volume_from_node(volume_node)
    assert from_image.geometry.is_close(from_node.geometry)
    np.testing.assert_array_equal(from_image.voxels, from_node.voxels)


def empty_labelmap(extent, ijk_to_frame) -> "slicer.vtkOrientedImageData":
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(*extent)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    labelmap.GetPointData().GetScalars().Fill(0)
    labelmap.SetImageToWorldMatrix(mrml_bridge.numpy_to_matrix(ijk_to_frame))
    return labelmap


def test_paint_labelmap_on_the_same_grid_reports_the_modified_extent():
    grid = IJK_TO_LOCAL.copy()
    labelmap = empty_labelmap((2, 9, 10, 14, 0, 3), grid)  # a modifier labelmap need not start at 0
    mask = np.zeros((4, 5, 8), np.uint8)
    mask[1, 2, 3] = mask[2, 4, 5] = 1
    shifted = grid @ affine(np.eye(3), [2, 10, 0])  # mask ijk 0 is labelmap extent (2, 10, 0)
    assert mrml_bridge.paint_labelmap(labelmap, mask, shifted) == [5, 7, 12, 14, 1, 2]
    assert labelmap.GetScalarComponentAsDouble(5, 12, 1, 0) == 1
    assert labelmap.GetScalarComponentAsDouble(7, 14, 2, 0) == 1
    assert labelmap.GetScalarComponentAsDouble(5, 12, 2, 0) == 0
    assert mrml_bridge.paint_labelmap(labelmap, np.zeros_like(mask), shifted) is None


def test_paint_labelmap_resamples_onto_a_finer_grid():
    # Target voxels half the size: each source voxel covers 2 x 2 x 2 target voxels.
    coarse = affine(np.diag([2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])
    fine = affine(np.eye(3), [-0.5, -0.5, -0.5])
    labelmap = empty_labelmap((0, 9, 0, 9, 0, 9), fine)
    mask = np.zeros((5, 5, 5), np.uint8)
    mask[1, 2, 3] = 1  # centre at (6, 4, 2) mm: covers fine voxels i 6..7, j 4..5, k 2..3
    assert mrml_bridge.paint_labelmap(labelmap, mask, coarse) == [6, 7, 4, 5, 2, 3]


def slice_to_ras(normal, point) -> np.ndarray:
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    x = np.cross(normal, [0.3, 0.5, 0.8])
    x /= np.linalg.norm(x)
    return affine(np.c_[x, np.cross(normal, x), normal], point)


@pytest.mark.parametrize("ijk_axis, index", [(2, 4), (1, 9), (0, 13)])
def test_view_aligned_with_a_voxel_axis_shows_that_slice(volume_node, ijk_axis, index):
    volume = mrml_bridge.volume_from_node(volume_node)
    point = [5.0, 6.0, 3.0]
    point[ijk_axis] = index + 0.3  # nearest slice is still ``index``
    slice_node = slicer.vtkMRMLSliceNode()
    slice_node.GetSliceToRAS().DeepCopy(mrml_bridge.numpy_to_matrix(
        slice_to_ras(-IJK_TO_WORLD[:3, ijk_axis], world_of_ijk(point))))  # flipped normal: same plane
    view = mrml_bridge.view_slice(mrml_bridge.matrix_to_numpy(slice_node.GetSliceToRAS()), volume)
    assert view == mrml_bridge.ViewSlice(axis=2 - ijk_axis, index=index)


def test_oblique_or_missing_view_shows_no_slice(volume_node):
    volume = mrml_bridge.volume_from_node(volume_node)
    tilted = rotation(0, 2.0) @ IJK_TO_WORLD[:3, 2]
    assert mrml_bridge.view_slice(slice_to_ras(tilted, world_of_ijk((5, 5, 5))), volume) is None
    outside = world_of_ijk((5, 5, SHAPE_KJI[0] + 3))
    assert mrml_bridge.view_slice(slice_to_ras(IJK_TO_WORLD[:3, 2], outside), volume) is None


def test_non_linear_parent_transform_is_refused_with_advice(scene, volume_node):
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 1.0, p[1], p[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(spline)
    volume_node.GetParentTransformNode().SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(mrml_bridge.BridgeError, match="Harden transform"):
        mrml_bridge.volume_from_node(volume_node)


def test_unplaced_roi_and_missing_segment_raise_clear_errors(scene, volume_node, segmentation_node):
    with pytest.raises(mrml_bridge.BridgeError, match="not placed"):
        mrml_bridge.roi_box(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode"))
    volume = mrml_bridge.volume_from_node(volume_node)
    with pytest.raises(mrml_bridge.BridgeError, match="does not exist"):
        mrml_bridge.write_mask_to_segment(np.zeros(SHAPE_KJI), volume, segmentation_node, "nope")


def test_slicers_reader_and_the_core_reader_agree_on_a_real_oblique_volume(scene):
    # Slicer reads NIfTI into RAS with its own ITK-based reader; the core reads it with SimpleITK in
    # LPS and converts. Same voxels at the same world positions, or a frame is wrong somewhere.
    from ultrasam.volume_io import read_volume

    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    node = volumes_logic.AddArchetypeVolume(str(RESECT_CASE3), "case3")
    from_slicer = mrml_bridge.volume_from_node(node)
    from_core = read_volume(RESECT_CASE3)
    assert from_slicer.shape_kji == from_core.shape_kji == (288, 256, 256)
    np.testing.assert_allclose(from_slicer.geometry.ijk_to_ras_matrix(), from_core.geometry.ijk_to_ras_matrix(),
                               atol=1e-4)
    np.testing.assert_array_equal(from_slicer.voxels, from_core.voxels)
