"""The ``ultrasam`` command: segment images and volumes, inspect and download checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Sequence

import numpy as np

from ultrasam.model_options import add_model_options, predictor_from_args
from ultrasam.propagation import StopRules

EXAMPLES = """\
examples:
  # a 2D ultrasound image, one positive click at pixel (x=120, y=85):
  ultrasam segment bus_0001-l.png --checkpoint UltraSam.pth --point 120 85 --output mask.png

  # a box and a negative click:
  ultrasam segment image.png -c UltraSam.pth --box 40 30 200 160 --negative 90 60 -o mask.png

  # a volume: one click given in Slicer's RAS millimetres, segment that slice only:
  ultrasam segment Case3.nii.gz -c UltraSam.pth --frame ras --point 12.5 -30.1 40.2 -o mask.nii.gz

  # ... and propagate it through the volume along the k axis, writing a Slicer segmentation:
  ultrasam segment Case3.nii.gz -c UltraSam.pth --point 128 120 144 --propagate -o mask.seg.nrrd

  # a 3D ROI (centre and half sizes, voxels) prompting every slice it crosses:
  ultrasam segment obs000.nii.gz -c UltraSam.pth --roi 23 31 22 8 10 9 --propagate -o gland.nii.gz

  # many volumes from one prompts file (JSON or CSV), see `ultrasam batch --help`:
  ultrasam batch prompts.json -c UltraSam.pth --output-dir masks/

  # the same on a shared GPU server (`ultrasam serve`), its token in $ULTRASAM_TOKEN:
  ultrasam batch prompts.json --server http://gpu-box:8765 --output-dir masks/

  # Dice/IoU of a model with box and centroid-click prompts, beside the ellipse-in-box baseline:
  ultrasam evaluate busbra/ hc18/ -c UltraSam.pth -o eval/

  ultrasam info UltraSam.pth     # what the loader finds in a checkpoint
  ultrasam download              # fetch the official UltraSam weights (needs internet)
  ultrasam demo                  # segment the bundled real ultrasound volume
"""


# Commands other packages add (pyproject.toml: [project.entry-points."ultrasam.commands"]): the
# entry point's name is the command, its object a ``main(argv) -> int`` that parses its own arguments.
COMMAND_GROUP = "ultrasam.commands"
DESCRIPTION = "UltraSam: SAM trained on ultrasound, for images and 3D volumes."
NO_REGISTERED_COMMANDS = ("\n  none found; installing this project (pip install -e .) registers train, convert "
                          "and check-data")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registered = registered_commands()
        if argv and argv[0] in registered:
            return registered[argv[0]].load()(argv[1:])
        args = build_parser(registered).parse_args(argv)
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        # Every expected failure carries a message meant for the user; no traceback.
        print(f"ultrasam: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted("ultrasam")


def _interrupted(program: str) -> int:
    """What Ctrl+C prints instead of a traceback; the shell's exit status for SIGINT."""
    print(f"\n{program}: interrupted; files being written were left as they were", file=sys.stderr)
    return 130


def registered_commands() -> dict[str, metadata.EntryPoint]:
    """Command name -> entry point (not loaded yet) of every command installed packages register."""
    try:
        entries = metadata.entry_points(group=COMMAND_GROUP)
    except TypeError:  # Python 3.9: no selection; a dict of group -> entry points
        entries = metadata.entry_points().get(COMMAND_GROUP, ())
    commands: dict[str, metadata.EntryPoint] = {}
    for entry in entries:
        commands.setdefault(entry.name, entry)  # the first on sys.path wins, as for imports
    return commands


def build_parser(registered: Mapping[str, metadata.EntryPoint] | None = None) -> argparse.ArgumentParser:
    from ultrasam.evaluation import add_evaluate_parser

    parser = _Parser(registered_commands() if registered is None else registered, prog="ultrasam",
                     description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True, metavar="command", parser_class=argparse.ArgumentParser)
    _add_segment(commands)
    _add_batch(commands)
    _add_info(commands)
    _add_download(commands)
    _add_demo(commands)
    _add_serve(commands)
    add_evaluate_parser(commands)
    return parser


def _add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help="segment on a running `ultrasam serve` (http://host:port) "
                        "with the model it was started with; its token from $ULTRASAM_TOKEN or --token-file")
    parser.add_argument("--token-file", help="file holding the server's token")


def _add_volume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--axis", default="k", help="slicing axis: k, j or i (the ijk index constant on a "
                        "slice), or the numpy axis 0, 1, 2 of the (K, J, I) array (default k)")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="intensity window mapped to 0..255 (default: 0..255 for 8-bit-range data, "
                        "else the 0.5-99.5th percentiles)")
    parser.add_argument("--propagate", action="store_true", help="extend from the prompted slice(s) "
                        "through the whole object")
    rules = parser.add_argument_group("when propagation stops (the slice that breaks a rule stays empty)")
    defaults = StopRules()
    rules.add_argument("--min-iou", type=float, default=defaults.min_iou,
                       help=f"predicted IoU below this ends the object (default {defaults.min_iou})")
    rules.add_argument("--max-growth", type=float, default=defaults.max_growth,
                       help=f"area above this x the previous slice's is a leak (default {defaults.max_growth})")
    rules.add_argument("--growth-floor", type=int, default=defaults.growth_floor,
                       help=f"area in pixels below which growth is not judged (default {defaults.growth_floor})")
    rules.add_argument("--min-area", type=int, default=defaults.min_area,
                       help=f"a mask with fewer pixels has vanished (default {defaults.min_area})")


def _add_segment(commands) -> None:
    parser = commands.add_parser(
        "segment", help="segment one image or volume from prompts", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment one object. Points and boxes are in --frame coordinates: pixel x y for a "
                    "2D image, voxel i j k, or physical RAS/LPS millimetres for a volume.",
    )
    parser.add_argument("input", help="2D image (PNG/JPG), volume (NIfTI, NRRD, MHA/MHD) or DICOM folder")
    parser.add_argument("-o", "--output", required=True, help=".png (2D), .nii.gz, .nrrd, .mha or .seg.nrrd")
    parser.add_argument("--point", nargs="+", type=float, action="append", default=[], metavar="X",
                        help="positive click: X Y (2D) or X Y Z; repeatable")
    parser.add_argument("--negative", nargs="+", type=float, action="append", default=[], metavar="X",
                        help="negative click, like --point")
    parser.add_argument("--box", nargs="+", type=float, action="append", default=[], metavar="X",
                        help="2D box: X0 Y0 X1 Y1 (2D image) or two opposite corners X0 Y0 Z0 X1 Y1 Z1 "
                        "on one slice of a volume")
    parser.add_argument("--roi", nargs=6, type=float, action="append", default=[],
                        metavar=("CX", "CY", "CZ", "HX", "HY", "HZ"),
                        help="axis-aligned 3D box (centre and half sizes in --frame) prompting every slice "
                        "it crosses")
    parser.add_argument("--frame", choices=("ijk", "ras", "lps"), default="ijk",
                        help="coordinates of prompts: voxel/pixel indices (default), or RAS/LPS mm")
    parser.add_argument("--time-frame", type=int, help="frame of a 4D (3D+t) series")
    parser.add_argument("--report", help="write the per-slice report (JSON) here")
    parser.add_argument("--span", nargs=2, type=int, metavar=("FIRST", "LAST"),
                        help="propagate only within slices FIRST..LAST (inclusive)")
    add_model_options(parser)
    _add_volume_options(parser)
    _add_server_option(parser)
    parser.set_defaults(run=_run_segment)


def _add_batch(commands) -> None:
    from ultrasam import batch

    parser = commands.add_parser("batch", help="segment many volumes from one prompts file",
                                 description=batch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", help="JSON or CSV prompts file")
    parser.add_argument("--output-dir", required=True, help="folder for masks, report.json and summary.csv")
    add_model_options(parser)
    _add_volume_options(parser)
    _add_server_option(parser)
    parser.set_defaults(run=_run_batch)


def _add_info(commands) -> None:
    parser = commands.add_parser("info", help="say what a checkpoint holds")
    parser.add_argument("checkpoint", help="a checkpoint file, or 'litemedsam' or 'compact-v1'")
    parser.set_defaults(run=_run_info)


def _add_download(commands) -> None:
    parser = commands.add_parser("download", help="download the official UltraSam weights (needs internet)")
    parser.add_argument("--cache-dir", help="folder to keep them in (default: $ULTRASAM_CACHE or ~/.cache/ultrasam)")
    parser.add_argument("--url", help="where to fetch UltraSam.pth (default: CAMMA's official address; a mirror "
                        "serving the same file works too, the file is checked by loading it)")
    parser.set_defaults(run=_run_download)


def _add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="segment the bundled real ultrasound volume (RESECT case 3)")
    parser.add_argument("-o", "--output", default="demo_output/resect_case3_mask.seg.nrrd")
    add_model_options(parser)
    _add_volume_options(parser)
    parser.set_defaults(run=_run_demo)


def _add_serve(commands) -> None:
    parser = commands.add_parser(
        "serve", help="run the engine as an HTTP service (Slicer, `--server` clients)",
        description="Hold the model and serve segmentation sessions over HTTP (operations: ultrasam/server.py). "
                    "Listens on 127.0.0.1 unless --host says otherwise; any other address needs a token.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                        "any other address needs a token)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    parser.add_argument("--token-file", help="file holding the token clients must send (default: the "
                        "ULTRASAM_TOKEN environment variable)")
    parser.add_argument("--new-token", action="store_true", help="make a random token and print it, to paste "
                        "into the UltraSam module or pass as --token to clients")
    parser.add_argument("--cache-gib", type=float, default=2.0, help="slice embeddings kept on the device "
                        "(twice as much more in CPU memory; default 2)")
    parser.add_argument("--session-memory-gib", type=float, default=8.0,
                        help="voxel memory of all open volumes; least recently used idle ones close beyond it")
    parser.add_argument("--idle-minutes", type=float, default=30.0, help="close volumes unused this long")
    parser.add_argument("--max-upload-mib", type=float, default=1024.0, help="largest volume a client may send")
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)  # child of Slicer
    add_model_options(parser)
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import secrets

    from ultrasam.server import Engine, Limits, check_binding, serve
    from ultrasam.volume_embeddings import GIB, VolumeEmbeddingCache

    token = _token(args)
    if args.new_token:
        token = secrets.token_urlsafe(24)
        print(f"token: {token}", flush=True)
    check_binding(args.host, token)  # before the model loads: a refusal costs nothing
    predictor, description = predictor_from_args(args)
    budget = int(args.cache_gib * GIB)
    limits = Limits(upload_bytes=int(args.max_upload_mib * 2**20), session_bytes=int(args.session_memory_gib * GIB),
                    idle_seconds=args.idle_minutes * 60)
    engine = Engine(VolumeEmbeddingCache(predictor, budget, 2 * budget), description, limits)
    print(f"ultrasam serve: http://{args.host}:{args.port} ({description})", file=sys.stderr, flush=True)
    serve(engine, args.host, args.port, token, watch_stdin=args.exit_with_stdin)
    return 0


def _run_segment(args: argparse.Namespace) -> int:
    from ultrasam.atomic import atomic_group, check_writable, write_text_atomic
    from ultrasam.batch import segment_volume
    from ultrasam.volume_io import check_mask_path, read_volume, write_mask

    volume = read_volume(args.input, frame=args.time_frame)
    check_mask_path(args.output, volume.shape_kji[0])  # before the model loads and any slice runs
    if args.report:
        check_writable(args.report)
    prompts = _volume_prompts(args, volume.shape_kji[0] == 1)
    axis = 0 if volume.shape_kji[0] == 1 else args.axis
    span = tuple(args.span) if args.span else None
    if args.server:
        segment = _server_segmenter(args, {"first": span[0], "last": span[1]} if span else None)
        mask, report = segment(volume, prompts, axis)
    else:
        predictor, description = predictor_from_args(args)
        print(f"model: {description}", file=sys.stderr)
        with _progress(volume.shape_kji, axis, args.propagate) as on_slice:
            mask, report = segment_volume(volume, predictor, prompts, axis=axis, propagate=args.propagate,
                                          window=_window(args), rules=_stop_rules(args), on_slice=on_slice, span=span)
    _print_warnings(report)
    with atomic_group() as group:  # the mask and its report replace the old ones together, or neither
        write_mask(mask, volume.geometry, args.output, group=group)
        if args.report:
            write_text_atomic(args.report, json.dumps(report, indent=2), group)
    print(f"wrote {args.output}: {int(mask.sum())} voxels on {len(report['segmented_slices'])} slice(s)")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from ultrasam.batch import run_batch

    predictor, segment = None, _server_segmenter(args) if args.server else None
    if segment is None:
        predictor, description = predictor_from_args(args)
        print(f"model: {description}", file=sys.stderr)
    rows = run_batch(args.prompts, predictor, args.output_dir, axis=args.axis, propagate=args.propagate,
                     rules=_stop_rules(args), window=_window(args), segment=segment)
    failed = [row for row in rows if row.get("error")]
    warned = sum(1 for row in rows if row.get("warnings"))
    checks = f", {warned} with warnings to check (its warnings column)" if warned else ""
    print(f"{len(rows) - len(failed)} of {len(rows)} volumes segmented; summary in {args.output_dir}/summary.csv"
          + checks)
    return 1 if failed else 0


def _run_info(args: argparse.Namespace) -> int:
    from ultrasam.checkpoint import load_model

    from ultrasam.resources import model_path

    loaded = load_model(model_path(args.checkpoint))
    print(f"{args.checkpoint}: {loaded.kind} checkpoint")
    for key, value in loaded.info.items():
        print(f"  {key}: {value}")
    return 0


def _run_download(args: argparse.Namespace) -> int:
    from ultrasam.download import OFFICIAL_URL, download_official_weights

    # A progress bar only on a terminal: the Slicer module reads this child's output through a pipe
    # after it exits (a bar would fill the pipe and block the download), and shows the file's size.
    print(download_official_weights(args.cache_dir, url=args.url or OFFICIAL_URL, progress=sys.stderr.isatty()))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from ultrasam.resources import SAMPLE_BOX_IJK, SAMPLE_VOLUME

    args.input, args.time_frame, args.report = str(SAMPLE_VOLUME), None, None
    args.point, args.negative, args.box, args.roi = [], [], [list(SAMPLE_BOX_IJK)], []
    args.frame, args.propagate, args.span, args.server = "ijk", True, None, None
    print(f"demo: {SAMPLE_VOLUME.name} (RESECT case 3, CC BY 4.0), a box on slice k={SAMPLE_BOX_IJK[2]} "
          f"(voxel corners {SAMPLE_BOX_IJK}), followed through the volume")
    return _run_segment(args)


def _server_segmenter(args: argparse.Namespace, span: dict | None = None):
    """segment(volume, prompts, axis) -> (mask, report) on the server named by --server."""
    import dataclasses

    from ultrasam.client import Client, segment_on_server
    from ultrasam.slicing import axis_index

    if args.window or args.checkpoint:
        raise ValueError("--window and --checkpoint do not apply with --server: the server chooses the window and "
                         "runs the model it was started with")
    client = Client(args.server, _token(args))
    print(f"model: {client.check_version()['model']} at {client.url}", file=sys.stderr)
    rules = dataclasses.asdict(_stop_rules(args))
    return lambda volume, prompts, axis: segment_on_server(client, volume, prompts, axis_index(axis), args.propagate,
                                                           rules, span)


def _token(args: argparse.Namespace) -> str | None:
    """The server token: --token-file's content, else $ULTRASAM_TOKEN; None when neither holds one."""
    from ultrasam.client import TOKEN_ENV

    if args.token_file:
        with open(args.token_file, encoding="utf-8") as file:
            return file.read().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def _print_warnings(report: dict) -> None:
    for warning in report.get("warnings", []):
        print(f"ultrasam: warning: {warning}", file=sys.stderr)


def _stop_rules(args: argparse.Namespace) -> StopRules:
    return StopRules(min_area=args.min_area, min_iou=args.min_iou, max_growth=args.max_growth,
                     growth_floor=args.growth_floor)


def _window(args: argparse.Namespace) -> tuple[float, float] | None:
    return tuple(args.window) if args.window else None


def _volume_prompts(args: argparse.Namespace, is_2d: bool):
    """Command-line points/boxes/ROIs -> VolumePrompts (2D inputs get z = 0)."""
    from ultrasam.prompts3d import Roi, SliceBox, VolumePrompts

    def position(values: list[float], option: str, count: int = 1) -> np.ndarray:
        width = 2 if is_2d and args.frame == "ijk" else 3
        if len(values) != width * count:
            raise ValueError(f"{option} takes {width * count} numbers here, got {len(values)}: {values}")
        points = np.reshape(values, (count, width))
        return np.pad(points, ((0, 0), (0, 3 - width))) if width == 2 else points

    for box in args.box:
        _check_box_order(box, args.frame)
    points = [position(p, "--point")[0] for p in args.point] + [position(p, "--negative")[0] for p in args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    boxes = [SliceBox(*position(b, "--box", 2), frame=args.frame) for b in args.box]
    rois = [Roi(center=r[:3], half_sizes=r[3:], frame=args.frame) for r in args.roi]
    prompts = VolumePrompts(points=np.reshape(points, (-1, 3)), labels=labels, frame=args.frame,
                            boxes=boxes, rois=rois)
    if prompts.is_empty():
        raise ValueError("no prompt given: add --point, --negative, --box or --roi (see --help)")
    return prompts


def _check_box_order(values: list[float], frame: str) -> None:
    """Voxel/pixel boxes are (low corner, high corner), as in the Python API; never swapped.
    (RAS/LPS boxes are two opposite corners: their axes need not run like the voxel axes.)"""
    if frame != "ijk" or len(values) not in (4, 6):
        return
    low, high = np.reshape(values, (2, -1))
    if np.any(high < low) or np.count_nonzero(high > low) < 2:
        raise ValueError(f"--box must be X0 Y0 X1 Y1 (or X0 Y0 Z0 X1 Y1 Z1 on one slice) with X1 > X0 and "
                         f"Y1 > Y0, got {values}; give the top-left corner first")


class _Parser(argparse.ArgumentParser):
    """The top-level parser; its help also lists the registered commands, loaded only then."""

    def __init__(self, registered: Mapping[str, metadata.EntryPoint], **kwargs) -> None:
        super().__init__(**kwargs)
        self.registered = registered

    def format_help(self) -> str:
        listing = "".join(f"\n  {name:<12}{_summary(entry)}" for name, entry in self.registered.items())
        self.description = (f"{DESCRIPTION}\n\nmore commands, from other packages (see `ultrasam <command> "
                            f"--help`):{listing or NO_REGISTERED_COMMANDS}")
        return super().format_help()


def _summary(entry: metadata.EntryPoint) -> str:
    """First line of a registered command's docstring; a command that fails to load is named."""
    try:
        command = entry.load()
    except Exception as error:  # another package's failure must leave `ultrasam --help` working
        return f"cannot be loaded ({entry.value}: {error})"
    return (command.__doc__ or "").strip().split("\n")[0]


class _progress:
    """tqdm bar over slices while a volume is propagated; silent for single slices."""

    def __init__(self, shape_kji, axis, propagate: bool) -> None:
        from ultrasam.slicing import axis_index
        from tqdm.auto import tqdm

        self._bar = tqdm(total=shape_kji[axis_index(axis)], unit="slice", desc="segmenting",
                         disable=not propagate, file=sys.stderr)

    def __enter__(self):
        return lambda result: self._bar.update(1)

    def __exit__(self, *exc) -> None:
        self._bar.close()


if __name__ == "__main__":
    sys.exit(main())
