"""bench/gpu_check.py: its dry run runs every step on the CPU (the CUDA tests too) and reports them;
a step over its budget is killed with its children and reported, and the others still run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    pytest.importorskip("torch", reason="the dry run runs the engine's torch code paths on the CPU")
    result = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), str(tmp_path), "--dry-run"],
                            capture_output=True, text=True, timeout=1800)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert result.returncode == 0, {name: step.get("log_tail") for name, step in steps.items()}
    assert list(steps) == [step.name for step in gpu_check.STEPS]
    assert all(step["status"] == "ok" and step["peak_gpu_mib"] is None for step in steps.values())

    tests = steps["cuda_tests"]["result"]
    assert tests["counts"]["FAILED"] == tests["counts"]["ERROR"] == 0 and tests["counts"]["PASSED"] >= 7
    assert "test_compiled_decoder_gives_the_eager_masks" in tests["tests"]  # the dry run reached the last test
    for name in ("inference_vit_b", "inference_default"):
        figures = steps[name]["result"]
        assert figures["slices"] == 2 and figures["reference"]["propagated_slices"] == 2
        assert set(figures["speedup"]) == {"embed_ms_per_slice", "click_ms", "propagate_s", "cold_start_s"}
    assert steps["inference_default"]["result"]["model"].endswith(".pth")  # the shipped model, not random weights
    training = steps["training"]["result"]
    assert set(training["variants"]) == {"recipe", "ultrasam"}
    assert set(training["frozen_encoder"]["variants"]) == {"frozen", "full"}
    resume = steps["torchrun_resume"]["result"]
    assert resume["process_group"] == "gloo" and resume["resumed_from_step"] in (4, 8)
    assert resume["killed_at_step"] >= resume["resumed_from_step"]  # killed after a checkpoint, resumed from it
    assert resume["bit_identical"] and resume["max_abs_difference"] == 0.0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {step.name} | ok |" in markdown for step in gpu_check.STEPS)
    assert "===== torchrun_resume: ok" in (tmp_path / "gpu_check.log").read_text()


def test_a_step_over_its_budget_is_killed_with_its_children(tmp_path):
    """A hung step (here: a process whose child sleeps) ends at its budget, children included."""
    hang = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(child.pid, flush=True); time.sleep(120)")
    start = time.monotonic()
    status, seconds, peak = gpu_check.run_step([sys.executable, "-c", hang], 3.0, tmp_path / "log")
    assert status == "timeout" and 3.0 <= seconds < 30 and time.monotonic() - start < 30
    child = int((tmp_path / "log").read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_refuses_an_unknown_step_budget(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["out", "--budget", "nonsense=3"])
    assert stopped.value.code == 2
    assert "--budget takes STEP=SECONDS" in capsys.readouterr().err
