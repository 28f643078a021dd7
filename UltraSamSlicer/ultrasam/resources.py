"""Files shipped with the package: the sample volume and the compact default model."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

# RESECT case 3 (Xiao et al., Med Phys 2017, CC BY 4.0): real intra-operative 3D brain ultrasound,
# 256x256x288 voxels of 0.4 mm, oblique direction matrix. See data/README.md.
SAMPLE_VOLUME = DATA / "RESECT_Case3.nii.gz"
# RAS mm of voxel (i, j, k) = (140, 128, 144): the bright (hyperechoic) region of the middle slice.
SAMPLE_POINT_RAS = (-31.23, 13.67, 20.44)

# The compact model trained by this project (docs/MODEL_CARD.md): a small SAM-architecture model
# trained from scratch on BUS-BRA and HC18. Used when no UltraSam weights are downloaded or chosen.
SHIPPED_MODEL = DATA / "compact-v1.pth"
SHIPPED_MODEL_NOTICE = (
    "the compact model shipped with UltraSamSlicer (trained from scratch on 2D breast and fetal head "
    "ultrasound; NOT UltraSam, and weaker: docs/MODEL_CARD.md)"
)
