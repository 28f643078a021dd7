"""Export of segmented volumes (as the MRML bridge hands them) into the training layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_reference import instance_count
from PIL import Image
from pycocotools.coco import COCO

from ultrasam.geometry import Geometry, Volume
from ultrasam.slicing import VolumeSlices
from ultrasam_data.slicer_export import SegmentedVolume, export_segmentations

GEOMETRY = Geometry(origin_lps=[10.0, -5.0, 3.0], spacing=[0.5, 0.8, 2.0],
                    direction_lps=[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def segmented_volume() -> SegmentedVolume:
    rng = np.random.default_rng(0)
    voxels = rng.normal(40.0, 300.0, size=(6, 20, 24)).astype(np.float32)  # (K, J, I), needs a window
    gland = np.zeros(voxels.shape, np.uint8)
    gland[1:4, 3:9, 4:10] = 1
    gland[2:5, 12:16, 15:20] = 1  # a second blob on slices 2..4
    lesion = np.zeros(voxels.shape, np.uint8)
    lesion[2, 5:7, 6:8] = 1  # inside the gland: segments may overlap
    return SegmentedVolume(Volume(voxels, GEOMETRY, name="case 7.nrrd"), {"gland": gland, "lesion": lesion},
                           name="case 7", segments_geometry=GEOMETRY)


@pytest.mark.parametrize("axis", [0, "i"])
def test_export_writes_each_segmented_slice_as_the_model_sees_it(tmp_path, axis):
    item = segmented_volume()
    folder = export_segmentations([item], tmp_path, dataset="MyScene", axes=[axis])
    coco = COCO(str(folder / "annotations" / "MyScene__coco.json"))
    slices = VolumeSlices(item.volume, axis)
    stacked = {name: np.moveaxis(mask, slices.axis, 0) for name, mask in item.segments.items()}
    expected = [s for s in range(slices.num_slices) if any(m[s].any() for m in stacked.values())]
    records = sorted(coco.dataset["images"], key=lambda r: r["index"])
    assert [r["index"] for r in records] == expected
    for record in records:
        s = record["index"]
        pixels = np.asarray(Image.open(folder / "images" / record["file_name"]))
        assert np.array_equal(pixels, slices.image(s))  # same pixels, one window, as inference slices
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=record["id"]))
        assert len(annotations) == sum(instance_count(m[s]) for m in stacked.values())
        union = np.any([coco.annToMask(a) for a in annotations], axis=0)
        assert np.array_equal(union, np.any([m[s] for m in stacked.values()], axis=0))
        assert record["group"] == "case 7" and record["file_name"].startswith("MyScene__case_7__")


def test_masks_off_the_volume_grid_are_refused_with_what_to_do(tmp_path):
    item = segmented_volume()
    item.segments["bad"] = np.zeros((6, 20, 23), np.uint8)
    with pytest.raises(ValueError, match="reference geometry"):
        export_segmentations([item], tmp_path)
    moved = segmented_volume()
    moved.segments_geometry = Geometry(origin_lps=[11.0, -5.0, 3.0], spacing=GEOMETRY.spacing,
                                       direction_lps=GEOMETRY.direction_lps)
    with pytest.raises(ValueError, match="another grid"):
        export_segmentations([moved], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_export_is_kept_unless_overwritten(tmp_path):
    folder = export_segmentations([segmented_volume()], tmp_path, axes=["k"])
    before = json.loads((folder / "annotations" / f"{folder.name}__coco.json").read_text())
    with pytest.raises(FileExistsError, match="allow overwriting"):
        export_segmentations([segmented_volume()], tmp_path, axes=["k", "j"])
    assert json.loads((folder / "annotations" / f"{folder.name}__coco.json").read_text()) == before
    export_segmentations([segmented_volume()], tmp_path, axes=["k", "j"], overwrite=True)
    after = json.loads((folder / "annotations" / f"{folder.name}__coco.json").read_text())
    assert len(after["images"]) > len(before["images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
