"""Check a training data set before training: every image opened, every mask decoded.

Reports missing or unreadable image files, images whose size differs from their COCO record,
masks that are corrupt, empty, outside the image or of another size, annotations of unknown
images and images left without any object. Every bad item is listed; the command exits 1 when
there is any (training refuses the same data unless ``data.skip_bad_samples``), 0 when all is
usable. The report lists the usable indices, and ``dataset.subset(report.good)`` trains on them.

Command line (``ultrasam check-data`` wraps it)::

    ultrasam check-data data/US43d --split train
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from ultrasam_data.coco import CocoDataset, DataError, Problem, read_sample


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        good: indices of the dataset's records that load and decode cleanly.
        problems: every bad annotation (found while reading) and bad image (found here).
        images_per_dataset: usable images of each data set.
        objects: usable objects in the good images.
        over_cap: good images with more than ``max_objects`` objects (a subset is drawn per step).
        max_objects: the dataset's cap.
    """

    good: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    images_per_dataset: Counter = field(default_factory=Counter)
    objects: int = 0
    over_cap: int = 0
    max_objects: int = 20

    def counts(self) -> Counter:
        """Problem kind -> how many."""
        return Counter(problem.kind for problem in self.problems)

    def format(self, examples: int = 3) -> str:
        """A readable multi-line summary, with up to ``examples`` places per problem kind."""
        per_dataset = ", ".join(f"{name}: {n}" for name, n in sorted(self.images_per_dataset.items()))
        lines = [f"Usable: {len(self.good)} images, {self.objects} objects ({per_dataset or 'none'})."]
        if not self.problems:
            lines.append("No problems found.")
        for kind, count in sorted(self.counts().items()):
            lines.append(f"Skipped, {kind}: {count}")
            lines.extend(f"    {p.where}: {p.detail}" for p in [p for p in self.problems if p.kind == kind][:examples])
        if self.over_cap:
            lines.append(f"Images with more than {self.max_objects} objects ({self.max_objects} drawn per step): "
                         f"{self.over_cap}")
        return "\n".join(lines)


def check_dataset(dataset: CocoDataset, progress: bool = True) -> CheckReport:
    """Open every image and decode every mask of ``dataset``; never raises for bad samples."""
    report = CheckReport(problems=list(dataset.problems), max_objects=dataset.max_objects)
    for index, record in enumerate(tqdm(dataset.records, desc="checking", unit="image", disable=not progress)):
        try:
            read_sample(record, record.rles)
        except DataError as error:
            report.problems.append(Problem(error.kind, f"{record.dataset} image {record.path.name}", error.detail))
            continue
        report.good.append(index)
        report.images_per_dataset[record.dataset] += 1
        report.objects += len(record.rles)
        report.over_cap += len(record.rles) > dataset.max_objects
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Report missing files and bad masks in COCO data sets; exit 1 when anything is wrong.

    Exit status 0 when every item is usable, 1 when anything is missing, unreadable or unusable,
    2 when the sources themselves do not exist.
    """
    parser = argparse.ArgumentParser(
        prog="ultrasam check-data",
        description="Check training data (US-43d COCO layout): missing files, bad or empty masks, "
                    "size mismatches. Exits 1 when anything is missing, unreadable or unusable.",
        epilog="examples:\n"
               "  ultrasam check-data data/BUSBRA/annotations/BUSBRA__coco.json\n"
               "  ultrasam check-data data/US43d --split train --examples 10",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="COCO files, or folders holding <dataset>/annotations/")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                        help="files a folder contributes: [split.]<dataset>__coco.json (default: unsplit)")
    parser.add_argument("--image-root", default=None, help="folder image file names are relative to")
    parser.add_argument("--max-objects", type=int, default=20, help="objects per image the trainer keeps")
    parser.add_argument("--examples", type=int, default=3, help="places listed per problem kind")
    args = parser.parse_args(argv)
    try:
        dataset = CocoDataset(args.sources, args.max_objects, args.image_root, args.split)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = check_dataset(dataset)
    print(report.format(args.examples))
    return 0 if report.good and not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
