"""precision="auto" on a CPU is decided by timing the encoder in fp32 and bf16, once per machine and
model shape, and remembered in the user cache folder (ultrasam.precision)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ultrasam.device import autocast_for
from ultrasam.predictor import Predictor
from ultrasam.precision import BF16_MARGIN, encoder_key, encoder_timer, machine_key, resolve_precision

CPU = torch.device("cpu")


class FakeTimer:
    """Seconds per precision as given, recording what was timed."""

    def __init__(self, float32: float, bfloat16: float) -> None:
        self.seconds = {"float32": float32, "bfloat16": bfloat16}
        self.calls: list[str] = []

    def __call__(self, precision: str) -> float:
        self.calls.append(precision)
        return self.seconds[precision]


@pytest.mark.parametrize("float32, bfloat16, expected", [
    (1.0, 0.5, "bfloat16"),  # bf16 twice as fast: taken
    (0.5, 1.0, "float32"),  # bf16 slower (the Xeon): not taken
    (1.0, BF16_MARGIN * 1.01, "float32"),  # bf16 barely faster: fp32, which is exact, kept
])
def test_auto_takes_the_precision_the_timing_favours(tiny_sam, tmp_path, float32, bfloat16, expected):
    cache = tmp_path / "cpu_precision.json"
    timer = FakeTimer(float32, bfloat16)
    assert resolve_precision("auto", CPU, tiny_sam.image_encoder, timer, cache) == expected
    assert sorted(set(timer.calls)) == ["bfloat16", "float32"]
    stored = json.loads(cache.read_text())
    entry = stored[f"{machine_key()}/{encoder_key(tiny_sam.image_encoder)}"]
    assert entry["precision"] == expected and entry["seconds"] == {"float32": float32, "bfloat16": bfloat16}


def test_the_choice_is_read_back_not_measured_again(tiny_sam, tmp_path):
    cache = tmp_path / "cpu_precision.json"
    assert resolve_precision("auto", CPU, tiny_sam.image_encoder, FakeTimer(1.0, 0.5), cache) == "bfloat16"
    opposite = FakeTimer(0.5, 1.0)
    assert resolve_precision("auto", CPU, tiny_sam.image_encoder, opposite, cache) == "bfloat16"
    assert opposite.calls == []


def test_another_model_shape_is_timed_on_its_own(tiny_sam, tmp_path):
    from ultrasam.checkpoint import SamConfig, sam_from_config

    cache = tmp_path / "cpu_precision.json"
    resolve_precision("auto", CPU, tiny_sam.image_encoder, FakeTimer(1.0, 0.5), cache)
    other = sam_from_config(SamConfig(encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2,
                                      encoder_global_attn_indexes=(1,), image_size=64)).image_encoder
    timer = FakeTimer(0.5, 1.0)
    assert resolve_precision("auto", CPU, other, timer, cache) == "float32"
    assert timer.calls and len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_file_is_measured_again_and_rewritten(tiny_sam, tmp_path):
    cache = tmp_path / "cpu_precision.json"
    cache.write_text('{"half a file')
    assert resolve_precision("auto", CPU, tiny_sam.image_encoder, FakeTimer(0.5, 1.0), cache) == "float32"
    assert len(json.loads(cache.read_text())) == 1


def test_explicit_precisions_are_kept_and_bad_names_refused(tiny_sam, tmp_path):
    timer = FakeTimer(1.0, 0.5)
    for precision in ("float32", "bfloat16"):
        assert resolve_precision(precision, CPU, tiny_sam.image_encoder, timer, tmp_path / "c.json") == precision
    assert timer.calls == [] and not (tmp_path / "c.json").exists()
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", CPU, tiny_sam.image_encoder, timer)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(tiny_sam, device="cpu", precision="fp16")


def test_autocast_is_bf16_only_when_asked_and_refuses_an_unresolved_auto():
    with autocast_for(CPU, "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for(CPU, "float32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast_for(CPU, "auto")


def test_the_real_timer_runs_the_encoder_up_to_its_first_global_block(tiny_sam):
    encoder = tiny_sam.image_encoder
    ran = []
    for index, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    first_global = next(i for i, block in enumerate(encoder.blocks) if block.window_size == 0)
    timer = encoder_timer(encoder, CPU)
    assert timer("float32") > 0 and timer("bfloat16") > 0
    assert ran == list(range(first_global + 1)) * 2


def test_the_predictor_embeds_in_the_remembered_choice(tiny_sam, tmp_path, monkeypatch):
    """Predictor(precision="auto") on a CPU runs the encoder as the cache says (here: bf16), the same
    embedding as asking for bf16, and not fp32's."""
    from ultrasam.user_cache import cache_dir
    from ultrasam.fast_attention import accelerate_image_encoder
    from ultrasam.precision import CACHE_NAME

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path))  # nothing remembered by earlier tests
    image = np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)
    encoder = accelerate_image_encoder(tiny_sam).image_encoder  # as the predictor will run it
    resolve_precision("auto", CPU, encoder, FakeTimer(1.0, 0.5), cache_dir() / CACHE_NAME)
    auto = Predictor(tiny_sam, device="cpu", precision="auto")
    assert auto.encoder_precision == "bfloat16"
    features = auto.set_image(image).features
    as_bf16 = Predictor(tiny_sam, device="cpu", precision="bfloat16").set_image(image).features
    as_fp32 = Predictor(tiny_sam, device="cpu", precision="float32").set_image(image).features
    assert torch.equal(features, as_bf16) and not torch.allclose(features, as_fp32, atol=1e-4)


def test_an_out_of_memory_batch_is_split_until_it_fits(tiny_sam):
    """A fake CUDA out-of-memory error for batches over 2 images (a hook on the encoder): the
    predictor halves its batch (4 -> 2) for good and returns the embeddings of every image, equal to
    embedding them one at a time; one image that does not fit re-raises."""
    images = [np.full((32, 40), value, np.uint8) for value in (10, 60, 110, 160, 210)]
    one_at_a_time = [e.features for e in Predictor(tiny_sam, device="cpu", precision="float32", batch_size=1)
                     .embed(images)]
    predictor = Predictor(tiny_sam, device="cpu", precision="float32", batch_size=4)
    sizes = []

    def out_of_memory_above_limit(module, args):
        sizes.append(len(args[0]))
        if len(args[0]) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    predictor.model.image_encoder.register_forward_pre_hook(out_of_memory_above_limit)
    limit = 2
    with pytest.warns(UserWarning, match="embedding 2 at a time"):
        embeddings = predictor.embed(images)
    assert sizes == [4, 2, 2, 1] and predictor.batch_size == 2
    assert all(torch.allclose(e.features, f, atol=1e-5) for e, f in zip(embeddings, one_at_a_time))
    limit = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor.embed([np.zeros((32, 40), np.uint8)])
