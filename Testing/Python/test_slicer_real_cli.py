"""The module's Logic with the library's real command line (``python -m CovidGANSegLib``) in a child.

Models: random-weight tiny checkpoints in the real format (made in a child process, seconds) for
the plumbing; tiny trained models for the slow test that runs the module's own self-test. The CT is
a synthetic phantom loaded through Slicer's own NIfTI reader (ITK), which may order the voxels
differently from the file (here it reverses the slices): the outputs must still land on the node's
grid, and the library's lung mask must coincide with the phantom's true lungs in RAS space.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures
from slicer_harness.fixtures import ROOT, requireSlicerCore  # noqa: E402

pytestmark = pytest.mark.slicer


def _needTorch():
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the library's CLI cannot run")


@pytest.fixture(scope="module")
def randomModels(tmp_path_factory):
    _needTorch()
    from slicer_harness.models import writeRandomModels

    return writeRandomModels(tmp_path_factory.mktemp("random-models"))


@pytest.fixture(scope="module")
def phantomFiles(tmp_path_factory):
    """A COVID phantom CT (LAS, 128 x 128 x 36) with its true lung and lesion masks, as NIfTI files."""
    import nibabel as nib
    from CovidGANSegLib.synth.phantoms import generate_phantom

    folder = tmp_path_factory.mktemp("phantom")
    p = generate_phantom(np.random.default_rng(3), size="small", covid=True)
    paths = {}
    for key, array, dtype in (("ct", p.hu, np.int16), ("lungs", p.lung_mask, np.uint8), ("lesion", p.lesion_mask, np.uint8)):
        image = nib.Nifti1Image(np.asarray(array, dtype=dtype), p.affine)
        image.set_qform(p.affine, code=1)
        image.set_sform(p.affine, code=1)
        paths[key] = folder / f"{key}.nii.gz"
        nib.save(image, str(paths[key]))
    return paths


def _load(harness, path, name, labelmap=False):
    node = harness.modules.volumes.logic().AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    assert node is not None, f"Slicer's reader could not load {path}"
    return node


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_real_cli_outputs_land_on_the_nodes_grid(harness, logic, randomModels, phantomFiles):
    import slicer
    from CovidGANSegModuleLib import segmentations, tables, volumeio

    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    trueLungs = _load(harness, phantomFiles["lungs"], "true lungs", labelmap=True)
    result = logic.segmentLesions(ct, randomModels["gan"], randomModels["seg"], "cpu")
    for key in ("pseudoHealthy", "difference"):
        assert volumeio.sameGeometry(result[key], ct)
    seg = result["segmentation"]
    lungs = segmentations.segmentMask(seg, "Lungs", ct)
    lesion = segmentations.segmentMask(seg, "Lesion", ct)
    assert lungs.shape == slicer.util.arrayFromVolume(ct).shape
    # RAS chain: the library's lung mask of the CT vs the phantom's true lungs (read separately by Slicer)
    truth, info = segmentations.groundTruthMask(trueLungs, ct)
    assert not info["resampled"]
    dice = _dice(lungs, truth)
    print("lung Dice", dice, "flipped k", _dice(lungs, truth[::-1]), "flipped i", _dice(lungs, truth[:, :, ::-1]))
    assert dice > 0.75, "lungs found by the library do not coincide with the true lungs: RAS/IJK mix-up?"
    # a mix-up of axis directions (what an LPS/RAS or k-order error does) would score far lower
    assert _dice(lungs, truth[::-1]) < dice - 0.2 and _dice(lungs, truth[:, ::-1]) < dice - 0.2
    assert not np.any(lesion & ~lungs), "lesions are restricted to the lungs"
    # pseudo-healthy: the input outside the lungs (paper: G only changes the lungs)
    hu = slicer.util.arrayFromVolume(ct)
    ph = slicer.util.arrayFromVolume(result["pseudoHealthy"])
    outside = ~truth
    assert np.mean(np.isclose(ph[outside], hu[outside], atol=1.0)) > 0.99
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result["difference"]), hu - ph, atol=1e-3)
    # the Slicer-side quantification equals the CLI's own report
    row = tables.tableRows(result["quantificationTable"])[0]
    assert row["Lesion volume"] == pytest.approx(result["report"]["lesion_ml"], rel=1e-6, abs=1e-9)
    assert row["Lung volume"] == pytest.approx(result["report"]["lung_ml"], rel=1e-6)
    assert row["MosMed category"] == result["report"]["mosmed_category"]


def test_real_cli_segments_with_the_edited_lungs(harness, logic, randomModels, phantomFiles):
    """The "Lungs" segment given to ``segment --input-lungs`` (the phantom's true lungs, which keep the
    consolidation our lung mask leaves out) passes the real CLI's grid check on a CT that Slicer's
    reader re-ordered, and is exactly the lung mask of the result."""
    import slicer
    from CovidGANSegModuleLib import segmentations, volumeio

    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    truth, _ = segmentations.groundTruthMask(_load(harness, phantomFiles["lungs"], "true lungs", labelmap=True), ct)
    given = segmentations.createSegmentationNode(slicer.mrmlScene, "corrected", ct,
                                                 [(segmentations.LUNGS_NAME, truth.astype(np.uint8), segmentations.LUNGS_COLOR)])
    result = logic.segmentLesions(ct, randomModels["gan"], randomModels["seg"], "cpu", pseudoHealthy=False, lungSegmentation=given)
    lungs = segmentations.segmentMask(result["segmentation"], "Lungs", ct)
    np.testing.assert_array_equal(lungs, truth)
    assert not np.any(segmentations.segmentMask(result["segmentation"], "Lesion", ct) & ~truth)
    voxelMl = abs(np.linalg.det(volumeio.ijkToRasArray(ct)[:3, :3])) / 1000.0
    assert result["report"]["lung_ml"] == pytest.approx(float(truth.sum()) * voxelMl, rel=1e-6)
    assert result["report"]["lung_mask"]["source"].endswith("input_lungs.nii")  # the edited lungs, said in the report


def test_real_cli_cancel_leaves_nothing(harness, logic, randomModels, phantomFiles):
    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    before = harness.scene.GetNumberOfNodes()
    job = logic.startSegmentation(ct, randomModels["gan"], randomModels["seg"], "cpu")
    time.sleep(1.0)  # the child is importing torch / loading the models
    pid = job.child.pid
    job.cancel()
    assert job.state.value == "cancelled"
    assert harness.scene.GetNumberOfNodes() == before
    assert list(Path(harness.app.temporaryPath).glob("CovidGANSeg-*")) == []
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def test_real_cli_errors_reach_the_user(harness, logic, randomModels, phantomFiles, tmp_path):
    import slicer
    from CovidGANSegLib.checkpoints import write_model_card
    from CovidGANSegModuleLib.jobs import JobFailed

    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    before = harness.scene.GetNumberOfNodes()
    # a checkpoint with a valid model card but corrupt content: only torch.load can tell
    corrupt = tmp_path / "corrupt" / "model.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    write_model_card(corrupt, name="corrupt", kind="seg", arch="transunet", config_name="tiny", config={}, trained_on="x", demo=True)
    with pytest.raises(JobFailed, match="corrupt, truncated or unsafe checkpoint"):
        logic.segmentLesions(ct, randomModels["gan"], str(corrupt), "cpu")
    # a volume that is not in Hounsfield units: the library refuses it, the message names the volume
    scaled = slicer.util.addVolumeFromArray((slicer.util.arrayFromVolume(ct) + 1024) / 4096.0, name="scaled CT")
    with pytest.raises(JobFailed) as info:
        logic.generatePseudoHealthy(scaled, randomModels["gan"], "cpu")
    assert "input volume 'scaled CT'" in str(info.value) and "Hounsfield" in str(info.value)
    assert harness.scene.GetNumberOfNodes() == before + 2  # only the scaled volume (and its display node) the test added
    assert list(Path(harness.app.temporaryPath).glob("CovidGANSeg-*")) == []


@pytest.fixture
def pythonSlicerOnPath(tmp_path, monkeypatch):
    """A ``PythonSlicer`` launcher on the PATH, as inside the Slicer application: a shell script that
    logs its command line and runs this interpreter as its child (a parent process like Slicer's
    launcher, so the exit code has to come through it)."""
    launcher = tmp_path / "Slicer" / "bin" / "PythonSlicer"
    launcher.parent.mkdir(parents=True)
    log = tmp_path / "launcher_calls.txt"
    launcher.write_text("#!/bin/sh\n"
                        f"echo \"$*\" >> \"{log}\"\n"
                        f"\"{sys.executable}\" \"$@\"\n"
                        "exit $?\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{launcher.parent}:{os.environ.get('PATH', '')}")
    return launcher, log


def test_real_cli_through_python_slicer_falls_back_to_the_cpu_for_both_jobs(harness, logic, randomModels, phantomFiles,
                                                                            pythonSlicerOnPath):
    """Issue 9, items 11 and 12: the module's own launcher path (``PythonSlicer -m CovidGANSegLib``)
    and the real CLI's CUDA-missing exit code, for Pseudo-healthy and Segment, on a machine
    without CUDA (``CUDA_VISIBLE_DEVICES`` empty, so also on a GPU machine): each job runs once on
    ``cuda``, gets ``EXIT_CUDA_MISSING``, says so, reruns on the CPU and loads correct outputs."""
    import slicer
    from CovidGANSegLib import protocol
    from CovidGANSegModuleLib import segmentations, volumeio

    launcher, launcherLog = pythonSlicerOnPath
    logic.extraEnvironment = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    assert logic.cliCommand is None and logic.commandPrefix() == [str(launcher), "-m", "CovidGANSegLib"]
    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    trueLungs = _load(harness, phantomFiles["lungs"], "true lungs", labelmap=True)
    truth, _ = segmentations.groundTruthMask(trueLungs, ct)
    hu = slicer.util.arrayFromVolume(ct)

    ph = logic.startPseudoHealthy(ct, randomModels["gan"], "cuda")
    phResult = ph.wait(timeout=300)
    seg = logic.startSegmentation(ct, randomModels["gan"], randomModels["seg"], "cuda")
    segResult = seg.wait(timeout=300)

    for job in (ph, seg):
        assert job.attempts == [("cuda", protocol.EXIT_CUDA_MISSING), ("cpu", protocol.EXIT_OK)], job.name
        assert len(job.messages) == 1 and "CUDA not available on device 'cuda'" in job.messages[0], job.messages
        assert "running again on the CPU" in job.messages[0]
    calls = launcherLog.read_text().splitlines()
    assert [call.split("--device ")[1].split()[0] for call in calls] == ["cuda", "cpu", "cuda", "cpu"]
    assert [call.split()[4] for call in calls] == ["pseudo-healthy", "pseudo-healthy", "segment", "segment"]

    # the outputs of the CPU rerun are right: on the CT's grid, difference = CT - pseudo-healthy,
    # unchanged outside the lungs, lungs where the phantom's lungs are, lesions inside them
    for result in (phResult, segResult):
        assert volumeio.sameGeometry(result["pseudoHealthy"], ct) and volumeio.sameGeometry(result["difference"], ct)
        phArray = slicer.util.arrayFromVolume(result["pseudoHealthy"])
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result["difference"]), hu - phArray, atol=1e-3)
        assert np.mean(np.isclose(phArray[~truth], hu[~truth], atol=1.0)) > 0.99
    lungs = segmentations.segmentMask(segResult["segmentation"], "Lungs", ct)
    lesion = segmentations.segmentMask(segResult["segmentation"], "Lesion", ct)
    assert _dice(lungs, truth) > 0.75 and not np.any(lesion & ~lungs)
    assert segResult["report"]["device"] == "cpu"
    assert list(Path(harness.app.temporaryPath).glob("CovidGANSeg-*")) == []


#: ``sitecustomize`` of a child that believes it has a GPU too small for any model: torch reports
#: CUDA available, and moving a module to CUDA raises torch's own ``OutOfMemoryError``
SIMULATED_SMALL_GPU = """
import torch

_to = torch.nn.Module.to


def _to_small_gpu(self, *args, **kwargs):
    device = args[0] if args else kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated GPU)")
    return _to(self, *args, **kwargs)


torch.cuda.is_available = lambda: True
torch.nn.Module.to = _to_small_gpu
"""


def test_real_cli_gpu_out_of_memory_falls_back_to_the_cpu(harness, logic, randomModels, phantomFiles, tmp_path, monkeypatch):
    """The real CLI's out-of-memory exit code (torch's own exception, on a simulated GPU) makes both
    jobs rerun on the CPU with ``auto`` (which picks the GPU here) and load correct outputs."""
    import slicer
    from CovidGANSegLib import protocol
    from CovidGANSegModuleLib import segmentations, volumeio

    hooks = tmp_path / "small-gpu"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SIMULATED_SMALL_GPU)
    monkeypatch.setenv("PYTHONPATH", str(hooks))  # the child's environment adds the library in front
    logic.extraEnvironment = {"OMP_NUM_THREADS": "1"}
    ct = _load(harness, phantomFiles["ct"], "phantom CT")
    hu = slicer.util.arrayFromVolume(ct)

    ph = logic.startPseudoHealthy(ct, randomModels["gan"], "auto")
    phResult = ph.wait(timeout=300)
    seg = logic.startSegmentation(ct, randomModels["gan"], randomModels["seg"], "auto", pseudoHealthy=False)
    segResult = seg.wait(timeout=300)
    for job in (ph, seg):
        assert job.attempts == [("auto", protocol.EXIT_GPU_OUT_OF_MEMORY), ("cpu", protocol.EXIT_OK)], job.name
        assert len(job.messages) == 1 and "GPU out of memory on device 'auto'" in job.messages[0], job.messages
    assert volumeio.sameGeometry(phResult["pseudoHealthy"], ct)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(phResult["difference"]),
                               hu - slicer.util.arrayFromVolume(phResult["pseudoHealthy"]), atol=1e-3)
    lungs = segmentations.segmentMask(segResult["segmentation"], "Lungs", ct)
    assert lungs.shape == hu.shape and lungs.any() and segResult["report"]["device"] == "cpu"


def test_headless_script_never_imports_torch(randomModels, phantomFiles, tmp_path):
    """What ``Slicer --no-main-window --python-script`` runs: Logic only, outputs saved, torch-free process."""
    requireSlicerCore()
    script = ROOT / "Testing" / "Slicer" / "headless_segment.py"
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(script), "--input", str(phantomFiles["ct"]), "--gan", randomModels["gan"],
                             "--seg", randomModels["seg"], "--output", str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["torch_imported"] is False
    assert summary["segments"] == ["Lungs", "Lesion"]
    assert (out / "segmentation.seg.nrrd").is_file() and (out / "quantification.csv").is_file()


@pytest.mark.slow
def test_module_self_test_with_trained_models(harness, scriptedModule, tmp_path_factory, monkeypatch):
    """The module's own Test class (as Slicer's "Reload and Test" runs it) with tiny trained models."""
    _needTorch()
    from slicer_harness.models import trainTinyModels

    trained = trainTinyModels(tmp_path_factory.mktemp("trained"))
    monkeypatch.setenv("COVIDGANSEG_MODELS", trained["folder"])
    import slicer

    slicer.modules.CovidGANSegInstance.runTest(msec=0)
    assert harness.qtUsage == []
