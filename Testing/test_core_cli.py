"""The ``ultrasam`` command end to end, and its answers to bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from ultrasam.checkpoint import save_checkpoint
from ultrasam.cli import main
from ultrasam.resources import SAMPLE_VOLUME
from ultrasam.volume_io import read_volume
from ultrasam_layout import mmengine_bookkeeping, save_ultrasam_checkpoint


@pytest.fixture
def checkpoint(tmp_path, tiny_sam):
    return str(save_checkpoint(tmp_path / "model.pth", tiny_sam))


def test_segment_2d_png(tmp_path, checkpoint):
    image = np.zeros((60, 80), np.uint8)
    image[20:40, 30:60] = 200
    Image.fromarray(image).save(tmp_path / "scan.png")
    out = tmp_path / "mask.png"
    assert main(["segment", str(tmp_path / "scan.png"), "-c", checkpoint, "--point", "45", "30",
                 "--box", "25", "15", "65", "45", "-o", str(out), "--device", "cpu"]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}


def test_ras_point_segments_the_hand_computed_slice(tmp_path, checkpoint):
    """A RAS click on the oblique RESECT volume lands on the slice SimpleITK computes for it, and the
    written mask has the input's geometry."""
    source = SAMPLE_VOLUME
    image = sitk.ReadImage(str(source))
    ijk = (100.0, 140.0, 77.0)
    lps = image.TransformContinuousIndexToPhysicalPoint(ijk)
    ras = (-lps[0], -lps[1], lps[2])
    out, report = tmp_path / "mask.nii.gz", tmp_path / "report.json"
    assert main(["segment", str(source), "-c", checkpoint, "--frame", "ras", "--point", *map(str, ras),
                 "--axis", "k", "-o", str(out), "--report", str(report), "--device", "cpu"]) == 0
    assert json.loads(report.read_text())["key_slices"] == [77]
    written = read_volume(out)
    assert written.geometry.is_close(read_volume(source).geometry, 1e-4)
    assert set(np.flatnonzero(written.voxels.any(axis=(1, 2)))) <= {77}


def test_info(tmp_path, tiny_sam, capsys):
    path = tmp_path / "UltraSam.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), path)
    assert main(["info", str(path)]) == 0
    output = capsys.readouterr().out
    meta = mmengine_bookkeeping()["meta"]
    assert "ultrasam checkpoint" in output and "postprocess: ultrasam" in output
    assert f"iter: {meta['iter']}" in output and f"mmengine_version: {meta['mmengine_version']}" in output


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "examples:" in capsys.readouterr().out


def _volume(tmp_path):
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (8, 30, 40), dtype=np.uint8)),
                    str(path))
    return str(path)


def _run_bad(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_explained_and_write_nothing(tmp_path, checkpoint, capsys):
    volume, out = _volume(tmp_path), tmp_path / "out.nii.gz"
    base = ["segment", volume, "-o", str(out), "--device", "cpu"]
    cases = [
        (base + ["-c", checkpoint, "--point", "500", "5", "3"], "lies outside the volume"),
        (base + ["-c", checkpoint], "no prompt given"),
        (base + ["-c", checkpoint, "--point", "5", "5"], "--point takes 3 numbers"),
        (base + ["-c", str(tmp_path / "none.pth"), "--point", "5", "5", "3"], "no such checkpoint"),
        (base + ["-c", volume, "--point", "5", "5", "3"], "not a PyTorch checkpoint"),
        (["segment", str(tmp_path / "missing.nii.gz"), "-o", str(out), "-c", checkpoint, "--point", "1", "1", "1"],
         "no such file"),
        (base + ["-c", checkpoint, "--point", "5", "5", "3", "--axis", "x"], "unknown slicing axis"),
    ]
    for argv, message in cases:
        assert message in _run_bad(capsys, argv), argv
    assert not out.exists()


def test_without_weights_the_shipped_model_runs_and_says_so(tmp_path, capsys, monkeypatch):
    import ultrasam.resources

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "o.nii.gz"
    assert main(["segment", _volume(tmp_path), "-o", str(out), "--point", "5", "5", "3", "--device", "cpu"]) == 0
    error = capsys.readouterr().err
    assert "compact model shipped with UltraSamSlicer" in error and "NOT UltraSam" in error
    assert "ultrasam download" in error and out.is_file()
    monkeypatch.setattr(ultrasam.resources, "SHIPPED_MODEL", tmp_path / "not-installed.pth")
    error = _run_bad(capsys, ["segment", _volume(tmp_path), "-o", str(tmp_path / "p.nii.gz"), "--point", "1", "1", "1"])
    assert "ultrasam download" in error and "--checkpoint" in error


