"""The Slicer self-tests run where Slicer runs them: without ``--testing`` (Reload and Test, the
Self Tests module) and without torch (the Extensions Index build machines).

Checked from the files' own syntax trees, and by running the module self-test's torch-free part
under the Qt stubs (qt_layer fixture; Slicer's ScriptedLoadableModuleTest is a unittest.TestCase).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF_TEST_FILES = [ROOT / "UltraSamSlicer" / "UltraSamSlicer.py", ROOT / "UltraSamTraining" / "UltraSamTraining.py",
                   *sorted((ROOT / "UltraSamSlicer" / "Testing" / "Python").glob("*.py"))]
HEAVY = ("torch", "torchvision", "segment_anything")


def top_level_imports(tree: ast.Module) -> list[str]:
    """Modules imported when the file loads (module body, including its if/try blocks)."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", []) + \
                [child for handler in getattr(node, "handlers", []) for child in handler.body]
    return found


@pytest.mark.parametrize("path", SELF_TEST_FILES, ids=lambda path: path.name)
def test_self_test_files_load_without_torch_and_never_require_testing_mode(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    heavy = [name for name in top_level_imports(tree) if name.split(".")[0] in HEAVY]
    assert heavy == [], f"{path.name} imports {heavy} when it loads: Slicer without torch cannot even list it"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("assert"):
            called = {getattr(inner.func, "attr", "") for inner in ast.walk(node) if isinstance(inner, ast.Call)}
            assert "testingEnabled" not in called, \
                f"{path.name}:{node.lineno} asserts testingEnabled(): Reload and Test runs without --testing"


@pytest.mark.parametrize("testing", [True, False], ids=["--testing", "Reload and Test"])
def test_the_module_self_test_of_the_dependency_check_passes_in_both_modes_without_a_dialog(
        qt_layer, monkeypatch, testing):
    import slicer

    monkeypatch.syspath_prepend(str(ROOT / "UltraSamSlicer"))
    module = importlib.import_module("UltraSamSlicer")
    monkeypatch.setattr(module, "missing_requirements", lambda: ["torch>=2.1"])  # as without torch
    dialogs = []

    def dialog(*args, **kwargs):  # stands for Slicer's real dialog
        dialogs.append(args)
        return False

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", dialog, raising=False)
    slicer.app.testingEnabled.return_value = testing
    module.UltraSamSlicerTest("test_dependency_check_is_silent_in_testing").test_dependency_check_is_silent_in_testing()
    assert dialogs == [] and slicer.util.confirmOkCancelDisplay is dialog  # never shown; restored afterwards


def test_the_effect_self_tests_stand_in_for_the_server_runs_without_torch():
    """The effect self-test's preview/apply/undo part runs on slicer_test_fakes.NumpySession where
    Slicer has no torch; here, in a Python where importing torch fails, it must still answer a click
    with the bright ball's slice and a propagation with the whole ball."""
    import os
    import subprocess
    import sys

    code = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from slicer_test_fakes import NumpySession, ball
from ultrasam.geometry import Geometry, Volume
from ultrasam.wire import prompts_to_json

inside = ball((12, 16, 18), (6, 8, 9), 3.3)
volume = Volume(np.where(inside, 200.0, 10.0).astype(np.float32), Geometry([4.0, -2.0, 1.0], [0.5, 0.6, 1.2]))
click = prompts_to_json(volume.geometry.ijk_to_ras(np.array([[9.0, 8.0, 6.0]])), [1])
session = NumpySession(volume)
assert session.start(click).state == "done"
assert np.array_equal(session.mask, inside & (np.arange(12) == 6)[:, None, None])
assert session.start(click, propagate=True).propagated
assert np.array_equal(session.mask, inside)
print("ok")
"""
    path = os.pathsep.join([str(ROOT / "UltraSamSlicer"), str(ROOT / "UltraSamSlicer" / "Testing" / "Python")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=path))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
