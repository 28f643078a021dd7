"""UltraSam Training module: fine-tune UltraSam on a folder of US-43d-style data or on this scene's
segmentations, on this machine's GPUs or on a SLURM cluster, and watch it live.

The module only configures, launches and watches: training runs as a separate process (or a
SLURM job) through :mod:`ultrasam_training.launch`, and a QTimer reads its ``metrics.jsonl`` and
log, so the GUI never blocks. Closing Slicer does not stop a job; reopening the run folder shows
it again. Docs: docs/TRAINING.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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

POLL_MS = 2000
LOG_LINES = 200
SETTINGS_PREFIX = "UltraSamTraining/"


class UltraSamTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UltraSam Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["UltraSamSlicer developers"]
        self.parent.helpText = (
            "Fine-tune UltraSam with its published recipe on your data (a US-43d-style folder, or this "
            "scene's segmentations), locally or on SLURM; then use the result in the UltraSam effect."
        )
        self.parent.acknowledgementText = "UltraSam: Meyer et al., arXiv 2411.16222. Segment Anything: Kirillov et al."


class UltraSamTrainingLogic(ScriptedLoadableModuleLogic):
    """Data statistics, scene export, config, launch and "use this model"; no widgets."""

    @staticmethod
    def dataStatistics(sources: list[str]) -> str:
        """Images, objects and skipped annotations per data set, from the COCO files alone (fast)."""
        from collections import Counter

        from ultrasam_data.coco import CocoDataset

        dataset = CocoDataset(sources)
        images = Counter(record.dataset for record in dataset.records)
        objects = Counter()
        for record in dataset.records:
            objects[record.dataset] += len(record.rles)
        lines = [f"{name}: {images[name]} images, {objects[name]} objects" for name in sorted(images)]
        lines.append(f"Total: {len(dataset)} images, {sum(objects.values())} objects")
        skipped = Counter(problem.kind for problem in dataset.problems)
        lines += [f"Skipped ({kind}): {count}" for kind, count in sorted(skipped.items())]
        return "\n".join(lines)

    @staticmethod
    def exportSceneSegmentations(root: str, axes: tuple[str, ...] = ("k",)) -> Path:
        """Write every segmentation of the scene, on its reference volume, as one US-43d data set."""
        from UltraSamSlicerLib.mrml_bridge import volume_from_node

        from ultrasam_data.slicer_export import SegmentedVolume, export_segmentations

        items = []
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            volume = node.GetNodeReference(role)
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
                logging.warning(f"{node.GetName()}: no source volume; skipped (set one in the Segment Editor)")
                continue
            segmentation = node.GetSegmentation()
            segments = {
                segmentation.GetSegment(segment_id).GetName():
                    slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
                for segment_id in segmentation.GetSegmentIDs()
            }
            if segments:
                items.append(SegmentedVolume(volume_from_node(volume), segments, name=volume.GetName()))
        if not items:
            raise ValueError("the scene has no segmentation with a source volume and segments; segment a volume first")
        return export_segmentations(items, root, axes=axes, overwrite=True)

    @staticmethod
    def writeConfig(runDir: Path, sources: list[str], checkpoint: str, steps: int, batchSize: int,
                    frozenEncoder: bool = False, trainLastStage: bool = False) -> Path:
        """``<runDir>/config.json``: UltraSam's recipe with these data, start weights, length and batch;
        ``frozenEncoder`` trains only the prompt encoder and mask decoder on cached embeddings, and
        with ``trainLastStage`` a TinyViT encoder's last stage as well."""
        from ultrasam_training.config import from_dict, save_config

        config = from_dict({
            "output_dir": str(runDir),
            "data": {"train": sources},
            "model": {"init": "checkpoint", "checkpoint": checkpoint, "frozen_encoder": frozenEncoder,
                      "train_last_stage": trainLastStage},
            "run": {"steps": steps, "batch_size": batchSize,
                    "checkpoint_every": max(1, min(1000, steps // 10)), "val_every": max(1, min(1000, steps // 10))},
        })
        path = runDir / "config.json"
        save_config(config, path)
        return path

    @staticmethod
    def start(runDir: Path, gpus: int, slurm=None) -> str:
        """Start (or resume) the run folder's config locally or on SLURM; returns a short description."""
        from ultrasam_training import launch

        config = runDir / "config.json"
        if slurm is not None:
            return f"SLURM job {launch.submit_slurm(config, runDir, slurm)}"
        return f"process {launch.start_local(config, runDir, processes=gpus, env=UltraSamTrainingLogic.childEnv()).pid}"

    @staticmethod
    def childEnv() -> dict[str, str]:
        """PYTHONPATH for the trainer process: Slicer puts module folders on its own path only."""
        import ultrasam
        import ultrasam_training

        folders = [str(Path(ultrasam.__file__).resolve().parents[1]),
                   str(Path(next(iter(ultrasam_training.__path__))).resolve().parent),
                   os.environ.get("PYTHONPATH", "")]
        return {"PYTHONPATH": os.pathsep.join(folder for folder in folders if folder)}

    @staticmethod
    def localGpuCount() -> int:
        try:
            import torch
        except ImportError:
            return 0
        return torch.cuda.device_count()

    @staticmethod
    def useModel(path: str) -> None:
        """Make ``path`` the UltraSam effect's model (the UltraSam module's checkpoint setting)."""
        from UltraSamSlicerLib import model_settings

        model_settings.save(dataclasses.replace(model_settings.read(), checkpoint=path))

    @staticmethod
    def currentModel() -> str:
        """The checkpoint the UltraSam module uses now (a path, or its name for the official weights)."""
        from UltraSamSlicerLib import model_settings

        try:
            return str(model_settings.read().checkpoint_path())
        except FileNotFoundError:
            return ""


class UltraSamTrainingWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = UltraSamTrainingLogic()
        self.runDir: Path | None = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.refresh)
        self.chart = None
        self.sceneObservation = slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._setupData()
        self._setupRun()
        self._setupMonitor()
        self.layout.addStretch(1)

    def _setupData(self):
        box = ctk.ctkCollapsibleButton()
        box.text = "Data"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.dataPath = ctk.ctkPathLineEdit()
        self.dataPath.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Files
        self.dataPath.toolTip = "A US-43d-style folder (<dataset>/annotations/*__coco.json) or one COCO file"
        form.addRow("Data folder or COCO file:", self.dataPath)
        exportButton = qt.QPushButton("Export this scene's segmentations into the data folder")
        exportButton.connect("clicked()", self.onExportScene)
        form.addRow(exportButton)
        statsButton = qt.QPushButton("Show data statistics")
        statsButton.connect("clicked()", self.onStatistics)
        form.addRow(statsButton)
        self.statsText = qt.QPlainTextEdit()
        self.statsText.readOnly = True
        self.statsText.setMaximumHeight(120)
        form.addRow(self.statsText)

    def _setupRun(self):
        box = ctk.ctkCollapsibleButton()
        box.text = "Training run"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.runPath = ctk.ctkPathLineEdit()
        self.runPath.filters = ctk.ctkPathLineEdit.Dirs
        self.runPath.toolTip = "Folder of this run: config, checkpoints, metrics, log. An existing run can be resumed."
        form.addRow("Run folder:", self.runPath)
        self.weightsPath = ctk.ctkPathLineEdit()
        self.weightsPath.toolTip = "Start weights: UltraSam, SAM ViT-B, MedSAM or one of our checkpoints"
        self.weightsPath.currentPath = self.logic.currentModel()
        form.addRow("Start from:", self.weightsPath)
        self.frozenCheck = qt.QCheckBox("Fine-tune on this scene's segments (frozen image encoder)")
        self.frozenCheck.toolTip = ("Embed each image once, then train only the prompt encoder and mask decoder: "
                                    "minutes on a CPU for a thousand images. Off: full fine-tuning (needs a GPU)")
        form.addRow(self.frozenCheck)
        self.lastStageCheck = qt.QCheckBox("Also train the image encoder's last stage")
        self.lastStageCheck.toolTip = ("LiteMedSAM-based models (compact-v2, compact-v3): the last encoder stage learns "
                                       "too, on cached inputs; about 3 times slower per step than the decoder alone")
        self.lastStageCheck.enabled = False
        self.frozenCheck.connect("toggled(bool)", self.lastStageCheck.setEnabled)
        form.addRow(self.lastStageCheck)
        self.stepsSpin = qt.QSpinBox()
        self.stepsSpin.setRange(10, 1000000)
        self.stepsSpin.value = 3000
        form.addRow("Steps:", self.stepsSpin)
        self.batchSpin = qt.QSpinBox()
        self.batchSpin.setRange(1, 64)
        self.batchSpin.value = 8
        form.addRow("Images per GPU:", self.batchSpin)
        self.whereCombo = qt.QComboBox()
        self.whereCombo.addItems(["This machine", "SLURM cluster"])
        form.addRow("Run on:", self.whereCombo)
        self.gpuSpin = qt.QSpinBox()
        self.gpuSpin.setRange(1, max(1, self.logic.localGpuCount()))
        form.addRow("Local GPUs:", self.gpuSpin)
        self.partitionEdit = qt.QLineEdit()
        form.addRow("SLURM partition:", self.partitionEdit)
        self.nodesSpin = qt.QSpinBox()
        self.nodesSpin.setRange(1, 64)
        form.addRow("SLURM nodes:", self.nodesSpin)
        self.slurmGpuSpin = qt.QSpinBox()
        self.slurmGpuSpin.setRange(1, 16)
        self.slurmGpuSpin.value = 4
        form.addRow("GPUs per node:", self.slurmGpuSpin)
        self.timeEdit = qt.QLineEdit("24:00:00")
        form.addRow("Time limit:", self.timeEdit)
        buttons = qt.QHBoxLayout()
        for text, slot in (("Start", self.onStart), ("Resume", self.onResume), ("Stop", self.onStop),
                           ("Use this model", self.onUseModel)):
            button = qt.QPushButton(text)
            button.connect("clicked()", slot)
            buttons.addWidget(button)
        form.addRow(buttons)

    def _setupMonitor(self):
        box = ctk.ctkCollapsibleButton()
        box.text = "Progress"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)
        self.progressBar = qt.QProgressBar()
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("No run.")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.logText = qt.QPlainTextEdit()
        self.logText.readOnly = True
        form.addRow(self.logText)

    # --- actions ---------------------------------------------------------------------------

    def _sources(self) -> list[str]:
        if not self.dataPath.currentPath:
            raise ValueError("choose a data folder or COCO file first")
        return [self.dataPath.currentPath]

    def _runFolder(self) -> Path:
        if not self.runPath.currentPath:
            raise ValueError("choose a run folder first")
        return Path(self.runPath.currentPath)

    def onExportScene(self):
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            if not self.dataPath.currentPath:
                raise ValueError("choose the data folder to export into first")
            folder = self.logic.exportSceneSegmentations(self.dataPath.currentPath)
            self.statsText.setPlainText(f"Exported to {folder}\n" + self.logic.dataStatistics([str(folder)]))

    def onStatistics(self):
        with slicer.util.tryWithErrorDisplay("Could not read the data.", waitCursor=True):
            self.statsText.setPlainText(self.logic.dataStatistics(self._sources()))

    def _slurmOptions(self):
        if self.whereCombo.currentIndex == 0:
            return None
        from ultrasam_training.launch import SlurmOptions

        if not self.partitionEdit.text:
            raise ValueError("enter the SLURM partition")
        return SlurmOptions(self.partitionEdit.text, self.nodesSpin.value, self.slurmGpuSpin.value,
                            time=self.timeEdit.text)

    def onStart(self):
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            runDir = self._runFolder()
            if (runDir / "resume.pt").exists():
                raise ValueError(f"{runDir} already holds a run: press Resume, or choose an empty folder")
            if not self.weightsPath.currentPath:
                raise ValueError("choose the start weights (download UltraSam in the UltraSam module)")
            self.logic.writeConfig(runDir, self._sources(), self.weightsPath.currentPath,
                                   self.stepsSpin.value, self.batchSpin.value, self.frozenCheck.checked,
                                   self.frozenCheck.checked and self.lastStageCheck.checked)
            self._launch(runDir)

    def onResume(self):
        with slicer.util.tryWithErrorDisplay("Could not resume training.", waitCursor=True):
            runDir = self._runFolder()
            if not (runDir / "config.json").is_file():
                raise ValueError(f"{runDir} has no config.json: it is not a training run folder")
            self._launch(runDir)

    def _launch(self, runDir: Path):
        gpus = self.gpuSpin.value if self.logic.localGpuCount() else 1
        self.statusLabel.text = f"Started {self.logic.start(runDir, gpus, self._slurmOptions())}."
        self.runDir = runDir
        self.timer.start()

    def onStop(self):
        from ultrasam_training import launch

        with slicer.util.tryWithErrorDisplay("Could not stop training.", waitCursor=True):
            launch.stop(self.runDir or self._runFolder())
            self.refresh()

    def onUseModel(self):
        from ultrasam_training.launch import read_progress

        with slicer.util.tryWithErrorDisplay("No model to use yet.", waitCursor=True):
            runDir = self.runDir or self._runFolder()
            candidates = [read_progress(runDir).model, runDir / "best.pth", runDir / "model.pth"]
            path = next((str(p) for p in candidates if p and Path(p).is_file()), None)
            if path is None:
                raise ValueError(f"{runDir} has no model yet: wait for the first validation or the end of the run")
            self.logic.useModel(path)
            self.statusLabel.text = f"The UltraSam effect now uses {path}."

    # --- monitoring --------------------------------------------------------------------------

    def refresh(self):
        """Poll the run's metrics and log; update the progress bar, status, plot and log view."""
        from ultrasam_training import launch

        if self.runDir is None:
            return
        progress = launch.read_progress(self.runDir)
        running = launch.is_running(self.runDir)
        self.progressBar.value = int(100 * progress.fraction)
        parts = [f"{progress.state}, step {progress.step}/{progress.steps}"]
        if progress.loss:
            parts.append(f"loss {progress.loss[-1][1]:.4f}")
        if progress.val_dice is not None:
            parts.append(f"val Dice {progress.val_dice:.3f} (best {progress.best_dice:.3f})")
        if progress.images_per_s:
            parts.append(f"{progress.images_per_s:.1f} images/s")
        if progress.eta_s:
            parts.append(f"about {progress.eta_s / 60:.0f} min left")
        if progress.skipped:
            parts.append(progress.skipped)
        if progress.message:
            parts.append(progress.message)
        if not running and progress.state == "running":
            parts.append("process ended: press Resume to continue")
        self.statusLabel.text = ", ".join(parts)
        self._showLog()
        self._plot(progress)
        if not running:
            self.timer.stop()

    def _showLog(self):
        logs = sorted(self.runDir.glob("slurm-*.out")) or [self.runDir / "train.log"]
        if logs[-1].is_file():
            lines = logs[-1].read_text(errors="replace").splitlines()[-LOG_LINES:]
            self.logText.setPlainText("\n".join(lines))
            self.logText.verticalScrollBar().value = self.logText.verticalScrollBar().maximum

    def _plot(self, progress):
        """Loss and validation Dice against step in a Slicer plot view (nodes reused across polls,
        made again when File > Close Scene removed them)."""
        import numpy as np

        if not progress.loss:
            return
        if self.chart is None or not slicer.mrmlScene.IsNodePresent(self.chart):
            self.chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "UltraSam training")
            self.chart.SetXAxisTitle("step")
            self.tables = {}
            for name, color in (("loss", (0.9, 0.3, 0.1)), ("val Dice", (0.1, 0.5, 0.9))):
                table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"UltraSam {name}")
                series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("step")
                series.SetYColumnName(name)
                series.SetPlotType(series.PlotTypeScatter)
                series.SetColor(*color)
                self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
                self.tables[name] = table
            slicer.modules.plots.logic().ShowChartInLayout(self.chart)
        for name, points in (("loss", progress.loss), ("val Dice", progress.dice)):
            if points:
                steps, values = np.asarray(points, dtype=float).T
                slicer.util.updateTableFromArray(self.tables[name], [steps, values], columnNames=["step", name])

    def onSceneEndClose(self, caller, event):
        """File > Close Scene removed the plot's nodes: draw it again, also for a finished run."""
        self.refresh()

    def cleanup(self):
        self.timer.stop()
        slicer.mrmlScene.RemoveObserver(self.sceneObservation)


class UltraSamTrainingTest(ScriptedLoadableModuleTest):
    """Slicer self-test: the monitor reads a finished run's metrics into the plot (no torch needed)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_monitor_plots_a_finished_run()

    def test_monitor_plots_a_finished_run(self):
        import json
        import tempfile

        folder = Path(tempfile.mkdtemp())
        records = [{"kind": "skipped", "step": 0, "time": 0.0, "count": 1, "kinds": {"missing file": 1},
                    "items": [{"kind": "missing file", "where": "data image a.png", "detail": "a.png does not exist"}]},
                   {"kind": "start", "step": 0, "time": 0.0, "steps": 4},
                   *[{"kind": "train", "step": s, "time": float(s), "total": 1.0 / s} for s in range(1, 5)],
                   {"kind": "val", "step": 4, "time": 5.0, "dice": 0.5},
                   {"kind": "done", "step": 4, "time": 6.0, "model": str(folder / "model.pth")}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        widget = slicer.modules.ultrasamtraining.widgetRepresentation().self()
        widget.runDir = folder
        widget.refresh()
        self.assertEqual(widget.progressBar.value, 100)
        self.assertEqual(widget.tables["loss"].GetTable().GetNumberOfRows(), 4)
        self.assertIn("1 data items skipped (missing file 1", widget.statusLabel.text)
        self.assertIn("val Dice 0.500", widget.statusLabel.text)
        self.delayDisplay("UltraSamTraining monitor test passed")
