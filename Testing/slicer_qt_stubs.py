"""Stand-ins for the parts of Slicer that exist only inside the application (qt, ctk, the Segment
Editor's effect base class, slicer.app), so module and effect files import under the slicer-core
wheel. MRML stays real. Used through the ``qt_layer`` fixture of conftest.py.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from unittest import mock

import slicer


class StubEffectBase:
    """Stand-in for SegmentEditorEffects.AbstractScriptedSegmentEditorEffect (Qt-side Slicer code)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def xyToRas(self, xy, viewWidget):
        return viewWidget.xyToRas(xy)


def stub_qt_layer(monkeypatch):
    """Stub the modules and slicer attributes that only exist inside the Slicer application."""
    for name in ("qt", "ctk", "qSlicerSegmentationsEditorEffectsPythonQt"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, mock.MagicMock(name=name))
    if importlib.util.find_spec("SegmentEditorEffects") is None:
        monkeypatch.setitem(sys.modules, "SegmentEditorEffects",
                            types.SimpleNamespace(AbstractScriptedSegmentEditorEffect=StubEffectBase))
    if importlib.util.find_spec("slicer.ScriptedLoadableModule") is None:
        base = type("Base", (), {"__init__": lambda self, *args: setattr(self, "parent", args[0] if args else None)})
        stub = types.ModuleType("slicer.ScriptedLoadableModule")
        for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget"):
            setattr(stub, name, type(name, (base,), {}))
        # Slicer's ScriptedLoadableModuleTest is a unittest.TestCase (Base/Python/slicer/ScriptedLoadableModule.py).
        stub.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,), {})
        monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", stub)
    abstract = types.SimpleNamespace(ModificationModeSet=0, ModificationModeAdd=1)
    for name, value in (("app", mock.MagicMock(name="app")), ("qMRMLNodeComboBox", mock.MagicMock),
                        ("qSlicerSegmentEditorAbstractEffect", abstract)):
        if not hasattr(slicer, name):
            monkeypatch.setattr(slicer, name, value, raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda *args: None)
    interaction = slicer.vtkMRMLInteractionNode()  # mouse mode: "view transform", no markups placement
    slicer.app.applicationLogic.return_value.GetInteractionNode.return_value = interaction
    for name in ("UltraSamSlicer", "UltraSamSegmentEditorEffect"):
        sys.modules.pop(name, None)
    yield
    for name in ("UltraSamSlicer", "UltraSamSegmentEditorEffect"):
        sys.modules.pop(name, None)
