"""The US-43d reader: RLE dicts and repr strings, polygons, the object cap, file discovery."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image
from pycocotools import mask as mask_utils

from ultrasam_data.coco import CocoDataset, annotation_files, image_group, to_rle


def write_coco(folder, images, annotations, name="toy__coco.json"):
    """images: list of (file name, uint8 array); annotations: list of (image index, segmentation)."""
    records = []
    for index, (file_name, pixels) in enumerate(images):
        Image.fromarray(pixels).save(folder / file_name)
        records.append({"id": index, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
    content = {"images": records, "categories": [{"id": 1, "name": "object"}],
               "annotations": [{"id": n + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": s}
                               for n, (i, s) in enumerate(annotations)]}
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def test_repr_string_rle_matches_the_published_dicts(tmp_path):
    sample = shared_path("us43d_sample")
    content = json.loads((sample / "sample_coco_MMOTU2D.json").read_text())
    for annotation in content["annotations"]:  # the Python-repr string form of the same RLE
        annotation["segmentation"] = repr(annotation["segmentation"])
    converted = tmp_path / "repr.json"
    converted.write_text(json.dumps(content))
    reference = json.loads((sample / "sample_coco_MMOTU2D.json").read_text())
    by_image = {a["image_id"]: a for a in reference["annotations"]}
    for source in (sample / "sample_coco_MMOTU2D.json", converted):
        dataset = CocoDataset(source, image_root=sample / "sample_images")
        assert len(dataset) == 10 and not dataset.problems
        for index in range(len(dataset)):
            item = dataset[index]
            annotation = by_image[item.image_id]
            rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
            assert np.array_equal(item.masks[0], mask_utils.decode(rle).astype(bool))
            assert item.image.shape == (*rle["size"], 3) and item.image.dtype == np.uint8
            x, y, w, h = annotation["bbox"]  # UltraSam's own bbox, from its converter
            assert np.allclose(item.boxes_xyxy[0], [x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5])
            assert item.dataset == "MMOTU_2d"


def test_literal_eval_never_runs_code():
    with pytest.raises(ValueError, match="bad segmentation"):
        to_rle("__import__('os').system('echo unsafe')", 10, 10)


def test_polygons_become_masks_and_out_of_bounds_polygons_are_dropped(tmp_path):
    image = np.zeros((40, 50), np.uint8)
    two_squares = [[5, 5, 15, 5, 15, 15, 5, 15], [30, 20, 40, 20, 40, 30, 30, 30]]
    outside = [[40, 30, 60, 30, 60, 39, 40, 39]]  # x up to 60 in a 50-wide image
    path = write_coco(tmp_path, [("a.png", image)], [(0, two_squares), (0, outside)])
    dataset = CocoDataset(path)
    mask = dataset[0].masks
    assert mask.shape == (1, 40, 50)
    assert mask[0, 10, 10] and mask[0, 25, 35] and not mask[0, 20, 20]  # both squares, nothing between
    assert abs(int(mask.sum()) - 200) <= 2 * (40 + 40)  # two 10x10 squares, up to one pixel rim each
    assert [p.kind for p in dataset.problems] == ["out of bounds"]


def square(row, col, size=4, shape=(64, 64)):
    mask = np.zeros(shape, bool)
    mask[row:row + size, col:col + size] = True
    return mask


def test_images_with_more_objects_than_the_cap_give_a_reproducible_subset(tmp_path):
    squares = [square(2 + 12 * (n // 5), 2 + 12 * (n % 5)) for n in range(25)]
    rles = []
    for mask in squares:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    path = write_coco(tmp_path, [("many.png", np.full((64, 64), 128, np.uint8))], [(0, r) for r in rles])
    dataset = CocoDataset(path, max_objects=20)
    item = dataset[0]
    assert item.masks.shape == (20, 64, 64)
    chosen = [next(n for n, s in enumerate(squares) if np.array_equal(s, m)) for m in item.masks]
    assert len(set(chosen)) == 20
    for n, box in zip(chosen, item.boxes_xyxy):
        row, col = 2 + 12 * (n // 5), 2 + 12 * (n % 5)
        assert np.allclose(box, [col - 0.5, row - 0.5, col + 3.5, row + 3.5])
    assert np.array_equal(dataset[0].masks, item.masks)  # same epoch, same draw
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        seen |= {next(n for n, s in enumerate(squares) if np.array_equal(s, m)) for m in dataset[0].masks}
    assert seen == set(range(25))
    assert CocoDataset(path, max_objects=30)[0].masks.shape == (25, 64, 64)


def test_folder_discovery_prefers_agnostic_files_and_groups_come_from_names(tmp_path):
    annotations = tmp_path / "DS" / "annotations"
    images = tmp_path / "DS" / "images"
    annotations.mkdir(parents=True)
    images.mkdir()
    for name in ("train.DS__coco.json", "train.agnostic.DS__coco.json", "val.DS__coco.json"):
        write_coco(images, [("DS__pat1__proc__00001.png", np.zeros((8, 8), np.uint8))],
                   [(0, [[1, 1, 6, 1, 6, 6]])], name=name)
        (images / name).rename(annotations / name)
    assert [p.name for p in annotation_files(tmp_path, "train")] == ["train.agnostic.DS__coco.json"]
    dataset = CocoDataset(tmp_path, split="val")
    assert len(dataset) == 1 and dataset.records[0].dataset == "DS"
    assert dataset[0].group == "pat1__proc"
    assert image_group({"file_name": "test.MMOTU_2d__00003.png"}) == "test.MMOTU_2d__00003"
    assert image_group({"file_name": "x.png", "group": "vol7"}) == "vol7"
