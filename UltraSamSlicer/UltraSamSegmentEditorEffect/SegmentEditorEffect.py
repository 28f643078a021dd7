"""The UltraSam Segment Editor effect: prompts in slice views -> live preview -> propagate -> apply.

A thin Qt layer. Clicks, drags and markups become world-RAS prompts (:mod:`mrml_bridge`); the
model runs in ``ultrasam serve``, a separate process (:mod:`UltraSamSlicerLib.engine`), which turns
them into a (K, J, I) mask; the effect only makes short calls from the main thread: the volume
is sent a chunk per timer tick, a run is started, then a ``QTimer`` polls it and does all MRML work. If the server dies, the preview and the
segment stay as they were, and the next prompt starts it again. The result is shown in a separate
preview segmentation and reaches the edited segment only through
``modifySelectedSegmentByLabelmap``, after one ``saveStateForUndo``, so masking, overwrite rules and
the editor's undo/redo apply.

Slicer APIs used here (all in Slicer 5.8): ``AbstractScriptedSegmentEditorEffect`` and the
``qSlicerSegmentEditorAbstractEffect`` methods declared in qSlicerSegmentEditorAbstractEffect.h
(``sourceVolumeImageData``, ``defaultModifierLabelmap``, ``modifySelectedSegmentByLabelmap``,
``saveStateForUndo``, ``confirmCurrentSegmentVisible``, ``addActor2D``, ``scheduleRender``,
``setNodeReference``, ``setParameter``/``parameter``); ``vtkMRMLSliceNode.UpdateMatrices`` for
"Align views".
"""

from __future__ import annotations

import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

# Only absolute imports: Slicer loads this file as the module "UltraSamSegmentEditorEffect" (its
# folder's name), never as part of a package.
from ultrasam.client import VolumeUpload
from ultrasam.wire import prompts_to_json
from UltraSamSlicerLib import model_settings, mrml_bridge
from UltraSamSlicerLib.engine import ServerError, ServerGone, shared_engine
from UltraSamSlicerLib.models import missing_requirements

EFFECT_NAME = "UltraSam"
PREVIEW_ROLE = "UltraSamPreview"  # node reference of the preview segmentation in the editor node
PREVIEW_SEGMENT = "UltraSamPreview"
PROMPT_ROLE_ATTRIBUTE = "UltraSam.PromptRole"  # marks the effect's own click-prompt nodes
DRAG_PIXELS = 4  # a press-release that moves further is a box, not a click
POLL_MS = 50  # a click's preview is picked up by the next tick: no call waits for the model
DIRECTIONS = ("both", "forward", "backward")  # the "Direction" parameter (ultrasam.session.DIRECTIONS)
APPLY_MODES = ("add", "replace")  # the "ApplyMode" parameter, in the order of the Apply combo box
MARKUPS_KEYS = ("BackSpace", "Delete")  # Markups deletes the hovered point with these (vtkSlicerMarkupsWidget)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segment the selected segment with UltraSam from points, boxes and ROIs."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = EFFECT_NAME  # not translated: modules find effects by name
        scriptedEffect.title = "UltraSam"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        # Tests replace this to run without a server: volume -> an object with RemoteSession's calls.
        self.sessionFactory = None
        self.sessionSettings = None  # model settings the current session was opened with
        self.engine = None  # set while active
        self.session = None  # ultrasam.client.RemoteSession of the source volume
        self.wantSession = False  # open one as soon as the server is ready
        self.upload = None  # ultrasam.client.VolumeUpload of the source volume, while it is sent
        self.queuedRun = None  # a run asked for while another was going: its `propagate`
        self.volume = None
        self.axis = 0
        self.propagated = False
        self.result = None  # the preview's (K, J, I) uint8 mask
        self.boxes = {}  # (axis, slice index) -> two opposite corners of a box, world RAS
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
<li>Markups points and ROI handles can be dragged (press on them); <b>Backspace</b> or <b>Delete</b> over a
point deletes it. A points node selected below adds more positive points.</li>
<li><b>p</b>: propagate through the volume. <b>Backspace</b> elsewhere: remove the last click or box.
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
        self.directionCombo.addItems(list(DIRECTIONS))
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

        for widget, signal in ((self.directionCombo, "currentIndexChanged(int)"), (self.rangeCheck, "toggled(bool)"),
                               (self.firstSpin, "valueChanged(int)"), (self.lastSpin, "valueChanged(int)"),
                               (self.minIouSpin, "valueChanged(double)"),
                               (self.applyModeCombo, "currentIndexChanged(int)")):
            widget.connect(signal, self.updateMRMLFromGUI)
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

    def optionWidgets(self):
        return (self.directionCombo, self.rangeCheck, self.firstSpin, self.lastSpin, self.minIouSpin,
                self.applyModeCombo)

    def setMRMLDefaults(self):
        # Options live in the segment editor node (attributes "UltraSam.<name>"): they are saved with
        # the scene and survive switching effects.
        effect = self.scriptedEffect
        effect.setParameterDefault("Direction", DIRECTIONS[0])
        effect.setParameterDefault("LimitSlices", 0)
        effect.setParameterDefault("FirstSlice", 0)
        effect.setParameterDefault("LastSlice", 0)
        effect.setParameterDefault("MinIoU", 0.5)
        effect.setParameterDefault("ApplyMode", APPLY_MODES[0])

    def updateGUIFromMRML(self):
        if hasattr(self, "directionCombo"):
            effect = self.scriptedEffect
            blocked = [widget.blockSignals(True) for widget in self.optionWidgets()]
            self.directionCombo.currentIndex = DIRECTIONS.index(effect.parameter("Direction"))
            self.rangeCheck.checked = effect.integerParameter("LimitSlices") != 0
            self.firstSpin.value = effect.integerParameter("FirstSlice")
            self.lastSpin.value = effect.integerParameter("LastSlice")
            self.minIouSpin.value = effect.doubleParameter("MinIoU")
            self.applyModeCombo.currentIndex = APPLY_MODES.index(effect.parameter("ApplyMode"))
            for widget, wasBlocked in zip(self.optionWidgets(), blocked):
                widget.blockSignals(wasBlocked)
        self.updateButtons()

    def updateMRMLFromGUI(self, *unused):
        effect = self.scriptedEffect
        # One parameter-modified event at the end: each one calls updateGUIFromMRML, which would
        # otherwise put back the widgets not written yet.
        with slicer.util.NodeModify(effect.parameterSetNode()):
            effect.setParameter("Direction", DIRECTIONS[self.directionCombo.currentIndex])
            effect.setParameter("LimitSlices", int(self.rangeCheck.checked))
            effect.setParameter("FirstSlice", self.firstSpin.value)
            effect.setParameter("LastSlice", self.lastSpin.value)
            effect.setParameter("MinIoU", self.minIouSpin.value)
            effect.setParameter("ApplyMode", APPLY_MODES[self.applyModeCombo.currentIndex])

    def interactionNodeModified(self, interactionNode):
        # Stay active while the user places markups prompts: the C++ base class deactivates the
        # effect on any non-ViewTransform mode (qSlicerSegmentEditorAbstractEffect.cxx, 5.8).
        pass

    # ---- lifecycle -----------------------------------------------------------------------------
    def activate(self):
        self.engine = shared_engine()
        self.pollTimer.start()
        self.observePromptNodes()
        self.buildSession()

    def deactivate(self):
        self.stopWork()
        self.engine = None
        for viewWidget, (actor, _) in self.rubberBands.items():
            self.scriptedEffect.removeActor2D(viewWidget, actor)
        self.rubberBands = {}
        self.discardPreview()

    def cleanup(self):
        """The effect is destroyed (Slicer closes): nothing of it may keep running or observing."""
        self.stopWork()
        self.pollTimer.disconnect("timeout()", self.onPoll)
        self.runTimer.disconnect("timeout()", self.runPrompts)

    def stopWork(self):
        """Stop the timers and observing prompts; close the volume on the server (which cancels its
        run there, never waiting for it). The server itself belongs to the module: it stops at exit."""
        self.pollTimer.stop()
        self.runTimer.stop()
        self.closeSession()
        self.unobservePromptNodes()

    def sourceVolumeNodeChanged(self):
        if self.engine is not None:
            self.buildSession()

    def referenceGeometryChanged(self):
        if self.engine is not None:
            self.buildSession()

    def buildSession(self):
        """Read the source image (in the segmentation's grid); it is sent to the server when ready."""
        self.closeSession()
        self.result, self.propagated, self.volume = None, False, None
        self.discardPreview()
        image = self.scriptedEffect.sourceVolumeImageData()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if image is None or segmentationNode is None:
            self.setStatus("Select a segmentation and a source volume.")
            return
        missing = missing_requirements()
        if missing and self.sessionFactory is None and not model_settings.read().server_url:
            self.setStatus(f"Missing Python packages ({', '.join(missing)}): install them in the UltraSam module.")
            return
        try:
            self.volume = mrml_bridge.volume_from_oriented_image(
                image, segmentationNode.GetParentTransformNode(), segmentationNode.GetName())
        except mrml_bridge.BridgeError as error:
            self.setStatus(str(error))
            return
        self.wantSession = True
        self.openSession()

    def openSession(self):
        """Send the volume to the server once it is ready, one chunk a call (the timer calls again);
        prompts made meanwhile run once it is there."""
        try:
            if self.sessionFactory is not None:
                self.session = self.sessionFactory(self.volume)
            else:
                if self.upload is None:
                    settings = self.sessionSettings = model_settings.read()
                    client = self.engine.client(settings)
                    if client is None:
                        self.setStatus("Starting the UltraSam server...")
                        return
                    geometry = self.volume.geometry
                    self.upload = VolumeUpload(client, self.volume.voxels, geometry.origin_lps, geometry.spacing,
                                               geometry.direction_lps, self.volume.name)
                self.session = self.upload.step()
                if self.session is None:
                    self.setStatus(f"Uploading the volume to the UltraSam server: {100 * self.upload.progress:.0f} %"
                                   " (prompts run once it is there)")
                    return
        except ServerGone as error:
            self.wantSession, self.upload = False, None
            self.setStatus(f"{error}. Prompt again to retry.")
            return
        except (ServerError, FileNotFoundError) as error:
            self.wantSession, self.upload = False, None
            self.setStatus(str(error))
            return
        self.wantSession, self.upload = False, None
        description = self.engine.description if self.engine is not None else ""
        self.setStatus(f"Ready: {description}." if description else "Ready.")
        self.runPrompts()

    def closeSession(self):
        session, self.session, self.wantSession, self.queuedRun = self.session, None, False, None
        upload, self.upload = self.upload, None
        try:
            if session is not None:
                session.close()
            if upload is not None:
                upload.cancel()
        except ServerError:
            pass  # gone already, or expired: nothing left to free

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
        own = {node.GetID() for node in nodes}
        extra = [self.pointsSelector.currentNode(), self.roiSelector.currentNode()]
        return nodes + [node for node in extra if node is not None and node.GetID() not in own]

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
        """Everything placed, in world RAS, as :func:`ultrasam.wire.prompts_to_json` makes it."""
        import numpy as np

        points, labels, rois = [], [], []
        for node in self.promptNodes():
            if node.IsA("vtkMRMLMarkupsROINode"):
                if node.GetNumberOfControlPoints():
                    box = mrml_bridge.roi_box(node)
                    rois.append((box.center_ras, box.axes_ras, box.half_size))
            else:
                nodePoints, nodeLabels = mrml_bridge.markups_prompts(node)
                points.append(nodePoints)
                labels.append(nodeLabels)
        boxes = [box for (axis, _), box in self.boxes.items() if axis == self.axis]
        return prompts_to_json(np.concatenate(points or [np.zeros((0, 3))]),
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
        view = self.viewSlice(viewWidget)
        if view is None:
            return
        self.followView(view)
        key = (view.axis, view.index)
        self.boxes[key] = (self.xyToRas(xyStart, viewWidget), self.xyToRas(xyEnd, viewWidget))  # two corners
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
        """Turn every slice view to the nearest voxel plane of the grid clicks are checked against.

        That grid is the segmentation's (the source image the editor hands over is resampled to
        it), which may differ from the source volume's own: vtkMRMLSliceNode::RotateToVolumePlane
        would align to the latter.
        """
        layoutManager = slicer.app.layoutManager()
        if self.volume is None or layoutManager is None:
            return
        for name in layoutManager.sliceViewNames():
            sliceNode = layoutManager.sliceWidget(name).mrmlSliceNode()
            sliceToRas = mrml_bridge.matrix_to_numpy(sliceNode.GetSliceToRAS())
            aligned = mrml_bridge.aligned_slice_to_ras(sliceToRas, self.volume)
            sliceNode.GetSliceToRAS().DeepCopy(mrml_bridge.numpy_to_matrix(aligned))
            sliceNode.UpdateMatrices()
        self.setStatus("Slice views aligned with the segmentation's voxel grid.")

    # ---- view interaction -----------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        # True stops the event: the editor observes at priority 1.0 and aborts what the effect
        # handled, so the markups widgets (priority 0.0) would never see it (qMRMLSegmentEditorWidget.cxx).
        if viewWidget.className() != "qMRMLSliceWidget" or self.volume is None:
            return False
        if eventId == vtk.vtkCommand.KeyPressEvent:
            key = callerInteractor.GetKeySym()
            return not (key in MARKUPS_KEYS and self.markupsHovered()) and self.onKey(key)
        if callerInteractor.GetShiftKey() or callerInteractor.GetAltKey():
            return False  # Shift moves the crosshair, Alt is the view's: leave them to Slicer
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()  # vtkMRMLApplicationLogic
        if interactionNode is not None and interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            return False  # the user is placing a markups point or ROI (a prompt too): let Slicer place it
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if self.markupsHovered():
                return False  # Markups drags the point or handle under the mouse
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

    @staticmethod
    def markupsHovered() -> bool:
        """Whether the mouse is over a markups control point, line or handle (prompts included).

        The markups widget marks what the mouse hovers as its display node's active component, for
        the mouse's interaction context (vtkSlicerMarkupsWidget::ProcessMouseMove), and clears it
        when the mouse leaves; the effect lets mouse moves through, so this stays current.
        """
        none = slicer.vtkMRMLMarkupsDisplayNode.ComponentNone
        return any(node.GetActiveComponentType() != none
                   for node in slicer.util.getNodesByClass("vtkMRMLMarkupsDisplayNode"))

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
        """Where propagation may go: :class:`ultrasam.session.Span` fields, from the effect's parameters."""
        effect = self.scriptedEffect
        limited = effect.integerParameter("LimitSlices") != 0
        return {"direction": effect.parameter("Direction"),
                "first": effect.integerParameter("FirstSlice") if limited else None,
                "last": effect.integerParameter("LastSlice") if limited else None}

    def runPrompts(self, propagate=None):
        """Start a run of the current prompts on the server (queued while one is going)."""
        propagate = self.propagated if propagate is None else propagate
        if self.session is None:
            if self.volume is not None and self.engine is not None and not self.wantSession:
                self.wantSession = True  # e.g. the first prompt after the server died: start it again
                self.openSession()
            return
        if self.sessionFactory is None and model_settings.read() != self.sessionSettings:
            self.buildSession()  # another model was chosen meanwhile: load it, then run these prompts
            return
        if self.session.running:
            self.queuedRun = propagate or bool(self.queuedRun)
            return
        try:
            prompts = self.collectPrompts()
        except mrml_bridge.BridgeError as error:
            self.setStatus(str(error))
            return
        if not (prompts["points"] or prompts["boxes"] or prompts["rois"]):
            self.discardPreview()
            return
        rules = {"min_iou": self.scriptedEffect.doubleParameter("MinIoU")}
        self.call(lambda: self.session.start(prompts, propagate, self.axis, self.span(), rules))

    def call(self, request):
        """Make one short server call and act on the run state it returns; a lost server is reported."""
        try:
            self.onRunState(request())
        except ServerGone:
            lost = self.engine.lost() if self.engine is not None else "the UltraSam server does not answer"
            self.session, self.queuedRun = None, None
            self.setStatus(f"{lost}. The preview and the segment are unchanged; the next prompt starts the "
                           "server again.")
        except ServerError as error:
            self.setStatus(str(error))
        self.updateButtons()

    def onPropagate(self):
        if self.session is None:
            self.setStatus("The model is not ready yet.")
            return
        self.runPrompts(propagate=True)

    def onCancel(self):
        if self.session is not None and self.session.running:
            self.call(lambda: self.session.cancel() or self.session.poll())

    def onPoll(self):
        """Main thread, every POLL_MS: open the volume once the server is up; follow a running run."""
        if self.wantSession:
            self.openSession()
        elif self.session is not None and self.session.running:
            self.call(lambda: self.session.poll())

    def onRunState(self, state):
        if state.state == "running":
            done, total = state.progress
            self.progressBar.maximum, self.progressBar.value = max(total, 1), done
            return
        if state.state == "done":
            self.showResult(state)
        elif state.state == "cancelled":
            self.setStatus("Cancelled: the previous result is kept.")
        elif state.state == "failed":
            self.setStatus(state.error)
        if self.queuedRun is not None:
            propagate, self.queuedRun = self.queuedRun, None
            self.runPrompts(propagate)

    def showResult(self, state):
        """Show the session's latest mask in the preview segmentation (created on first use), and
        what the server's content checks ask the user to look at again (blank slices left empty,
        a key slice below the IoU threshold, a mask on the background outside the fan)."""
        self.result = self.session.mask
        self.propagated = state.propagated
        previewNode = self.previewNode(create=True)
        mrml_bridge.write_mask_to_segment(self.result, self.volume, previewNode, PREVIEW_SEGMENT)
        self.setStatus("\n".join([state.summary] + [f"Warning: {warning}" for warning in state.warnings]))

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
        if self.session is not None and self.session.running:
            self.setStatus("Wait for the running computation to finish, or cancel it, before applying.")
            return
        modes = slicer.qSlicerSegmentEditorAbstractEffect
        mode = (modes.ModificationModeAdd, modes.ModificationModeSet)[
            APPLY_MODES.index(self.scriptedEffect.parameter("ApplyMode"))]
        modifier = self.scriptedEffect.defaultModifierLabelmap()
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        painted = mrml_bridge.paint_labelmap(modifier, self.result,
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
        busy = self.session is not None and self.session.running
        self.applyButton.enabled = self.result is not None and not busy
        self.discardButton.enabled = self.result is not None
        self.propagateButton.enabled = self.session is not None and not busy
        self.cancelButton.enabled = busy
        self.progressBar.visible = busy and self.session.last.progress[1] > 1

    def setStatus(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text
        slicer.util.showStatusMessage(f"UltraSam: {text}", 5000)
