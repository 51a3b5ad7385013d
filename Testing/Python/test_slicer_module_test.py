"""The module as Slicer loads it: Module metadata, the self-test registry, and the module's own
``CovidGANSegTest`` run under the harness (its Logic tests are real: no ``testLogic = False``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures

pytestmark = pytest.mark.slicer


def test_module_metadata(harness, scriptedModule):
    import slicer

    module = slicer.modules.covidganseg
    assert module.title == "CovidGANSeg" and module.categories == ["Segmentation"]
    assert module.contributors and "not for clinical use" in module.helpText.lower()
    assert module.icon and Path(module.icon).name == "CovidGANSeg.png" and Path(module.icon).is_file()
    assert "CovidGANSeg" in slicer.selfTests
    instance = slicer.modules.CovidGANSegInstance
    assert Path(instance.resourcePath("UI/CovidGANSeg.ui")).is_file()
    assert module.categories == ["Segmentation"] and "qSlicerAbstractCoreModule" in [c for c, _ in _lookups()]


def _lookups():
    from slicer_harness import i18n

    return i18n.lookups


def test_widget_without_a_parent_builds_its_own_panel(harness, scriptedModule, monkeypatch, tmp_path):
    """As Slicer's base class does: a qMRMLWidget parent, setup() from __init__ (before the subclass's
    own __init__ code has run: the attributes must exist first)."""
    monkeypatch.setenv("COVIDGANSEG_MODELS", str(tmp_path / "no-models"))
    widget = scriptedModule.CovidGANSegWidget()
    try:
        assert widget.ui.segmentButton.text and widget._parameterNode is not None
        assert widget.parent.visible
    finally:
        harness.unloadModule("CovidGANSeg")


def test_module_self_test_without_models(harness, scriptedModule, tmp_path, monkeypatch):
    """Input checks, quantification and comparison; the inference part is skipped without models."""
    import slicer

    monkeypatch.setenv("COVIDGANSEG_MODELS", str(tmp_path / "no-models"))
    slicer.selfTests["CovidGANSeg"](msec=0)
    assert harness.qtUsage == [], f"the Logic / Test used Qt: {harness.qtUsage}"


def test_module_self_test_with_the_real_cli(harness, scriptedModule, tmp_path_factory, monkeypatch):
    """The whole self-test, including segmentation and cancel through ``python -m CovidGANSegLib``."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the library's CLI cannot run")
    import slicer
    from slicer_harness.models import writeRandomModels

    models = writeRandomModels(tmp_path_factory.mktemp("models"))
    monkeypatch.setenv("COVIDGANSEG_MODELS", models["folder"])
    slicer.modules.CovidGANSegInstance.runTest(msec=0)
    assert list(Path(harness.app.temporaryPath).glob("CovidGANSeg-*")) == []
    assert harness.qtUsage == []


def test_module_loads_before_the_python_dependencies_are_installed(tmp_path):
    """Slicer imports every module at startup: that must work without torch, nibabel, scipy, scikit-image."""
    import subprocess

    from slicer_harness.fixtures import MODULE_FILE, requireSlicerCore

    requireSlicerCore()
    code = f"""
import sys, importlib.abc
BLOCKED = ("torch", "nibabel", "scipy", "skimage", "einops", "tqdm")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'Slicer')!r})
import slicer_harness
h = slicer_harness.install()
module = h.loadScriptedModule({str(MODULE_FILE)!r})
logic = module.CovidGANSegLogic()
p = logic.getParameterNode()
print(logic.listModels({str(tmp_path)!r}), p.device, sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "([], []) auto []"
