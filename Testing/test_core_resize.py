"""Each inference mode feeds the model the pixels its reference pipeline makes.

UltraSam mode against mmdet's ``FixScaleResize(scale=(1024, 1024), keep_ratio=True)``, re-expressed
here from mmdet 3.x (``mmdet/datasets/transforms/transforms.py``: ``rescale_size`` with
``_fixed_scale_size``, then ``mmcv.imresize``, i.e. ``cv2.resize``) on the image as mmdet loads it
(``cv2.imread``, BGR); the model input is compared pixel for pixel, no tolerance. Refine mode against
the training pipeline it serves (``ultrasam_training.prepare``).
"""

from __future__ import annotations

import functools
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import SHARED_DATA

cv2 = pytest.importorskip("cv2", reason="needs opencv-python-headless")

SIDE = 1024
# (height, width): odd, prime, tiny, thin, and larger than the input (down-scaling) sizes.
ODD_SIZES = [(533, 958), (1, 7), (17, 1), (255, 256), (511, 1023), (1025, 641), (2000, 3), (769, 1153)]
US43D_IMAGES = sorted((SHARED_DATA / "us43d_sample" / "sample_images").glob("*.png"))


def mmdet_fix_scale_resize(bgr: np.ndarray, side: int = SIDE) -> np.ndarray:
    """mmdet's FixScaleResize with scale (side, side) and keep_ratio, on a cv2-loaded image."""
    height, width = bgr.shape[:2]
    factor = min(max(side, side) / max(height, width), min(side, side) / min(height, width))
    new_size = int(width * float(factor)), int(height * float(factor))  # (w, h), truncated
    return cv2.resize(bgr, new_size, interpolation=cv2.INTER_LINEAR)


def _random_bgr(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 7919 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _us43d_image(path) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"needs {path} (the team's shared data, present in CI, absent on a fresh clone)")
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def _images() -> list:
    return ([pytest.param(size, id=f"{size[0]}x{size[1]}") for size in ODD_SIZES]
            + [pytest.param(path, id=path.name) for path in US43D_IMAGES or [SHARED_DATA / "us43d_sample"]])


def _bgr(source) -> np.ndarray:
    return _random_bgr(*source) if isinstance(source, tuple) else _us43d_image(source)


def test_every_us43d_sample_size_is_covered():
    if not US43D_IMAGES:
        pytest.skip(f"needs {SHARED_DATA / 'us43d_sample'} (the team's shared data, absent on a fresh clone)")
    assert len(US43D_IMAGES) == 10


@pytest.mark.parametrize("source", _images())
def test_resize_module_is_mmdets_fix_scale_resize(source):
    from ultrasam.resize import fix_scale_size, resize_like_mmdet

    bgr = _bgr(source)
    expected = mmdet_fix_scale_resize(bgr)
    assert fix_scale_size(*bgr.shape[:2], SIDE) == expected.shape[:2]
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    assert np.array_equal(resize_like_mmdet(rgb, expected.shape[:2]), expected[..., ::-1])


def test_958_by_533_becomes_1023_by_569():
    from ultrasam.resize import fix_scale_size

    assert fix_scale_size(533, 958, SIDE) == (569, 1023)  # ULTRASAM_FACTS.md; SAM's rule gives 570 x 1024


def test_without_opencv_ultrasam_mode_says_what_to_install(monkeypatch):
    from ultrasam.resize import resize_like_mmdet

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails, as in a Slicer without it
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        resize_like_mmdet(_random_bgr(5, 6), (3, 4))


class _Stop(Exception):
    """Raised by the hook once the encoder's input is seen: the encoder itself need not run."""


@functools.lru_cache(maxsize=None)
def _predictor(mode: str):
    from ultrasam.checkpoint import SamConfig, sam_from_config
    from ultrasam.predictor import Predictor

    model = sam_from_config(SamConfig(encoder_embed_dim=32, encoder_num_heads=2, encoder_depth=2,
                                      encoder_global_attn_indexes=(1,), encoder_window_size=4))
    return Predictor(model, device="cpu", mode=mode, precision="float32")


def _model_input(mode: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """What the predictor gives the image encoder: (3, S, S) as given (normalised, zero-padded), the
    same de-normalised to grey levels, and the (h, w) of the resized image in it."""
    torch = pytest.importorskip("torch")
    predictor, seen = _predictor(mode), []

    def capture(module, args):
        seen.append(args[0][0])
        raise _Stop

    hook = predictor.model.image_encoder.register_forward_pre_hook(capture)
    try:
        with pytest.raises(_Stop):
            predictor.embed([rgb], cache=False)
    finally:
        hook.remove()
    with torch.no_grad():
        pixels = seen[0] * predictor.model.pixel_std + predictor.model.pixel_mean
    return seen[0].numpy(), pixels.numpy(), predictor.input_size(*rgb.shape[:2])


@pytest.mark.parametrize("source", _images())
def test_ultrasam_mode_feeds_the_model_mmdets_pixels(source):
    bgr = _bgr(source)
    expected = mmdet_fix_scale_resize(bgr)[..., ::-1]  # mmdet converts to RGB after resizing
    given, pixels, (height, width) = _model_input("ultrasam", np.ascontiguousarray(bgr[..., ::-1]))
    assert (height, width) == expected.shape[:2]
    inside = pixels[:, :height, :width].transpose(1, 2, 0)
    assert np.abs(inside - expected).max() < 1e-3  # de-normalising leaves ~1e-5: no grey level differs
    assert not given[:, height:, :].any() and not given[:, :, width:].any()  # padded after normalising


def test_refine_mode_feeds_the_model_the_training_pipelines_pixels():
    torch = pytest.importorskip("torch")
    prepare = pytest.importorskip("ultrasam_training.prepare")

    rgb = _random_bgr(2048, 1536)  # halving: many bilinear values end in .5, where rounding rules differ
    masks = np.zeros((1, 2048, 1536), dtype=bool)
    masks[0, 500:900, 400:800] = True
    sample = SimpleNamespace(image=rgb, masks=masks, dataset="synthetic")
    item = prepare.prepare(sample, prepare.PrepareOptions(image_size=SIDE, prompt_kind="box"),
                           torch.Generator().manual_seed(0))
    _, pixels, (height, width) = _model_input("refine", rgb)
    assert (height, width) == tuple(item.image.shape[1:])
    assert np.abs(pixels[:, :height, :width] - item.image.numpy()).max() < 1e-3
