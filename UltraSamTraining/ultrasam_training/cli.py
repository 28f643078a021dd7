"""``ultrasam-train`` / ``python -m ultrasam_training``: configure, run, launch, watch and stop training.

    ultrasam-train config OUT.json --train a.json [--val b.json] [--init scratch|checkpoint|usf-mae]
                          [--checkpoint W.pth] [--output-dir RUN] [--steps N]
    ultrasam-train train CONFIG.json          run here (every torchrun process runs this); resumes
                                              from <output_dir>/resume.pt when present
    ultrasam-train launch CONFIG.json [--gpus N | --slurm PARTITION [--nodes N] [--gpus-per-node G]
                          [--time HH:MM:SS]]  start in the background, return at once
    ultrasam-train status RUN_DIR             progress as JSON
    ultrasam-train stop RUN_DIR               end the job (the whole process tree, or scancel)
    ultrasam-train split FILE.json [--val-fraction F] [--seed S] [--by group|image]
                                              write a fixed train./val. split beside a data set's file
    ultrasam-train export CHECKPOINT OUT.pth [--float16]
                                              rewrite a checkpoint in this project's format (to ship it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ultrasam_training import config as config_module


def main(argv: Sequence[str] | None = None) -> int:
    """Configure, run, launch, watch and stop training jobs (the `ultrasam-train` command)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (config_module.ConfigError, RuntimeError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nultrasam-train: interrupted; resume.pt keeps the last checkpoint, run the same command to resume",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultrasam-train", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, dest="command")

    make = commands.add_parser("config", help="write a config file with UltraSam's recipe as defaults")
    make.add_argument("out")
    make.add_argument("--train", nargs="+", required=True, help="COCO annotation files to train on")
    make.add_argument("--val", nargs="*", default=[], help="COCO annotation files to validate on")
    make.add_argument("--init", choices=config_module.INIT_KINDS, default="checkpoint")
    make.add_argument("--checkpoint", default="", help="weights to start from (UltraSam, SAM, USF-MAE)")
    make.add_argument("--output-dir", default="ultrasam-run")
    make.add_argument("--steps", type=int)
    make.add_argument("--skip-bad-samples", action="store_true",
                      help="train without unusable annotations and images (each is reported) instead of refusing")
    make.set_defaults(run=_config)

    train = commands.add_parser("train", help="train in this process (torchrun-aware)")
    train.add_argument("config")
    train.set_defaults(run=_train)

    launch = commands.add_parser("launch", help="start training in the background, locally or on SLURM")
    launch.add_argument("config")
    launch.add_argument("--gpus", type=int, default=1, help="local processes (torchrun when > 1)")
    launch.add_argument("--slurm", metavar="PARTITION", help="submit to this SLURM partition instead")
    launch.add_argument("--nodes", type=int, default=1)
    launch.add_argument("--gpus-per-node", type=int, default=4)
    launch.add_argument("--time", default="24:00:00")
    launch.set_defaults(run=_launch)

    for name, run, text in (("status", _status, "print progress as JSON"), ("stop", _stop, "end the job")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run_dir")
        command.set_defaults(run=run)

    export = commands.add_parser("export", help="write a checkpoint in this project's format, e.g. in float16 to ship it")
    export.add_argument("checkpoint", help="any checkpoint `ultrasam info` reads (a run's best.pth)")
    export.add_argument("out")
    export.add_argument("--float16", action="store_true", help="store the weights in half precision (half the file)")
    export.set_defaults(run=_export)

    split = commands.add_parser("split", help="write train./val. COCO files beside a data set's main file")
    split.add_argument("annotation_file", help="a data set's main file, <dataset>__coco.json")
    split.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out (default 0.2)")
    split.add_argument("--seed", type=int, default=0, help="which groups are drawn (default 0)")
    split.add_argument("--by", choices=("group", "image"), default="group",
                       help="hold out whole patients/volumes (group, default) or random images")
    split.set_defaults(run=_split)
    return parser


def _config(args) -> int:
    values = {
        "output_dir": args.output_dir,
        "data": {"train": args.train, "val": args.val, "skip_bad_samples": args.skip_bad_samples},
        "model": {"init": args.init, "checkpoint": args.checkpoint},
    }
    if args.steps is not None:
        values["run"] = {"steps": args.steps}
    config_module.save_config(config_module.from_dict(values), args.out)
    print(args.out)
    return 0


def _train(args) -> int:
    from ultrasam_training.trainer import train

    print(train(config_module.load_config(args.config)))
    return 0


def _launch(args) -> int:
    from ultrasam_training import launch

    config = config_module.load_config(args.config)
    if args.slurm:
        options = launch.SlurmOptions(args.slurm, args.nodes, args.gpus_per_node, time=args.time)
        print(launch.submit_slurm(args.config, config.output_dir, options))
    else:
        print(launch.start_local(args.config, config.output_dir, args.gpus).pid)
    return 0


def _status(args) -> int:
    from ultrasam_training import launch

    print(json.dumps({"running": launch.is_running(args.run_dir), **launch.read_progress(args.run_dir).to_dict()}))
    return 0


def _stop(args) -> int:
    from ultrasam_training import launch

    launch.stop(args.run_dir)
    return 0


def _export(args) -> int:
    print(export_checkpoint(args.checkpoint, args.out, args.float16))
    return 0


def export_checkpoint(checkpoint: str | Path, out: str | Path, float16: bool = False) -> Path:
    """Rewrite any checkpoint ``load_model`` reads in this project's format (``float16``: half the file)."""
    from ultrasam.checkpoint import load_model, save_checkpoint

    loaded = load_model(checkpoint)
    meta = dict(loaded.info.get("meta", {}))
    if "postprocess" in loaded.info:  # the inference rules travel with the weights
        meta["postprocess"] = loaded.info["postprocess"]
    return save_checkpoint(out, loaded.model, meta, float16=float16)


def _split(args) -> int:
    from ultrasam_data.splits import write_split

    for path in write_split(args.annotation_file, args.val_fraction, args.seed, args.by):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
