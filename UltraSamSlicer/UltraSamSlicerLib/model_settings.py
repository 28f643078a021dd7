"""The model settings, kept in Slicer's settings (``QSettings``) under ``UltraSam/``.

The UltraSam module panel writes them; the Segment Editor effect and the training module ("Use
this model") read and write them here, so that neither reaches into a module panel file.
"""

from __future__ import annotations

import os

import qt
import slicer

from UltraSamSlicerLib.models import OFFICIAL, ModelSettings

PREFIX = "UltraSam/"


def read() -> ModelSettings:
    """The model chosen in the UltraSam module (defaults where nothing was chosen yet)."""
    value = slicer.util.settingsValue
    return ModelSettings(
        checkpoint=value(PREFIX + "Checkpoint", OFFICIAL),
        device=value(PREFIX + "Device", "auto"),
        precision=value(PREFIX + "Precision", "auto"),
        cache_gib=value(PREFIX + "CacheGiB", 2.0, converter=float),
        cache_dir=weights_folder(),
        server_url=value(PREFIX + "ServerURL", ""),
        server_token=value(PREFIX + "ServerToken", ""),
    )


def save(settings: ModelSettings) -> None:
    """Store ``settings`` (``cache_dir`` is not stored: it always is :func:`weights_folder`)."""
    store = qt.QSettings()
    store.setValue(PREFIX + "Checkpoint", settings.checkpoint)
    store.setValue(PREFIX + "Device", settings.device)
    store.setValue(PREFIX + "Precision", settings.precision)
    store.setValue(PREFIX + "CacheGiB", settings.cache_gib)
    store.setValue(PREFIX + "ServerURL", settings.server_url)
    store.setValue(PREFIX + "ServerToken", settings.server_token)


def weights_folder() -> str:
    """Downloaded weights live in Slicer's cache folder, never in the module folder."""
    return os.path.join(slicer.app.cachePath, "UltraSam")
