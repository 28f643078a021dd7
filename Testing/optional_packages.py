"""pytest plugin for the runs under other Pythons (``make test-compat``): torch-free environments.

Those environments hold what a Slicer without the extension's packages holds (numpy, SimpleITK,
Pillow, pycocotools, tqdm) and none of torch, segment-anything, OpenCV, mmengine, the Slicer
wheels, or the server's FastAPI, uvicorn and httpx (the server runs where the model does). A test module, or a test, that fails only because one of these is missing is reported as
skipped with the package named, as ``pytest.importorskip`` would; every other failure stays a failure.
Load it with ``-p optional_packages``.
"""

from __future__ import annotations

import pytest
from _pytest.reports import CollectReport

OPTIONAL = ("torch", "torchvision", "segment_anything", "cv2", "mmengine", "slicer", "vtk", "qt", "ctk",
            "fastapi", "uvicorn", "httpx")


def missing_optional_package(error: BaseException | None) -> str | None:
    """The optional package whose absence caused ``error`` (through its causes), else None."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL:
            return error.name
        error = error.__cause__ or error.__context__
    return None


def _reason(package: str) -> str:
    return f"needs {package}, which this torch-free environment does not install"


@pytest.hookimpl(tryfirst=True)
def pytest_make_collect_report(collector):
    if not isinstance(collector, pytest.Module):
        return None
    try:
        collector.obj  # imports the test module (and keeps it for the normal collection)
    except collector.CollectError as error:
        package = missing_optional_package(error)
        if package:
            return CollectReport(collector.nodeid, "skipped", (str(collector.path), 0, _reason(package)), [])
    except (Exception, pytest.skip.Exception):
        pass  # the normal collection reports it
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    package = missing_optional_package(call.excinfo.value) if call.excinfo and report.failed else None
    if package:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_reason(package)}")
    return report
