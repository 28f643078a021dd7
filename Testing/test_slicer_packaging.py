"""Extension packaging: every file of both modules is listed in CMake, and the ExtensionsIndex
description agrees with the top-level CMakeLists.txt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("UltraSamSlicer", "UltraSamTraining")
IGNORED_PARTS = {"__pycache__", "Testing"}  # Testing/: self-tests registered with ctest, not shipped


def cmake_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, arguments) of each CMake command, comments stripped, quotes removed."""
    text = re.sub(r'("[^"]*")|#[^\n]*', lambda m: m.group(1) or "", text)  # keep '#' inside quotes
    return [(name.lower(), re.findall(r'"[^"]*"|[^\s"]+', body))
            for name, body in re.findall(r'(\w+)\s*\(((?:"[^"]*"|[^)"])*)\)', text)]


def cmake_variables(text: str) -> dict[str, list[str]]:
    variables: dict[str, list[str]] = {}
    for name, args in cmake_commands(text):
        if name == "set" and args:
            values = [a.strip('"') for a in args[1:]]
            variables[args[0]] = [_expand(v, variables) for v in values]
    return variables


def _expand(value: str, variables: dict[str, list[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)


def module_files(module: str) -> tuple[set[str], set[str]]:
    """(.py files, other files) of a module folder, relative to it, as CMake lists them."""
    folder = ROOT / module
    scripts, resources = set(), set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file() or IGNORED_PARTS & set(relative.parts) or path.suffix == ".pyc":
            continue
        if relative.as_posix() == "CMakeLists.txt":
            continue
        (scripts if path.suffix == ".py" else resources).add(relative.as_posix())
    return scripts, resources


@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_listed_and_every_listed_file_exists(module):
    variables = cmake_variables((ROOT / module / "CMakeLists.txt").read_text())
    assert variables["MODULE_NAME"] == [module]
    scripts, resources = module_files(module)
    listed_scripts = set(variables.get("MODULE_PYTHON_SCRIPTS", []))
    listed_resources = set(variables.get("MODULE_PYTHON_RESOURCES", []))
    assert scripts - listed_scripts == set(), f"add these to MODULE_PYTHON_SCRIPTS in {module}/CMakeLists.txt"
    assert resources - listed_resources == set(), f"add these to MODULE_PYTHON_RESOURCES in {module}/CMakeLists.txt"
    assert listed_scripts - scripts == set(), "listed but missing (CMake would stop with an error)"
    assert listed_resources - resources == set(), "listed but missing (CMake would stop with an error)"


@pytest.mark.parametrize("module", MODULES)
def test_self_test_scripts_are_registered_with_ctest(module):
    commands = cmake_commands((ROOT / module / "CMakeLists.txt").read_text())
    known = {"MODULE_NAME": [module], "CMAKE_CURRENT_SOURCE_DIR": ["."]}
    registered = {_expand(args[args.index("SCRIPT") + 1], known).removeprefix("./")
                  for name, args in commands if name == "slicer_add_python_unittest"}
    tests = {p.relative_to(ROOT / module).as_posix() for p in (ROOT / module / "Testing").rglob("*Test.py")}
    assert tests <= registered
    assert all((ROOT / module / script).is_file() for script in registered)


def top_level() -> dict[str, list[str]]:
    return cmake_variables((ROOT / "CMakeLists.txt").read_text())


def test_top_level_cmake_is_a_complete_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    commands = cmake_commands(text)
    project = [args[0] for name, args in commands if name == "project"]
    assert project == ["UltraSamSlicer"] and not project[0].startswith("Slicer")
    variables = top_level()
    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert len(variables.get(f"EXTENSION_{name}", [])) == 1, f"EXTENSION_{name} must be one value"
        assert variables[f"EXTENSION_{name}"][0], f"EXTENSION_{name} is empty"
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert {args[0] for name, args in commands if name == "add_subdirectory"} == set(MODULES)
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text


def test_extensions_index_json_matches_cmake():
    variables = top_level()
    index = json.loads((ROOT / "UltraSamSlicer.json").read_text())  # named after the CMake project
    depends = [] if variables["EXTENSION_DEPENDS"] == ["NA"] else variables["EXTENSION_DEPENDS"]
    assert index["build_dependencies"] == depends
    assert index["category"] == variables["EXTENSION_CATEGORY"][0]
    repository = re.match(r"https://github.com/([^/]+/[^/#]+)", variables["EXTENSION_HOMEPAGE"][0]).group(1)
    assert index["scm_url"] == f"https://github.com/{repository}.git"
    assert repository.split("/")[1].startswith("Slicer"), "the index wants a repository named Slicer..."
    assert index["category"] in ("Segmentation", "Ultrasound")
    assert index["build_subdirectory"] == "." and isinstance(index["tier"], int)


def repository_file(url: str) -> Path:
    """The file of this repository a raw.githubusercontent.com URL of EXTENSION_HOMEPAGE's repository names."""
    repository = re.match(r"https://github.com/([^/]+/[^/#]+)", top_level()["EXTENSION_HOMEPAGE"][0]).group(1)
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert url.startswith(prefix), f"{url} is not a file of {repository}'s main branch"
    return ROOT / url[len(prefix):]


def test_icon_url_points_at_the_128px_icon_in_this_repository():
    from PIL import Image

    with Image.open(repository_file(top_level()["EXTENSION_ICONURL"][0])) as icon:
        assert icon.size == (128, 128)


def test_screenshot_urls_point_at_images_in_this_repository():
    from PIL import Image

    for url in top_level()["EXTENSION_SCREENSHOTURLS"][0].split():  # CMake: space-separated URLs
        with Image.open(repository_file(url)) as screenshot:
            assert min(screenshot.size) >= 300, f"{url}: too small to show anything"
