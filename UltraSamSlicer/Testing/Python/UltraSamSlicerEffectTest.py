"""Self-test of the UltraSam Segment Editor effect, driven through a real qMRMLSegmentEditorWidget.

Run in Slicer: ``Slicer --no-splash --testing --python-script UltraSamSlicerEffectTest.py`` (ctest
registers it as ``py_UltraSamSlicerEffectTest``). Needs no model, no server, no torch and no
network, as on the Extensions Index build machines: the effect talks to a numpy stand-in for the
server's client (slicer_test_fakes.NumpySession, which says what it assumes and where that is
checked) whose model thresholds the slice it is given, so the expected voxels are those of a bright
ball in the test volume. Checks the preview, Apply as one undo step, undo/redo, and Discard; that
the effect keeps its options in the editor's node; and that it leaves hovered markups to Markups.
"""

import time
import unittest

import numpy as np
import vtk

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest
from slicer_test_fakes import NumpySession, ball

SHAPE = (14, 20, 22)
CENTER_KJI = np.array([7, 10, 11])
RADIUS = 4.2


class UltraSamSlicerEffectTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_options_and_hovered_markups_need_no_torch()
        self.setUp()
        self.test_preview_apply_undo_redo()

    def test_options_and_hovered_markups_need_no_torch(self):
        _, _, editor = self.makeScene()
        effect = editor.effectByName("UltraSam").self()
        # The editor ran the effect's setMRMLDefaults when it got its node (qMRMLSegmentEditorWidget).
        self.assertEqual(editor.mrmlSegmentEditorNode().GetAttribute("UltraSam.Direction"), "both")
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        points.AddControlPoint(0.0, 0.0, 0.0)
        points.CreateDefaultDisplayNodes()
        self.assertFalse(effect.markupsHovered())
        points.GetDisplayNode().SetActiveControlPoint(0)  # what the markups widget does on hover
        self.assertTrue(effect.markupsHovered())

    def test_preview_apply_undo_redo(self):
        volume, segmentation, editor = self.makeScene()
        effect = editor.effectByName("UltraSam").self()
        # Before activation, so that activating opens the volume on the stand-in, not on a server.
        effect.sessionFactory = NumpySession
        editor.setActiveEffectByName("UltraSam")
        self.assertIs(editor.activeEffect().self(), effect)
        self.settle(effect)
        self.assertIsNotNone(effect.session)

        # A positive point at the ball's centre: the preview shows the ball's slice, the segment is untouched.
        center = self.worldOfKji(volume, CENTER_KJI)
        effect.promptNode(True).AddControlPointWorld(vtk.vtkVector3d(*center))
        self.settle(effect)
        self.assertEqual(self.voxels(effect.previewNode(), "UltraSamPreview", volume), self.ball({CENTER_KJI[0]}))
        self.assertEqual(len(self.voxels(segmentation, "object", volume)), 0)

        # Propagate, then Apply: one undo step.
        effect.onPropagate()
        self.settle(effect)
        whole = self.ball(range(SHAPE[0]))
        self.assertEqual(self.voxels(effect.previewNode(), "UltraSamPreview", volume), whole)
        effect.onApply()
        self.assertEqual(self.voxels(segmentation, "object", volume), whole)
        self.assertIsNone(effect.previewNode())
        editor.undo()
        self.assertEqual(len(self.voxels(segmentation, "object", volume)), 0)
        editor.redo()
        self.assertEqual(self.voxels(segmentation, "object", volume), whole)

        # Discard leaves the segment as it was.
        effect.promptNode(True).AddControlPointWorld(vtk.vtkVector3d(*center))
        self.settle(effect)
        effect.discardPreview()
        self.assertIsNone(effect.previewNode())
        self.assertEqual(self.voxels(segmentation, "object", volume), whole)

    def makeScene(self):
        inside = ball(SHAPE, CENTER_KJI, RADIUS)
        ijkToRas = vtk.vtkMatrix4x4()
        transform = vtk.vtkTransform()
        transform.RotateWXYZ(20, 1, 2, 3)  # oblique volume
        transform.Scale(0.6, 0.8, 1.2)
        ijkToRas.DeepCopy(transform.GetMatrix())
        volume = slicer.util.addVolumeFromArray(np.where(inside, 200.0, 10.0).astype(np.float32), ijkToRAS=ijkToRas,
                                                name="UltraSamBall")
        parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        move = vtk.vtkTransform()
        move.RotateZ(30)
        move.Translate(5, -3, 2)
        parent.SetMatrixTransformToParent(move.GetMatrix())
        volume.SetAndObserveTransformNodeID(parent.GetID())
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation.GetSegmentation().AddEmptySegment("object", "object")
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID("object")
        self.editor = editor  # keep the widget alive for the whole test
        return volume, segmentation, editor

    @staticmethod
    def worldOfKji(volume, kji):
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        local = ijkToRas.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])
        world = [0.0, 0.0, 0.0]
        volume.GetParentTransformNode().GetTransformToWorld().TransformPoint(local[:3], world)
        return world

    @staticmethod
    def ball(slices):
        return {tuple(p) for p in np.argwhere(ball(SHAPE, CENTER_KJI, RADIUS)) if p[0] in slices}

    @staticmethod
    def voxels(segmentationNode, segmentId, volume):
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)
        return set(map(tuple, np.argwhere(array > 0)))

    @staticmethod
    def settle(effect, timeout=30.0):
        """Let the effect's timers and runs finish, keeping the event loop alive."""
        end = time.time() + timeout
        while time.time() < end:
            slicer.app.processEvents()  # fires the effect's run and poll timers
            running = effect.wantSession or (effect.session is not None and effect.session.running)
            if not effect.runTimer.isActive() and not running:
                return
            time.sleep(0.01)
        raise AssertionError("the UltraSam effect did not finish in time")


if __name__ == "__main__":
    unittest.main()
