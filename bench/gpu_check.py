"""One command for a lent GPU: CUDA tests, inference and training speed, torchrun kill/resume, memory.

    python3 bench/gpu_check.py OUT_DIR --volume carry/Case3_uint8.npz   # on the GPU machine
    python bench/gpu_check.py OUT_DIR --dry-run                         # the same steps on the CPU, tiny
    python bench/gpu_check.py --prepare carry                           # here, before: wheels, volume, size

Steps, each a subprocess with its own time budget, so that a slow or hung step is killed and the
others still run (the whole check stays within ``--total-s``, 8 minutes by default):

1. ``cuda_tests``: ``pytest -m cuda`` (Testing/test_cuda_paths.py);
2. ``inference_vit_b`` and ``inference_default``: bench/bench_inference.py, engine against
   ``SamPredictor`` fp32, on random ViT-B weights and on the shipped default model;
3. ``training``: bench/bench_training.py, ViT-B full fine-tuning, bf16 and fp32 images/s, and
   frozen-encoder training of the shipped model (LiteMedSAM's architecture) against its full
   fine-tuning;
4. ``torchrun_resume``: a 1-GPU torchrun job (NCCL) of 50 steps killed with SIGKILL after its
   first checkpoint, resumed, and its final weights compared with an uninterrupted job's;
5. peak GPU memory of every step (``nvidia-smi`` polled by this process, besides what each step
   measures itself).

``OUT_DIR/gpu_check.json`` and ``gpu_check.md`` are rewritten after every step, so a check cut
short still leaves the steps done; ``gpu_check.log`` holds every step's output. ``--dry-run``
runs the same code on the CPU with tiny sizes (gloo instead of NCCL, tiny models, few slices;
the CUDA tests run on the CPU too) in about a minute: CI runs it (Testing/test_speed_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "UltraSamSlicer"), str(REPO / "UltraSamTraining")]

from ultrasam.atomic import write_text_atomic  # noqa: E402
from ultrasam_training.launch import process_tree, signal_tree  # noqa: E402

BUNDLED_VOLUME = REPO / "UltraSamSlicer" / "ultrasam" / "data" / "RESECT_Case3.nii.gz"
CARRIED_VOLUME = REPO / "carry" / "Case3_uint8.npz"
TRAINING_DATA = REPO / "Testing" / "fixtures" / "regression" / "BUSBRA" / "annotations" / "BUSBRA__coco.json"
WHEELS = ("segment-anything==1.0", "pycocotools==2.0.11")  # what the GPU machine lacks (SimpleITK: too big, not needed)
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on what travels
TRAINING_TARGET = 60.0  # images/s per GPU, issue 6


@dataclass(frozen=True)
class Step:
    """One step: its seconds on a GPU and in the dry run (generous: shared CI machines vary 10x)."""

    name: str
    budget_s: float
    dry_budget_s: float


STEPS = (
    Step("cuda_tests", 120, 300),
    Step("inference_vit_b", 120, 300),
    Step("inference_default", 40, 300),
    Step("training", 90, 300),
    Step("torchrun_resume", 100, 300),
)


# ---- the steps (each runs in its own process: ``gpu_check.py --step NAME``) --------------------
def cuda_tests(work: Path, dry_run: bool, volume: Path) -> dict:
    """pytest -m cuda, verbose so that a step killed half-way still says which tests ran."""
    log = work / "cuda_tests.pytest.log"
    env = {**os.environ, "ULTRASAM_CUDA_TESTS_ON_CPU": "1" if dry_run else "0"}
    with log.open("w") as stream:
        code = subprocess.call([sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider",
                                str(REPO / "Testing" / "test_cuda_paths.py")], cwd=REPO, env=env,
                               stdout=stream, stderr=subprocess.STDOUT)
    return {"exit_code": code, **pytest_outcomes(log.read_text())}


def pytest_outcomes(text: str) -> dict:
    """Per-test outcomes from ``pytest -v`` lines (``path::test[param] PASSED [ 50%]``)."""
    outcomes = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if "::" in name and rest.split(" ")[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS"):
            outcomes[name.split("::", 1)[1]] = rest.split(" ")[0]
    counts = {kind: list(outcomes.values()).count(kind) for kind in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    return {"tests": outcomes, "counts": counts}


def inference(work: Path, dry_run: bool, volume: Path, model: str) -> dict:
    """bench_inference.py's figures: engine against SamPredictor (fp32, one slice at a time)."""
    import bench_inference
    from ultrasam.resources import SHIPPED_MODEL

    weights = ["--model", "tiny" if dry_run else "vit_b"] if model == "vit_b" else ["--checkpoint", str(SHIPPED_MODEL)]
    sizes = ["--device", "cpu", "--slices", "2", "--clicks", "2", "--batch", "2"] if dry_run else \
        ["--device", "cuda", "--batch", "16", "--clicks", "20"]
    return bench_inference.main([*weights, *sizes, "--volume", str(volume), "--json", str(work / f"{model}.json")])


def training(work: Path, dry_run: bool, volume: Path) -> dict:
    """bench_training.py: ViT-B full fine-tuning, bf16 (the recipe) and fp32 (UltraSam's); frozen-encoder
    training of the shipped model against its full fine-tuning."""
    import bench_training

    sizes = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "2", "--objects", "3"] \
        if dry_run else ["--device", "cuda", "--steps", "10", "--warmup", "3"]
    figures = bench_training.main([*sizes, "--json", str(work / "training.json")])
    from ultrasam.resources import SHIPPED_MODEL  # LiteMedSAM's architecture; its package does not travel

    frozen = sizes if dry_run else ["--checkpoint", str(SHIPPED_MODEL), "--device", "cuda", "--steps", "10",
                                    "--warmup", "3", "--objects", "1"]
    figures["frozen_encoder"] = bench_training.main([*frozen, "--frozen", "--json", str(work / "training_frozen.json")])
    return figures


def torchrun_resume(work: Path, dry_run: bool, volume: Path) -> dict:
    """A 1-process torchrun job (NCCL on a GPU, gloo on the CPU) killed with SIGKILL after its first
    checkpoint, resumed, against the same job uninterrupted: final weights compared."""
    import torch

    from ultrasam.checkpoint import load_model
    from ultrasam_training.runlog import read_records

    steps, every = (12, 4) if dry_run else (50, 10)
    scratch = ({"image_size": 128, "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
                "encoder_global_attn_indexes": [1], "encoder_window_size": 4, "prompt_embed_dim": 32,
                "mask_in_chans": 4, "decoder_mlp_dim": 64, "iou_head_hidden_dim": 32}
               if dry_run else {"image_size": 512})  # ViT-B at 512 px: the real blocks, 50 steps in seconds
    figures = {"steps": steps, "model": scratch}
    for name in ("uninterrupted", "killed"):
        config = {"output_dir": str(work / name), "model": {"init": "scratch", "scratch": scratch},
                  "data": {"train": [str(TRAINING_DATA)], "val_fraction": 0.0},
                  "optim": {"warmup_steps": 5},
                  "run": {"steps": steps, "batch_size": 2, "checkpoint_every": every, "log_every": 1,
                          "num_workers": 0 if dry_run else 2, "deterministic": True}}
        (work / f"{name}.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "ultrasam_training", "train"]
    start = time.perf_counter()
    _run_logged(command + [str(work / "uninterrupted.json")], work / "uninterrupted.log")
    figures["uninterrupted_s"] = time.perf_counter() - start
    metrics = work / "killed" / "metrics.jsonl"
    with (work / "killed.log").open("w") as log:
        job = subprocess.Popen(command + [str(work / "killed.json")], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        while not _past_a_checkpoint(read_records(metrics)):  # so that some work is lost
            if job.poll() is not None:
                raise RuntimeError(f"the job to kill ended first (exit {job.returncode}); see killed.log")
            time.sleep(0.02)
        kill_tree(job.pid)
        job.wait()
    figures["killed_at_step"] = max(r["step"] for r in read_records(metrics) if r["kind"] == "train")
    _run_logged(command + [str(work / "killed.json")], work / "resumed.log")
    records = read_records(metrics)
    figures["resumed_from_step"] = [r["step"] for r in records if r["kind"] == "start"][-1]
    started = [r for r in records if r["kind"] == "start"]
    figures["device"], figures["process_group"] = started[-1]["device"], started[-1]["process_group"]
    expected = load_model(work / "uninterrupted" / "model.pth").model.state_dict()
    resumed = load_model(work / "killed" / "model.pth").model.state_dict()
    differences = [float((expected[key].float() - resumed[key].float()).abs().max()) for key in expected]
    figures["bit_identical"] = all(torch.equal(expected[key], resumed[key]) for key in expected)
    figures["max_abs_difference"] = max(differences)
    return figures


def _past_a_checkpoint(records: list[dict]) -> bool:
    """Whether a training step was logged after the first checkpoint."""
    saved = [r["step"] for r in records if r["kind"] == "checkpoint"]
    return bool(saved) and any(r["kind"] == "train" and r["step"] > saved[0] for r in records)


def _run_logged(command: list[str], log: Path) -> None:
    with log.open("w") as stream:
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[-3:])} failed (exit {code}): {log.read_text()[-1500:]}")


RUNNERS = {
    "cuda_tests": cuda_tests,
    "inference_vit_b": lambda work, dry_run, volume: inference(work, dry_run, volume, "vit_b"),
    "inference_default": lambda work, dry_run, volume: inference(work, dry_run, volume, "default"),
    "training": training,
    "torchrun_resume": torchrun_resume,
}


# ---- the parent: budgets, memory, reports -------------------------------------------------------
class GpuMemoryPoller:
    """Largest GPU memory in use (MiB, all processes) while a step runs, from ``nvidia-smi``."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak_mib, self._stop = interval_s, None, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemoryPoller:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = nvidia_smi("memory.used")
            if used:
                self.peak_mib = max(self.peak_mib or 0, sum(int(value) for value in used))
            self._stop.wait(self.interval_s)


def nvidia_smi(query: str) -> list[str]:
    """One value per GPU, or [] without nvidia-smi."""
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def run_step(command: list[str], timeout_s: float, log: Path) -> tuple[str, float, int | None]:
    """Run ``command`` in its own process group; kill the group after ``timeout_s``.

    Returns (status "ok" | "failed" | "timeout", seconds, peak GPU MiB or None).
    """
    start = time.perf_counter()
    with log.open("w") as stream, GpuMemoryPoller() as memory:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=child_env(), start_new_session=True)
        try:
            status = "ok" if process.wait(timeout=max(timeout_s, 0.1)) == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            status = "timeout"
    return status, time.perf_counter() - start, memory.peak_mib


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid``'s process group and all its descendants."""
    signal_tree(pid, process_tree(pid), signal.SIGKILL)


def child_env() -> dict:
    paths = [str(REPO / "UltraSamSlicer"), str(REPO / "UltraSamTraining"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def check(out: Path, dry_run: bool, volume: Path, total_s: float, budgets: dict[str, float],
          only: list[str] | None, command: str) -> dict:
    """Run the steps within their budgets and ``total_s``; write the reports after each step."""
    deadline = time.monotonic() + total_s
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run,
              "command": command, "device": _device_name(dry_run),
              "volume": str(volume), "total_budget_s": total_s, "steps": {}}
    logs = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as folder:
        for step in STEPS:
            if only and step.name not in only:
                continue
            work = Path(folder) / step.name
            work.mkdir()
            budget = budgets.get(step.name, step.dry_budget_s if dry_run else step.budget_s)
            timeout = min(budget, deadline - time.monotonic() - 5)
            entry = {"budget_s": budget}
            if timeout < 5:
                entry["status"] = "skipped: the check's total budget was spent"
            else:
                command = [sys.executable, __file__, "--step", step.name, "--work", str(work), "--volume", str(volume)]
                status, seconds, peak = run_step(command + (["--dry-run"] if dry_run else []), timeout, work / "step.log")
                result = work / "result.json"
                entry.update(status=status, seconds=round(seconds, 1), peak_gpu_mib=peak,
                             result=json.loads(result.read_text()) if result.is_file() else None)
                if step.name == "cuda_tests" and entry["result"] is None and (work / "cuda_tests.pytest.log").is_file():
                    entry["result"] = pytest_outcomes((work / "cuda_tests.pytest.log").read_text())  # killed half-way
                text = "".join(path.read_text(errors="replace") for path in sorted(work.glob("*.log")))
                entry["log_tail"] = text[-2000:]
                logs.append(f"===== {step.name}: {status} in {seconds:.1f} s =====\n{text}")
            report["steps"][step.name] = entry
            write_reports(out, report, logs)
    return report


def _device_name(dry_run: bool) -> str:
    if dry_run:
        from ultrasam.precision import cpu_description

        return f"CPU: {cpu_description()[0]} (dry run)"
    gpus = nvidia_smi("name,memory.total,driver_version")
    return "; ".join(gpus) or "no nvidia-smi"


def write_reports(out: Path, report: dict, logs: list[str]) -> None:
    write_text_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "gpu_check.md", markdown(report))
    write_text_atomic(out / "gpu_check.log", "\n".join(logs))


def markdown(report: dict) -> str:
    """The report as tables: steps, then each step's figures against the targets."""
    from bench_inference import GPU_TARGETS

    lines = [f"# GPU check, {report['date']}", "", f"- device: {report['device']}",
             f"- command: `{report['command']}`", f"- dry run: {report['dry_run']}", "",
             "| step | status | seconds (budget) | peak GPU MiB (nvidia-smi) |", "|---|---|---|---|"]
    for name, entry in report["steps"].items():
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} ({entry['budget_s']:g}) | "
                     f"{entry.get('peak_gpu_mib') or ''} |")
    steps = report["steps"]
    tests = (steps.get("cuda_tests") or {}).get("result")
    if tests:
        lines += ["", f"CUDA tests: {tests['counts']}", ""]
        lines += [f"- {name}: {outcome}" for name, outcome in tests["tests"].items()]
    for name in ("inference_vit_b", "inference_default"):
        figures = (steps.get(name) or {}).get("result")
        if not figures:
            continue
        lines += ["", f"## {name}: {figures['model']}, {figures['slices']} slices {figures['slice_shape']}, "
                      f"batch {figures['batch']}, engine precision {figures['engine_setup'].get('precision')}", "",
                  "| figure | reference | engine | ratio | target |", "|---|---|---|---|---|"]
        rows = [("embed, ms/slice", "embed_ms_per_slice"), ("click, ms", "click_ms"),
                ("propagate all, s", "propagate_s"), ("cold start, s", "cold_start_s")]
        for label, key in rows:
            lines.append(f"| {label} | {figures['reference'][key]:.3f} | {figures['engine'][key]:.3f} | "
                         f"{figures['speedup'][key]:.2f}x | {GPU_TARGETS.get(key, '')} |")
        engine = figures["engine"]
        lines += [f"| propagate 300 slices, s | | {engine['propagate_300_s']:.3f} | | {GPU_TARGETS['propagate_300_s']} |",
                  f"| click with refine pass, ms | | {engine['click_refine_ms']:.3f} | | |",
                  f"| peak GPU GiB (torch) | {figures['reference']['peak_gib']} | {engine['peak_gib']} | | |",
                  "", f"mask IoU engine vs reference: min {figures['mask_iou']['min']:.4f}, "
                      f"mean {figures['mask_iou']['mean']:.4f}"]
    figures = (steps.get("training") or {}).get("result")
    if figures:
        lines += ["", f"## training: {figures['encoder']} encoder at {figures['image_size']} px, batch "
                      f"{figures['batch_per_gpu']}", "", "| variant | images/s | peak GiB (torch) | target |",
                  "|---|---|---|---|"]
        for name, result in figures["variants"].items():
            lines.append(f"| {name} | {result['images_per_s']:.2f} | {result['peak_memory_gib']} | {TRAINING_TARGET:g} |")
        frozen = figures["frozen_encoder"]
        lines.append(f"| frozen encoder ({frozen['encoder']} at {frozen['image_size']} px) | "
                     f"{frozen['variants']['frozen']['images_per_s']:.2f} | | {frozen['speedup']:.1f}x full fine-tuning |")
    figures = (steps.get("torchrun_resume") or {}).get("result")
    if figures:
        lines += ["", "## torchrun kill -9 and resume", "",
                  f"{figures['steps']} steps on {figures['device']} ({figures['process_group']}); killed at step {figures['killed_at_step']}, "
                  f"resumed from {figures['resumed_from_step']}; final weights bit-identical to the uninterrupted "
                  f"run: {figures['bit_identical']} (max abs difference {figures['max_abs_difference']:.3g})"]
    return "\n".join(lines) + "\n"


# ---- preparation, here --------------------------------------------------------------------------
def prepare(folder: Path) -> int:
    """Wheels the GPU machine lacks and the bundled volume as 8-bit slices into ``folder`` (git-ignored);
    refuses when what travels (checkout + folder) reaches the 64 MiB limit."""
    import numpy as np

    from ultrasam.intensity import to_uint8
    from ultrasam.volume_io import read_volume

    download_wheels(folder / "wheels")
    voxels, _ = to_uint8(read_volume(BUNDLED_VOLUME).voxels)
    np.savez_compressed(folder / "Case3_uint8.npz", voxels=voxels)
    return 0 if fits_the_device(folder) else 1


def download_wheels(wheels: Path) -> None:
    """The pure-Python and manylinux wheels of ``WHEELS`` for the GPU machine's Python 3.12."""
    platforms = [f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(wheels), *WHEELS], check=True)


def fits_the_device(folder: Path) -> bool:
    """Whether the checkout plus the carried ``folder`` stays under the device tool's limit; says the sizes."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    checkout = sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())
    carried = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"checkout {checkout / 2**20:.1f} MiB + {folder} {carried / 2**20:.1f} MiB = "
          f"{(checkout + carried) / 2**20:.1f} MiB (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if checkout + carried >= CARRY_LIMIT:
        print("too big to travel: remove files from the checkout or the carried folder", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for gpu_check.json, .md and .log")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    parser.add_argument("--volume", type=Path, help="volume file or (K, J, I) .npy/.npz (default: "
                        "carry/Case3_uint8.npz if prepared, else the bundled RESECT case 3)")
    parser.add_argument("--total-s", type=float, help="the whole check's budget (default 8 min; dry run 25 min)")
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS", help="a step's own budget")
    parser.add_argument("--only", nargs="+", choices=[step.name for step in STEPS], help="run only these steps")
    parser.add_argument("--prepare", type=Path, metavar="FOLDER", help="here: fill FOLDER (e.g. carry) and check sizes")
    parser.add_argument("--step", choices=list(RUNNERS), help=argparse.SUPPRESS)  # one step, in a child process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    volume = args.volume or (CARRIED_VOLUME if CARRIED_VOLUME.is_file() else BUNDLED_VOLUME)
    if args.step:
        result = RUNNERS[args.step](args.work, args.dry_run, volume)
        (args.work / "result.json").write_text(json.dumps(result, indent=2, default=str))
        return 0
    if args.out is None:
        parser.error("give the output folder (or --prepare FOLDER)")
    try:
        budgets = {name: float(seconds) for name, seconds in (item.split("=", 1) for item in args.budget)}
    except ValueError:
        budgets = {"": 0.0}
    if not set(budgets) <= set(RUNNERS):
        parser.error(f"--budget takes STEP=SECONDS with STEP one of {list(RUNNERS)}, e.g. --budget training=120")
    command = " ".join(["python3 bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    total_s = args.total_s or (1500.0 if args.dry_run else 480.0)
    report = check(args.out, args.dry_run, volume, total_s, budgets, args.only, command)
    print(markdown(report))
    return 0 if all(entry.get("status") == "ok" for entry in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
