"""Layers that hold: read every import of the project (import_graph.py) and check the rules of
docs/ARCHITECTURE.md. The checker itself is first shown to fail on a small tree that breaks each rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from import_graph import cycles, forbidden, layer, python_files, read_imports

ROOT = Path(__file__).resolve().parents[1]

CORE_TO_TRAINING = "the core imports training"
DATA_TO_TRAINING = "the data layer imports training"
INTO_MODULE_FILE = "a file below the Slicer layer imports a module file"
QT_FREE_TO_SLICER = "a Qt-free layer imports Slicer-side code"

# One file per import form and rule. "Mod" is a Slicer module folder (it has a CMakeLists.txt).
SYNTHETIC_TREE = {
    "Mod/CMakeLists.txt": "",
    "Mod/Mod.py": "import qt\nimport ModLib\nfrom ultrasam_training import t\n",
    "Mod/ModLib/__init__.py": "",
    "Mod/ModLib/helper.py": "import importlib\ndef settings():\n    return importlib.import_module('Mod')\n",
    "Mod/ultrasam/__init__.py": "",
    "Mod/ultrasam/a.py": "def late():\n    from . import b\n",
    "Mod/ultrasam/b.py": "from ultrasam.a import late\n",
    "Mod/ultrasam/c.py": 'COMMANDS = {"t": "ultrasam_training.t:main"}\n',
    "Mod/ultrasam/d.py": "if True:\n    import slicer.util\n",
    "Mod/ultrasam/e.py": '"""ultrasam_training.t"""\nfrom ultrasam import a\nRUN = ["python", "-m", "ultrasam_training.t"]\n',
    "Mod/ultrasam_data/__init__.py": "",
    "Mod/ultrasam_data/f.py": "__import__('ultrasam_training.t')\n",
    "Train/ultrasam_training/__init__.py": "",
    "Train/ultrasam_training/t.py": "from ultrasam.a import late\nimport ultrasam_data\n",
    "Testing/test_t.py": "import Mod\nfrom ultrasam_training.t import x\n",
}


@pytest.fixture
def synthetic(tmp_path) -> Path:
    for name, text in SYNTHETIC_TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_finds_each_broken_rule_and_nothing_else(synthetic):
    broken = forbidden(read_imports(synthetic), synthetic)
    assert broken == {
        CORE_TO_TRAINING: ["Mod/ultrasam/c.py:1 imports ultrasam_training.t"],  # a module name in a string
        DATA_TO_TRAINING: ["Mod/ultrasam_data/f.py:1 imports ultrasam_training.t"],  # __import__
        INTO_MODULE_FILE: ["Mod/ModLib/helper.py:3 imports Mod"],  # importlib, inside a function
        QT_FREE_TO_SLICER: ["Mod/ultrasam/d.py:2 imports slicer.util"],  # under an if
    }


def test_the_checker_finds_a_circle_through_a_relative_import_in_a_function(synthetic):
    found = cycles(read_imports(synthetic))
    assert [[path.relative_to(synthetic).as_posix() for path in group] for group in found] == [
        ["Mod/ultrasam/a.py", "Mod/ultrasam/b.py"]]


def test_the_checker_names_layers_by_folder(synthetic):
    layers = {path.relative_to(synthetic).as_posix(): layer(path, synthetic) for path in python_files(synthetic)}
    assert layers["Mod/Mod.py"] == "module" and layers["Mod/ModLib/helper.py"] == "slicer-helpers"
    assert (layers["Mod/ultrasam/a.py"], layers["Mod/ultrasam_data/f.py"]) == ("core", "data")
    assert layers["Train/ultrasam_training/t.py"] == "training" and layers["Testing/test_t.py"] == "tests"


@pytest.fixture(scope="module")
def project_imports():
    return read_imports(ROOT)


def test_the_project_is_read_whole(project_imports):
    """Known edges of each kind are there, so an empty or partial reading cannot pass the rules."""
    edges = {(i.source.relative_to(ROOT).as_posix(), i.target.relative_to(ROOT).as_posix())
             for i in project_imports if i.target is not None}
    assert ("UltraSamSlicer/ultrasam/evaluation.py", "UltraSamSlicer/ultrasam/evaluation_data.py") in edges  # lazy
    assert ("UltraSamSlicer/ultrasam/evaluation_data.py", "UltraSamSlicer/ultrasam_data/coco.py") in edges
    assert ("UltraSamTraining/ultrasam_training/trainer.py", "UltraSamSlicer/ultrasam_data/coco.py") in edges
    assert ("UltraSamSlicer/UltraSamSlicer.py", "UltraSamSlicer/UltraSamSlicerLib/models.py") in edges
    layers = {layer(path, ROOT) for path in python_files(ROOT)}
    assert layers == {"core", "data", "training", "module", "slicer-helpers", "tests"}


@pytest.mark.parametrize("rule", [
    CORE_TO_TRAINING,
    DATA_TO_TRAINING,
    INTO_MODULE_FILE,
    QT_FREE_TO_SLICER,
])
def test_the_project_keeps_the_layer_rule(project_imports, rule):
    assert forbidden(project_imports, ROOT)[rule] == []


def test_no_file_imports_itself_back_around_a_circle(project_imports):
    assert [[path.relative_to(ROOT).as_posix() for path in group] for group in cycles(project_imports)] == []
