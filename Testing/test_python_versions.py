"""Every project file compiles, and every Qt-free module imports, under the Python running the tests.

The main suite runs this under 3.11; ``make test-compat`` runs it (with the rest of the torch-free
suite) under 3.9, Slicer 5.8's Python, and 3.12, Slicer 5.10's and later. There, modules that need a
package the environment lacks (torch, OpenCV, the Slicer wheels) are skipped with the package named.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

from optional_packages import missing_optional_package

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("UltraSamSlicer", "UltraSamTraining", "Testing", "bench")
PACKAGES = {"ultrasam": "UltraSamSlicer", "ultrasam_data": "UltraSamSlicer", "ultrasam_training": "UltraSamTraining",
            "UltraSamSlicerLib": "UltraSamSlicer"}


def _python_files() -> list[Path]:
    return sorted(path for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py"))


def _modules() -> list[str]:
    names = []
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder / package).glob("*.py")):
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return [name for name in names if not name.endswith(".__main__")]  # __main__ runs


def test_every_python_file_compiles_with_warnings_as_errors():
    """Syntax of a later Python (match, except*, PEP 695) fails here; so do invalid escapes, which
    3.12 warns about."""
    failures = []
    for path in _python_files():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
            except (SyntaxError, SyntaxWarning, DeprecationWarning) as error:
                failures.append(f"{path.relative_to(REPO)}: {type(error).__name__}: {error}")
    assert len(_python_files()) > 80 and not failures, "\n".join(failures)


@pytest.mark.parametrize("module", _modules())
def test_qt_free_module_imports(module, monkeypatch):
    """Runtime-evaluated annotations, 3.10+ library calls at import time and removed modules fail here."""
    for folder in set(PACKAGES.values()):
        monkeypatch.syspath_prepend(str(REPO / folder))
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        package = missing_optional_package(error)
        if not package:
            raise
        pytest.skip(f"{module} needs {package}, not installed under Python {sys.version.split()[0]}")
