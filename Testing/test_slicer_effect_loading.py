"""The effect registers under both of Slicer's effect loaders (5.8 and 5.10+), and the training
module can still import the shared Slicer-side helpers afterwards.

The loaders are replayed from Slicer's source (slicer_effect_loaders.py says where each step comes
from); the Qt layer is stubbed (qt_layer fixture), MRML is the slicer-core wheel.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

from slicer_effect_loaders import LOADERS, effect_names

ROOT = Path(__file__).resolve().parents[1]
MODULE_FOLDERS = [ROOT / "UltraSamSlicer", ROOT / "UltraSamTraining"]
HELPERS = "UltraSamSlicerLib"


@pytest.fixture
def loader(request):
    version = request.param
    if version == "5.8" and sys.version_info >= (3, 12):
        pytest.skip("Slicer 5.8 runs Python 3.9; its loader's imp module is gone from Python 3.12")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # imp's own deprecation notice
        yield LOADERS[version]


@pytest.fixture
def modules_restored(monkeypatch):
    """sys.modules and sys.path as before the test, whatever the loaders put there."""
    saved = dict(sys.modules)
    for folder in MODULE_FOLDERS:
        monkeypatch.syspath_prepend(str(folder))
    yield
    for name in set(sys.modules) - set(saved):
        del sys.modules[name]
    sys.modules.update(saved)
    for name, module in saved.items():  # a re-imported submodule also replaced its parent's attribute
        parent, _, child = name.rpartition(".")
        if parent in saved and getattr(saved[parent], child, None) is not module:
            setattr(saved[parent], child, module)


@pytest.mark.parametrize("loader", list(LOADERS), indirect=True)
def test_the_effect_registers_and_the_training_module_still_imports_the_helpers(
        loader, qt_layer, modules_restored, monkeypatch):
    import slicer

    for name in [name for name in sys.modules if name == "UltraSamSlicer" or name.startswith(HELPERS)]:
        del sys.modules[name]  # a fresh Slicer process: no copy imported by an earlier test (restored after)
    panel = importlib.import_module("UltraSamSlicer")  # Slicer loads the module (and its helpers) first
    effect_class = loader(panel.EFFECT_SOURCE)
    assert effect_class is not None and effect_class.__name__ == "SegmentEditorEffect"
    assert loader(panel.EFFECT_SOURCE) is effect_class  # clone(): the registered class is reused
    adaptor = mock.MagicMock()
    effect_class(adaptor)
    assert adaptor.name == "UltraSam"
    effect_module = sys.modules[effect_names(panel.EFFECT_SOURCE)[0]]
    assert effect_module.mrml_bridge is importlib.import_module(f"{HELPERS}.mrml_bridge")

    # The training module imports the helpers later, maybe for the first time: through the package.
    for name in [name for name in sys.modules if name.startswith(HELPERS + ".")]:
        del sys.modules[name]
    training = importlib.import_module("UltraSamTraining")
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    with pytest.raises(ValueError, match="no segmentation"):  # imported mrml_bridge, then found nothing
        training.UltraSamTrainingLogic.exportSceneSegmentations("unused")
    assert f"{HELPERS}.mrml_bridge" in sys.modules


def write_effect_inside_its_helpers_package(folder: Path) -> Path:
    """The old layout: DemoLib/SegmentEditorEffect.py imports DemoLib.helper."""
    package = folder / "DemoLib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("VALUE = 1\n")
    (package / "SegmentEditorEffect.py").write_text(
        "from DemoLib import helper\n\nclass SegmentEditorEffect:\n    value = helper.VALUE\n")
    return package / "SegmentEditorEffect.py"


@pytest.mark.parametrize("loader", list(LOADERS), indirect=True)
def test_the_replays_reproduce_why_an_effect_inside_its_helpers_package_fails_from_5_10(
        loader, modules_restored, monkeypatch, tmp_path):
    effect_file = write_effect_inside_its_helpers_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("DemoLib")  # as the module panel imports its helpers first
    if loader is LOADERS["5.8"]:  # executed into the package itself: its submodules still import
        assert loader(effect_file).value == 1
        del sys.modules["DemoLib.helper"]
        importlib.import_module("DemoLib.helper")
        return
    with pytest.raises(ImportError, match="cannot import name 'helper' from 'DemoLib'"):
        loader(effect_file)
    with pytest.raises(ImportError, match="not a package"):  # and the package stays broken for others
        importlib.import_module("DemoLib.helper")


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in a file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_the_effect_never_imports_its_own_folder(qt_layer, modules_restored):
    """Under 5.10+ the folder's name is the effect's own plain module, not a package: importing from
    it (by name or relatively) fails. (Imports of module files: Testing/test_layers.py.)"""
    effect_file = importlib.import_module("UltraSamSlicer").EFFECT_SOURCE
    for module, level in imported_modules(effect_file):
        assert level == 0 and module.split(".")[0] != effect_file.parent.name, module
