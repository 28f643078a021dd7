"""``ultrasam convert``: turn public or own data into US-43d training data.

Every converter writes ``<out>/<name>/images/*.png`` and ``<out>/<name>/annotations/*__coco.json``
(class-agnostic COCO, RLE masks, one instance per connected component), atomically: a failed run
leaves no half-written data set. ``ultrasam convert`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ultrasam_data.converters import convert_layout, convert_volumes, pair_folders
from ultrasam_data.public_2d import convert_busbra, convert_hc18
from ultrasam_data.writer import CocoWriter

# UltraSam's data set names, so converted sets sit beside a downloaded US-43d without clashes.
DEFAULT_NAMES = {"busbra": "BUSBRA", "hc18": "HC", "segthy": "segthy-dataset", "regpro": "regPro",
                 "microseg": "MicroSeg", "volume": None, "frames": None}

EXAMPLES = """examples:
  # BUS-BRA with its official test split (fold 1 of 5-fold-cv.csv -> test.BUSBRA__coco.json)
  ultrasam convert busbra ~/data/BUSBRA data/US43d
  # HC18 training set: head outlines filled and checked against pixel_size_and_HC.csv
  ultrasam convert hc18 ~/data/HC18/training_set data/US43d
  # published 3D sets, sliced as UltraSam did (regPro: sagittal, 4D label channels)
  ultrasam convert regpro ~/data/muRegPro data/US43d
  # your own volumes: NIfTI/NRRD images + label maps paired by file name, sliced along i
  ultrasam convert volume --images vols/ --labels segs/ --label-suffix _seg \\
      --axis i --name MyProstate data/US43d
  # 2D+time sequences (CAMUS-like), frame by frame
  ultrasam convert frames --images seqs/ --labels seqs_gt/ --label-suffix _gt \\
      --name MyEcho data/US43d
then check and train:
  ultrasam check-data data/US43d
"""


def _source_converter(kind: str) -> Callable[[argparse.Namespace, CocoWriter], int]:
    if kind == "busbra":
        return lambda args, writer: convert_busbra(args.source, writer)
    if kind == "hc18":
        return lambda args, writer: convert_hc18(args.source, writer)
    return lambda args, writer: convert_layout(kind, args.source, writer)


def _folder_converter(args: argparse.Namespace, writer: CocoWriter) -> int:
    pairs = pair_folders(args.images, args.labels, args.label_suffix)
    return convert_volumes(pairs, writer, args.axis, args.rotate_180, args.clear_outside)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultrasam convert",
        description="Convert public or own data into US-43d training data (8-bit PNG images, class-agnostic "
                    "COCO RLE masks, one instance per connected component).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    helps = {"busbra": "BUS-BRA breast lesions (images/, masks/, 5-fold-cv.csv)",
             "hc18": "HC18 fetal head outlines (*_HC.png, *_HC_Annotation.png, pixel_size_and_HC.csv)",
             "segthy": "SegThy thyroid volumes (*.nii), axial", "regpro": "muRegPro prostate TRUS, sagittal",
             "microseg": "MicroSeg micro-ultrasound prostate, axial"}
    for kind, text in helps.items():
        sub = kinds.add_parser(kind, help=text, description=text)
        sub.add_argument("source", help="the data set's folder, unpacked as released")
        sub.set_defaults(run=_source_converter(kind))
    for kind, text in (("volume", "your own 3D volumes + label maps"), ("frames", "2D+time sequences + labels")):
        sub = kinds.add_parser(kind, help=text, description=text)
        sub.add_argument("--images", required=True, help="folder of image volumes (.nii.gz, .nrrd, .mha...)")
        sub.add_argument("--labels", required=True, help="folder of label maps on the same voxel grids")
        sub.add_argument("--label-suffix", default="", help="label stem = image stem + this (e.g. _seg)")
        if kind == "volume":
            sub.add_argument("--axis", default="k", choices=("k", "j", "i"),
                             help="slice along this voxel axis (k: voxels[s], j: voxels[:, s], i: voxels[:, :, s])")
        else:
            sub.set_defaults(axis="k")
        sub.add_argument("--rotate-180", action="store_true", help="turn slices upside down (probe at the bottom)")
        sub.add_argument("--clear-outside", action="store_true", help="drop mask pixels where the image is 0")
        sub.set_defaults(run=_folder_converter)
    for sub in kinds.choices.values():
        sub.add_argument("out", help="output root; the data set goes to OUT/NAME")
        sub.add_argument("--name", default=None, help="data set name (default: UltraSam's name for it)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing OUT/NAME")
    return parser


def summary(writer: CocoWriter) -> str:
    """What a conversion wrote and left out, for the terminal."""
    lines = [f"{writer.target}:"]
    for key in sorted(k for k in writer.counts if k.endswith("/images")):
        subset = key.split("/")[0]
        lines.append(f"  {subset or 'main'}: {writer.counts[key]} images, {writer.counts[subset + '/instances']} instances")
    if writer.counts["empty"]:
        lines.append(f"  not written (no object): {writer.counts['empty']} slices or images")
    for reason, items in writer.skipped.items():
        lines.append(f"  skipped ({reason}): {len(items)}, e.g. {'; '.join(items[:3])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Convert data sets (BUS-BRA, HC18, 3D volumes) to US-43d's COCO layout."""
    args = build_parser().parse_args(argv)
    name = args.name or DEFAULT_NAMES[args.kind]
    if not name:
        print("error: give the data set a name with --name", file=sys.stderr)
        return 2
    try:
        with CocoWriter(args.out, name, overwrite=args.overwrite) as writer:
            args.run(args, writer)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(writer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
