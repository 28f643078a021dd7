"""The project's imports read from its source (ast), as edges between files, and the layer rules.

Every form counts, wherever it sits (module level, inside a function, under ``if``):
``import a.b``, ``from a import b``, relative imports, ``importlib.import_module("a.b")`` and
``__import__("a.b")`` with a literal name, and a string that is exactly a dotted project module
(``"a.b"`` or ``"a.b:attr"``), since such a string exists to be imported by name later (unless it
follows ``"-m"`` in an argument list: a child process runs that module, nothing imports it).

A file's module name is the one Python gives it when the first folder above its packages is on
``sys.path`` (as Slicer puts module folders and pytest puts Testing/ there).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SKIPPED_FOLDERS = {"__pycache__", "build", "node_modules"}
# Layers of the project's own packages (by top-level package name).
PACKAGE_LAYERS = {"ultrasam": "core", "ultrasam_data": "data", "ultrasam_training": "training"}
QT_FREE = ("core", "data", "training")
# Modules that exist only inside Slicer's Python.
SLICER_MODULES = ("slicer", "qt", "ctk", "SegmentEditorEffects", "SampleData", "PyTorchUtils", "DICOMLib")
SLICER_PREFIXES = ("qSlicer", "qMRML", "PythonQt")


@dataclass(frozen=True)
class Import:
    """One import in ``source`` (a project file) of the module ``name``; ``target`` is the project
    file it loads, None for a module from outside the project."""

    source: Path
    line: int
    name: str
    target: Path | None


def python_files(root: Path) -> list[Path]:
    """Every .py file under ``root``, without hidden folders, virtual environments and build output."""
    files = []
    for path in sorted(root.rglob("*.py")):
        folders = path.relative_to(root).parts[:-1]
        if any(part.startswith(".") or part in SKIPPED_FOLDERS for part in folders):
            continue
        if any((root.joinpath(*folders[: i + 1]) / "pyvenv.cfg").exists() for i in range(len(folders))):
            continue
        files.append(path)
    return files


def module_name(path: Path) -> str:
    """``a.b.c`` for ``<root>/a/b/c.py`` where ``a`` and ``b`` hold an ``__init__.py`` (``a.b`` for
    ``a/b/__init__.py``)."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def project_modules(files: Iterable[Path]) -> dict[str, Path]:
    """Module name -> file; two files with one name are an error (an import of it is ambiguous)."""
    modules: dict[str, Path] = {}
    for path in files:
        name = module_name(path)
        if name in modules:
            raise ValueError(f"{modules[name]} and {path} are both module {name!r}; rename one")
        modules[name] = path
    return modules


def read_imports(root: Path) -> list[Import]:
    """Every import of every project file under ``root``."""
    files = python_files(root)
    modules = project_modules(files)
    names = set(modules)
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
        for line, candidates in _imported_names(tree, package, names):
            found.append(Import(path, line, candidates[0], _target(candidates, modules)))
    return found


def _imported_names(tree: ast.AST, package: str, project: set[str]) -> Iterator[tuple[int, list[str]]]:
    """(line, candidate module names, most specific first) of each import in ``tree``."""
    # No further imports: docstrings, strings already read as an import call's argument, and the
    # module after "-m" in an argument list (a child process runs it; this file does not import it).
    seen = {id(node.body[0].value) for node in ast.walk(tree) if _has_docstring(node)}
    seen |= {id(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and _is_import_call(node)
             and node.args}
    seen |= {id(after) for node in ast.walk(tree) if isinstance(node, (ast.List, ast.Tuple))
             for flag, after in zip(node.elts, node.elts[1:]) if _literal(flag) == "-m"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            for alias in node.names:
                # `from a import b`: b is a submodule of a, or a name defined in a.
                yield node.lineno, [f"{base}.{alias.name}" if base else alias.name, base]
        elif isinstance(node, ast.Call) and _is_import_call(node) and node.args:
            name = _literal(node.args[0])
            if name is not None:
                anchor = _literal(node.args[1]) if len(node.args) > 1 else None
                keywords = {k.arg: _literal(k.value) for k in node.keywords}
                level = len(name) - len(name.lstrip("."))
                yield node.lineno, [_absolute(name[level:], level, anchor or keywords.get("package") or package)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in seen:
            name = node.value.partition(":")[0]
            if "." in name and name in project:
                yield node.lineno, [name]


def _has_docstring(node: ast.AST) -> bool:
    body = getattr(node, "body", None)
    return (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and bool(body)
            and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))


def _is_import_call(node: ast.Call) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return name in ("import_module", "__import__")


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _absolute(name: str, level: int, package: str) -> str:
    """The absolute module name of a (possibly relative) import made from ``package``."""
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level > len(parts):
        return ""  # beyond the top-level package: Python refuses it, so it loads nothing
    return ".".join(parts[: len(parts) - (level - 1)] + ([name] if name else []))


def _target(candidates: list[str], modules: dict[str, Path]) -> Path | None:
    """The project file an import loads: the first candidate, or its closest parent, that is one."""
    for name in candidates:
        while name:
            if name in modules:
                return modules[name]
            name = name.rpartition(".")[0]
    return None


# ---- layers ------------------------------------------------------------------------------------
def layer(path: Path, root: Path) -> str:
    """``core``, ``data``, ``training``, ``module`` (a Slicer module file), ``slicer-helpers`` (the
    other files of a Slicer module folder) or ``tests`` (test, self-test and benchmark files)."""
    parts = path.relative_to(root).parts
    if "Testing" in parts or parts[0] == "bench":
        return "tests"
    top_package = module_name(path).split(".")[0]
    if (path.parent / "__init__.py").is_file() and top_package in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[top_package]
    if (root / parts[0] / "CMakeLists.txt").is_file():  # a Slicer module folder
        return "module" if len(parts) == 2 else "slicer-helpers"
    return "tests"


def forbidden(imports: Iterable[Import], root: Path) -> dict[str, list[str]]:
    """Rule -> the imports that break it (``file:line imports name``)."""
    rules = {
        "the core imports training": lambda source, target: source == "core" and target == "training",
        "the data layer imports training": lambda source, target: source == "data" and target == "training",
        "a file below the Slicer layer imports a module file":
            lambda source, target: source not in ("module", "tests") and target == "module",
        "a Qt-free layer imports Slicer-side code": lambda source, target: source in QT_FREE
            and target in ("module", "slicer-helpers", "slicer"),
    }
    broken: dict[str, list[str]] = {rule: [] for rule in rules}
    for item in imports:
        source = layer(item.source, root)
        if item.target is not None:
            target = layer(item.target, root)
        else:
            top = item.name.split(".")[0]
            target = "slicer" if top in SLICER_MODULES or top.startswith(SLICER_PREFIXES) else "outside"
        for rule, breaks in rules.items():
            if breaks(source, target):
                broken[rule].append(f"{item.source.relative_to(root)}:{item.line} imports {item.name}")
    return broken


def cycles(imports: Iterable[Import]) -> list[list[Path]]:
    """Groups of files that import each other, directly or around a circle (Tarjan's strongly
    connected components with more than one file, or a file importing itself)."""
    graph: dict[Path, set[Path]] = {}
    for item in imports:
        graph.setdefault(item.source, set())
        if item.target is not None:
            graph[item.source].add(item.target)
            graph.setdefault(item.target, set())
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found: list[list[Path]] = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
