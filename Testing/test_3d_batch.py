"""segment_volume end to end with a (tiny, random) real model, and batch runs from prompts files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from test_3d_fakes import MRUS3D, RESECT_CASE3, micro_sam, needs_mrus3d
from ultrasam.batch import read_prompts_file, run_batch, segment_volume
from ultrasam.predictor import Predictor
from ultrasam.prompts3d import VolumePrompts
from ultrasam.propagation import PropagationCancelled
from ultrasam.volume_io import read_volume, write_mask


@pytest.fixture
def predictor():
    return Predictor(micro_sam(), device="cpu")


def test_one_point_with_propagation_on_resect_writes_a_mask_in_the_input_geometry(tmp_path, predictor):
    image = sitk.ReadImage(str(RESECT_CASE3))
    lps = image.TransformContinuousIndexToPhysicalPoint([120.0, 130.0, 140.2])
    volume = read_volume(RESECT_CASE3)
    seen = []
    mask, report = segment_volume(volume, predictor, VolumePrompts([lps], [1], frame="lps"), axis="k",
                                  on_slice=lambda result: seen.append(result.index))
    assert mask.shape == (288, 256, 256) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert report["key_slices"] == [140] and seen[:3] == [140, 139, 141]  # key, then one step each way
    rows = {row["index"]: row for row in report["slices"]}
    assert rows[140]["status"] == "key" and set(rows) == set(seen)
    assert report["segmented_slices"] == np.flatnonzero(mask.any(axis=(1, 2))).tolist()
    assert report["voxels"] == int(mask.sum())
    assert report["volume_ml"] == pytest.approx(mask.sum() * 0.4 ** 3 / 1000, rel=1e-3)
    written = sitk.ReadImage(str(write_mask(mask, volume.geometry, tmp_path / "mask.nii.gz")))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), mask)


def test_cancelled_segmentation_raises_and_empty_prompts_are_refused(predictor):
    from ultrasam.geometry import Volume

    volume = Volume(np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8), name="noise")
    with pytest.raises(PropagationCancelled):
        segment_volume(volume, predictor, VolumePrompts([[8, 8, 2]], [1], "ijk"), should_cancel=lambda: True)
    with pytest.raises(ValueError, match="no prompts"):
        segment_volume(volume, predictor, VolumePrompts())


def gland_centre_ras(name: str) -> list[float]:
    volume = read_volume(MRUS3D / "images" / name)
    gland = read_volume(MRUS3D / "labels" / name, frame=0).voxels > 0.5
    kji = np.argwhere(gland).mean(axis=0).round()
    return volume.geometry.ijk_to_ras(kji[::-1]).tolist()


@needs_mrus3d
@pytest.mark.parametrize("kind", ["json", "csv"])
def test_batch_over_a_prompts_file_writes_every_mask_and_a_summary(tmp_path, predictor, kind):
    names = ["obs000.nii.gz", "obs001.nii.gz"]
    entries = [{"volume": str(MRUS3D / "images" / n), "points": [gland_centre_ras(n)], "labels": [1]} for n in names]
    entries.append({"volume": str(tmp_path / "missing.nii.gz"), "points": [[0, 0, 0]], "labels": [1]})
    prompts = tmp_path / f"prompts.{kind}"
    if kind == "json":
        entries[1].update(axis="i", rois=[{"center": entries[1]["points"][0], "half_sizes": [6, 6, 6]}])
        prompts.write_text(json.dumps({"volumes": entries}))
    else:
        with prompts.open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["volume", "x", "y", "z", "label"])
            writer.writerows([e["volume"], *e["points"][0], 1] for e in entries)
    summary = run_batch(prompts, predictor, tmp_path / "out", progress=False)
    assert [row["status"] for row in summary] == ["ok", "ok", "failed"]
    assert "no such file" in summary[2]["error"]
    for name, row in zip(names, summary):
        source = sitk.ReadImage(str(MRUS3D / "images" / name))
        written = sitk.ReadImage(row["output"])
        assert row["output"].endswith(f"{name[:-7]}_mask.nii.gz") and written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection())
        report = json.loads(open(row["output"] + ".report.json").read())
        assert report["segmented_slices"] and len(report["segmented_slices"]) == row["segmented_slices"]
    with (tmp_path / "out" / "summary.csv").open() as stream:
        assert [r["status"] for r in csv.DictReader(stream)] == ["ok", "ok", "failed"]
    if kind == "json":
        assert json.loads(open(summary[1]["output"] + ".report.json").read())["axis"] == 2


def test_bad_prompts_files_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"points": [[1, 2, 3]]}]))
    with pytest.raises(ValueError, match="not a valid prompts file"):
        read_prompts_file(bad)
    labels = tmp_path / "labels.csv"
    labels.write_text("volume,x,y,z,label\na.nii,1,2,3,7\n")
    with pytest.raises(ValueError, match="labels must be 1"):
        read_prompts_file(labels)
    text = tmp_path / "prompts.txt"
    text.write_text("")
    with pytest.raises(ValueError, match=".json or .csv"):
        read_prompts_file(text)
