"""The UltraSamTraining Slicer module's logic with slicer-core: a run config from the panel's
choices, and this scene's segmentations exported as training data (instances counted)."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

ROOT = Path(__file__).resolve().parents[1]
for folder in ("UltraSamSlicer", "UltraSamTraining"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))


@pytest.fixture
def module(qt_layer):
    sys.modules.pop("UltraSamTraining", None)
    yield importlib.import_module("UltraSamTraining")
    sys.modules.pop("UltraSamTraining", None)


def test_panel_choices_become_a_valid_recipe_config(module, tmp_path):
    from ultrasam_training.config import load_config

    path = module.UltraSamTrainingLogic.writeConfig(tmp_path / "run", ["/data/US43d"], "/w/UltraSam.pth", 500, 4)
    config = load_config(path)
    assert config.data.train == ["/data/US43d"] and config.model.checkpoint == "/w/UltraSam.pth"
    assert (config.run.steps, config.run.batch_size, config.run.checkpoint_every) == (500, 4, 50)
    assert config.optim.lr == 1e-4 and config.loss.focal_weight == 20.0  # the recipe's defaults
    assert not config.model.frozen_encoder  # full fine-tuning unless the box is ticked


def test_fine_tune_on_the_scene_freezes_the_encoder(module, tmp_path):
    from ultrasam_training.config import load_config

    path = module.UltraSamTrainingLogic.writeConfig(tmp_path / "run", ["/data/scene"], "litemedsam", 300, 8,
                                                    frozenEncoder=True)
    config = load_config(path)
    assert config.model.frozen_encoder and config.model.checkpoint == "litemedsam"
    assert not config.model.train_last_stage


def test_training_the_last_stage_needs_the_frozen_encoder_mode(module, tmp_path):
    from ultrasam_training.config import ConfigError, load_config

    logic = module.UltraSamTrainingLogic
    path = logic.writeConfig(tmp_path / "run", ["/data/scene"], "litemedsam", 300, 8, frozenEncoder=True,
                             trainLastStage=True)
    assert load_config(path).model.train_last_stage
    with pytest.raises(ConfigError, match="train_last_stage needs model.frozen_encoder"):
        logic.writeConfig(tmp_path / "other", ["/data/scene"], "litemedsam", 300, 8, trainLastStage=True)
    assert not (tmp_path / "other" / "config.json").exists()


def test_the_trainer_process_gets_both_libraries_on_its_path(module):
    """Slicer adds module folders to its own sys.path only; the child process gets them via PYTHONPATH."""
    import os

    folders = [Path(p) for p in module.UltraSamTrainingLogic.childEnv()["PYTHONPATH"].split(os.pathsep)]
    assert any((folder / "ultrasam" / "checkpoint.py").is_file() for folder in folders)
    assert any((folder / "ultrasam_data" / "coco.py").is_file() for folder in folders)
    assert any((folder / "ultrasam_training" / "trainer.py").is_file() for folder in folders)


def test_scene_segmentations_export_as_instances(module, tmp_path, monkeypatch):
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: logic),
        volumes=types.SimpleNamespace(logic=lambda: volumes)), raising=False)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient7")
    voxels = np.random.default_rng(0).integers(0, 255, (4, 20, 30)).astype(np.float32)  # (k, j, i)
    slicer.util.updateVolumeFromArray(volume, voxels)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = np.zeros((4, 20, 30), dtype=np.uint8)
    labels[1, 2:6, 3:9] = 1  # slice 1: two separate blobs
    labels[1, 10:15, 20:28] = 1
    labels[2, 4:9, 4:9] = 1  # slice 2: one blob
    segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion", "lesion")
    slicer.util.updateSegmentBinaryLabelmapFromArray(labels, segmentation, segment_id, volume)

    folder = module.UltraSamTrainingLogic.exportSceneSegmentations(str(tmp_path / "data"))
    coco = json.loads(next((folder / "annotations").glob("*__coco.json")).read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 3
    assert {image["group"] for image in coco["images"]} == {"patient7"}
    assert sorted(a["area"] for a in coco["annotations"]) == [24, 25, 40]
    stats = module.UltraSamTrainingLogic.dataStatistics([str(folder)])
    assert stats.splitlines()[-1] == "Total: 2 images, 3 objects"


def test_the_training_plot_comes_back_after_file_close_scene(module, monkeypatch, tmp_path):
    """A finished run's plot, drawn again when the scene is closed (no poll timer runs any more)."""
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    shown = []
    plots = types.SimpleNamespace(logic=lambda: types.SimpleNamespace(ShowChartInLayout=shown.append))
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(plots=plots), raising=False)
    records = [{"kind": "start", "step": 0, "time": 0.0, "steps": 3},
               *[{"kind": "train", "step": s, "time": float(s), "total": 1.0 / s} for s in range(1, 4)],
               {"kind": "val", "step": 3, "time": 4.0, "dice": 0.7}, {"kind": "done", "step": 3, "time": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    widget = module.UltraSamTrainingWidget.__new__(module.UltraSamTrainingWidget)  # the panel, minus Qt
    widget.runDir, widget.chart, widget.timer = tmp_path, None, types.SimpleNamespace(stop=lambda: None)
    widget.progressBar, widget.statusLabel = types.SimpleNamespace(value=0), types.SimpleNamespace(text="")
    widget.refresh()
    scene.Clear(0)  # File > Close Scene removes every node, the plot's included
    widget.onSceneEndClose(scene, scene.EndCloseEvent)
    charts = [scene.GetNthNodeByClass(n, "vtkMRMLPlotChartNode")
              for n in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode"))]
    assert len(charts) == 1 and shown[-1] is charts[0]
    assert charts[0].GetNumberOfPlotSeriesNodes() == 2
    rows = {name: table.GetTable().GetNumberOfRows() for name, table in widget.tables.items()}
    assert rows == {"loss": 3, "val Dice": 1} and all(scene.IsNodePresent(t) for t in widget.tables.values())
