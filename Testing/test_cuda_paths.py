"""The device paths of inference on a CUDA GPU: bf16 autocast, SDPA attention, the compiled decoder,
the embedding cache in GPU memory, the fallback when the GPU runs out of memory.

Marked ``cuda``; they skip without a GPU. ``bench/gpu_check.py`` runs them on a lent GPU, and its
``--dry-run`` runs them on the CPU (``ULTRASAM_CUDA_TESTS_ON_CPU=1``) so that the tests themselves
are exercised wherever CI runs. References are segment_anything's own modules and ``SamPredictor``
in fp32 with TF32 off, and real breast ultrasound images shipped in ``Testing/fixtures``.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import Attention

from conftest import REGRESSION_FIXTURES
from speed_helpers import iou, randomise_rel_pos
from ultrasam.fast_attention import FusedAttention
from ultrasam.geometry import Volume
from ultrasam.predictor import Predictor, Prompt2D
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_embeddings import VolumeEmbeddingCache

pytestmark = pytest.mark.cuda
ON_CPU = "ULTRASAM_CUDA_TESTS_ON_CPU"
IMAGES = REGRESSION_FIXTURES / "BUSBRA" / "images"


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """The GPU, or the CPU in gpu_check's dry run; references run with TF32 off."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        return torch.device("cuda")
    if os.environ.get(ON_CPU) == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU: bench/gpu_check.py runs these on one (docs/BENCHMARKS.md)")


def breast_ultrasound() -> list[np.ndarray]:
    """Two real 8-bit B-mode images (BUS-BRA, 351 x 274 and others), grey."""
    return [np.asarray(Image.open(path).convert("L")) for path in sorted(IMAGES.glob("*.png"))[:2]]


def reference_masks(model, device: torch.device, image: np.ndarray, boxes) -> list[tuple[np.ndarray, torch.Tensor]]:
    """SamPredictor in fp32: (mask, low-res logits) per box."""
    predictor = SamPredictor(copy.deepcopy(model).to(device).float())
    predictor.set_image(np.repeat(image[..., None], 3, axis=2))
    results = []
    for box in boxes:
        masks, _, logits = predictor.predict(box=np.asarray(box), multimask_output=False)
        results.append((masks[0], torch.as_tensor(logits[0])))
    return results


def boxes_for(image: np.ndarray) -> list[list[float]]:
    height, width = image.shape
    return [[0.3 * width, 0.3 * height, 0.65 * width, 0.6 * height], [0.1 * width, 0.2 * height, 0.5 * width, 0.7 * height]]


def test_bf16_autocast_masks_match_fp32_segment_anything(device, tiny_sam):
    """precision="auto" on CUDA is bf16 (on the CPU dry run bf16 is asked for); masks and the
    logits thresholded at the reference's median (half the image each side) agree with the fp32
    reference to IoU >= 0.98, and bf16 really ran (the embedding differs from fp32's)."""
    fast = Predictor(copy.deepcopy(tiny_sam), device=device, mode="sam",
                     precision="auto" if device.type == "cuda" else "bfloat16")
    assert fast.encoder_precision == "bfloat16"
    exact = Predictor(copy.deepcopy(tiny_sam), device=device, mode="sam", precision="float32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the Predictors switched TF32 on
    for image in breast_ultrasound():
        embedding = fast.set_image(image)
        assert not torch.allclose(embedding.features, exact.set_image(image).features, rtol=0, atol=1e-4)
        for box, (want, want_logits) in zip(boxes_for(image), reference_masks(tiny_sam, device, image, boxes_for(image))):
            got = fast.predict(embedding, Prompt2D(box_xyxy=box))
            threshold = want_logits.median()
            assert iou(got.mask, want) >= 0.98
            assert iou(got.low_res_logits.cpu()[0, 0] > threshold, want_logits > threshold) >= 0.98


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["windowed", "global"])
def test_sdpa_attention_matches_segment_anything_on_the_device(device, kind, precision):
    """FusedAttention (SDPA, position bias as mask) against segment_anything's eager Attention at
    ViT-B width (768, 12 heads) on 14 x 14 windows and a global grid (64 x 64 on the GPU)."""
    grid = (14, 14) if kind == "windowed" else ((64, 64) if device.type == "cuda" else (16, 24))
    torch.manual_seed(0)
    original = Attention(dim=768, num_heads=12, use_rel_pos=True, input_size=grid)
    randomise_rel_pos(original)
    original = original.to(device).eval()
    fused = copy.deepcopy(original)
    fused.__class__ = FusedAttention
    x = torch.randn(2, *grid, 768, device=device)
    with torch.inference_mode():
        expected = original(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            got = fused(x).float()
    tolerance = 1e-4 if precision == "float32" else 3e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_sdpa_runs_a_fused_kernel_on_cuda(device):
    """On the GPU, SDPA with SAM's bias as mask runs a fused (memory-efficient or flash) kernel in
    bf16, not the unfused math fallback that materialises the scores."""
    if device.type != "cuda":
        pytest.skip("kernel names are CUDA's; the CPU dry run has no fused-kernel question")
    from torch.profiler import ProfilerActivity, profile

    attention = Attention(dim=768, num_heads=12, use_rel_pos=True, input_size=(64, 64)).to(device).eval()
    attention.__class__ = FusedAttention
    x = torch.randn(1, 64, 64, 768, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        attention(x)
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            attention(x)
            torch.cuda.synchronize()
    kernels = " ".join(event.name.lower() for event in trace.events())
    assert any(name in kernels for name in ("fmha", "efficient_attention", "flash")), kernels[:2000]


def test_embedding_cache_keeps_bf16_on_the_gpu_and_spills_to_host(device, tiny_sam):
    """VolumeEmbeddingCache on the device: the two most recent slices stay on it (bf16 on CUDA),
    older ones move to host memory; every slice comes back as float32 on the device and predicts
    the mask of a fresh embedding."""
    predictor = Predictor(tiny_sam, device=device, precision="float32", batch_size=2)
    volume = Volume(np.stack([np.asarray(Image.fromarray(image).resize((128, 96))) for image in breast_ultrasound()] * 2))
    slices = VolumeSlices(volume, axis=0)
    grid = tiny_sam.image_encoder.img_size // 16
    stored_bytes = 256 * grid * grid * (2 if device.type == "cuda" else 4)
    cache = VolumeEmbeddingCache(predictor, device_bytes=2 * stored_bytes)
    embeddings = cache.get(slices, range(4))

    assert [e.features.device.type for e in cache._device.values()] == [device.type] * 2
    assert [e.features.device.type for e in cache._host.values()] == ["cpu"] * 2
    expected_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    assert all(e.features.dtype == expected_dtype for e in [*cache._device.values(), *cache._host.values()])
    again = cache.get(slices, [0])[0]  # from host memory, back on the device
    assert again.features.device.type == device.type and again.features.dtype == torch.float32
    box = Prompt2D(box_xyxy=[30, 20, 90, 70])
    for index, embedding in enumerate(embeddings):
        fresh = predictor.embed([slices.image(index)], cache=False)[0]
        assert iou(predictor.predict(embedding, box).mask, predictor.predict(fresh, box).mask) >= 0.98


def test_out_of_memory_halves_the_embedding_batch_on_the_gpu(device):
    """A real CUDA out-of-memory error: ViT-B in bf16 with the process limited to the model plus
    2.5 GiB, so a batch of 8 images cannot be embedded at once; the predictor halves its batch and
    embeds all 8. (On the CPU a fake error tests the same: test_speed_precision.py.)"""
    if device.type != "cuda":
        pytest.skip("a real out-of-memory error needs a GPU; the CPU test fakes one")
    from ultrasam.checkpoint import SamConfig, sam_from_config

    predictor = Predictor(sam_from_config(SamConfig()), device=device, mode="sam", precision="bfloat16", batch_size=8)
    images = [np.full((256, 256), 20 * i, np.uint8) for i in range(8)]
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(device) + 2.5 * 2**30) / total))
    try:
        with pytest.warns(UserWarning, match="ran out of memory"):
            embeddings = predictor.embed(images)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert len(embeddings) == 8 and predictor.batch_size < 8


def test_compiled_decoder_gives_the_eager_masks(device, tiny_sam, monkeypatch):
    """Predictor(compile_decoder=True): inductor on the GPU (the "eager" backend on the CPU dry run,
    which needs no C++ toolchain), warmed on its thread, then serving clicks with eager's masks."""
    if device.type != "cuda":
        import ultrasam.fast_attention as fast_attention

        original = fast_attention.WarmCompiled.__init__
        monkeypatch.setattr(fast_attention.WarmCompiled, "__init__",
                            lambda self, *args, **kwargs: original(self, *args, backend="eager", **kwargs))
    eager = Predictor(copy.deepcopy(tiny_sam), device=device, precision="float32")
    compiled = Predictor(tiny_sam, device=device, precision="float32", compile_decoder=True)
    assert compiled.wait_until_compiled(timeout=240), compiled._mask_decoder.error
    image = breast_ultrasound()[0]
    height, width = image.shape
    for prompt in (Prompt2D([[width / 2, height / 2]], [1]), Prompt2D(box_xyxy=boxes_for(image)[0]),
                   Prompt2D([[width / 2, height / 2]], [1], box_xyxy=boxes_for(image)[0])):
        want = eager.predict(eager.set_image(image), prompt)
        got = compiled.predict(compiled.set_image(image), prompt)
        assert iou(got.mask, want.mask) >= 0.999 and abs(got.iou - want.iou) < 1e-3
    assert compiled._mask_decoder.served["compiled"] >= 3
