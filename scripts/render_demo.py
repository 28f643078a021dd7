"""Draw the demo's answer: the prompted slice of the bundled RESECT volume with the mask over it.

    python scripts/render_demo.py                       # runs `ultrasam demo` first, then draws
    python scripts/render_demo.py --mask demo_output/resect_case3_mask.seg.nrrd -o docs/demo.png

The slice is the one holding the demo's box (axis k, as the demo propagates); the mask is tinted
red with its outline, the box prompt is drawn in green. Used for the README's picture.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ultrasam.intensity import to_uint8
from ultrasam.resources import SAMPLE_BOX_IJK, SAMPLE_VOLUME
from ultrasam.volume_io import read_volume

SCALE = 2  # output pixels per voxel


def render(volume_path: Path, mask_path: Path, box_ijk) -> Image.Image:
    """RGB picture of slice k of ``box_ijk`` = (i0, j0, k, i1, j1, k) with the mask and the box drawn over it."""
    volume = read_volume(volume_path)
    mask = read_volume(mask_path).voxels.astype(bool)
    if mask.shape != volume.shape_kji:
        raise ValueError(f"the mask's grid {mask.shape} is not the volume's {volume.shape_kji}")
    i0, j0, k, i1, j1, _ = box_ijk
    grey, _ = to_uint8(volume.voxels[k])
    on_slice = mask[k]
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    rgb[on_slice] = 0.55 * rgb[on_slice] + 0.45 * np.array([255, 40, 40])
    inner = np.zeros_like(on_slice)
    inner[1:-1, 1:-1] = on_slice[1:-1, 1:-1] & on_slice[:-2, 1:-1] & on_slice[2:, 1:-1] & on_slice[1:-1, :-2] & on_slice[1:-1, 2:]
    rgb[on_slice & ~inner] = (255, 40, 40)
    image = Image.fromarray(rgb.astype(np.uint8)).resize((grey.shape[1] * SCALE, grey.shape[0] * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    draw.rectangle([i0 * SCALE, j0 * SCALE, (i1 + 1) * SCALE, (j1 + 1) * SCALE], outline=(40, 220, 40), width=2)
    draw.text((6, 6), f"slice k={k}: {int(on_slice.sum())} voxels in the mask here; "
              f"{int(mask.sum())} on {int(mask.any(axis=(1, 2)).sum())} slices in all", fill=(255, 255, 0))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mask", help="the demo's output (default: run `ultrasam demo` now)")
    parser.add_argument("-o", "--output", default="docs/demo.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mask = Path(args.mask) if args.mask else Path(folder) / "demo.seg.nrrd"
        if not args.mask:
            from ultrasam.cli import main as ultrasam

            if ultrasam(["demo", "-o", str(mask), "--device", "cpu", "--precision", "float32"]) != 0:
                raise SystemExit("ultrasam demo failed")
        render(SAMPLE_VOLUME, mask, SAMPLE_BOX_IJK).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
