"""Start, watch and stop training jobs, without Qt (the Slicer module and the CLI use this).

A job is described by ``<run_dir>/job.json`` so any later session (a restarted Slicer) can find
it again:

- local: the trainer as a child process in its own session (torchrun when more than one GPU),
  output in ``<run_dir>/train.log``; stopping kills the whole process tree.
- SLURM: a generated ``<run_dir>/job.sbatch`` submitted with ``sbatch --parsable``; one torchrun
  per node (c10d rendezvous on the first node); stopping is ``scancel``.

Progress comes only from ``metrics.jsonl`` (:mod:`ultrasam_training.runlog`), so it reads the
same for local and cluster jobs. Resume = start again on the same run folder: the trainer
continues from ``resume.pt``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ultrasam.atomic import write_text_atomic
from ultrasam_training.runlog import METRICS_FILE, read_records

JOB_FILE = "job.json"
LOG_FILE = "train.log"
SBATCH_FILE = "job.sbatch"


@dataclass
class SlurmOptions:
    """Where a cluster job runs: partition, nodes, GPUs per node, wall time ("HH:MM:SS" or "D-HH:MM:SS")."""

    partition: str
    nodes: int = 1
    gpus_per_node: int = 4
    cpus_per_gpu: int = 8
    time: str = "24:00:00"
    account: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. "module load cuda"


def train_command(config_path: str | Path, processes: int = 1, python: str = sys.executable) -> list[str]:
    """The command that trains ``config_path`` with ``processes`` local processes (torchrun if > 1)."""
    entry = ["-m", "ultrasam_training", "train", str(config_path)]
    if processes <= 1:
        return [python, *entry]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *entry]


def sbatch_script(config_path: str | Path, run_dir: str | Path, options: SlurmOptions, python: str = "python") -> str:
    """A SLURM batch script that trains ``config_path`` on ``options``' nodes and GPUs."""
    if options.nodes < 1 or options.gpus_per_node < 1:
        raise ValueError("SLURM jobs need at least one node and one GPU per node")
    run_dir = Path(run_dir).resolve()
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=ultrasam-train",
        f"#SBATCH --partition={options.partition}",
        f"#SBATCH --nodes={options.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={options.gpus_per_node}",
        f"#SBATCH --cpus-per-task={options.cpus_per_gpu * options.gpus_per_node}",
        f"#SBATCH --time={options.time}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        *([f"#SBATCH --account={options.account}"] if options.account else []),
        "set -euo pipefail",
        *options.setup,
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=${MASTER_PORT:-29500}",
        "srun " + shlex.join([python, "-m", "torch.distributed.run"])
        + f" --nnodes=$SLURM_NNODES --nproc_per_node={options.gpus_per_node} --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d"
        + " --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT "
        + shlex.join(["-m", "ultrasam_training", "train", str(Path(config_path).resolve())]),
    ]
    return "\n".join(lines) + "\n"


def start_local(config_path: str | Path, run_dir: str | Path, processes: int = 1,
                env: Optional[dict[str, str]] = None, python: str = sys.executable) -> subprocess.Popen:
    """Start training as a detached child (its own session), output to ``train.log``; records job.json."""
    run_dir = Path(run_dir)
    _refuse_if_running(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(config_path, processes, python)
    with (run_dir / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, **_new_process_group(),
        )
    _write_job(run_dir, {"kind": "local", "pid": process.pid, "command": command, "started": time.time()})
    return process


def submit_slurm(config_path: str | Path, run_dir: str | Path, options: SlurmOptions, python: str = "python") -> str:
    """Write ``job.sbatch`` and submit it; returns the SLURM job id (``sbatch`` must be on PATH)."""
    run_dir = Path(run_dir)
    _refuse_if_running(run_dir)
    script = run_dir / SBATCH_FILE
    write_text_atomic(script, sbatch_script(config_path, run_dir, options, python))
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch refused the job: {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    _write_job(run_dir, {"kind": "slurm", "job_id": job_id, "script": str(script), "started": time.time()})
    return job_id


def read_job(run_dir: str | Path) -> Optional[dict]:
    path = Path(run_dir) / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_running(run_dir: str | Path) -> bool:
    """Whether the run folder's job is still alive (local process tree, or SLURM pending/running)."""
    job = read_job(run_dir)
    if job is None:
        return False
    if job["kind"] == "local":
        return _pid_alive(job["pid"])
    result = subprocess.run(["squeue", "-h", "-j", job["job_id"], "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() not in ("", "COMPLETED", "FAILED", "CANCELLED")


def stop(run_dir: str | Path, grace_s: float = 5.0) -> None:
    """End the job: SIGTERM to the local process tree, SIGKILL after ``grace_s``; or ``scancel``."""
    job = read_job(run_dir)
    if job is None:
        return
    if job["kind"] == "slurm":
        subprocess.run(["scancel", job["job_id"]], check=False)
        return
    tree = process_tree(job["pid"])
    signal_tree(job["pid"], tree, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_pid_alive(pid) for pid in tree):
        time.sleep(0.05)
    signal_tree(job["pid"], tree, getattr(signal, "SIGKILL", signal.SIGTERM))


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc; elsewhere just ``pid``)."""
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
        except OSError:
            continue
        tree.extend(children)
        frontier.extend(children)
    return tree


@dataclass
class Progress:
    """What a run's metrics say so far.

    ``state``: "waiting" (no metrics yet), "running", "done" or "error". ``loss`` and ``dice``
    are (step, value) series for plots; ``val_dice`` / ``best_dice`` the last and best validation
    Dice; ``eta_s`` the estimated seconds left from the recent rate; ``skipped`` a summary of the
    training data left out (see :mod:`ultrasam_training.skipped`).
    """

    state: str = "waiting"
    step: int = 0
    steps: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    dice: list[tuple[int, float]] = field(default_factory=list)
    val_dice: Optional[float] = None
    best_dice: Optional[float] = None
    images_per_s: Optional[float] = None
    eta_s: Optional[float] = None
    message: str = ""
    model: Optional[str] = None
    skipped: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_progress(run_dir: str | Path) -> Progress:
    """Progress of a run folder from its ``metrics.jsonl`` (works while the writer is running).

    A resumed run writes a new "start" record; what the killed run logged after its last
    checkpoint was already dropped by the trainer, so the series stay monotonic.
    """
    progress = Progress()
    timed: list[tuple[int, float]] = []
    skipped: dict[tuple[str, str], str] = {}  # each item once, however often it was reported
    for record in read_records(Path(run_dir) / METRICS_FILE):
        kind, step = record.get("kind"), int(record.get("step", 0))
        progress.step = step if kind == "start" else max(progress.step, step)
        if kind == "start":
            progress.state, progress.steps, timed = "running", int(record["steps"]), []
        elif kind == "train":
            progress.loss.append((step, float(record["total"])))
            progress.images_per_s = record.get("images_per_s")
            timed.append((step, float(record["time"])))
        elif kind == "val":
            progress.val_dice = float(record["dice"])
            progress.dice.append((step, progress.val_dice))
            progress.best_dice = max(progress.best_dice or 0.0, progress.val_dice)
        elif kind == "done":
            progress.state, progress.model = "done", record.get("best") or record.get("model")
        elif kind == "error":
            progress.state, progress.message = "error", record.get("message", "")
        elif kind == "skipped":  # before training, then for each unreadable image met; again on resume
            skipped.update({(item["kind"], item["where"]): item["kind"] for item in record.get("items", [])})
            kinds = Counter(skipped.values())
            listed = ", ".join(f"{name} {count}" for name, count in sorted(kinds.items()))
            progress.skipped = f"{len(skipped)} data items skipped ({listed}; see metrics.jsonl)"
    if progress.state == "running" and len(timed) >= 2 and timed[-1][0] > timed[0][0]:
        seconds_per_step = (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0])
        progress.eta_s = seconds_per_step * (progress.steps - progress.step)
    return progress


def _refuse_if_running(run_dir: Path) -> None:
    if is_running(run_dir):
        raise RuntimeError(f"a training job is already running in {run_dir}; stop it first")


def _write_job(run_dir: Path, job: dict) -> None:
    write_text_atomic(run_dir / JOB_FILE, json.dumps(job, indent=2) + "\n")


def _new_process_group() -> dict:
    """Popen options that put the child in its own process group, so the tree can be ended at once."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _pid_alive(pid: int) -> bool:
    """True for a live process (a zombie, finished but not yet reaped, counts as ended)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        listed = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True)
        return str(pid) in listed.stdout.split()
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        return status.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    return not Path("/proc").is_dir()


def signal_tree(root: int, tree: list[int], sig: int) -> None:
    """Send ``sig`` to the root's process group and to every process of ``tree`` (:func:`process_tree`,
    taken before the first signal: descendants may have started sessions of their own, as torchrun's
    workers do)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(root)], capture_output=True, check=False)
        return
    try:
        os.killpg(root, sig)
    except OSError:
        pass
    for pid in tree:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
