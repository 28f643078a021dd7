"""The module and the Segment Editor effect, outside Slicer.

Slicer's Qt layer (qt, ctk, the Segment Editor's C++ effect adaptor, slice widgets) is absent from
the slicer-core wheel, so it is stubbed here, and only it: MRML, segmentations, markups, the
bridge and the session are real (run in-process by a stand-in for the server client, except in the
tests that start the real server). The stub effect adaptor implements the few
``qSlicerSegmentEditorAbstractEffect`` calls the effect makes with the real MRML objects Slicer
would hand it (the source image in the segmentation's grid, a modifier labelmap on that grid),
and a stub slice view maps view pixels to RAS through a real vtkMRMLSliceNode.

The effect is then driven as a user would: click, drag, an oblique view, propagate, apply. A
stand-in model (shared with the Slicer self-test) thresholds the slice it is given, so the
expected voxels are the bright ball's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found has no MRML (not slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "UltraSamSlicer"
sys.path[:0] = [str(MODULE_DIR), str(MODULE_DIR / "Testing" / "Python")]
from slicer_effect_loaders import load_like_slicer_5_10  # noqa: E402
from slicer_test_fakes import InlineSession, ThresholdModel, ball  # noqa: E402
from UltraSamSlicerLib import mrml_bridge  # noqa: E402

SHAPE = (12, 16, 18)
IJK_TO_LOCAL = np.array([[0.0, -0.8, 0.0, 4.0], [0.6, 0.0, 0.3, -2.0], [0.0, 0.0, 1.2, 5.0], [0, 0, 0, 1]])
IJK_TO_LOCAL[:3, :3] = np.linalg.qr(IJK_TO_LOCAL[:3, :3])[0] * [0.6, 0.8, 1.2]  # oblique, anisotropic
PARENT = np.array([[np.cos(0.4), 0, np.sin(0.4), 3.0], [0, 1, 0, -1.0], [-np.sin(0.4), 0, np.cos(0.4), 2.0],
                   [0, 0, 0, 1]])
CENTER_KJI = np.array([6, 8, 9])
RESERVED_KEYS = set("0123456789zZyYqQwWiI/*,.<>") | {"Escape", "space"}


class StubAdaptor:
    """The qSlicerSegmentEditorAbstractEffect calls the effect makes, on real MRML objects."""

    NotConfirmed, ConfirmedWithoutDialog, ConfirmedWithDialog = 0, 1, 2

    def __init__(self, editorNode, sourceImage):
        self.editorNode, self.sourceImage = editorNode, sourceImage
        self.references, self.undoStates, self.modifications = {}, 0, []

    def parameterSetNode(self):
        return self.editorNode

    def sourceVolumeImageData(self):
        return self.sourceImage

    def defaultModifierLabelmap(self):
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetExtent(self.sourceImage.GetExtent())
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        labelmap.GetPointData().GetScalars().Fill(0)
        labelmap.CopyDirections(self.sourceImage)
        labelmap.SetSpacing(self.sourceImage.GetSpacing())
        labelmap.SetOrigin(self.sourceImage.GetOrigin())
        return labelmap

    def saveStateForUndo(self):
        self.undoStates += 1

    def modifySelectedSegmentByLabelmap(self, modifier, mode):
        array = vtk.util.numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars())
        self.modifications.append((array.reshape(SHAPE).copy(), mode))

    def confirmCurrentSegmentVisible(self):
        return self.ConfirmedWithoutDialog

    # Effect parameters: attributes "<effect name>.<parameter>" of the segment editor node, as in
    # qSlicerSegmentEditorAbstractEffect.cxx (setParameter, parameter, setParameterDefault; 5.8.1).
    def setParameter(self, name, value):
        attribute = f"{self.name}.{name}"
        if self.editorNode.GetAttribute(attribute) == str(value):
            return
        modified = self.editorNode.GetDisableModifiedEvent()
        self.editorNode.SetDisableModifiedEvent(1)
        self.editorNode.SetAttribute(attribute, str(value))
        self.editorNode.SetDisableModifiedEvent(modified)
        self.editorNode.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def parameterDefined(self, name):
        return self.editorNode.GetAttribute(f"{self.name}.{name}") is not None

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def parameter(self, name):
        return self.editorNode.GetAttribute(f"{self.name}.{name}") or ""

    def integerParameter(self, name):
        return int(self.parameter(name))

    def doubleParameter(self, name):
        return float(self.parameter(name))

    def nodeReference(self, name):
        return self.references.get(name)

    def setNodeReference(self, name, node):
        self.references[name] = node

    def __getattr__(self, name):  # widgets, actors, renders: nothing to check there
        return mock.MagicMock(name=name)


class StubSliceView:
    """A slice view: view pixel xy -> RAS through its real slice node's SliceToRAS (0.5 mm pixels)."""

    def __init__(self, sliceToRas):
        self.node = slicer.vtkMRMLSliceNode()
        self.node.GetSliceToRAS().DeepCopy(mrml_bridge.numpy_to_matrix(sliceToRas))

    def className(self):
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):
        return self.node

    def xyToRas(self, xy):
        matrix = mrml_bridge.matrix_to_numpy(self.node.GetSliceToRAS())
        return (matrix @ [0.5 * xy[0], 0.5 * xy[1], 0.0, 1.0])[:3].tolist()

    def xyOf(self, ras):
        matrix = mrml_bridge.matrix_to_numpy(self.node.GetSliceToRAS())
        local = np.linalg.inv(matrix) @ np.append(ras, 1.0)
        return (int(round(local[0] / 0.5)), int(round(local[1] / 0.5)))


def interactor(xy, control=False, key=""):
    return types.SimpleNamespace(GetEventPosition=lambda: xy, GetShiftKey=lambda: 0, GetAltKey=lambda: 0,
                                 GetControlKey=lambda: int(control), GetKeySym=lambda: key)


def test_module_imports_and_registers_at_startup_only(qt_layer):
    module = importlib.import_module("UltraSamSlicer")
    slicer.app.reset_mock()
    module.UltraSamSlicer(mock.MagicMock())
    connected = [call.args for call in slicer.app.connect.call_args_list]
    assert connected == [("startupCompleted()", module.registerEffect),
                         ("startupCompleted()", module.registerSampleData)]
    assert module.EFFECT_SOURCE.is_file() and module.SAMPLE_FILE.is_file()
    import hashlib

    assert hashlib.sha256(module.SAMPLE_FILE.read_bytes()).hexdigest() == module.SAMPLE_SHA256


@pytest.fixture
def scene(qt_layer, monkeypatch):
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    yield scene
    scene.Clear(1)


@pytest.fixture
def effect(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ball")
    inside = ball(SHAPE, CENTER_KJI, 3.3)  # slices 3..9
    slicer.util.updateVolumeFromArray(volume, np.where(inside, 200.0, 10.0).astype(np.float32))
    volume.SetIJKToRASMatrix(mrml_bridge.numpy_to_matrix(IJK_TO_LOCAL))
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    parent.SetMatrixTransformToParent(mrml_bridge.numpy_to_matrix(PARENT))
    volume.SetAndObserveTransformNodeID(parent.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.GetSegmentation().AddEmptySegment("object", "object")
    editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editorNode.SetAndObserveSegmentationNode(segmentation)
    editorNode.SetAndObserveSourceVolumeNode(volume)
    editorNode.SetSelectedSegmentID("object")
    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)

    effect_class = load_like_slicer_5_10(importlib.import_module("UltraSamSlicer").EFFECT_SOURCE)
    effect = effect_class(StubAdaptor(editorNode, image))
    effect.setupOptionsFrame()
    # qt is stubbed: option widgets that hold values, as the editor shows them.
    for name in ("directionCombo", "rangeCheck", "firstSpin", "lastSpin", "minIouSpin", "applyModeCombo"):
        setattr(effect, name, types.SimpleNamespace(blockSignals=lambda blocked: False))
    effect.pointsSelector = effect.roiSelector = types.SimpleNamespace(currentNode=lambda: None)
    effect.setMRMLDefaults()  # what the editor does when it gets its parameter node, and it then
    editorNode.AddObserver(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified,  # calls this on each change
                           lambda caller, event: effect.updateGUIFromMRML())
    effect.updateGUIFromMRML()
    effect.sessionFactory = InlineSession
    effect.activate()
    settle(effect)
    assert effect.session is not None
    yield effect
    effect.deactivate()


def settle(effect, timeout=60.0):
    """Poll from the 'main thread' like the effect's timer until nothing is starting or running."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        effect.onPoll()
        if not effect.wantSession and not (effect.session is not None and effect.session.running):
            return
        time.sleep(0.005)
    raise AssertionError("the effect did not settle")


def world_of_kji(kji) -> np.ndarray:
    kji = np.atleast_2d(kji)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (ijk1 @ (PARENT @ IJK_TO_LOCAL).T)[:, :3]


def plane_view(axis: int, index: int) -> StubSliceView:
    """A view showing slice ``index`` along numpy ``axis`` (its normal is that voxel axis in world)."""
    ijk_to_world = PARENT @ IJK_TO_LOCAL
    normal_column = 2 - axis
    x, y = (ijk_to_world[:3, c] / np.linalg.norm(ijk_to_world[:3, c]) for c in range(3) if c != normal_column)
    normal = np.cross(x, y)
    kji = [0, 0, 0]
    kji[axis] = index
    return StubSliceView(np.r_[np.c_[x, y, normal, world_of_kji(kji)[0]], [[0, 0, 0, 1]]])


def k_plane_view(k: int) -> StubSliceView:
    return plane_view(0, k)


def click(effect, view, xy, control=False):
    for event in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
        assert effect.processInteractionEvents(interactor(xy, control), event, view)
    effect.runPrompts()  # what the coalescing timer does in Slicer
    settle(effect)


def preview_kji(effect, scene) -> set:
    node = effect.previewNode()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue("UltraSamPreview")
    reference = effect.scriptedEffect.editorNode.GetSourceVolumeNode()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, labelmap, reference)
    return set(map(tuple, np.argwhere(slicer.util.arrayFromVolume(labelmap) > 0)))


def ball_voxels(slices) -> set:
    return {tuple(p) for p in np.argwhere(ball(SHAPE, CENTER_KJI, 3.3)) if p[0] in slices}


def test_click_shows_the_slice_preview_then_propagate_and_apply_once(effect, scene):
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    assert preview_kji(effect, scene) == ball_voxels({6})
    assert effect.scriptedEffect.modifications == []  # nothing reaches the segment before Apply

    assert effect.onKey("p")  # propagate
    settle(effect)
    assert preview_kji(effect, scene) == ball_voxels(range(3, 10))

    effect.onApply()
    adaptor = effect.scriptedEffect
    assert adaptor.undoStates == 1 and len(adaptor.modifications) == 1
    painted, mode = adaptor.modifications[0]
    assert mode == slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd
    assert set(map(tuple, np.argwhere(painted))) == ball_voxels(range(3, 10))
    assert effect.previewNode() is None and effect.promptNode(True).GetNumberOfControlPoints() == 0


def test_reprompting_after_propagation_reruns_from_the_new_prompt(effect, scene):
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    effect.onPropagate()
    settle(effect)
    first = preview_kji(effect, scene)
    other = k_plane_view(8)
    click(effect, other, other.xyOf(world_of_kji([8, 8, 9])[0]))
    assert effect.propagated and preview_kji(effect, scene) == first  # same object, both keys agree
    assert effect.onKey("BackSpace")
    settle(effect)
    assert effect.promptNode(True).GetNumberOfControlPoints() == 1


def test_drag_makes_a_box_on_the_viewed_slice(effect, scene):
    view = k_plane_view(5)
    start, end = view.xyOf(world_of_kji([5, 5, 6])[0]), view.xyOf(world_of_kji([5, 11, 12])[0])
    effect.processInteractionEvents(interactor(start), vtk.vtkCommand.LeftButtonPressEvent, view)
    effect.processInteractionEvents(interactor(end), vtk.vtkCommand.MouseMoveEvent, view)
    effect.processInteractionEvents(interactor(end), vtk.vtkCommand.LeftButtonReleaseEvent, view)
    assert list(effect.boxes) == [(0, 5)]
    effect.runPrompts()
    settle(effect)
    assert preview_kji(effect, scene) == ball_voxels({5})


def test_segmenting_follows_the_axis_of_the_view_clicked(effect, scene):
    view = plane_view(1, 7)  # a j slice
    click(effect, view, view.xyOf(world_of_kji([6, 7, 9])[0]))
    assert effect.axis == 1
    expected = {p for p in ball_voxels(range(SHAPE[0])) if p[1] == 7}
    assert preview_kji(effect, scene) == expected


def test_oblique_view_adds_no_prompt_and_says_why(effect, scene):
    view = k_plane_view(6)
    tilt = vtk.vtkTransform()
    tilt.RotateX(3.0)
    sliceToRas = mrml_bridge.matrix_to_numpy(view.node.GetSliceToRAS()) @ mrml_bridge.matrix_to_numpy(tilt.GetMatrix())
    view.node.GetSliceToRAS().DeepCopy(mrml_bridge.numpy_to_matrix(sliceToRas))
    effect.processInteractionEvents(interactor((20, 20)), vtk.vtkCommand.LeftButtonPressEvent, view)
    effect.processInteractionEvents(interactor((20, 20)), vtk.vtkCommand.LeftButtonReleaseEvent, view)
    assert effect.promptNode(True).GetNumberOfControlPoints() == 0
    assert "Align views" in effect.statusLabel.text


def test_clicks_while_placing_markups_are_left_to_slicer(effect):
    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.Place)
    assert not effect.processInteractionEvents(interactor((20, 20)), vtk.vtkCommand.LeftButtonPressEvent,
                                               k_plane_view(6))
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)


def test_effect_keys_leave_the_segment_editors_own_alone(effect):
    for key in RESERVED_KEYS:
        assert not effect.onKey(key)
    assert not effect.processInteractionEvents(interactor((0, 0), key="z"), vtk.vtkCommand.KeyPressEvent,
                                               k_plane_view(6))


def test_a_prompt_outside_the_volume_is_reported_not_raised(effect, scene):
    view = k_plane_view(6)
    outside = world_of_kji([6, 8, 9])[0] + 50 * (PARENT @ IJK_TO_LOCAL)[:3, 0]
    effect.promptNode(True).AddControlPointWorld(vtk.vtkVector3d(*outside))
    effect.runPrompts()
    settle(effect)
    assert "outside the volume" in effect.statusLabel.text
    assert view is not None


def test_dependency_install_asks_once_and_never_in_testing_mode(qt_layer, monkeypatch):
    module = importlib.import_module("UltraSamSlicer")
    missing = [["torch>=2.1", "segment-anything==1.0"], ["segment-anything==1.0"], []]
    monkeypatch.setattr(module, "missing_requirements", lambda: missing[0])
    confirm, pip = mock.MagicMock(return_value=False), mock.MagicMock()
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", pip)

    slicer.app.testingEnabled.return_value = True
    assert module.UltraSamSlicerLogic.installDependencies() is False
    assert not confirm.called and not pip.called  # testing mode: no dialog, no install

    slicer.app.testingEnabled.return_value = False
    assert module.UltraSamSlicerLogic.installDependencies() is False  # the user declined
    assert confirm.call_count == 1 and not pip.called

    confirm.return_value = True
    pytorch_utils = mock.MagicMock()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext(), raising=False)
    monkeypatch.setattr(module, "missing_requirements", lambda: missing.pop(0))
    assert module.UltraSamSlicerLogic.installDependencies() is True
    assert confirm.call_count == 2  # one more question, for the whole install
    pytorch_utils.PyTorchUtilsLogic.return_value.installTorch.assert_called_once_with(
        askConfirmation=False, torchVersionRequirement=">=2.1")
    pip.assert_called_once_with(["segment-anything==1.0"])


@pytest.fixture
def served(effect, tiny_sam, tmp_path, monkeypatch):
    """The effect on the real path: a local `ultrasam serve` child with a tiny checkpoint (this
    interpreter stands in for PythonSlicer); yields the settings the module would hold."""
    from ultrasam.checkpoint import save_checkpoint
    from UltraSamSlicerLib import engine, model_settings
    from UltraSamSlicerLib.models import ModelSettings

    chosen = {"settings": ModelSettings(checkpoint=str(save_checkpoint(tmp_path / "first.pth", tiny_sam)),
                                        device="cpu")}
    monkeypatch.setattr(model_settings, "read", lambda: chosen["settings"])
    connection = engine.EngineConnection(sys.executable)
    monkeypatch.setattr(engine, "_ENGINE", connection)
    effect.engine, effect.sessionFactory = connection, None
    yield chosen
    effect.deactivate()
    connection.stop()


def test_the_effect_starts_the_server_with_the_chosen_checkpoint_and_restarts_it_when_it_changes(
        effect, served, tmp_path, tiny_sam):
    import dataclasses

    from ultrasam.checkpoint import save_checkpoint

    effect.buildSession()
    settle(effect)
    assert "first.pth" in effect.engine.description and effect.engine.local.running
    first_process = effect.engine.local.process
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    settle(effect)
    assert effect.result is not None and effect.result.shape == SHAPE

    second = save_checkpoint(tmp_path / "second.pth", tiny_sam)
    served["settings"] = dataclasses.replace(served["settings"], checkpoint=str(second))  # e.g. "Use this model"
    effect.runPrompts()
    settle(effect)
    assert "second.pth" in effect.engine.description and effect.engine.starts == 2
    assert first_process.poll() is not None  # the first server was stopped, not left behind
    assert effect.result is not None  # the prompts ran again with the new model


def test_the_effect_sends_the_volume_a_chunk_per_tick_and_no_call_waits_for_the_model(effect, served, monkeypatch):
    # Structural, not timed: every main-thread call sends at most one bounded chunk, and no call
    # asks the server to hold its answer (wait=0), so each returns within one short exchange.
    import time
    from urllib.parse import parse_qs, urlsplit

    from ultrasam.client import Client, VolumeUpload

    chunk_bytes = 512
    monkeypatch.setattr(VolumeUpload, "CHUNK_BYTES", chunk_bytes)
    calls, ticks, statuses = [], [], []
    request = Client.request
    monkeypatch.setattr(Client, "request", lambda client, method, path, body=None, timeout=None: (
        calls.append((method, path, body)), request(client, method, path, body, timeout))[1])
    on_poll, set_status = effect.onPoll, effect.setStatus
    monkeypatch.setattr(effect, "onPoll", lambda: (ticks.append(len(calls)), on_poll()))
    monkeypatch.setattr(effect, "setStatus", lambda text: (statuses.append(text), set_status(text)))

    effect.buildSession()
    end = time.monotonic() + 60
    while effect.upload is None or effect.upload.sent == 0:  # the server starts, then the upload begins
        assert time.monotonic() < end, effect.statusLabel.text
        effect.onPoll()
        time.sleep(0.01)
    view = k_plane_view(6)  # a click while the volume is on its way: it runs once the volume is there
    for event in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
        assert effect.processInteractionEvents(interactor(view.xyOf(world_of_kji(CENTER_KJI)[0])), event, view)
    effect.runPrompts()
    assert effect.session is None and "Uploading the volume" in effect.statusLabel.text
    settle(effect)
    assert effect.result is not None and effect.result[6].any()

    chunks = [body for method, path, body in calls if method == "POST" and path.startswith("/uploads/")]
    counts = [json.loads(body[8:8 + int.from_bytes(body[4:8], "little")])["count"] for body in chunks]
    itemsize = effect.volume.voxels.itemsize
    assert sum(counts) == effect.volume.voxels.size and max(counts) * itemsize <= chunk_bytes and len(counts) >= 5
    chunk_ticks = [i for i, (method, path, _) in enumerate(calls) if method == "POST" and path.startswith("/uploads/")]
    assert len(set(np.searchsorted(ticks, chunk_ticks, side="right"))) == len(chunk_ticks)  # one chunk per tick
    uploading = [int(text.split(": ")[1].split(" %")[0]) for text in statuses if text.startswith("Uploading")]
    assert uploading == sorted(uploading) and len(set(uploading)) >= 4
    waits = [float(w) for _, path, _ in calls for w in parse_qs(urlsplit(path).query).get("wait", [])]
    waits += [body.get("wait", 0.0) for _, _, body in calls if isinstance(body, dict)]
    assert waits and max(waits) == 0.0  # the click's start and every poll return at once


def test_a_killed_server_leaves_preview_and_segment_as_they_were_and_the_next_prompt_restarts_it(
        effect, served, scene):
    import os
    import signal

    effect.buildSession()
    settle(effect)
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    settle(effect)
    before = preview_kji(effect, scene)
    assert before and effect.engine.starts == 1

    crash_log = effect.engine.local.log_path
    os.kill(effect.engine.local.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
    effect.engine.local.process.wait()
    effect.onPropagate()
    assert "server stopped" in effect.statusLabel.text and "next prompt starts" in effect.statusLabel.text
    assert crash_log in effect.statusLabel.text and os.path.exists(crash_log)  # kept for the user to read
    os.remove(crash_log)
    assert preview_kji(effect, scene) == before and effect.session is None
    assert effect.scriptedEffect.modifications == []  # the segment was never touched

    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI + [0, 1, 0])[0]))  # the next prompt
    settle(effect)
    assert effect.engine.starts == 2 and effect.session is not None
    assert preview_kji(effect, scene)  # a new preview from the new server


def test_a_markups_roi_prompts_every_slice_it_crosses_and_resizing_it_reruns(effect, scene):
    ijk_to_world = PARENT @ IJK_TO_LOCAL
    spacing = np.linalg.norm(ijk_to_world[:3, :3], axis=0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    frame = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")  # ROI axes along the volume's grid
    frame.SetMatrixTransformToParent(mrml_bridge.numpy_to_matrix(
        np.r_[np.c_[ijk_to_world[:3, :3] / spacing, world_of_kji([6, 8, 9])[0]], [[0, 0, 0, 1]]]))
    roi.SetAndObserveTransformNodeID(frame.GetID())
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(*(spacing * [12.0, 12.0, 2.6]))  # k from 4.7 to 7.3: slices 5, 6, 7
    effect.roiSelector = types.SimpleNamespace(currentNode=lambda: roi)
    effect.onPromptNodesChanged(roi)
    effect.runPrompts()
    settle(effect)
    assert preview_kji(effect, scene) == ball_voxels({5, 6, 7})

    effect.runTimer.reset_mock()
    roi.SetSize(*(spacing * [12.0, 12.0, 0.6]))  # now slice 6 only
    assert effect.runTimer.start.called  # the resize is observed
    effect.runPrompts()
    settle(effect)
    assert preview_kji(effect, scene) == ball_voxels({6})


@pytest.mark.parametrize("hovered", ["control point", "ROI handle"])
def test_a_press_or_backspace_over_a_hovered_markups_point_or_handle_is_left_to_markups(effect, scene, hovered):
    """The markups widget marks what the mouse hovers as the display node's active component
    (vtkSlicerMarkupsWidget::ProcessMouseMove -> SetActiveComponent, mouse context ""); with it set,
    the press (drag that point) and Backspace (delete it) must reach Markups, not add a prompt."""
    view = k_plane_view(6)
    xy = view.xyOf(world_of_kji(CENTER_KJI)[0])
    click(effect, view, xy)  # one prompt, so Backspace would have something to undo
    points = effect.promptNode(True)
    if hovered == "control point":
        display = points.GetDisplayNode()
        display.SetActiveControlPoint(0)
        assert display.GetActiveComponentType() == display.ComponentControlPoint
    else:
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        display.SetActiveComponent(display.ComponentScaleHandle, 2)
    press, release = vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent
    assert not effect.processInteractionEvents(interactor(xy), press, view)
    assert not effect.processInteractionEvents(interactor(xy), release, view)
    assert not effect.processInteractionEvents(interactor(xy, key="BackSpace"), vtk.vtkCommand.KeyPressEvent, view)
    assert not effect.processInteractionEvents(interactor(xy, key="Delete"), vtk.vtkCommand.KeyPressEvent, view)
    assert points.GetNumberOfControlPoints() == 1 and len(effect.undoStack) == 1  # nothing added or undone

    display.SetActiveComponent(display.ComponentNone, -1)  # the mouse left it: clicks prompt again
    click(effect, view, (xy[0] + 10, xy[1]))
    assert points.GetNumberOfControlPoints() == 2
    assert effect.processInteractionEvents(interactor(xy, key="BackSpace"), vtk.vtkCommand.KeyPressEvent, view)
    assert points.GetNumberOfControlPoints() == 1


def test_the_effects_options_are_kept_in_the_segment_editor_node(effect, scene):
    from ultrasam.session import Span

    node = effect.scriptedEffect.editorNode
    assert (node.GetAttribute("UltraSam.Direction"), node.GetAttribute("UltraSam.MinIoU")) == ("both", "0.5")
    # The user sets the options in the panel: they are written to the node ...
    effect.directionCombo.currentIndex, effect.rangeCheck.checked = 1, True  # forward, limited
    effect.firstSpin.value, effect.lastSpin.value, effect.minIouSpin.value = 2, 9, 0.7
    effect.applyModeCombo.currentIndex = 1  # replace
    effect.updateMRMLFromGUI()
    assert [node.GetAttribute(f"UltraSam.{name}") for name in
            ("Direction", "LimitSlices", "FirstSlice", "LastSlice", "MinIoU", "ApplyMode")] == \
        ["forward", "1", "2", "9", "0.7", "replace"]
    # ... and what the node holds (a reloaded scene, a new editor) is what the panel shows and runs with.
    node.SetAttribute("UltraSam.Direction", "backward")
    node.SetAttribute("UltraSam.MinIoU", "0.25")
    effect.updateGUIFromMRML()
    assert (effect.directionCombo.currentIndex, effect.minIouSpin.value, effect.applyModeCombo.currentIndex) == \
        (2, 0.25, 1)
    assert Span(**effect.span()) == Span("backward", 2, 9)  # what the server builds from the request
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    effect.onApply()
    assert effect.scriptedEffect.modifications[0][1] == slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet


def test_choosing_the_effects_own_prompt_node_as_extra_points_counts_its_points_once(effect):
    own = effect.promptNode(True)
    own.AddControlPointWorld(vtk.vtkVector3d(*world_of_kji(CENTER_KJI)[0]))
    effect.pointsSelector = types.SimpleNamespace(currentNode=lambda: own)
    assert len(effect.collectPrompts()["points"]) == 1


def test_a_run_of_the_previous_session_never_reaches_the_new_one(effect, scene):
    """A preview still running on the server when the source volume (or the model) changes must
    not be shown in the new session: the old session is closed on the server (which cancels its
    run there) and never polled again; only the new session's own results are shown."""
    class RunningSession(InlineSession):
        """The old session: its run goes on on the server until ``finished``; then a poll brings its
        mask, as RemoteSession's does once the server's run is done."""
        finished, polls_after_close = False, 0

        def start(self, *request, **options):
            self.running, self.request = True, (request, options)
            return self.RunState("running", (0, 1))

        def poll(self, wait=0.0):
            self.polls_after_close += self.closed
            if self.running and self.finished:
                self.running = False
                return super().start(*self.request[0], **self.request[1])
            return self.RunState("running", (0, 1)) if self.running else self.last

    class BlindModel(ThresholdModel):  # the new session's model finds nothing: its results are told apart
        def predict(self, *args, **kwargs):
            prediction = super().predict(*args, **kwargs)
            return type(prediction)(np.zeros_like(prediction.mask), 1.0, prediction.low_res_logits)

    effect.sessionFactory = RunningSession
    effect.buildSession()
    old = effect.session
    view = k_plane_view(6)
    for event in (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent):
        effect.processInteractionEvents(interactor(view.xyOf(world_of_kji(CENTER_KJI)[0])), event, view)
    effect.runPrompts()
    effect.onPoll()
    assert old.running and effect.result is None  # the old session's preview is still going

    effect.sessionFactory = lambda volume: InlineSession(volume, slice_predictor=BlindModel)
    effect.buildSession()  # another source volume (or model): a new session, the old one closed
    old.finished = True  # the old run ends on the server now
    settle(effect)
    assert old.closed and old.polls_after_close == 0
    assert effect.result is not None and not effect.result.any()  # the new session's own (empty) preview
    assert preview_kji(effect, scene) == set()
    old.running = True
    assert old.poll().state == "done" and old.mask.any()  # what it would have shown: the ball's slice


def test_cleanup_stops_polling_and_observing_and_closes_the_volume_on_the_server(effect, monkeypatch):
    session = effect.session
    session.running = True  # a run is going on the server
    node = effect.promptNode(True)  # observed by the effect
    stopped_servers = []
    monkeypatch.setattr(effect.engine, "stop", lambda: stopped_servers.append(True))
    effect.pollTimer.reset_mock()
    effect.runTimer.reset_mock()
    effect.cleanup()  # what Slicer calls when it closes
    assert effect.pollTimer.stop.called and effect.runTimer.stop.called
    assert session.closed and effect.session is None  # closing cancels its run on the server
    assert stopped_servers == []  # the server belongs to the module: it stops when Slicer exits
    node.AddControlPointWorld(vtk.vtkVector3d(0.0, 0.0, 0.0))
    assert not effect.runTimer.start.called


def test_propagation_leaves_blank_slices_empty_and_the_effect_shows_the_servers_warnings(effect, scene):
    view = k_plane_view(6)
    click(effect, view, view.xyOf(world_of_kji(CENTER_KJI)[0]))
    effect.onPropagate()
    settle(effect)
    assert preview_kji(effect, scene) == ball_voxels(range(3, 10))
    # Beyond the ball (slices 3..9) the volume holds one grey value: the walks meet blank slices.
    assert "Warning: slice(s) [2, 10] are blank (a single grey value) and were left empty" in \
        effect.statusLabel.text


@pytest.mark.parametrize("prompt, propagate, span", [
    ("click", False, None), ("box", False, None), ("click", True, None),
    ("click", True, {"direction": "forward"}), ("box", True, {"direction": "backward", "first": 4, "last": 8}),
])
def test_the_numpy_stand_in_answers_as_the_core_session_does(effect, prompt, propagate, span):
    """The effect's self-test runs on NumpySession where Slicer has no torch: its masks must be
    those of the core's session with the same stand-in model (InlineSession)."""
    from slicer_test_fakes import NumpySession
    from ultrasam.wire import prompts_to_json

    centre = world_of_kji(CENTER_KJI)[0]
    if prompt == "click":
        prompts = prompts_to_json([centre], [1])
    else:
        prompts = prompts_to_json(np.zeros((0, 3)), [], boxes=[tuple(world_of_kji([[7, 5, 6], [7, 12, 13]]))])
    answers = []
    for session in (InlineSession(effect.volume), NumpySession(effect.volume)):
        state = session.start(prompts, propagate, 0, span)
        answers.append((state.state, state.propagated, session.mask))
    (core_state, core_propagated, core_mask), (state, propagated, mask) = answers
    assert (state, propagated) == (core_state, core_propagated) == ("done", propagate)
    assert mask.any()
    np.testing.assert_array_equal(mask, core_mask)


def test_align_views_turns_views_to_the_grid_clicks_are_checked_against(qt_layer, scene):
    """The segmentation's grid (the editor's source image) need not be the source volume's: after
    'Align views', every view must show a whole slice of the former, whatever its pose was."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ball")
    slicer.util.updateVolumeFromArray(volume, np.zeros(SHAPE, np.float32))
    volume.SetIJKToRASMatrix(mrml_bridge.numpy_to_matrix(IJK_TO_LOCAL))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editorNode.SetAndObserveSegmentationNode(segmentation)
    editorNode.SetAndObserveSourceVolumeNode(volume)
    grid = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)
    turn = vtk.vtkMatrix4x4()
    grid.GetImageToWorldMatrix(turn)
    rotation = np.linalg.qr(np.array([[1.0, 0.3, 0.1], [0.2, 1.0, -0.4], [0.1, 0.5, 1.0]]))[0]
    turned = mrml_bridge.matrix_to_numpy(turn)
    turned[:3, :3] = rotation @ turned[:3, :3]  # the segmentation's grid, rotated from the volume's
    grid.SetImageToWorldMatrix(mrml_bridge.numpy_to_matrix(turned))

    effect = load_like_slicer_5_10(importlib.import_module("UltraSamSlicer").EFFECT_SOURCE)(
        StubAdaptor(editorNode, grid))
    effect.volume = mrml_bridge.volume_from_oriented_image(grid, None, "grid")
    views = {name: StubSliceView(pose) for name, pose in (
        ("Red", np.eye(4)), ("Green", np.array([[1.0, 0, 0, 3], [0, 0, 1, 2], [0, 1, 0, 4], [0, 0, 0, 1]])),
        ("Yellow", np.array([[0, 0, 1.0, -1], [1, 0, 0, 0], [0, 1, 0, 5], [0, 0, 0, 1]])))}
    slicer.app.layoutManager.return_value = types.SimpleNamespace(
        sliceViewNames=lambda: list(views),
        sliceWidget=lambda name: types.SimpleNamespace(mrmlSliceNode=lambda: views[name].node))
    assert all(effect.viewSlice(view) is None for view in views.values())  # oblique to that grid
    effect.alignViews()
    shown = [mrml_bridge.view_slice(mrml_bridge.matrix_to_numpy(view.node.GetSliceToRAS()), effect.volume)
             for view in views.values()]
    assert None not in shown and {view.axis for view in shown} == {0, 1, 2}
