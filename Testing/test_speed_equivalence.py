"""The fast image-encoder path computes what segment_anything's eager path computes.

References: segment_anything's own ``Attention`` / ``ImageEncoderViT`` forward (deep copies of the
modules before acceleration), with random, non-zero relative-position tables so the bias matters.
"""

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

from ultrasam.fast_attention import FusedAttention, WarmCompiled, accelerate_image_encoder


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


@pytest.mark.parametrize("grid", [(14, 14), (24, 40)], ids=["windowed-14x14", "global-24x40"])
def test_fused_attention_matches_original(grid):
    torch.manual_seed(0)
    original = Attention(dim=96, num_heads=4, use_rel_pos=True, input_size=grid)
    _randomise_rel_pos(original)
    fused = copy.deepcopy(original)
    fused.__class__ = FusedAttention  # what accelerate_image_encoder does to each block
    without_bias = copy.deepcopy(original)
    without_bias.use_rel_pos = False
    x = torch.randn(3, *grid, 96)

    expected = original(x)

    # The bias changes the output, so a dropped or transposed bias (non-square grid) would show.
    assert (expected - without_bias(x)).abs().max() > 1e-2
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)


def test_accelerated_encoder_matches_original_forward_and_gradients():
    original = _tiny_encoder()
    fast = accelerate_image_encoder(copy.deepcopy(original))
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


def test_warm_compiled_serves_eagerly_then_compiled_with_padded_batches():
    encoder = accelerate_image_encoder(_tiny_encoder())
    x = torch.randn(3, 3, 320, 320)
    with torch.inference_mode():
        expected = encoder(x)

    # The "eager" backend exercises the compile/warm-up/padding logic without a C++ toolchain.
    runner = WarmCompiled(encoder, (3, 320, 320), batch_sizes=(1, 4), device="cpu",
                          background=True, backend="eager")
    early = runner(x)  # served eagerly or compiled, whichever is ready: same values
    assert runner.wait(timeout=120), runner.error
    padded = runner(x)  # batch 3 runs as batch 4
    too_big = runner(torch.cat([x, x]))  # batch 6 > 4: eager, no recompilation

    for result in (early, padded, too_big[:3], too_big[3:]):
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
