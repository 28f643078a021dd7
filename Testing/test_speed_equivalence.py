"""The fast image-encoder path computes what segment_anything's eager path computes.

References: segment_anything's own ``Attention`` / ``ImageEncoderViT`` forward (deep copies of the
modules before acceleration), with random, non-zero relative-position tables so the bias matters.
"""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

from ultrasam.fast_attention import FusedAttention, WarmCompiled, accelerate_image_encoder
from ultrasam.predictor import Predictor, Prompt2D
from ultrasam.resources import SAMPLE_VOLUME
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_io import read_volume


def _randomise_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    """SAM zero-initialises the relative-position tables; trained ones are not zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "rel_pos" in name:
            param.data = torch.randn(param.shape, generator=generator)


def _tiny_encoder() -> ImageEncoderViT:
    """SAM-shaped but narrow: 20 x 20 tokens, so windowed blocks (14) pad, plus global blocks."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=320, embed_dim=64, depth=4, num_heads=4, out_chans=32, use_rel_pos=True,
        window_size=14, global_attn_indexes=(1, 3),
    )
    _randomise_rel_pos(encoder)
    return encoder.eval()


FOLD = pytest.mark.parametrize("fold", [False, True], ids=["bias-as-mask", "bias-folded-into-qk"])


@FOLD
@pytest.mark.parametrize("grid", [(14, 14), (24, 40)], ids=["windowed-14x14", "global-24x40"])
def test_fused_attention_matches_original(grid, fold):
    torch.manual_seed(0)
    original = Attention(dim=96, num_heads=4, use_rel_pos=True, input_size=grid)
    _randomise_rel_pos(original)
    fused = copy.deepcopy(original)
    fused.__class__ = FusedAttention  # what accelerate_image_encoder does to each block
    fused.fold_rel_pos = fold
    without_bias = copy.deepcopy(original)
    without_bias.use_rel_pos = False
    x = torch.randn(3, *grid, 96)

    expected = original(x)

    # The bias changes the output, so a dropped or transposed bias (non-square grid) would show.
    assert (expected - without_bias(x)).abs().max() > 1e-2
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


@FOLD
def test_accelerated_encoder_matches_original_forward_and_gradients(fold):
    original = _tiny_encoder()
    fast = accelerate_image_encoder(copy.deepcopy(original), fold_rel_pos=fold)
    x = torch.randn(2, 3, 320, 320)

    expected = original(x)
    actual = fast(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)

    expected.square().sum().backward()
    actual.square().sum().backward()
    for (name, ref), (_, got) in zip(original.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_accelerate_keeps_weights_and_is_idempotent():
    encoder = _tiny_encoder()
    before = {key: value.clone() for key, value in encoder.state_dict().items()}

    assert accelerate_image_encoder(accelerate_image_encoder(encoder)) is encoder

    attentions = [m for m in encoder.modules() if isinstance(m, Attention)]
    assert len(attentions) == 4 and all(type(m) is FusedAttention for m in attentions)
    after = encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_accelerate_refuses_other_models():
    with pytest.raises(TypeError, match="load_model"):
        accelerate_image_encoder(torch.nn.Linear(2, 2))


def test_warm_compiled_serves_eagerly_then_compiled_for_warmed_shapes():
    encoder = accelerate_image_encoder(_tiny_encoder())
    x = torch.randn(3, 3, 320, 320)
    with torch.inference_mode():
        expected = encoder(x)

    # The "eager" backend exercises compile, warm-up and dispatch without a C++ toolchain.
    runner = WarmCompiled(encoder, [((x[:1],), {}), ((x,), {})], "cpu", precision="float32", backend="eager")
    early = runner(x[:1])  # served eagerly or compiled, whichever is ready: same values
    assert runner.wait(timeout=120), runner.error
    before = runner.served.copy()
    warm = runner(x)
    other = runner(x[:2])  # a batch size never warmed: eager, no recompilation

    assert runner.served - before == Counter(compiled=1, eager=1)
    for result, want in ((early, expected[:1]), (warm, expected), (other, expected[:2])):
        torch.testing.assert_close(result, want, atol=1e-5, rtol=1e-5)


def test_warm_compiled_decoder_tells_prompt_shapes_and_flags_apart(tiny_sam):
    embedding = torch.randn(1, 256, 16, 16)
    points = (torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]]))
    with torch.inference_mode():
        sparse, dense = tiny_sam.prompt_encoder(points=points, boxes=None, masks=None)
        inputs = dict(image_embeddings=embedding, image_pe=tiny_sam.prompt_encoder.get_dense_pe(),
                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        expected = {flag: tiny_sam.mask_decoder(**inputs, multimask_output=flag) for flag in (True, False)}

    runner = WarmCompiled(tiny_sam.mask_decoder, [((), {**inputs, "multimask_output": True})], "cpu",
                          precision="float32", background=False, backend="eager")
    assert runner.ready, runner.error
    single = runner(**inputs, multimask_output=False)  # not warmed: eager
    multi = runner(**inputs, multimask_output=True)  # warmed: compiled

    assert runner.served == Counter(eager=1, compiled=1)
    for flag, result in ((False, single), (True, multi)):
        for got, want in zip(result, expected[flag]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _iou(a, b) -> float:
    """Intersection over union of two boolean arrays (numpy or torch) of one shape."""
    a, b = np.asarray(a), np.asarray(b)
    return float((a & b).sum() / max((a | b).sum(), 1))


@FOLD
def test_fast_path_masks_match_fp32_reference_on_real_slices(tiny_sam, fold):
    """Fast path (SDPA + bf16 encoder, as on a GPU) against segment_anything's fp32 eager path.

    Random weights give masks covering most of a slice, which would agree trivially. So besides
    the pipeline's masks, the final logits are also thresholded at the reference's median: half
    the slice on each side, with the boundary running through the logit field wherever it is
    flattest, which is harsher than a trained model's steep, bimodal logits.
    """
    slices = VolumeSlices(read_volume(SAMPLE_VOLUME), axis=0)
    images = [slices.image(index) for index in (80, 120, 160, 200)]
    # Whatever the Predictor applies itself, the reference runs segment_anything's attention in
    # fp32 and the fast path the variant under test.
    reference = Predictor(copy.deepcopy(tiny_sam), device="cpu", precision="float32")
    for module in reference.model.modules():
        if isinstance(module, Attention):
            module.__class__ = Attention
    fast_fp32 = Predictor(tiny_sam, device="cpu", precision="float32")  # a CPU without native bf16
    fast = Predictor(tiny_sam, device="cpu", precision="bfloat16")  # a GPU, or a CPU with bf16
    accelerate_image_encoder(tiny_sam, fold_rel_pos=fold)
    height, width = images[0].shape
    prompts = [Prompt2D(points_xy=[[width * 0.5, height * 0.45]], labels=[1]),
               Prompt2D(box_xyxy=[width * 0.3, height * 0.3, width * 0.65, height * 0.6])]

    expected_embeddings = reference.embed(images)
    fp32_embeddings = fast_fp32.embed(images)
    bf16_embeddings = fast.embed(images)

    for expected, fp32, bf16 in zip(expected_embeddings, fp32_embeddings, bf16_embeddings):
        fp32_error = (fp32.features - expected.features).abs().max()
        assert fp32_error < 1e-4 * expected.features.abs().max()
        assert (bf16.features - expected.features).abs().max() > 10 * fp32_error  # bf16 really ran
        for prompt in prompts:
            want = reference.predict(expected, prompt)
            got = fast.predict(bf16, prompt)
            threshold = want.low_res_logits.median()
            assert _iou(got.mask, want.mask) >= 0.98
            assert _iou(got.low_res_logits > threshold, want.low_res_logits > threshold) >= 0.98


def test_predictor_with_compiled_decoder_gives_the_same_masks(tiny_sam, monkeypatch):
    import ultrasam.fast_attention as fast_attention

    original = fast_attention.WarmCompiled.__init__

    def eager_backend(self, *args, **kwargs):  # no C++ toolchain needed for the test
        original(self, *args, backend="eager", **kwargs)

    monkeypatch.setattr(fast_attention.WarmCompiled, "__init__", eager_backend)
    image = (np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)
    eager = Predictor(copy.deepcopy(tiny_sam), device="cpu", precision="float32")
    compiled = Predictor(tiny_sam, device="cpu", precision="float32", compile_decoder=True)
    assert compiled.wait_until_compiled(timeout=300) and not eager.wait_until_compiled()
    for prompt in (Prompt2D([[60.0, 40.0]], [1]), Prompt2D(box_xyxy=[20, 10, 100, 80]),
                   Prompt2D([[60.0, 40.0]], [1], box_xyxy=[20, 10, 100, 80])):
        want = eager.predict(eager.set_image(image), prompt)
        got = compiled.predict(compiled.set_image(image), prompt)
        assert np.array_equal(got.mask, want.mask) and abs(got.iou - want.iou) < 1e-5
    assert compiled._mask_decoder.served["compiled"] >= 3
