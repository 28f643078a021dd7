"""Splits: grouped ones never put a group on both sides; both kinds are per data set and seeded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ultrasam_data.coco import CocoDataset, ImageRecord
from ultrasam_data.splits import split_dataset, write_split


def fake_dataset(groups_per_dataset: dict[str, list[int]]) -> CocoDataset:
    """Records only (no files): data set name -> images per group."""
    dataset = CocoDataset.__new__(CocoDataset)
    dataset.records = [
        ImageRecord(Path(f"{name}_{g}_{n}.png"), name, f"{name}-vol{g}", f"{g}-{n}", 8, 8, (), Path("x.json"))
        for name, sizes in groups_per_dataset.items() for g, size in enumerate(sizes) for n in range(size)]
    return dataset


SIZES = {"Segthy": [40, 35, 52, 28, 44, 39, 31, 47], "regPro": [20] * 12, "BUSBRA": [1, 2] * 60, "tiny": [9]}


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_never_leaks_a_group_and_keeps_each_data_set_on_both_sides(seed):
    dataset = fake_dataset(SIZES)
    split = split_dataset(dataset, val_fraction=0.1, seed=seed, by="group")
    assert sorted(split.train + split.val) == list(range(len(dataset)))
    train_groups = {dataset.records[i].group for i in split.train}
    val_groups = {dataset.records[i].group for i in split.val}
    assert not train_groups & val_groups
    for name, sizes in SIZES.items():
        val = sum(1 for i in split.val if dataset.records[i].dataset == name)
        if len(sizes) == 1:
            assert val == 0  # a single group cannot be split without leaking
        else:
            assert 0.1 * sum(sizes) <= val < sum(sizes) - min(sizes) + 1


def test_random_split_is_per_image_fractional_and_seeded():
    dataset = fake_dataset(SIZES)
    split = split_dataset(dataset, val_fraction=0.05, seed=3, by="image")
    for name, sizes in SIZES.items():
        val = sum(1 for i in split.val if dataset.records[i].dataset == name)
        assert val == math.ceil(0.05 * sum(sizes))
    assert split == split_dataset(dataset, val_fraction=0.05, seed=3, by="image")
    assert split != split_dataset(dataset, val_fraction=0.05, seed=4, by="image")


def test_adding_a_data_set_leaves_the_others_split_unchanged():
    small = fake_dataset({"Segthy": SIZES["Segthy"]})
    large = fake_dataset({"Segthy": SIZES["Segthy"], "regPro": SIZES["regPro"]})
    first = {small.records[i].image_id for i in split_dataset(small, 0.2, seed=1).val}
    second = {large.records[i].image_id for i in split_dataset(large, 0.2, seed=1).val
              if large.records[i].dataset == "Segthy"}
    assert first == second


def test_bad_split_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown split kind"):
        split_dataset(fake_dataset(SIZES), by="patient")
    with pytest.raises(ValueError, match="val_fraction"):
        split_dataset(fake_dataset(SIZES), val_fraction=1.0)


def _coco_file(path: Path, groups: list[str]) -> dict:
    """A main COCO file with one 8x8 image per entry of ``groups`` and one object each, except
    that the last image has no annotation (the reader drops it)."""
    from pycocotools import mask as mask_utils
    import numpy as np

    mask = np.zeros((8, 8), dtype=np.uint8, order="F")
    mask[2:5, 3:6] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    content = {
        "info": {"description": "kept"}, "categories": [{"id": 1, "name": "object"}],
        "images": [{"id": i, "file_name": f"D__{g}__{i}.png", "height": 8, "width": 8, "group": g}
                   for i, g in enumerate(groups)],
        "annotations": [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": rle, "iscrowd": 0,
                         "bbox": [3, 2, 3, 3], "area": 9} for i in range(len(groups) - 1)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return content


def test_write_split_writes_disjoint_grouped_files_beside_the_source(tmp_path):
    groups = [f"p{n // 3}" for n in range(30)]  # 10 patients of 3 images
    source = tmp_path / "D" / "annotations" / "D__coco.json"
    content = _coco_file(source, groups)
    train_file, val_file = write_split(source, val_fraction=0.2, seed=0)
    assert (train_file.name, val_file.name) == ("train.D__coco.json", "val.D__coco.json")
    train, val = (json.loads(p.read_text(encoding="utf-8")) for p in (train_file, val_file))
    assert train["info"] == val["info"] == content["info"]
    ids = {part: {image["id"] for image in data["images"]} for part, data in (("train", train), ("val", val))}
    assert ids["train"] | ids["val"] == set(range(29))  # image 29 has no object: in neither file
    assert not ids["train"] & ids["val"]
    assert len(ids["val"]) >= 0.2 * 29
    for data, part in ((train, "train"), (val, "val")):
        assert {a["image_id"] for a in data["annotations"]} == ids[part]
    val_groups = {groups[i] for i in ids["val"]}
    assert not val_groups & {groups[i] for i in ids["train"]}
    assert CocoDataset(tmp_path / "D", split="val").records[0].group in val_groups
    assert write_split(source, val_fraction=0.2, seed=0) and json.loads(val_file.read_text(encoding="utf-8")) == val


def test_write_split_refuses_a_split_file(tmp_path):
    source = tmp_path / "val.D__coco.json"
    _coco_file(source, ["a", "b"])
    with pytest.raises(ValueError, match="main data-set file"):
        write_split(source, 0.2)
