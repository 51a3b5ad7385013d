"""pytest plugin: run the Slicer tests with **Slicer's own** ``parameterNodeWrapper`` instead of the fake.

A fidelity check of the harness against the real code (nothing of Slicer is copied into this
project: the package is loaded from a Slicer source checkout you point at)::

    git clone https://github.com/Slicer/Slicer && git -C Slicer checkout v5.6.0
    COVIDGANSEG_SLICER_SOURCE=$PWD/Slicer PYTHONPATH=Testing/Slicer \\
        .venv/bin/python -m pytest -p slicer_harness.with_slicer_source -m "slicer and not slow" \\
        Testing/Python/test_slicer_widget.py Testing/Python/test_slicer_logic.py Testing/Python/test_slicer_harness.py

Slicer's wrapper then runs on the harness's MRML scene and stand-in widgets; the version-dependent
behaviour is the checked-out tag's (the harness's :meth:`Harness.emulate` switch no longer matters).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def pytest_configure(config):
    source = os.environ.get("COVIDGANSEG_SLICER_SOURCE")
    if not source:
        raise RuntimeError("set COVIDGANSEG_SLICER_SOURCE to a Slicer source checkout")
    package = Path(source) / "Base" / "Python" / "slicer" / "parameterNodeWrapper"
    if not (package / "__init__.py").is_file():
        raise RuntimeError(f"{package}: not a Slicer source checkout")
    from . import install

    install()
    import slicer

    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["slicer.parameterNodeWrapper"] = module
    spec.loader.exec_module(module)
    slicer.parameterNodeWrapper = module
    config.addinivalue_line("markers", "slicer: tests that need the slicer-core wheel")


def pytest_report_header(config):
    return f"slicer.parameterNodeWrapper from {os.environ.get('COVIDGANSEG_SLICER_SOURCE')} (Slicer's own code)"
