"""The UltraSam Segment Editor effect: prompts in slice views -> live preview -> propagate -> apply.

A thin Qt layer. Clicks, drags and markups become world-RAS prompts (:mod:`mrml_bridge`); the
Qt-free :class:`~ultrasam.session.SegmentationSession` turns them into a (K, J, I) mask on
the one inference thread (:mod:`worker`); a ``QTimer`` on the main thread collects results and does
all MRML work. The result is shown in a separate preview segmentation and reaches the edited
segment only through ``modifySelectedSegmentByLabelmap``, after one ``saveStateForUndo``, so
masking, overwrite rules and the editor's undo/redo apply.

Slicer APIs used here (all in Slicer 5.8): ``AbstractScriptedSegmentEditorEffect`` and the
``qSlicerSegmentEditorAbstractEffect`` methods declared in qSlicerSegmentEditorAbstractEffect.h
(``sourceVolumeImageData``, ``defaultModifierLabelmap``, ``modifySelectedSegmentByLabelmap``,
``saveStateForUndo``, ``confirmCurrentSegmentVisible``, ``addActor2D``, ``scheduleRender``,
``setNodeReference``); ``vtkMRMLSliceNode.RotateToVolumePlane`` and
``vtkMRMLSliceLogic.SnapSliceOffsetToIJK`` for "Align views".
"""

from __future__ import annotations

import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from UltraSamSlicerLib import mrml_bridge
from UltraSamSlicerLib.models import missing_requirements, shared_manager
from UltraSamSlicerLib.worker import InferenceWorker, Job

EFFECT_NAME = "UltraSam"
PREVIEW_ROLE = "UltraSamPreview"  # node reference of the preview segmentation in the editor node
PREVIEW_SEGMENT = "UltraSamPreview"
PROMPT_ROLE_ATTRIBUTE = "UltraSam.PromptRole"  # marks the effect's own click-prompt nodes
DRAG_PIXELS = 4  # a press-release that moves further is a box, not a click
POLL_MS = 50
USER_ERRORS = (ValueError, FileNotFoundError, IndexError)  # shown in the panel, not as a traceback


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segment the selected segment with UltraSam from points, boxes and ROIs."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME  # not translated: modules find effects by name
        scriptedEffect.title = "UltraSam"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        # Tests replace this to run without a model: volume -> SegmentationSession.
        self.sessionFactory = None
        self.sessionSettings = None  # model settings the current session was loaded with
        self.worker = None
        self.session = None
        self.volume = None
        self.axis = 0
        self.propagated = False
        self.result = None
        self.embeddedAxes = set()
        self.boxes = {}  # (axis, slice index) -> SliceBox in world RAS
        self.undoStack = []  # callables removing the most recent click or box
        self.drag = None
        self.rubberBands = {}
        self.nodeObservations = []
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.runTimer = qt.QTimer()  # coalesces bursts of prompt edits into one run
        self.runTimer.setSingleShot(True)
        self.runTimer.setInterval(0)
        self.runTimer.connect("timeout()", self.runPrompts)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment with UltraSam (SAM trained on ultrasound).<p><ul style="margin: 0">
<li><b>Click</b> in a slice view: positive point. <b>Ctrl+click</b>: negative point (UltraSam was
trained without negative points: they may change little).</li>
<li><b>Drag</b>: box on that slice. A <b>markups ROI</b> selected below: a box on every slice it crosses.</li>
<li>Markups points can be moved; a points node selected below adds more positive points.</li>
<li><b>p</b>: propagate through the volume. <b>Backspace</b>: remove the last click or box.
<b>Enter</b>: apply the preview to the selected segment (undo with Ctrl+Z).</li>
<li>Views must show the volume's own slices; use <b>Align views</b> for oblique volumes.</li>
</ul></html>"""

    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel("Click in a slice view to segment.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.roiSelector = self._nodeSelector("vtkMRMLMarkupsROINode", "Markups ROI used as a 3D box prompt.")
        self.scriptedEffect.addLabeledOptionsWidget("ROI box:", self.roiSelector)
        self.pointsSelector = self._nodeSelector(
            "vtkMRMLMarkupsFiducialNode",
            "More point prompts (positive; node attribute UltraSam.PromptLabel=0: negative).")
        self.scriptedEffect.addLabeledOptionsWidget("Extra points:", self.pointsSelector)

        promptRow = qt.QHBoxLayout()
        self.clearButton = qt.QPushButton("Clear prompts")
        self.alignButton = qt.QPushButton("Align views")
        self.alignButton.toolTip = "Rotate slice views to the source volume's voxel axes (needed for oblique volumes)."
        promptRow.addWidget(self.clearButton)
        promptRow.addWidget(self.alignButton)
        self.scriptedEffect.addOptionsWidget(promptRow)

        self.directionCombo = qt.QComboBox()
        self.directionCombo.addItems(["both", "forward", "backward"])
        self.scriptedEffect.addLabeledOptionsWidget("Direction:", self.directionCombo)
        rangeRow = qt.QHBoxLayout()
        self.rangeCheck = qt.QCheckBox("slices")
        self.firstSpin, self.lastSpin = qt.QSpinBox(), qt.QSpinBox()
        for spin in (self.firstSpin, self.lastSpin):
            spin.setRange(0, 100000)
            rangeRow.addWidget(spin)
        rangeRow.insertWidget(0, self.rangeCheck)
        self.scriptedEffect.addLabeledOptionsWidget("Limit to:", rangeRow)
        self.minIouSpin = qt.QDoubleSpinBox()
        self.minIouSpin.setRange(0.0, 1.5)
        self.minIouSpin.setSingleStep(0.05)
        self.minIouSpin.value = 0.5
        self.minIouSpin.toolTip = "Propagation stops at the first slice whose predicted IoU is below this."
        self.scriptedEffect.addLabeledOptionsWidget("Stop below IoU:", self.minIouSpin)

        propagateRow = qt.QHBoxLayout()
        self.propagateButton = qt.QPushButton("Propagate")
        self.cancelButton = qt.QPushButton("Cancel")
        self.progressBar = qt.QProgressBar()
        propagateRow.addWidget(self.propagateButton)
        propagateRow.addWidget(self.progressBar)
        propagateRow.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(propagateRow)

        self.applyModeCombo = qt.QComboBox()
        self.applyModeCombo.addItems(["Add to segment", "Replace segment"])
        self.scriptedEffect.addLabeledOptionsWidget("Apply:", self.applyModeCombo)
        finishRow = qt.QHBoxLayout()
        self.discardButton = qt.QPushButton("Discard preview")
        self.applyButton = qt.QPushButton("Apply")
        finishRow.addWidget(self.discardButton)
        finishRow.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(finishRow)

        self.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPromptNodesChanged)
        self.pointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPromptNodesChanged)
        self.clearButton.connect("clicked()", self.clearPrompts)
        self.alignButton.connect("clicked()", self.alignViews)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)
        self.discardButton.connect("clicked()", self.discardPreview)
        self.updateButtons()

    def _nodeSelector(self, className, toolTip):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = [className]
        selector.noneEnabled = True
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.toolTip = toolTip
        return selector

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        pass

    def updateGUIFromMRML(self):
        self.updateButtons()

    def updateMRMLFromGUI(self):
        pass

    def interactionNodeModified(self, interactionNode):
        # Stay active while the user places markups prompts: the C++ base class deactivates the
        # effect on any non-ViewTransform mode (qSlicerSegmentEditorAbstractEffect.cxx, 5.8).
        pass

    # ---- lifecycle -----------------------------------------------------------------------------
    def activate(self):
        self.worker = InferenceWorker()
        self.pollTimer.start()
        self.observePromptNodes()
        self.buildSession()

    def deactivate(self):
        self.pollTimer.stop()
        self.runTimer.stop()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        self.unobservePromptNodes()
        for viewWidget, (actor, _) in self.rubberBands.items():
            self.scriptedEffect.removeActor2D(viewWidget, actor)
        self.rubberBands = {}
        self.discardPreview()
        self.session = None

    def cleanup(self):
        self.pollTimer.disconnect("timeout()", self.onPoll)
        self.runTimer.disconnect("timeout()", self.runPrompts)

    def sourceVolumeNodeChanged(self):
        if self.worker is not None:
            self.buildSession()

    def referenceGeometryChanged(self):
        if self.worker is not None:
            self.buildSession()

    def buildSession(self):
        """Read the source image (in the segmentation's grid) and load the model on the worker."""
        self.session, self.result, self.propagated = None, None, False
        self.embeddedAxes = set()  # axes whose slices are all embedded already
        self.discardPreview()
        image = self.scriptedEffect.sourceVolumeImageData()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if image is None or segmentationNode is None:
            self.setStatus("Select a segmentation and a source volume.")
            return
        missing = missing_requirements()
        if missing and self.sessionFactory is None:
            self.setStatus(f"Missing Python packages ({', '.join(missing)}): install them in the UltraSam module.")
            return
        try:
            self.volume = mrml_bridge.volume_from_oriented_image(
                image, segmentationNode.GetParentTransformNode(), segmentationNode.GetName())
        except mrml_bridge.BridgeError as error:
            self.setStatus(str(error))
            return
        volume, factory = self.volume, self.sessionFactory
        if factory is None:
            settings = self.sessionSettings = self.modelSettings()

            def factory(volume):
                from ultrasam.session import SegmentationSession

                return SegmentationSession(volume, shared_manager().cache(settings))

        self.worker.request(Job("load", lambda job: factory(volume)))
        self.setStatus("Loading UltraSam...")

    @staticmethod
    def modelSettings():
        """The model chosen in the UltraSam module (or by the training module's 'Use this model')."""
        from UltraSamSlicer import UltraSamSlicerLogic

        return UltraSamSlicerLogic.modelSettings()

    # ---- prompts --------------------------------------------------------------------------------
    def promptNode(self, positive: bool):
        """The effect's own markups node for clicked points (created on first use)."""
        role = "positive" if positive else "negative"
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute(PROMPT_ROLE_ATTRIBUTE) == role:
                return node
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"UltraSam {role}")
        node.SetAttribute(PROMPT_ROLE_ATTRIBUTE, role)
        node.SetAttribute(mrml_bridge.PROMPT_LABEL_ATTRIBUTE, "1" if positive else "0")
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor((0.2, 0.9, 0.3) if positive else (0.95, 0.2, 0.2))
        node.GetDisplayNode().SetPointLabelsVisibility(False)
        self.observePromptNodes()
        return node

    def promptNodes(self):
        nodes = [node for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")
                 if node.GetAttribute(PROMPT_ROLE_ATTRIBUTE)]
        extra = [self.pointsSelector.currentNode(), self.roiSelector.currentNode()]
        return nodes + [node for node in extra if node is not None]

    def observePromptNodes(self):
        """Re-run whenever a prompt node's points are placed, moved or removed."""
        self.unobservePromptNodes()
        markups = slicer.vtkMRMLMarkupsNode
        # vtkMRMLMarkupsNode.h: points placed, moved, removed; a moved parent transform; an ROI resized.
        events = (markups.PointPositionDefinedEvent, markups.PointModifiedEvent, markups.PointRemovedEvent,
                  markups.TransformModifiedEvent)
        for node in self.promptNodes():
            for event in events + ((vtk.vtkCommand.ModifiedEvent,) if node.IsA("vtkMRMLMarkupsROINode") else ()):
                self.nodeObservations.append((node, node.AddObserver(event, self.onPromptNodeModified)))

    def unobservePromptNodes(self):
        for node, tag in self.nodeObservations:
            node.RemoveObserver(tag)
        self.nodeObservations = []

    def onPromptNodesChanged(self, node):
        self.observePromptNodes()
        self.runTimer.start()

    def onPromptNodeModified(self, caller, event):
        self.runTimer.start()

    def collectPrompts(self):
        """Everything placed, as :class:`ultrasam.prompts3d.VolumePrompts` in world RAS."""
        import numpy as np
        from ultrasam.prompts3d import Roi, VolumePrompts

        points, labels, rois = [], [], []
        for node in self.promptNodes():
            if node.IsA("vtkMRMLMarkupsROINode"):
                if node.GetNumberOfControlPoints():
                    box = mrml_bridge.roi_box(node)
                    rois.append(Roi(box.center_ras, box.axes_ras, box.half_size, "ras"))
            else:
                nodePoints, nodeLabels = mrml_bridge.markups_prompts(node)
                points.append(nodePoints)
                labels.append(nodeLabels)
        boxes = [box for (axis, _), box in self.boxes.items() if axis == self.axis]
        return VolumePrompts(np.concatenate(points or [np.zeros((0, 3))]),
                             np.concatenate(labels or [np.zeros(0, int)]), "ras", boxes, rois)

    def viewSlice(self, viewWidget):
        """The volume slice a slice view shows, or None (with a message) when it is oblique."""
        sliceToRas = mrml_bridge.matrix_to_numpy(viewWidget.mrmlSliceNode().GetSliceToRAS())
        view = mrml_bridge.view_slice(sliceToRas, self.volume)
        if view is None:
            self.setStatus("This view does not show the volume's own slices (oblique, or outside the volume): "
                           "click 'Align views', then prompt again. No prompt was added.")
        return view

    def followView(self, view):
        """Segment along the axis of the view the user prompts in; boxes of other axes are dropped."""
        if view.axis != self.axis:
            self.axis = view.axis
            self.boxes = {key: box for key, box in self.boxes.items() if key[0] == self.axis}

    def addPoint(self, viewWidget, xy, positive):
        view = self.viewSlice(viewWidget)
        if view is None:
            return
        self.followView(view)
        node = self.promptNode(positive)
        ras = self.xyToRas(xy, viewWidget)
        # Remembered by ID, not index: the user may delete other points meanwhile (vtkMRMLMarkupsNode.h).
        pointId = node.GetNthControlPointID(node.AddControlPointWorld(vtk.vtkVector3d(*ras)))
        self.undoStack.append(lambda: self.removeControlPoint(node, pointId))
        self.runTimer.start()

    @staticmethod
    def removeControlPoint(node, pointId):
        index = node.GetNthControlPointIndexByID(pointId)
        if index >= 0:  # the user may have deleted it already
            node.RemoveNthControlPoint(index)

    def addBox(self, viewWidget, xyStart, xyEnd):
        from ultrasam.prompts3d import SliceBox

        view = self.viewSlice(viewWidget)
        if view is None:
            return
        self.followView(view)
        key = (view.axis, view.index)
        self.boxes[key] = SliceBox(self.xyToRas(xyStart, viewWidget), self.xyToRas(xyEnd, viewWidget), "ras")
        self.undoStack.append(lambda: self.boxes.pop(key, None))
        self.runTimer.start()

    def undoLastPrompt(self):
        if self.undoStack:
            self.undoStack.pop()()
            self.runTimer.start()

    def clearPrompts(self):
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute(PROMPT_ROLE_ATTRIBUTE):
                node.RemoveAllControlPoints()
        self.boxes, self.undoStack, self.propagated = {}, [], False
        self.discardPreview()

    def alignViews(self):
        sourceNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        layoutManager = slicer.app.layoutManager()
        if sourceNode is None or layoutManager is None:
            return
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            # vtkMRMLSliceNode::RotateToVolumePlane (closest volume axis), then put the plane on
            # voxel centres: vtkMRMLSliceLogic::SnapSliceOffsetToIJK.
            sliceWidget.mrmlSliceNode().RotateToVolumePlane(sourceNode)
            sliceWidget.sliceLogic().SnapSliceOffsetToIJK()
        self.setStatus("Slice views aligned with the source volume.")

    # ---- view interaction -----------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget" or self.volume is None:
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            return self.onKey(callerInteractor.GetKeySym())
        if callerInteractor.GetShiftKey() or callerInteractor.GetAltKey():
            return False  # Shift moves the crosshair, Alt is the view's: leave them to Slicer
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()  # vtkMRMLApplicationLogic
        if interactionNode is not None and interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            return False  # the user is placing a markups point or ROI (a prompt too): let Slicer place it
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            confirmed = self.scriptedEffect.confirmCurrentSegmentVisible()
            if confirmed in (self.scriptedEffect.NotConfirmed, self.scriptedEffect.ConfirmedWithDialog):
                return True  # as Slicer's Draw effect: a dialog ate the matching release event
            self.drag = (viewWidget, xy, bool(callerInteractor.GetControlKey()))
            return True
        if self.drag is None or self.drag[0] is not viewWidget:
            return False
        moved = max(abs(xy[0] - self.drag[1][0]), abs(xy[1] - self.drag[1][1])) > DRAG_PIXELS
        if eventId == vtk.vtkCommand.MouseMoveEvent:
            self.showRubberBand(viewWidget, self.drag[1], xy if moved else None)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            _, start, negative = self.drag
            self.drag = None
            self.showRubberBand(viewWidget, start, None)
            if moved:
                self.addBox(viewWidget, start, xy)
            else:
                self.addPoint(viewWidget, xy, positive=not negative)
            return True
        return False

    def onKey(self, key):
        """Effect keys, chosen not to clash with the Segment Editor's own (digits, z, y, q, w, i, ...)."""
        actions = {"p": self.onPropagate, "BackSpace": self.undoLastPrompt,
                   "Return": self.onApply, "KP_Enter": self.onApply}
        if key not in actions:
            return False
        actions[key]()
        return True

    def showRubberBand(self, viewWidget, start, end):
        """Draw (end given) or hide the box being dragged, in view pixels."""
        if viewWidget not in self.rubberBands:
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(4)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5, [0, 1, 2, 3, 0])
            polyData = vtk.vtkPolyData()
            polyData.SetPoints(points)
            polyData.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.8, 0.0)
            self.scriptedEffect.addActor2D(viewWidget, actor)
            self.rubberBands[viewWidget] = (actor, polyData)
        actor, polyData = self.rubberBands[viewWidget]
        actor.SetVisibility(end is not None)
        if end is not None:
            for n, (x, y) in enumerate([start, (end[0], start[1]), end, (start[0], end[1])]):
                polyData.GetPoints().SetPoint(n, x, y, 0.0)
            polyData.GetPoints().Modified()
        self.scriptedEffect.scheduleRender(viewWidget)

    # ---- running --------------------------------------------------------------------------------
    def span(self):
        from ultrasam.session import Span

        limited = self.rangeCheck.checked
        return Span(self.directionCombo.currentText,
                    self.firstSpin.value if limited else None, self.lastSpin.value if limited else None)

    def runPrompts(self, propagate=None):
        """Start (or queue, replacing a queued one) a run of the session on the current prompts."""
        if self.session is None or self.worker is None:
            return
        if self.sessionFactory is None and self.modelSettings() != self.sessionSettings:
            self.buildSession()  # another model was chosen meanwhile: load it, then run these prompts
            return
        from ultrasam.propagation import StopRules

        try:
            prompts = self.collectPrompts()
        except mrml_bridge.BridgeError as error:
            self.setStatus(str(error))
            return
        if prompts.is_empty():
            self.discardPreview()
            return
        propagate = self.propagated if propagate is None else propagate
        session, axis, span = self.session, self.axis, self.span()
        rules = StopRules(min_iou=self.minIouSpin.value)

        def run(job):
            session.set_rules(rules)
            session.set_axis(axis)
            return session.run(prompts, propagate, span, job.cancel.is_set,
                               lambda done, total: setattr(job, "progress", (done, total)))

        self.worker.request(Job("propagate" if propagate else "preview", run))
        self.updateButtons()

    def onPropagate(self):
        if self.session is None:
            self.setStatus("The model is not ready yet.")
            return
        self.runPrompts(propagate=True)

    def onCancel(self):
        if self.worker is not None:
            self.worker.cancel()

    def onPoll(self):
        """Main thread: progress of the running job; results and errors of a finished one."""
        if self.worker is None:
            return
        running = self.worker.running
        if running is not None and running.name == "propagate":
            done, total = running.progress
            self.progressBar.maximum, self.progressBar.value = max(total, 1), done
        finished = self.worker.poll()
        if finished is None:
            return
        job, result, error = finished
        if error is not None:
            self.reportError(job, error)
        elif job.name == "load":
            self.session = result
            description = shared_manager().description
            self.setStatus(f"Ready: {description}." if description else "Ready.")
            self.runPrompts()
        elif job.name == "embed":
            if result is not None:  # the axis whose slices are now all embedded
                self.embeddedAxes.add(result)
        else:
            self.showResult(result)
        self.embedInBackground()
        self.updateButtons()

    def embedInBackground(self):
        """On a GPU, embed the remaining slices while the user is idle; any prompt interrupts it."""
        cache = getattr(self.session, "cache", None)
        if cache is None or cache.predictor.device.type != "cuda" or self.worker.busy or self.axis in self.embeddedAxes:
            return
        session, axis = self.session, self.axis

        def embed(job):
            session.set_axis(axis)
            done = session.embed_all(job.cancel.is_set, lambda done, total: setattr(job, "progress", (done, total)))
            return axis if done else None

        self.worker.request(Job("embed", embed, background=True))

    def reportError(self, job, error):
        from ultrasam.propagation import PropagationCancelled

        if isinstance(error, PropagationCancelled):
            self.setStatus("Cancelled: the previous result is kept.")
        elif isinstance(error, USER_ERRORS + (mrml_bridge.BridgeError,)):
            self.setStatus(str(error))
        else:
            logging.error(f"UltraSam {job.name} failed", exc_info=error)
            self.setStatus(f"UltraSam {job.name} failed: {error} (details in the Python console)")

    def showResult(self, result):
        """Show a session result in the preview segmentation (created on first use)."""
        self.result = result
        self.propagated = result.propagated
        previewNode = self.previewNode(create=True)
        mrml_bridge.write_mask_to_segment(result.mask, self.volume, previewNode, PREVIEW_SEGMENT)
        self.setStatus(result.summary())

    def previewNode(self, create=False):
        node = self.scriptedEffect.nodeReference(PREVIEW_ROLE)
        if node is not None or not create:
            return node
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                  f"{segmentationNode.GetName()} UltraSam preview")
        node.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
        color = segmentationNode.GetSegmentation().GetSegment(segmentId).GetColor() if segmentId else (1.0, 0.8, 0.0)
        node.GetSegmentation().AddEmptySegment(PREVIEW_SEGMENT, "UltraSam preview", color)
        node.GetDisplayNode().SetOpacity(0.6)
        self.scriptedEffect.setNodeReference(PREVIEW_ROLE, node)
        return node

    def discardPreview(self):
        self.result = None
        node = self.previewNode()
        if node is not None:
            self.scriptedEffect.setNodeReference(PREVIEW_ROLE, None)
            slicer.mrmlScene.RemoveNode(node)
        self.updateButtons()

    def onApply(self):
        """Preview -> selected segment, as one undo step, honouring masking and overwrite settings."""
        if self.result is None or self.volume is None:
            return
        if self.worker is not None and self.worker.busy:
            self.setStatus("Wait for the running computation to finish, or cancel it, before applying.")
            return
        modes = slicer.qSlicerSegmentEditorAbstractEffect
        mode = (modes.ModificationModeAdd, modes.ModificationModeSet)[self.applyModeCombo.currentIndex]
        modifier = self.scriptedEffect.defaultModifierLabelmap()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        painted = mrml_bridge.paint_labelmap(modifier, self.result.mask,
                                             mrml_bridge.ijk_to_node_frame(self.volume, segmentationNode))
        if painted is None:
            self.setStatus("The preview is empty: nothing to apply.")
            return
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode)
        self.clearPrompts()
        self.setStatus("Applied. Undo with Ctrl+Z; click to segment the next object.")

    def updateButtons(self):
        if not hasattr(self, "applyButton"):
            return  # options frame not built yet
        busy = self.worker is not None and self.worker.busy
        self.applyButton.enabled = self.result is not None and not busy
        self.discardButton.enabled = self.result is not None
        self.propagateButton.enabled = self.session is not None and not busy
        self.cancelButton.enabled = busy
        self.progressBar.visible = busy and self.worker.running.name == "propagate"

    def setStatus(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text
        slicer.util.showStatusMessage(f"UltraSam: {text}", 5000)
