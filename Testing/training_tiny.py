"""Tiny SAM-architecture training configs on real data, for the training tests (CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
US43D_SAMPLE = SHARED_DATA / "us43d_sample" / "sample_coco_MMOTU2D.json"

TINY_SAM = {
    "image_size": 128, "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1], "encoder_window_size": 4, "encoder_mlp_ratio": 2.0,
    "prompt_embed_dim": 32, "mask_in_chans": 4, "decoder_mlp_dim": 64, "iou_head_hidden_dim": 32,
}


def tiny_sam_config():
    """TINY_SAM as ``ultrasam.checkpoint.SamConfig`` (its JSON lists become tuples)."""
    from ultrasam.checkpoint import SamConfig  # torch-heavy: only the tests that build a model pay for it

    return SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_SAM.items()})


def tiny_config(output_dir: Path, steps: int, **run) -> dict:
    """A scratch tiny model trained on UltraSam's own 10-image US-43d sample (validated on it too)."""
    return {
        "output_dir": str(output_dir),
        "data": {"train": [str(US43D_SAMPLE)], "val": [str(US43D_SAMPLE)]},
        "model": {"init": "scratch", "scratch": TINY_SAM},
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "run": {"steps": steps, "batch_size": 2, "checkpoint_every": steps, "val_every": steps,
                "log_every": 1, "num_workers": 0, **run},
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


def training_env() -> dict[str, str]:
    """Environment for trainer subprocesses: the repo's packages importable, one thread (reproducible)."""
    paths = [str(REPO / "UltraSamSlicer"), str(REPO / "UltraSamTraining"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a fresh process; fails the test with its output if it fails."""
    result = subprocess.run([sys.executable, "-m", *args], env=training_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
