"""Volume embedding cache: only needed slices, in batches, bounded memory, no stale entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrasam.geometry import Volume
from ultrasam.predictor import Predictor
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_embeddings import VolumeEmbeddingCache, VolumeSlicePredictor


@pytest.fixture
def predictor(tiny_sam):
    predictor = Predictor(tiny_sam, device="cpu", batch_size=3)
    predictor.encoded = []  # batch sizes the image encoder saw
    predictor.model.image_encoder.register_forward_hook(lambda m, inputs, out: predictor.encoded.append(len(inputs[0])))
    return predictor


@pytest.fixture
def volume():
    return Volume(np.random.default_rng(0).integers(0, 255, (6, 20, 24), dtype=np.uint8), name="noise")


def entry_bytes(predictor) -> int:
    grid = predictor.model.image_encoder.img_size // 16
    return 256 * grid * grid * 4


def test_only_requested_slices_are_embedded_in_batches(predictor, volume):
    cache = VolumeEmbeddingCache(predictor)
    slices = VolumeSlices(volume, 0)
    first = cache.get(slices, [1, 2, 3, 4])
    assert predictor.encoded == [3, 1] and cache.computed == 4
    again = cache.get(slices, [4, 2, 5])
    assert predictor.encoded == [3, 1, 1] and cache.computed == 5
    assert torch.equal(again[1].features, first[1].features)
    reference = Predictor(predictor.model, device="cpu").embed([slices.image(2)])[0]
    torch.testing.assert_close(again[1].features, reference.features)


def test_changed_window_voxels_axis_or_model_never_reuse_an_embedding(predictor, volume, tiny_sam):
    cache = VolumeEmbeddingCache(predictor)
    cache.get(VolumeSlices(volume, 0), [0])
    cache.get(VolumeSlices(volume, 0), [0])
    assert cache.computed == 1  # same content: reused
    cache.get(VolumeSlices(volume, 0, window=(0.0, 200.0)), [0])
    assert cache.computed == 2
    cache.get(VolumeSlices(volume, 1), [0])
    assert cache.computed == 3
    edited = Volume(volume.voxels.copy())
    edited.voxels[0, 5, 5] ^= 1
    cache.get(VolumeSlices(edited, 0), [0])
    assert cache.computed == 4
    other = VolumeEmbeddingCache(Predictor(tiny_sam, device="cpu"))
    other._device.update(cache._device)  # even entries copied over do not match another model
    other.get(VolumeSlices(volume, 0), [0])
    assert other.computed == 1


def test_memory_bound_spills_to_host_then_drops(predictor, volume):
    size = entry_bytes(predictor)
    cache = VolumeEmbeddingCache(predictor, device_bytes=int(2.5 * size), host_bytes=2 * size)
    slices = VolumeSlices(volume, 0)
    cache.get(slices, range(6))
    assert cache.device_used == 2 * size and cache.host_used == 2 * size  # 2 dropped
    computed = cache.computed
    cache.get(slices, [2, 3])  # spilled, not dropped: moved back without recomputing
    assert cache.computed == computed
    cache.get(slices, [0])  # dropped: recomputed
    assert cache.computed == computed + 1
    assert cache.device_used <= 2.5 * size and cache.host_used <= 2 * size


def test_slice_predictor_uses_the_cached_embedding(predictor, volume):
    cache = VolumeEmbeddingCache(predictor)
    slices = VolumeSlices(volume, 2)
    adapter = VolumeSlicePredictor(slices, cache)
    adapter.prefetch([3, 4, 5])
    from ultrasam.predictor import Prompt2D

    prompt = Prompt2D(points_xy=[[4, 3]], labels=[1])
    prediction = adapter.predict(4, prompt)
    assert cache.computed == 3 and prediction.mask.shape == slices.image_shape
    direct = predictor.predict(predictor.embed([slices.image(4)])[0], prompt)
    np.testing.assert_array_equal(prediction.mask, direct.mask)
    assert prediction.iou == pytest.approx(direct.iou)
