"""bench/bench_training.py runs on a CPU with a tiny model, and both variants train the same function."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_training.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_on_cpu(tmp_path):
    bench = _bench()
    torch.set_num_threads(1)
    figures = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "2",
                          "--objects", "3", "--json", str(tmp_path / "figures.json")])
    recipe, baseline = figures["variants"]["recipe"], figures["variants"]["ultrasam"]
    assert recipe["images_per_s"] > 0 and baseline["images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(recipe["images_per_s"] / baseline["images_per_s"])
    # Same weights and batch: bf16 + fused attention must compute the fp32 eager loss.
    assert recipe["first_loss"] == pytest.approx(baseline["first_loss"], rel=0.02)
    assert (tmp_path / "figures.json").is_file()


def test_synthetic_items_have_one_prompt_per_visible_object():
    items = _bench().synthetic_items(2, objects=5, image_size=128)
    for item in items:
        assert item.image.shape == (3, 96, 128) and item.image.dtype == torch.uint8
        assert len(item.target) == len(item.prompts.is_box) <= 5 and item.target.shape[1:] == (32, 32)


def test_frozen_comparison_trains_from_the_cache_with_the_full_models_loss():
    bench = _bench()
    torch.set_num_threads(1)
    figures = bench.main(["--tiny", "--frozen", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch", "2",
                          "--objects", "3"])
    frozen, full = figures["variants"]["frozen"], figures["variants"]["full"]
    assert figures["speedup"] == pytest.approx(frozen["images_per_s"] / full["images_per_s"])
    # Same weights and batch: the float16 cached embeddings give the encoder's own first loss.
    assert frozen["first_loss"] == pytest.approx(full["first_loss"], rel=0.02)


def test_last_stage_comparison_trains_from_cached_tokens_with_the_full_models_loss():
    bench = _bench()
    torch.set_num_threads(1)
    figures = bench.main(["--tiny", "--last-stage", "--device", "cpu", "--steps", "1", "--warmup", "1",
                          "--batch", "2", "--objects", "3"])
    assert figures["encoder"] == "TinyViTEncoder"
    last_stage, full = figures["variants"]["last-stage"], figures["variants"]["full"]
    assert figures["speedup"] == pytest.approx(last_stage["images_per_s"] / full["images_per_s"])
    # Same weights and batch: the float16 cached tokens, run through the last stage, give the encoder's own loss.
    assert last_stage["first_loss"] == pytest.approx(full["first_loss"], rel=0.02)
