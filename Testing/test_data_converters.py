"""Converters: the COCO files they write load in pycocotools, with instances checked at the source."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_path
from data_reference import (components_8, ellipse_outline, inner_boundary, instance_count,
                            perimeter_numeric)
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ultrasam_data.converters import convert_layout, convert_volumes, pair_folders
from ultrasam_data.public_2d import convert_busbra, convert_hc18
from ultrasam_data.writer import CocoWriter


def load(root, dataset, subset=""):
    """pycocotools' view of a converted file, and image file name -> decoded (N, H, W) masks."""
    coco = COCO(str(root / dataset / "annotations" / f"{subset + '.' if subset else ''}{dataset}__coco.json"))
    masks = {}
    for image in coco.dataset["images"]:
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        masks[image["file_name"]] = np.stack([coco.annToMask(a).astype(bool) for a in annotations])
        assert Image.open(root / dataset / "images" / image["file_name"]).size == (image["width"], image["height"])
    return coco, masks


def test_regpro_layout_on_mrus3d_matches_connected_components_of_each_channel(tmp_path):
    source = tmp_path / "regpro"
    for case in ("obs000", "obs005"):
        for kind in ("images", "labels"):
            (source / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_path("mrus3d", kind, f"{case}.nii.gz"), source / kind)
    with CocoWriter(tmp_path / "out", "regPro") as writer:
        convert_layout("regpro", source, writer)
    coco, masks = load(tmp_path / "out", "regPro")
    by_slice = {(i["group"], i["index"]): i["file_name"] for i in coco.dataset["images"]}
    for case in ("obs000", "obs005"):
        channels = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labels" / f"{case}.nii.gz")))
        assert channels.ndim == 4 and channels.shape[1:] == (44, 63, 47)  # (C, K, J, I), channel 0 the gland
        for i in range(channels.shape[3]):
            sagittal = channels[:, :, :, i][:, ::-1, ::-1] > 0  # (C, K, J), turned 180 degrees as UltraSam
            expected = sum(instance_count(c) for c in sagittal)
            if expected == 0:
                assert (case, i) not in by_slice
                continue
            found = masks[by_slice[(case, i)]]
            assert len(found) == expected
            assert np.array_equal(found.any(axis=0), sagittal.any(axis=0))
            gland_instances = [m for m in found if (m & sagittal[0]).sum() == m.sum()]
            assert sum(m.sum() for m in gland_instances) >= sagittal[0].sum()


def test_generic_volume_on_chosen_axis_splits_each_label_into_components(tmp_path):
    labels = np.zeros((4, 5, 12), np.uint8)  # (K, J, I)
    labels[:, 1, 1:3] = 1
    labels[:, 1, 5:7] = 1  # label 1: two blobs on every j=1 slice
    labels[1:3, 3, 8:11] = 2  # label 2: one blob on j=3
    voxels = np.linspace(-1000.0, 3000.0, labels.size).reshape(labels.shape)  # float: needs windowing
    for folder, array in (("img", voxels), ("lab", labels)):
        (tmp_path / folder).mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / folder / f"case{'_seg' if folder == 'lab' else ''}.nrrd"))
    with CocoWriter(tmp_path / "out", "Mine") as writer:
        convert_volumes(pair_folders(tmp_path / "img", tmp_path / "lab", "_seg"), writer, axis="j")
    coco, masks = load(tmp_path / "out", "Mine")
    indices = sorted(image["index"] for image in coco.dataset["images"])
    assert indices == [1, 3]
    assert [len(masks[i["file_name"]]) for i in sorted(coco.dataset["images"], key=lambda i: i["index"])] == [2, 1]
    image = np.asarray(Image.open(tmp_path / "out" / "Mine" / "images" / coco.dataset["images"][0]["file_name"]))
    assert image.shape == (4, 12) and image.dtype == np.uint8 and image.max() > image.min()


def test_a_failed_conversion_leaves_no_data_set(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)), str(tmp_path / "img" / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 6), np.uint8)), str(tmp_path / "lab" / "a.nii.gz"))
    with pytest.raises(ValueError, match="do not match the image"):
        with CocoWriter(tmp_path / "out", "Bad") as writer:
            convert_volumes(pair_folders(tmp_path / "img", tmp_path / "lab"), writer, axis="k")
    assert list((tmp_path / "out").iterdir()) == []


BUSBRA_IDS = ("bus_0001-l", "bus_0001-r", "bus_0002-l", "bus_0007-l", "bus_0007-r", "bus_0010-l")


def test_busbra_official_fold_1_is_the_test_split(tmp_path):
    busbra = shared_path("busbra")
    source = tmp_path / "BUSBRA"
    (source / "Images").mkdir(parents=True)
    (source / "Masks").mkdir()
    for name in ("5-fold-cv.csv", "bus_data.csv"):
        shutil.copy(busbra / name, source)
    for image_id in BUSBRA_IDS:
        shutil.copy(busbra / "images" / f"{image_id}.png", source / "Images")
        shutil.copy(busbra / "masks" / f"{image_id.replace('bus_', 'mask_')}.png", source / "Masks")
    with open(busbra / "5-fold-cv.csv", newline="") as file:
        folds = {row["ID"]: row["kFold"] for row in csv.DictReader(file) if row["ID"] in BUSBRA_IDS}
    assert "1" in folds.values() and set(folds.values()) != {"1"}  # the fixture spans both sides
    with CocoWriter(tmp_path / "out", "BUSBRA") as writer:
        convert_busbra(source, writer)
    for subset, wanted in (("test", {i for i, f in folds.items() if f == "1"}),
                           ("", {i for i, f in folds.items() if f != "1"})):
        coco, masks = load(tmp_path / "out", "BUSBRA", subset)
        assert {i["source"].removesuffix(".png") for i in coco.dataset["images"]} == wanted
        for image in coco.dataset["images"]:
            truth = np.asarray(Image.open(busbra / "masks" / image["source"].replace("bus_", "mask_"))) > 0
            assert len(masks[image["file_name"]]) == len(components_8(truth))
            assert np.array_equal(masks[image["file_name"]].any(axis=0), truth)
        assert {i["group"] for i in coco.dataset["images"]} <= {"1", "2", "7", "10"}


def write_hc18(folder, items, pixel_size=0.1):
    """items: name -> (image, annotation); writes the HC18 layout with a CSV of the given circumferences."""
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rows = ["filename,pixel size(mm),head circumference (mm)"]
    for name, (image, annotation, circumference_px) in items.items():
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        Image.fromarray(annotation.astype(np.uint8) * 255).save(folder / "annotations" / f"{name}_Annotation.png")
        rows.append(f"{name}.png,{pixel_size},{circumference_px * pixel_size}")
    (folder / "pixel_size_and_HC.csv").write_text("\n".join(rows) + "\n")


def test_hc18_outlines_are_filled_to_the_ellipse_area_and_open_ones_are_skipped(tmp_path):
    a, b = 150.0, 100.0
    outline = ellipse_outline((540, 800), 400.0, 270.0, a, b, 0.4)
    broken = outline.copy()
    broken[:, 520:540] = False  # an outline with a gap cannot be filled
    image = np.full((540, 800), 90, np.uint8)
    circumference = perimeter_numeric(a, b)
    write_hc18(tmp_path / "hc", {"001_HC": (image, outline, circumference), "002_HC": (image, broken, circumference)})
    with CocoWriter(tmp_path / "out", "HC") as writer:
        convert_hc18(tmp_path / "hc", writer)
    coco, masks = load(tmp_path / "out", "HC")
    assert [i["source"] for i in coco.dataset["images"]] == ["001_HC.png"]
    filled = masks[coco.dataset["images"][0]["file_name"]]
    assert filled.shape[0] == 1 and (filled[0] | outline).sum() == filled[0].sum()
    assert abs(filled.sum() - np.pi * a * b) < 0.02 * np.pi * a * b
    assert [item.split(":")[0] for items in writer.skipped.values() for item in items] == ["002_HC.png"]


@pytest.mark.parametrize("name", ["000_HC", "010_2HC", "186_HC"])
def test_hc18_real_masks_match_the_csv_circumference_and_refill_from_their_outline(tmp_path, name):
    hc18 = shared_path("hc18")
    with open(hc18 / "pixel_size_and_HC.csv", newline="") as file:
        row = next(r for r in csv.DictReader(file) if r["filename"] == f"{name}.png")
    truth = np.asarray(Image.open(hc18 / "annotations" / f"{name}_Annotation.png")).max(axis=-1) > 0
    image = np.asarray(Image.open(hc18 / "images" / f"{name}.png"))
    mm = float(row["pixel size(mm)"])
    circumference_px = float(row["head circumference (mm)"]) / mm
    write_hc18(tmp_path / "hc", {name: (image, inner_boundary(truth), circumference_px)}, pixel_size=mm)
    with CocoWriter(tmp_path / "out", "HC") as writer:
        convert_hc18(tmp_path / "hc", writer)
    coco, masks = load(tmp_path / "out", "HC")
    filled = masks[coco.dataset["images"][0]["file_name"]][0]
    assert np.array_equal(filled, truth)  # the outline alone gives back the released mask
    rows, cols = np.nonzero(filled)  # and that mask is the CSV's ellipse: perimeter and area agree
    semi = 2.0 * np.sqrt(np.linalg.eigvalsh(np.cov(np.stack([cols, rows]).astype(float), bias=True)))
    assert abs(perimeter_numeric(*semi) - circumference_px) < 0.03 * circumference_px
    if name != "186_HC":  # 186 is cut by the image border, so only part of its ellipse is inside
        assert abs(filled.sum() - np.pi * semi[0] * semi[1]) < 0.02 * filled.sum()
    assert coco.dataset["images"][0]["group"] == name.split("_")[0]
    assert mask_utils.area(coco.dataset["annotations"][0]["segmentation"]) == truth.sum()


def write_volume(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_segthy_and_microseg_layouts_pair_rotate_and_clear_outside_the_field_of_view(tmp_path):
    voxels = np.full((3, 6, 8), 50, np.uint8)  # (K, J, I)
    voxels[:, :, 6:] = 0  # outside the field of view
    labels = np.zeros((3, 6, 8), np.uint8)
    labels[1, 1:3, 1:3] = 1
    labels[1, 4, 5:8] = 2  # crosses into the zero region
    write_volume(tmp_path / "segthy" / "US_volumes" / "3_US.nii", voxels)
    write_volume(tmp_path / "segthy" / "ground_truth_labels" / "3.nii", labels)
    write_volume(tmp_path / "micro" / "micro_ultrasound_scans" / "microUS_train_07.nii.gz", voxels)
    write_volume(tmp_path / "micro" / "expert_annotations" / "expert_annotation_train_07.nii.gz", labels)
    write_volume(tmp_path / "micro" / "non_expert_annotations" / "nonexpert_train_07.nii.gz", labels)
    for layout, source, kept_columns in (("segthy", "segthy", 8), ("microseg", "micro", 6)):
        with CocoWriter(tmp_path / "out", layout) as writer:
            convert_layout(layout, tmp_path / source, writer)
        coco, masks = load(tmp_path / "out", layout)
        assert [(i["group"], i["index"]) for i in coco.dataset["images"]] == [("3" if layout == "segthy" else "07", 1)]
        expected = labels[1].copy()
        expected[:, kept_columns:] = 0
        turned = expected[::-1, ::-1]
        found = masks[coco.dataset["images"][0]["file_name"]]
        assert [m.sum() for m in found] == [4, int((turned == 2).sum())]
        assert np.array_equal(found[0], turned == 1) and np.array_equal(found[1], turned == 2)


def test_frames_command_cuts_a_2d_time_sequence_frame_by_frame(tmp_path, capsys):
    from ultrasam_data.convert import main

    frames = np.zeros((5, 10, 12), np.uint8)  # (T, H, W), SimpleITK's x, y, t file
    frames[[0, 2, 3], 4:7, 3:9] = 1
    write_volume(tmp_path / "seq" / "patient1_4CH.nii.gz", (np.arange(frames.size) % 200).reshape(frames.shape).astype(np.uint8))
    write_volume(tmp_path / "gt" / "patient1_4CH_gt.nii.gz", frames)
    args = ["frames", "--images", str(tmp_path / "seq"), "--labels", str(tmp_path / "gt"), "--label-suffix", "_gt",
            "--name", "Echo", str(tmp_path / "out")]
    assert main(args) == 0
    assert "main: 3 images, 3 instances" in capsys.readouterr().out
    coco, _ = load(tmp_path / "out", "Echo")
    assert sorted(i["index"] for i in coco.dataset["images"]) == [0, 2, 3]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
