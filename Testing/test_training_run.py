"""Whole training runs on CPU with a tiny SAM on UltraSam's own US-43d sample: the loss falls,
validation Dice is computed, kill -9 + resume is exact, and two-process torchrun works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import shared_path
from training_tiny import run_module, tiny_config, training_env, write_config
from ultrasam.checkpoint import load_model
from ultrasam_training.runlog import read_records


@pytest.fixture(autouse=True)
def _needs_sample():
    shared_path("us43d_sample", "sample_coco_MMOTU2D.json")


def test_few_dozen_steps_lower_the_loss_and_validate(tmp_path):
    config = tiny_config(tmp_path / "run", steps=36, val_every=18)
    config["data"] = {"train": config["data"]["train"], "val_fraction": 0.2}  # hold out 2 of the 10 images
    run_module("ultrasam_training", "train", str(write_config(tmp_path / "c.json", config)))
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert [(r["images"], r["val_images"]) for r in records if r["kind"] == "start"] == [(8, 2)]
    losses = [r["total"] for r in records if r["kind"] == "train"]
    assert len(losses) == 36
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [18, 36]
    assert vals[-1]["objects"] == 2 and set(vals[-1]["per_dataset"]) == {"MMOTU_2d"}
    assert 0.0 <= vals[-1]["dice"] <= 1.0 and 0.0 <= vals[-1]["iou"] <= vals[-1]["dice"] + 1e-9
    final = load_model(tmp_path / "run" / "model.pth")  # what the Segment Editor effect loads
    assert final.model.image_encoder.img_size == 128
    assert final.info["postprocess"] == "refine"  # run as validated: two passes, logits upsampled
    assert load_model(tmp_path / "run" / "best.pth").config == final.config


def _weights(path):
    return load_model(path).model.state_dict()


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    steps = 24
    straight = tiny_config(tmp_path / "straight", steps=steps, checkpoint_every=8, val_every=12)
    run_module("ultrasam_training", "train", str(write_config(tmp_path / "straight.json", straight)))

    killed = tiny_config(tmp_path / "killed", steps=steps, checkpoint_every=8, val_every=12)
    config_path = str(write_config(tmp_path / "killed.json", killed))
    process = subprocess.Popen([sys.executable, "-m", "ultrasam_training", "train", config_path],
                               env=training_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while not any(r["kind"] == "checkpoint" for r in read_records(metrics)) and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)  # let it run past the checkpoint, so work after it is lost
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    logged = read_records(metrics)
    assert not any(r["kind"] == "done" for r in logged)
    assert not (tmp_path / "killed" / "model.pth").exists()

    run_module("ultrasam_training", "train", config_path)
    records = read_records(metrics)
    starts = [r["step"] for r in records if r["kind"] == "start"]
    assert starts[0] == 0 and starts[1] in (8, 16)  # resumed from a checkpoint, not from scratch
    steps_logged = [r["step"] for r in records if r["kind"] == "train"]
    assert steps_logged == list(range(1, steps + 1))  # the killed run's extra lines were dropped
    expected, resumed = _weights(tmp_path / "straight" / "model.pth"), _weights(tmp_path / "killed" / "model.pth")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_two_process_torchrun_trains_and_writes_one_checkpoint(tmp_path):
    """2 processes x 2 images see the same samples and prompts as 1 process x 4 images, so with
    DDP's gradient averaging both must end with the same weights (up to float summation order)."""
    config = tiny_config(tmp_path / "run", steps=6)
    config_path = str(write_config(tmp_path / "c.json", config))
    run_module("torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ultrasam_training", "train", config_path)
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert [r["world"] for r in records if r["kind"] == "start"] == [2]
    assert [r["kind"] for r in records].count("done") == 1
    assert sorted(p.name for p in (tmp_path / "run").glob("*.p*")) == ["best.pth", "model.pth", "resume.pt"]
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert state["world"] == 2 and state["step"] == 6
    model = _weights(tmp_path / "run" / "model.pth")
    assert all(torch.equal(model[name], state["model"][name]) for name in model)

    single = tiny_config(tmp_path / "single", steps=6, batch_size=4)
    run_module("ultrasam_training", "train", str(write_config(tmp_path / "single.json", single)))
    reference = _weights(tmp_path / "single" / "model.pth")
    assert all(torch.allclose(model[name], reference[name], rtol=1e-3, atol=1e-5) for name in model)
