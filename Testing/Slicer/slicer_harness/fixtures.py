"""pytest fixtures for the Slicer-side tests (import them into a test module with ``from ... import *``).

Every fixture that needs ``slicer-core`` skips cleanly when the wheel cannot be imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from .application import slicerCoreAvailable

ROOT = Path(__file__).resolve().parents[3]
MODULE_FILE = ROOT / "CovidGANSeg" / "CovidGANSeg.py"
FAKE_CLI = Path(__file__).resolve().parent / "fake_cli.py"

__all__ = ["ROOT", "MODULE_FILE", "FAKE_CLI", "harness", "scriptedModule", "logic", "fakeModels", "fakeCli", "FakeCli", "addCtVolume",
           "OBLIQUE_LPS_IJK_TO_RAS", "requireSlicerCore"]

#: an oblique grid in LPS-like orientation (i -> -R, j -> -A rotated 10 degrees, k -> +S), like a DICOM CT
_c, _s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
OBLIQUE_LPS_IJK_TO_RAS = np.array([
    [-0.75 * _c, 0.75 * _s, 0.0, 120.5],
    [-0.75 * _s, -0.75 * _c, 0.0, 95.25],
    [0.0, 0.0, 2.5, -310.0],
    [0.0, 0.0, 0.0, 1.0],
])


def requireSlicerCore() -> None:
    if not slicerCoreAvailable():
        pytest.skip("slicer-core is not importable (pip install slicer-core==5.11.0.6; never install vtk separately)")


@pytest.fixture
def harness(tmp_path):
    """The installed harness with an empty scene and ``slicer.app.temporaryPath`` in ``tmp_path``."""
    requireSlicerCore()
    from . import install

    h = install()
    h.app.temporaryPath = str(tmp_path / "slicer-temp")
    Path(h.app.temporaryPath).mkdir()
    h.reset()
    del h.qtUsage[:]
    yield h
    h.reset()


@pytest.fixture
def scriptedModule(harness):
    """The CovidGANSeg scripted module, loaded the way Slicer's module factory loads it."""
    return harness.loadScriptedModule(MODULE_FILE)


@pytest.fixture
def logic(scriptedModule):
    return scriptedModule.CovidGANSegLogic()


def addCtVolume(shape_kji=(20, 32, 40), ijkToRas=OBLIQUE_LPS_IJK_TO_RAS, name="chest CT", seed=0, dtype=np.int16):
    """A CT-like volume node: air -1000 HU, body 40 HU, two dark lungs; random texture."""
    import slicer

    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji)
    nk, nj, ni = shape_kji
    hu = np.full(shape_kji, -1000.0)
    body = ((i - ni / 2) / (ni * 0.47)) ** 2 + ((j - nj / 2) / (nj * 0.47)) ** 2 <= 1
    hu[body] = 40.0
    lung = (((i - ni * 0.3) / (ni * 0.16)) ** 2 + ((j - nj / 2) / (nj * 0.3)) ** 2 <= 1) | (
        ((i - ni * 0.7) / (ni * 0.16)) ** 2 + ((j - nj / 2) / (nj * 0.3)) ** 2 <= 1)
    hu[lung] = -860.0
    hu += rng.normal(0, 15, shape_kji)
    return slicer.util.addVolumeFromArray(hu.astype(dtype), ijkToRas, name)


@pytest.fixture
def fakeModels(tmp_path):
    """A models folder with a GAN and a segmenter: small files with real model cards (no torch)."""
    from CovidGANSegLib.checkpoints import write_model_card

    folder = tmp_path / "models"
    out = {"folder": folder}
    for kind, arch in (("gan", "dense_unet3d"), ("seg", "transunet")):
        checkpoint = folder / kind / "model.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(f"fake {kind} weights".encode())
        write_model_card(checkpoint, name=f"phantom-{kind}", kind=kind, arch=arch, config_name="tiny", config={},
                         trained_on="synthetic phantoms (CovidGANSegLib.synth.phantoms, seed 0)", demo=True)
        out[kind] = str(checkpoint)
    return out


class FakeCli:
    """Points a Logic at :mod:`.fake_cli` with a JSON spec (see there)."""

    def __init__(self, logic, folder: Path) -> None:
        self.logic = logic
        self.specPath = folder / "fake_cli_spec.json"
        self.logPath = folder / "fake_cli_calls.jsonl"
        self.spec: dict = {"log": str(self.logPath)}
        logic.cliCommand = [sys.executable, str(FAKE_CLI)]
        logic.extraEnvironment = {"COVIDGANSEG_FAKE_SPEC": str(self.specPath)}
        self.write()

    def set(self, **spec) -> "FakeCli":
        self.spec.update(spec)
        return self.write()

    def write(self) -> "FakeCli":
        self.specPath.write_text(json.dumps(self.spec))
        return self

    def calls(self) -> list[dict]:
        if not self.logPath.is_file():
            return []
        return [json.loads(line) for line in self.logPath.read_text().splitlines() if line.strip()]


@pytest.fixture
def fakeCli(logic, tmp_path):
    return FakeCli(logic, tmp_path)
