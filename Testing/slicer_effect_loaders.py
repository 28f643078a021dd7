"""Slicer's two ways of loading a scripted Segment Editor effect file, replayed in Python.

Re-expressed from ``qSlicerSegmentEditorScriptedEffect::setPythonSource``
(Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx) and
``qSlicerScriptedUtils::loadSourceAsModule`` (Base/QTCore/qSlicerScriptedUtils.cxx), read at the
tags v5.8.1 and v5.10.0 of Slicer/Slicer (v5.12.3 is the same as v5.10.0). Both versions:

- name the module after the file's folder and look for the class ``<file base name>`` (with
  "Effect" appended unless it already ends so) in that module;
- load the file only when the class is not there yet (a clone of a registered effect reuses it).

They differ in where the file is executed:

- 5.8: ``PyImport_AddModule(folder)`` (the module already in ``sys.modules``, or a new empty one
  put there), then ``imp.load_source(folder, path)``, which executes the file *into that same
  module object*; the class is then read from it.
- 5.10 and later (commit bb06cef09d, "Replace deprecated imp module with importlib"): the class is
  looked up in ``sys.modules[folder]`` if present; else ``importlib.util.spec_from_file_location``
  and ``module_from_spec`` make a new plain module, ``sys.modules[folder]`` is *replaced* by it,
  the file is executed, and the class is read from ``sys.modules[folder]``. A failed load leaves
  the half-run module in ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def effect_names(path: str | Path) -> tuple[str, str]:
    """(module name, class name) Slicer derives from an effect file's path."""
    path = Path(path)
    class_name = path.stem if path.stem.endswith("Effect") else path.stem + "Effect"
    return path.parent.name, class_name


def load_like_slicer_5_8(path: str | Path) -> type | None:
    """The effect class as Slicer 5.8 finds it (None when the file defines no such class)."""
    import imp  # Slicer 5.8 runs Python 3.9, where imp exists (it is gone from Python 3.12)

    module_name, class_name = effect_names(path)
    module = sys.modules.get(module_name)
    if module is None:  # PyImport_AddModule: create an empty module and register it
        module = sys.modules[module_name] = types.ModuleType(module_name)
    if not hasattr(module, class_name):
        imp.load_source(module_name, str(path))
    return getattr(module, class_name, None)


def load_like_slicer_5_10(path: str | Path) -> type | None:
    """The effect class as Slicer 5.10 and later find it (None when the file defines no such class)."""
    module_name, class_name = effect_names(path)
    module = sys.modules.get(module_name)
    if module is None or not hasattr(module, class_name):
        spec = importlib.util.spec_from_file_location(module_name, str(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        module = sys.modules[module_name]
    return getattr(module, class_name, None)


LOADERS = {"5.8": load_like_slicer_5_8, "5.10+": load_like_slicer_5_10}
