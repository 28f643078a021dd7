"""The compact model shipped with the package: small, loadable, the default without UltraSam
weights, and as accurate on real held-out ultrasound as when it was trained.

The regression check runs ``ultrasam evaluate`` (the whole engine: reading, prompts, resize,
encoder, decoder, UltraSam's two passes, post-processing, metrics) on twelve real images the model
never saw (``Testing/fixtures/regression``) and compares the mean Dice with the figures measured
when the model was shipped (same command, float32 on a CPU). A change anywhere in that chain that
moves a mean by more than ``MARGIN`` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultrasam.checkpoint import load_model
from ultrasam.cli import main
from ultrasam.resources import SHIPPED_MODEL

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "regression"
MAX_BYTES = 25 * 1024 * 1024
MARGIN = 0.01
# Mean Dice per data set, from `ultrasam evaluate Testing/fixtures/regression/BUSBRA
# Testing/fixtures/regression/HC --device cpu --precision float32` with compact-v1.pth.
RECORDED = {
    "BUSBRA": {"box_dice": 0.8283, "point_dice": 0.6555, "ellipse_dice": 0.8618},
    "HC": {"box_dice": 0.9271, "point_dice": 0.8866, "ellipse_dice": 0.9735},
}


def test_shipped_model_is_small_and_loads_with_ultrasams_rules():
    assert SHIPPED_MODEL.is_file() and SHIPPED_MODEL.stat().st_size <= MAX_BYTES
    loaded = load_model(SHIPPED_MODEL)
    assert loaded.info["postprocess"] == "refine"  # trained with the refine round, so run with it
    assert loaded.config.image_size == 256 and loaded.config.encoder_embed_dim == 192


def test_evaluate_on_held_out_real_images_matches_the_recorded_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))  # the default model must be the shipped one
    out = tmp_path / "eval"
    assert main(["evaluate", str(FIXTURES / "BUSBRA"), str(FIXTURES / "HC"), "--device", "cpu",
                 "--precision", "float32", "-o", str(out)]) == 0
    assert "compact model shipped" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for dataset, figures in RECORDED.items():
        measured = results["datasets"][dataset]
        assert measured["n"] == 6
        for key, recorded in figures.items():
            assert measured[key]["mean"] == pytest.approx(recorded, abs=MARGIN), (dataset, key)


def test_training_config_in_docs_builds_the_shipped_architecture():
    from ultrasam_training.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "docs" / "compact-v1.train.json")
    assert config.model.init == "scratch" and config.prompts.refine
    assert config.model.sam_config() == load_model(SHIPPED_MODEL).config


def test_demo_runs_offline_on_the_bundled_volume_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """Offline, the demo runs end to end with compact-v1 and says so. Not a quality check: the model
    never saw brain ultrasound, and on the demo's click it finds a small blob beside it (MODEL_CARD.md)."""
    import SimpleITK as sitk

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))
    out = tmp_path / "demo.seg.nrrd"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    assert "compact model shipped" in capsys.readouterr().err
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert mask.shape == (288, 256, 256) and mask.any()
