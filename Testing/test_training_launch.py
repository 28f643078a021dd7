"""Launch and monitor logic (what the Slicer training module drives): local process trees, SLURM
through stand-in sbatch/squeue/scancel commands, and progress read from metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import shared_path
from training_tiny import tiny_config, training_env, write_config
from ultrasam_training import launch
from ultrasam_training.cli import main as cli_main
from ultrasam_training.runlog import RunLog, read_records


def _wait(condition, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_commands():
    assert launch.train_command("c.json", 1, "py") == ["py", "-m", "ultrasam_training", "train", "c.json"]
    assert launch.train_command("c.json", 4, "py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "ultrasam_training", "train", "c.json"]


def test_sbatch_script_is_valid_bash_with_the_requested_resources(tmp_path):
    options = launch.SlurmOptions("gpu-a100", nodes=2, gpus_per_node=4, time="2-00:00:00", account="lab",
                                  setup=["module load cuda"])
    script = launch.sbatch_script(tmp_path / "c.json", tmp_path / "run", options, python="/opt/py")
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --account=lab", "#SBATCH --cpus-per-task=32",
                 "module load cuda"):
        assert line in script.splitlines()
    srun = script.splitlines()[-1]
    assert srun.startswith("srun /opt/py -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc_per_node=4")
    assert f"ultrasam_training train {tmp_path / 'c.json'}" in srun
    assert f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out" in script.splitlines()
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    with pytest.raises(ValueError):
        launch.sbatch_script("c.json", tmp_path, launch.SlurmOptions("p", gpus_per_node=0))


def _fake_slurm(folder: Path, state: str) -> Path:
    """sbatch/squeue/scancel stand-ins that log their arguments to calls.txt."""
    folder.mkdir()
    calls = folder / "calls.txt"
    for name, output in (("sbatch", "4242;cluster"), ("squeue", state), ("scancel", "")):
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\necho "{output}"\n')
        script.chmod(0o755)
    return calls


def test_slurm_submit_status_and_cancel(tmp_path, monkeypatch):
    calls = _fake_slurm(tmp_path / "bin", "RUNNING")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    job_id = launch.submit_slurm(tmp_path / "c.json", run_dir, launch.SlurmOptions("short", gpus_per_node=2))
    assert job_id == "4242"
    assert launch.read_job(run_dir)["job_id"] == "4242"
    assert (run_dir / launch.SBATCH_FILE).read_text().startswith("#!/bin/bash")
    assert launch.is_running(run_dir)
    with pytest.raises(RuntimeError, match="already running"):
        launch.submit_slurm(tmp_path / "c.json", run_dir, launch.SlurmOptions("short"))
    launch.stop(run_dir)
    assert calls.read_text().splitlines() == [
        f"sbatch --parsable {run_dir / launch.SBATCH_FILE}", "squeue -h -j 4242 -o %T",
        "squeue -h -j 4242 -o %T", "scancel 4242"]


def test_stop_ends_the_whole_process_tree_even_a_detached_grandchild(tmp_path):
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\nsleep 300 &\nsetsid sleep 300 &\nsleep 300\n")
    fake_python.chmod(0o755)
    run_dir = tmp_path / "run"
    process = launch.start_local(tmp_path / "c.json", run_dir, python=str(fake_python))
    _wait(lambda: len(launch.process_tree(process.pid)) == 4)
    tree = launch.process_tree(process.pid)
    assert launch.is_running(run_dir)
    launch.stop(run_dir, grace_s=2.0)
    process.wait(timeout=10)
    _wait(lambda: not any(launch._pid_alive(pid) for pid in tree), 10)
    assert not launch.is_running(run_dir)


def test_read_progress(tmp_path):
    lines = [
        {"kind": "start", "step": 0, "time": 100.0, "steps": 100},
        {"kind": "train", "step": 10, "time": 110.0, "total": 2.0, "images_per_s": 8.0},
        {"kind": "val", "step": 10, "time": 111.0, "dice": 0.5},
        {"kind": "train", "step": 20, "time": 130.0, "total": 1.5, "images_per_s": 8.0},
        {"kind": "val", "step": 20, "time": 131.0, "dice": 0.4},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')  # torn last line
    progress = launch.read_progress(tmp_path)
    assert (progress.state, progress.step, progress.steps, progress.fraction) == ("running", 20, 100, 0.2)
    assert progress.loss == [(10, 2.0), (20, 1.5)] and progress.dice == [(10, 0.5), (20, 0.4)]
    assert (progress.val_dice, progress.best_dice) == (0.4, 0.5)
    assert progress.eta_s == pytest.approx(2.0 * 80)  # 20 s per 10 steps, 80 steps left
    with metrics.open("a") as stream:
        stream.write('\n{"kind": "error", "step": 20, "time": 140.0, "message": "CUDA out of memory"}\n')
    assert launch.read_progress(tmp_path).state == "error"
    assert launch.read_progress(tmp_path / "absent").state == "waiting"


def test_runlog_resume_drops_what_a_killed_run_logged_after_its_checkpoint(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in range(1, 8):
        log.write("train", step, total=1.0)
    log.write("checkpoint", 5)
    log.close()
    log = RunLog(tmp_path, resume_step=5, tensorboard=False)
    log.write("start", 5, steps=10)
    log.close()
    assert [(r["kind"], r["step"]) for r in read_records(tmp_path / "metrics.jsonl")] == [
        *[("train", s) for s in range(1, 6)], ("checkpoint", 5), ("start", 5)]


def test_start_stop_resume_a_real_local_run(tmp_path):
    shared_path("us43d_sample", "sample_coco_MMOTU2D.json")
    pytest.importorskip("torch", reason="the trainer it starts needs torch")
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.json", tiny_config(run_dir, steps=2000, checkpoint_every=2, val_every=1000))
    launch.start_local(config, run_dir, env=training_env())
    _wait(lambda: launch.read_progress(run_dir).step >= 4)
    progress = launch.read_progress(run_dir)
    assert progress.state == "running" and progress.steps == 2000 and progress.loss
    assert cli_main(["stop", str(run_dir)]) == 0
    _wait(lambda: not launch.is_running(run_dir), 15)
    stopped_at = launch.read_progress(run_dir).step

    launch.start_local(config, run_dir, env=training_env())  # Resume
    _wait(lambda: len([r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == "start"]) == 2)
    resumed = [r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert 2 <= resumed["step"] <= stopped_at
    launch.stop(run_dir)
    assert "Traceback" not in (run_dir / launch.LOG_FILE).read_text()


def test_cli_config_status_and_errors(tmp_path, capsys):
    from ultrasam_training.config import load_config

    out = tmp_path / "run.json"
    assert cli_main(["config", str(out), "--train", "a.json", "--checkpoint", "w.pth", "--steps", "100",
                     "--output-dir", str(tmp_path / "run")]) == 0
    config = load_config(out)
    assert (config.data.train, config.model.checkpoint, config.run.steps) == (["a.json"], "w.pth", 100)
    capsys.readouterr()
    assert cli_main(["status", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "waiting"
    assert cli_main(["train", str(tmp_path / "absent.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
