"""Fine-tune the shipped default model on a lent GPU within one device call (issue 16), ready to run.

    python bench/gpu_finetune.py prepare carry                    # here: data at 256 px, wheels, size check
    python3 bench/gpu_finetune.py train carry $OUT --budget-s 480  # on the GPU machine
    python bench/gpu_finetune.py join FILES_AT runs/gpu           # here: the returned parts -> one .pth per variant
    python bench/gpu_finetune.py train carry OUT --dry-run        # the same on the CPU, tiny

``prepare`` rewrites the training and validation images of compact-v3's config at the model's
input size (long side 256, the trainer's own resize, so that on the GPU it changes nothing) as
JPEG, with their masks resized by the trainer's rule, so that they travel beside the checkout
(the device tool carries at most 64 MiB). ``train`` runs every variant in ``VARIANTS`` at once on
the one GPU, each an ``ultrasam-train`` job from compact-v3's weights that validates often and
keeps its best checkpoint; at the budget it stops them, exports each ``best.pth`` in float16 and
cuts it into parts under the tool's 16 MiB limit on returned files. ``join`` checks each part
against its sha256 in ``finetune.json`` and puts the checkpoints back together; evaluate them with
``ultrasam evaluate`` as the model card does.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "UltraSamSlicer"), str(REPO / "UltraSamTraining")]

from gpu_check import child_env, download_wheels, fits_the_device, kill_tree  # noqa: E402
from ultrasam.atomic import atomic_path, write_text_atomic  # noqa: E402
from ultrasam.resources import SHIPPED_MODEL  # noqa: E402

DATA = (  # compact-v3's training and validation sets (docs/compact-v2.splits.sh writes them)
    "out/data/BUSBRA/annotations/train.BUSBRA__coco.json",
    "out/v2/hc_split/HC/annotations/train.HC__coco.json",
    "out/data/BUSBRA/annotations/val.BUSBRA__coco.json",
    "out/v2/hc_split/HC/annotations/val.HC__coco.json",
)
IMAGE_SIZE = 256  # the input size of compact-v3 (LiteMedSAM)
JPEG_QUALITY = 90  # compact-v3's 1,281 images in 17 MiB: with the checkout, 56 of the 64 MiB that travel
PART_BYTES = 15 * 2**20  # under the device tool's 16 MiB per returned file

BASE = {  # compact-v3's prompts, with flips and one round of corrective clicks; constant lr after warm-up
    "model": {"init": "checkpoint", "checkpoint": str(SHIPPED_MODEL)},
    "data": {"flip": True},
    "prompts": {"val_prompt": "point", "free_box_probability": 0.5, "correction_clicks": 1},
    "optim": {"lr": 2e-5, "warmup_steps": 100, "milestones": []},
    "run": {"steps": 1_000_000, "batch_size": 16, "val_every": 100, "checkpoint_every": 1000, "log_every": 20,
            "num_workers": 4},
}
VARIANTS = {  # the two options issue 16 names: the whole model, or the encoder's last stage with the decoder
    "full": {},
    "last-stage": {"model": {"frozen_encoder": True, "train_last_stage": True}},
}
DRY_RUN = {"run": {"steps": 2, "batch_size": 2, "val_every": 1, "log_every": 1, "num_workers": 0,
                   "precision": "fp32"}, "optim": {"warmup_steps": 1}}


# ---- here, before: the data that travels --------------------------------------------------------
def prepare(folder: Path, annotation_files: list[Path]) -> int:
    """Data at the model's input size into ``folder``/data, wheels into ``folder``/wheels; size check."""
    for path in annotation_files:
        if not path.is_file():
            print(f"{path} is missing: run docs/compact-v2.splits.sh first (it needs ../shared)", file=sys.stderr)
            return 2
    for path in annotation_files:
        written = shrink(path, folder / "data")
        print(f"{path} -> {written}")
    download_wheels(folder / "wheels")
    return 0 if fits_the_device(folder) else 1


def shrink(annotation_file: Path, root: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Rewrite one COCO file's images and masks at ``image_size`` under ``root``/<data set>/.

    Images become JPEG (grey when their channels are equal), resized as the trainer resizes them;
    masks are resized by the trainer's rule and stored as RLE. Returns the new annotation file,
    named as the old one so that the data set keeps its name.
    """
    import torch
    from PIL import Image

    from ultrasam_data.coco import read_annotation_file, read_sample
    from ultrasam_data.writer import CATEGORY, encode_mask
    from ultrasam_training.prepare import resize_image, resize_masks

    problems: list = []
    records = read_annotation_file(annotation_file, None, problems)
    if problems or not records:
        raise ValueError(f"{annotation_file}: {len(problems)} problem(s), e.g. {problems[:1]}; check it with "
                         "ultrasam check-data")
    folder = root / records[0].dataset
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for number, record in enumerate(records, 1):
        sample = read_sample(record, record.rles)
        pixels = resize_image(torch.tensor(sample.image).permute(2, 0, 1), image_size)
        masks = resize_masks(torch.from_numpy(sample.masks), tuple(pixels.shape[1:])).numpy()
        grey = bool((pixels == pixels[:1]).all())
        picture = Image.fromarray(pixels[0].numpy()) if grey else Image.fromarray(pixels.permute(1, 2, 0).numpy())
        name = f"{Path(record.path).stem}.jpg"
        picture.save(folder / "images" / name, quality=JPEG_QUALITY)
        images.append({"id": number, "file_name": name, "height": int(masks.shape[1]), "width": int(masks.shape[2]),
                       "group": record.group})
        annotations += [{"id": len(annotations) + n + 1, "image_id": number, "category_id": 1, "iscrowd": 0,
                         **encode_mask(mask)} for n, mask in enumerate(m for m in masks if m.any())]
    out = folder / "annotations" / annotation_file.name
    out.parent.mkdir(exist_ok=True)
    content = {"images": images, "annotations": annotations, "categories": [CATEGORY]}
    write_text_atomic(out, json.dumps(content))
    return out


# ---- on the GPU: the runs -----------------------------------------------------------------------
def train(folder: Path, out: Path, budget_s: float, dry_run: bool, part_bytes: int = PART_BYTES) -> int:
    """Every variant at once until done or ``budget_s`` (less the export's margin); best checkpoints
    exported in float16 and cut into parts in ``out``, with ``finetune.json`` and ``finetune.log``."""
    start = time.monotonic()
    data = sorted((folder / "data").glob("*/annotations/*.json"))
    files = {kind: [str(p) for p in data if p.name.startswith(f"{kind}.")] for kind in ("train", "val")}
    if not files["train"] or not files["val"]:
        print(f"no train./val. annotation files under {folder / 'data'}: run `prepare` first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run,
               "device": device_name(), "budget_s": budget_s, "base": BASE, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_finetune.") as scratch:  # only the exported parts go back
        runs = Path(scratch)
        jobs = {name: launch(runs, name, variant_config(name, files, runs, dry_run)) for name in VARIANTS}
        deadline = start + budget_s - export_margin_s(len(jobs))
        while any(job.poll() is None for job in jobs.values()) and time.monotonic() < deadline:
            time.sleep(1.0)
        for name, job in jobs.items():
            stopped = job.poll() is None
            if stopped:
                kill_tree(job.pid)  # best.pth is written atomically, so a kill keeps the last one whole
            job.wait()
            summary["variants"][name] = {"overrides": VARIANTS[name], "stopped_at_budget": stopped,
                                         "exit_code": None if stopped else job.returncode,
                                         **run_summary(runs / name), **export(runs / name, name, out, part_bytes)}
        logs = [f"===== {name} =====\n{(runs / f'{name}.log').read_text(errors='replace')[-20000:]}" for name in jobs]
    summary["seconds"] = round(time.monotonic() - start, 1)
    write_text_atomic(out / "finetune.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "finetune.log", "\n".join(logs))
    print(json.dumps({name: {key: value for key, value in entry.items() if key != "val"}
                      for name, entry in summary["variants"].items()}, indent=1))
    return 0 if all(entry["parts"] for entry in summary["variants"].values()) else 1


def variant_config(name: str, files: dict[str, list[str]], runs: Path, dry_run: bool) -> dict:
    """The ``ultrasam-train`` config of one variant: ``BASE`` with its overrides (and the dry run's)."""
    config = merged(BASE, VARIANTS[name], DRY_RUN if dry_run else {})
    config["output_dir"] = str(runs / name)
    config["data"] = {**config.get("data", {}), **files}
    return config


def launch(runs: Path, name: str, config: dict) -> subprocess.Popen:
    """Start one ``ultrasam-train train`` job in its own process group, its output in ``<name>.log``."""
    path = runs / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    with (runs / f"{name}.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "ultrasam_training", "train", str(path)], cwd=REPO,
                                env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def merged(*layers: dict) -> dict:
    """A copy of the first dict with each later one's keys written over it, one level of nesting down."""
    result = copy.deepcopy(layers[0])
    for layer in layers[1:]:
        for key, value in layer.items():
            result[key] = {**result.get(key, {}), **value} if isinstance(value, dict) else value
    return result


def export_margin_s(variants: int) -> float:
    """Seconds kept back for stopping the jobs and exporting their checkpoints (a few seconds each)."""
    return 20.0 + 10.0 * variants


def run_summary(run_dir: Path) -> dict:
    """Steps, images/s and the validation history of one run, from its ``metrics.jsonl``."""
    from ultrasam_training.runlog import read_records

    records = read_records(run_dir / "metrics.jsonl")
    rates = [r["images_per_s"] for r in records if r["kind"] == "train"]
    val = [{"step": r["step"], "dice": r["dice"],
            "per_dataset": {k: v["dice"] for k, v in r.get("per_dataset", {}).items()}}
           for r in records if r["kind"] == "val"]
    best = max(val, key=lambda entry: entry["dice"]) if val else None
    return {"steps": max((r["step"] for r in records if r["kind"] == "train"), default=0),
            "images_per_s": round(float(np.median(rates)), 2) if rates else None,
            "best": best, "val": val, "errors": [r["message"] for r in records if r["kind"] == "error"]}


def export(run_dir: Path, name: str, out: Path, part_bytes: int) -> dict:
    """``best.pth`` in float16, cut into ``<name>.pth.<n>`` parts in ``out``; their names and the sha256."""
    from ultrasam_training.cli import export_checkpoint

    best = run_dir / "best.pth"
    if not best.is_file():
        return {"parts": [], "note": "no best.pth: the run never validated"}
    content = export_checkpoint(best, run_dir / f"{name}.pth", float16=True).read_bytes()
    parts = []
    for index, offset in enumerate(range(0, len(content), part_bytes)):
        part = out / f"{name}.pth.{index}"
        part.write_bytes(content[offset: offset + part_bytes])
        parts.append(part.name)
    return {"parts": parts, "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- here, after: the checkpoints back together --------------------------------------------------
def join(files: Path, out: Path) -> int:
    """Each variant's parts in ``files`` -> ``out``/<variant>.pth, checked against its sha256."""
    if not (files / "finetune.json").is_file():
        print(f"no finetune.json in {files}: give the folder the device call's files lie in", file=sys.stderr)
        return 2
    summary = json.loads((files / "finetune.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, entry in summary["variants"].items():
        content, problem = joined_parts(files, entry)
        if problem:
            print(f"{name}: {problem}", file=sys.stderr)
            failed += 1
            continue
        with atomic_path(out / f"{name}.pth") as partial:
            partial.write_bytes(content)
        best = entry["best"]
        print(f"{out / f'{name}.pth'}: step {best['step']}, validation click Dice {best['dice']:.3f} "
              f"{best['per_dataset']}")
    return 1 if failed else 0


def joined_parts(files: Path, entry: dict) -> tuple[bytes, str]:
    """(one variant's checkpoint bytes, "") or (b"", what is wrong with its parts)."""
    if not entry.get("parts"):
        return b"", f"no checkpoint came back ({entry.get('note', 'see finetune.log')})"
    missing = [part for part in entry["parts"] if not (files / part).is_file()]
    if missing:
        return b"", f"{', '.join(missing)} did not come back: fetch the files again"
    content = b"".join((files / part).read_bytes() for part in entry["parts"])
    if hashlib.sha256(content).hexdigest() != entry["sha256"]:
        return b"", "the parts do not add up to the checkpoint that was sent (sha256 differs): fetch the files again"
    return content, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="here: the data and wheels that travel, into FOLDER")
    make.add_argument("folder", type=Path)
    make.add_argument("--data", nargs="+", type=Path, default=[REPO / p for p in DATA],
                      help="COCO files whose names start with train. or val. (default: compact-v3's)")
    run = commands.add_parser("train", help="on the GPU machine: fine-tune every variant within the budget")
    run.add_argument("folder", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--budget-s", type=float, default=480.0, help="the whole call's seconds, export included")
    run.add_argument("--dry-run", action="store_true", help="the CPU, two steps of two images per variant")
    back = commands.add_parser("join", help="here: put the returned checkpoints back together")
    back.add_argument("files", type=Path, help="the folder the returned files lie in")
    back.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.folder, args.data)
    if args.command == "train":
        return train(args.folder, args.out, args.budget_s, args.dry_run)
    return join(args.files, args.out)


if __name__ == "__main__":
    sys.exit(main())
