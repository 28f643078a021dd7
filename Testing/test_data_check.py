"""The data check reports each kind of bad input, skips it, and keeps every good sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import REGRESSION_FIXTURES
from ultrasam_data.check import check_dataset, main
from ultrasam_data.coco import CocoDataset, DataError

SQUARE = [[2, 2, 8, 2, 8, 8, 2, 8]]


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


@pytest.fixture
def broken(tmp_path):
    """One COCO file with two good images and one instance of every problem, plus an unreadable file."""
    for name, size in (("good1.png", 12), ("good2.png", 12), ("small.png", 10)):
        Image.fromarray(np.full((size, size), 100, np.uint8)).save(tmp_path / name)
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    images = [("good1.png", 12), ("good2.png", 12), ("absent.png", 12), ("garbage.png", 12), ("small.png", 12),
              ("nothing_usable.png", 12)]
    records = [{"id": n, "file_name": f, "height": s, "width": s} for n, (f, s) in enumerate(images)]
    records = [records[2]] + records[:2] + records[3:]  # a missing first image must not hide the folder
    records.append({"id": 6, "file_name": "no_size.png"})
    corrupt = {"size": [12, 12], "counts": mask_utils.frPyObjects({"counts": [150, 1], "size": [12, 12]}, 12, 12)
               ["counts"].decode()}
    segmentations = [(0, SQUARE), (0, repr(rle(np.eye(12, dtype=bool)))), (1, SQUARE), (2, SQUARE), (3, SQUARE),
                     (4, SQUARE), (1, corrupt), (5, rle(np.zeros((12, 12), bool))), (5, [[0, 0, 20, 0, 20, 5]]),
                     (5, "{'size': [12, 12], 'counts': "), (5, rle(np.ones((9, 9), bool))), (42, SQUARE)]
    annotations = [{"id": n, "image_id": i, "segmentation": s, "category_id": 1} for n, (i, s) in enumerate(segmentations)]
    (tmp_path / "data__coco.json").write_text(json.dumps({"images": records, "annotations": annotations}))
    (tmp_path / "truncated__coco.json").write_text('{"images": [')
    return tmp_path


def test_check_reports_each_problem_kind_and_keeps_the_good_images(broken):
    dataset = CocoDataset([broken / "data__coco.json", broken / "truncated__coco.json"])
    report = check_dataset(dataset, progress=False)
    assert report.counts() == {
        "missing file": 1, "unreadable image": 1, "size mismatch": 2, "bad segmentation": 2, "empty mask": 1,
        "out of bounds": 1, "unknown image": 1, "no objects": 1, "bad record": 1, "unreadable annotation file": 1}
    assert sorted(dataset.records[i].path.name for i in report.good) == ["good1.png"]
    assert report.objects == 2
    text = report.format()
    for kind in report.counts():
        assert f"Skipped, {kind}: " in text
    assert "absent.png" in text and "truncated__coco.json" in text


def test_training_on_the_checked_subset_never_meets_a_bad_sample(broken):
    dataset = CocoDataset(broken / "data__coco.json")
    with pytest.raises(DataError, match="missing file"):
        dataset[[r.path.name for r in dataset.records].index("absent.png")]
    clean = dataset.subset(check_dataset(dataset, progress=False).good)
    assert [clean[i].masks.shape[0] for i in range(len(clean))] == [2]


def test_check_command_prints_the_report(broken, capsys):
    assert main([str(broken / "data__coco.json")]) == 1  # usable images, but missing and unreadable ones too
    assert "Usable: 1 images, 2 objects (data: 1)." in capsys.readouterr().out
    assert main([str(broken / "nowhere.json")]) == 2
    clean = REGRESSION_FIXTURES / "HC" / "annotations" / "HC__coco.json"
    assert main([str(clean)]) == 0 and "No problems found." in capsys.readouterr().out
