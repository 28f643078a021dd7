"""`ultrasam segment --propagate` and `ultrasam batch` on real volumes, through the command line."""

from __future__ import annotations

import csv
import json

import numpy as np
import SimpleITK as sitk

from test_3d_fakes import MRUS3D, RESECT_CASE3, micro_sam, needs_mrus3d
from ultrasam.checkpoint import save_checkpoint
from ultrasam.cli import main
from ultrasam.volume_io import read_volume


def test_segment_resect_with_one_point_and_propagation(tmp_path):
    checkpoint = str(save_checkpoint(tmp_path / "model.pth", micro_sam()))
    image = sitk.ReadImage(str(RESECT_CASE3))
    lps = image.TransformContinuousIndexToPhysicalPoint([120.0, 130.0, 140.2])
    ras = [-lps[0], -lps[1], lps[2]]
    out, report = tmp_path / "mask.seg.nrrd", tmp_path / "report.json"
    assert main(["segment", str(RESECT_CASE3), "-c", checkpoint, "--frame", "ras", "--point", *map(str, ras),
                 "--propagate", "--axis", "k", "-o", str(out), "--report", str(report), "--device", "cpu"]) == 0
    written = read_volume(out)
    assert written.geometry.is_close(read_volume(RESECT_CASE3).geometry, 1e-4)
    assert written.shape_kji == (288, 256, 256)
    walks = json.loads(report.read_text())["walks"]
    assert [(w["key"], w["direction"]) for w in walks] == [(140, -1), (140, 1)] and all(w["slices"] for w in walks)


@needs_mrus3d
def test_batch_command_segments_every_volume_of_a_json_file(tmp_path):
    checkpoint = str(save_checkpoint(tmp_path / "model.pth", micro_sam()))
    entries = [{"volume": f"images/{name}", "points": [[23, 31, 22]], "frame": "ijk", "output": str(tmp_path / name)}
               for name in ("obs000.nii.gz", "obs003.nii.gz")]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(entries))
    (tmp_path / "images").symlink_to(MRUS3D / "images")
    assert main(["batch", str(prompts), "--output-dir", str(tmp_path / "out"), "-c", checkpoint, "--axis", "i",
                 "--propagate", "--device", "cpu"]) == 0
    with (tmp_path / "out" / "summary.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for entry in entries:
        mask = read_volume(entry["output"])
        assert mask.geometry.is_close(read_volume(MRUS3D / entry["volume"]).geometry)
        assert json.loads(open(entry["output"] + ".report.json").read())["key_slices"] == [23]
        assert np.all(np.asarray(mask.voxels.shape) == (44, 63, 47))
