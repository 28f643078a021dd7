"""Training says what data it leaves out: refused by default, reported everywhere when allowed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REGRESSION_FIXTURES
from training_tiny import TINY_SAM
from ultrasam_training.cli import main
from ultrasam_training.launch import read_progress
from ultrasam_training.runlog import read_records

HC = REGRESSION_FIXTURES / "HC"


@pytest.fixture
def data(tmp_path):
    """The HC fixture (6 real images) and, beside it, a COCO file cut off mid-way."""
    folder = tmp_path / "HC"
    shutil.copytree(HC, folder)
    corrupt = folder / "annotations" / "BROKEN__coco.json"
    corrupt.write_text('{"images": [{"id": 1, ')
    return folder / "annotations" / "HC__coco.json", corrupt


def _config(tmp_path: Path, train: list[Path], **data) -> Path:
    values = {
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [str(p) for p in train], "val_fraction": 0, **data},
        "model": {"init": "scratch", "scratch": TINY_SAM},
        "run": {"steps": 1, "batch_size": 1, "checkpoint_every": 1, "val_every": 1, "log_every": 1,
                "num_workers": 0},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    return path


def test_a_corrupt_annotation_file_stops_training_by_default(tmp_path, data, capsys):
    good, corrupt = data
    assert main(["train", str(_config(tmp_path, [good, corrupt]))]) == 2
    error = capsys.readouterr().err
    assert "unreadable annotation file: 1" in error and str(corrupt) in error and "JSONDecodeError" in error
    assert "data.skip_bad_samples" in error
    records = read_records(tmp_path / "run" / "metrics.jsonl")  # what the Slicer module reads
    assert records[-1]["kind"] == "error" and "JSONDecodeError" in records[-1]["message"]
    assert read_progress(tmp_path / "run").state == "error"


def test_a_corrupt_annotation_file_alone_names_the_json_error(tmp_path, data, capsys):
    _, corrupt = data
    assert main(["train", str(_config(tmp_path, [corrupt], skip_bad_samples=True))]) == 2
    error = capsys.readouterr().err
    assert "JSONDecodeError" in error and str(corrupt) in error and "training set is empty" in error


def test_allowed_skips_are_on_screen_in_metrics_and_in_the_progress(tmp_path, data, capsys):
    good, corrupt = data
    (good.parent.parent / "images" / "HC__006__00006.png").unlink()  # one image file missing
    assert main(["train", str(_config(tmp_path, [good, corrupt], skip_bad_samples=True))]) == 0
    error = capsys.readouterr().err
    assert "2 training data item(s) left out" in error and "HC__006__00006.png" in error

    records = read_records(tmp_path / "run" / "metrics.jsonl")
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["kinds"] == {"missing file": 1, "unreadable annotation file": 1}
    assert {item["kind"] for item in skipped[0]["items"]} == {"missing file", "unreadable annotation file"}
    start = next(r for r in records if r["kind"] == "start")
    assert start["images"] == 5  # 6 images, one missing
    # The Slicer module's status line shows Progress.skipped (UltraSamTraining.py, refresh()).
    assert read_progress(tmp_path / "run").skipped.startswith("2 data items skipped (missing file 1, unreadable")


def _undecodable(folder: Path) -> Path:
    """One of the fixture's image files, still present but no longer a PNG (only training opens it)."""
    image = folder.parent.parent / "images" / "HC__007__00007.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 10)
    return image


def _three_steps(config: Path) -> Path:
    values = json.loads(config.read_text())
    values["run"].update(steps=6, checkpoint_every=6, val_every=6)  # each of the 6 images is met
    config.write_text(json.dumps(values))
    return config


def test_an_image_that_cannot_be_decoded_stops_training_by_default(tmp_path, data, capsys):
    good, _ = data
    image = _undecodable(good)
    assert main(["train", str(_three_steps(_config(tmp_path, [good])))]) == 2
    error = capsys.readouterr().err
    assert "unreadable image: 1" in error and image.name in error and "data.skip_bad_samples" in error
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["kind"] == "error" and image.name in records[-1]["message"]
    assert not (tmp_path / "run" / "model.pth").exists()


def test_an_allowed_undecodable_image_is_reported_once_in_metrics_and_the_progress(tmp_path, data, capsys):
    good, _ = data
    image = _undecodable(good)
    config = _three_steps(_config(tmp_path, [good], skip_bad_samples=True))
    values = json.loads(config.read_text())
    values["run"].update(steps=12, checkpoint_every=12, val_every=12)  # two epochs: met twice, said once
    config.write_text(json.dumps(values))
    assert main(["train", str(config)]) == 0
    assert image.name in capsys.readouterr().err

    records = read_records(tmp_path / "run" / "metrics.jsonl")
    skipped = [r for r in records if r["kind"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["step"] > 0 and skipped[0]["kinds"] == {"unreadable image": 1}
    assert image.name in skipped[0]["items"][0]["where"]
    assert read_progress(tmp_path / "run").skipped.startswith("1 data items skipped (unreadable image 1")
