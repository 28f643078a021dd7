"""Shared pytest fixtures: tiny SAM-architecture models and the location of ../shared/data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# real BUS-BRA and HC18 images and masks shipped with the tests (attribution: README)
REGRESSION_FIXTURES = REPO / "Testing" / "fixtures" / "regression"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules


@pytest.fixture(autouse=True, scope="session")
def _user_cache_in_a_temporary_folder(tmp_path_factory):
    """What ultrasam keeps in the user's cache folder (the CPU precision choice, downloaded weights)
    goes to a folder of this test session, never the user's (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ULTRASAM_CACHE", str(tmp_path_factory.mktemp("user-cache")))
        yield


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the team's shared data, present in CI, absent on a fresh clone)")
    return path


@pytest.fixture
def tiny_config():
    from ultrasam.checkpoint import SamConfig

    # 12 encoder blocks like ViT-B (so UltraSam's 293-key layout holds) but 32 wide, 256 input.
    return SamConfig(encoder_embed_dim=32, encoder_num_heads=2, encoder_mlp_ratio=2.0, image_size=256,
                     encoder_window_size=4)


@pytest.fixture
def tiny_sam(tiny_config):
    import torch

    from ultrasam.checkpoint import sam_from_config

    torch.manual_seed(0)
    model = sam_from_config(tiny_config)
    _randomise(model)
    return model


def _randomise(model) -> None:
    """Give every tensor random values (SAM zero-initialises some), so each one matters."""
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                scale = 1.5 if tensor.dim() > 1 else 0.3  # logits of order 1, so 1e-4 is strict
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale / max(1, tensor.shape[-1]) ** 0.5
                             + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


@pytest.fixture
def qt_layer(monkeypatch):
    """Slicer's Qt-side modules stubbed (only where absent); needs the slicer-core wheel."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    from slicer_qt_stubs import stub_qt_layer

    yield from stub_qt_layer(monkeypatch)
