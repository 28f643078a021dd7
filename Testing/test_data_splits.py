"""Splits: grouped ones never put a group on both sides; both kinds are per data set and seeded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ultrasam_training.coco import CocoDataset, ImageRecord
from ultrasam_training.splits import split_dataset


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
