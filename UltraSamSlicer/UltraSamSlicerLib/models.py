"""The model the effect runs and the server that runs it: the module's settings, Qt-free.

The module panel reads ``QSettings`` into a :class:`ModelSettings`; :mod:`UltraSamSlicerLib.engine`
starts ``ultrasam serve`` with them (or connects to the remote server they name). Nothing here
imports torch or segment_anything, so the module and effect load before they are installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ultrasam.resources import COMPACT_V1, LITEMEDSAM  # the names model_path accepts (standard library only)

OFFICIAL = "official"  # ModelSettings.checkpoint value meaning "the downloaded UltraSam weights"
NAMED_MODELS = (OFFICIAL, LITEMEDSAM, COMPACT_V1)  # ModelSettings.checkpoint values that are not paths
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "float32")  # a subset of ultrasam.device.PRECISIONS (not imported: no torch yet)

# What the extension needs beyond Slicer itself: (import name, pip requirement). torch and
# torchvision come from the SlicerPyTorch extension, which picks the build for the GPU driver.
TORCH_REQUIREMENTS = (("torch", "torch>=2.1"), ("torchvision", "torchvision"))
# fastapi, uvicorn: the local `ultrasam serve` child process.
# opencv-python-headless: UltraSam's resize is cv2.resize (ultrasam.resize); it is not in Slicer's Python.
PIP_REQUIREMENTS = (("segment_anything", "segment-anything==1.0"), ("tqdm", "tqdm>=4.60"),
                    ("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                    ("cv2", "opencv-python-headless"))


@dataclass(frozen=True)
class ModelSettings:
    """What to load and how.

    Attributes:
        checkpoint: :data:`OFFICIAL` (the downloaded UltraSam weights; until they are downloaded, the
            compact model shipped with the extension), :data:`LITEMEDSAM`, :data:`COMPACT_V1`, or a
            path to any checkpoint :func:`ultrasam.checkpoint.load_model` reads (UltraSam, SAM ViT-B,
            MedSAM, files written by the training module).
        device: "auto" (CUDA when available), "cuda" or "cpu".
        precision: "auto" (bf16 image encoder on GPUs that support it; on a CPU the faster of
            bf16 and fp32, timed once per machine and model) or "float32".
        cache_gib: GPU (or CPU) memory kept for slice embeddings; twice as much more in CPU memory
            before old embeddings are dropped.
        cache_dir: folder of the downloaded official weights.
        server_url: a remote ``ultrasam serve`` (http://host:port) to use instead of a local one;
            the model is then the one that server was started with.
        server_token: the token the remote server was started with.
    """

    checkpoint: str = OFFICIAL
    device: str = "auto"
    precision: str = "auto"
    cache_gib: float = 2.0
    cache_dir: str = ""
    server_url: str = ""
    server_token: str = ""

    def checkpoint_path(self) -> Path:
        """The file to load; raises FileNotFoundError saying how to get it."""
        if self.checkpoint == OFFICIAL:
            from ultrasam.download import OFFICIAL_NAME
            from ultrasam.resources import SHIPPED_MODEL

            path = Path(self.cache_dir) / OFFICIAL_NAME
            if path.is_file():
                return path
            if SHIPPED_MODEL.is_file():
                return SHIPPED_MODEL
            raise FileNotFoundError(
                "the UltraSam weights are not downloaded yet: open the UltraSam module and click "
                "'Download UltraSam weights' (375 MB), or choose a checkpoint file there"
            )
        if self.checkpoint in (LITEMEDSAM, COMPACT_V1):
            from ultrasam.resources import model_path

            path = model_path(self.checkpoint)  # LiteMedSAM's is found and checked there
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: reinstall the UltraSamSlicer extension")
            return path
        path = Path(self.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist: choose another file in the UltraSam module")
        return path


def shipped_model_note() -> str:
    """What the panel and the effect say while the shipped compact model stands in for UltraSam."""
    from ultrasam.resources import SHIPPED_MODEL_NOTICE

    return f"{SHIPPED_MODEL_NOTICE}: download the UltraSam weights in the UltraSam module for better masks. "


def missing_requirements() -> list[str]:
    """pip requirements of the packages that cannot be imported (torch first), [] when ready."""
    return [requirement for name, requirement in TORCH_REQUIREMENTS + PIP_REQUIREMENTS
            if importlib.util.find_spec(name) is None]
