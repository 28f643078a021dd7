"""Files shipped with the package: the sample volume and a demonstration model."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

# RESECT case 3 (Xiao et al., Med Phys 2017, CC BY 4.0): real intra-operative 3D brain ultrasound,
# 256x256x288 voxels of 0.4 mm, oblique direction matrix. See data/README.md.
SAMPLE_VOLUME = DATA / "RESECT_Case3.nii.gz"
# RAS mm of voxel (i, j, k) = (140, 128, 144): the bright (hyperechoic) region of the middle slice.
SAMPLE_POINT_RAS = (-31.23, 13.67, 20.44)

UNTRAINED_NOTICE = (
    "UNTRAINED demonstration weights (a small SAM-architecture model with random weights, seed 0): "
    "the mask only shows that the pipeline runs end to end, it is not a segmentation. For real "
    "results run `ultrasam download` (UltraSam weights, needs internet) or pass --checkpoint."
)


def demonstration_model():
    """A small, deterministic, untrained SAM-architecture model for offline demos and smoke runs."""
    import torch

    from ultrasam.checkpoint import SamConfig, sam_from_config

    torch.manual_seed(0)
    return sam_from_config(SamConfig(encoder_embed_dim=64, encoder_depth=4, encoder_num_heads=2,
                                     encoder_global_attn_indexes=(1, 3), image_size=512))
