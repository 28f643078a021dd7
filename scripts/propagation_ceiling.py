"""How much of a volume's 3D Dice is lost to propagation, not to the click: one model, three prompts.

    python scripts/propagation_ceiling.py ../shared/data/mrus3d --axis k -o eval/ceiling.json

For every (image, label) volume of a folder with ``images/`` and ``labels/`` (as ``ultrasam
evaluate`` reads it), the structure is segmented three times, along ``--axis``:

- ``click``: one positive click on the middle slice (``ultrasam evaluate``'s 3D prompt), propagated;
- ``key_box``: the structure's true box on that same slice, propagated;
- ``every_slice_box``: the structure's true 3D bounding box as an ROI, so every slice it crosses is
  prompted with a true box and nothing is propagated from a neighbour.

A model that follows a box well but scores low from ``key_box`` loses its Dice in the walk from
slice to slice; the gap between ``key_box`` and ``every_slice_box`` is that loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ultrasam.atomic import write_text_atomic
from ultrasam.batch import segment_volume
from ultrasam.evaluation import dice, volume_prompt
from ultrasam.evaluation_data import read_volume_pair, source_kind, volume_set
from ultrasam.geometry import mask_box
from ultrasam.model_options import add_model_options, predictor_from_args
from ultrasam.prompts3d import Roi, SliceBox, VolumePrompts
from ultrasam.slicing import VolumeSlices, axis_index
from ultrasam.volume_embeddings import VolumeEmbeddingCache

PROMPTS = ("click", "key_box", "every_slice_box")


def three_prompts(slices: VolumeSlices, truth_kji: np.ndarray) -> dict[str, VolumePrompts]:
    """The click, the true box on the click's slice and the true 3D box (all in ijk) of one structure."""
    click, key, _ = volume_prompt(slices, truth_kji)
    x0, y0, x1, y1 = mask_box(slices.slice_mask(truth_kji, key))  # pixel edges, slice frame xy
    corners = slices.slice_to_ijk(key, [[x0, y0], [x1, y1]])
    voxels = np.argwhere(truth_kji)[:, ::-1]  # (N, 3) ijk
    low, high = voxels.min(axis=0) - 0.5, voxels.max(axis=0) + 0.5
    roi = Roi((low + high) / 2, np.eye(3), (high - low) / 2, frame="ijk")
    return {"click": click, "key_box": VolumePrompts(boxes=[SliceBox(*corners, frame="ijk")]),
            "every_slice_box": VolumePrompts(rois=[roi])}


def measure(folder: Path, predictor, axis: int, channel: int) -> list[dict]:
    """One row per volume: its name and the 3D Dice of each prompt in :data:`PROMPTS`."""
    rows = []
    for pair in volume_set(folder).pairs:
        volume, truth = read_volume_pair(pair, channel)
        prompts = three_prompts(VolumeSlices(volume, axis), truth)
        cache = VolumeEmbeddingCache(predictor)  # each slice is embedded once for all three prompts
        row = {"volume": Path(pair.image).name}
        for name in PROMPTS:
            mask, _ = segment_volume(volume, predictor, prompts[name], axis=axis, cache=cache)
            row[name] = round(dice(mask.astype(bool), truth), 4)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder with images/ and labels/ volumes")
    parser.add_argument("--axis", default="k", help="slicing axis: k, j, i or numpy 0, 1, 2")
    parser.add_argument("--label-channel", type=int, default=0, help="structure of a 4D label volume")
    parser.add_argument("-o", "--output", type=Path, help="also write the rows and means as JSON")
    add_model_options(parser)
    args = parser.parse_args(argv)
    if not args.folder.is_dir() or source_kind(args.folder) != "volumes":
        parser.error(f"{args.folder}: expected a folder with images/ and labels/ volumes")
    predictor, description = predictor_from_args(args)
    rows = measure(args.folder, predictor, axis_index(args.axis), args.label_channel)
    means = {name: round(float(np.mean([row[name] for row in rows])), 3) for name in PROMPTS}
    print(f"model: {description}\naxis {args.axis}, {len(rows)} volumes, mean 3D Dice: {means}")
    if args.output:  # atomic: a failed write leaves no half-written file
        write_text_atomic(args.output, json.dumps({"model": description, "axis": args.axis, "mean": means,
                                                   "volumes": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
