"""The CovidGANSeg module's Logic against real MRML nodes (slicer-core) through the project's harness.

The child process is ``Testing/Slicer/slicer_harness/fake_cli.py``: a real process that takes the
library CLI's command lines and writes outputs the tests know exactly, so geometry, node contents,
tables, cancellation, failures and the CPU fallback are checked precisely and fast. The same Logic
against the real CLI and trained models is in ``test_slicer_real_cli.py``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures
from slicer_harness.fixtures import addCtVolume  # noqa: E402

pytestmark = pytest.mark.slicer

SHAPE_KJI = (20, 32, 40)
LESION_BOX = [10, 18, 8, 20, 5, 12]  # i0, i1, j0, j1, k0, k1 (NIfTI / IJK order)
LUNGS_BOX = [4, 36, 4, 28, 2, 18]


def boxKji(box, shape_kji=SHAPE_KJI) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = box
    mask = np.zeros(shape_kji, dtype=bool)
    mask[k0:k1, j0:j1, i0:i1] = True
    return mask


def ijkToRas(node) -> np.ndarray:
    from CovidGANSegModuleLib import volumeio

    return volumeio.ijkToRasArray(node)


def nodeIds(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def workDirs(harness) -> list[Path]:
    return sorted(Path(harness.app.temporaryPath).glob("CovidGANSeg-*"))


def voxelMl(node) -> float:
    return float(abs(np.linalg.det(ijkToRas(node)[:3, :3]))) / 1000.0


# --------------------------------------------------------------------------------------------
# pseudo-healthy and segmentation: nodes on the input geometry
# --------------------------------------------------------------------------------------------

def test_pseudo_healthy_volumes_land_on_the_input_geometry(harness, logic, fakeCli, fakeModels):
    import slicer

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, steps=4, step_seconds=0.15)
    ct = addCtVolume(SHAPE_KJI)
    seen = []
    result = logic.generatePseudoHealthy(ct, fakeModels["gan"], "cpu", progressCallback=lambda s: seen.append((s.fraction, s.text)))
    ph, diff = result["pseudoHealthy"], result["difference"]
    assert ph.GetName() == "chest CT pseudo-healthy" and diff.GetName() == "chest CT difference"
    for node in (ph, diff):
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
        np.testing.assert_array_equal(ijkToRas(node), ijkToRas(ct))  # exact: the matrix is copied, not re-read from float32
        assert node.GetImageData().GetScalarTypeAsString() == "float"
    hu = slicer.util.arrayFromVolume(ct).astype(np.float32)
    lesion = boxKji(LESION_BOX)
    expected = np.where(lesion, -850.0, hu)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ph), expected)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(diff), hu - expected)
    # progress went up to the end, with the child's texts
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("step 2/4" in t for _, t in seen)
    # overlay: heat colour map, transparent below the threshold, foreground in every slice view
    display = diff.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"  # file colour maps exist only in the app
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(100.0)
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == diff.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    logic.setOverlayOpacity(0.8)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.8) for c in composites)
    # the child saw the device and an uncompressed temporary input; the temporary folder is gone
    call = fakeCli.calls()[-1]
    assert call["device"] == "cpu" and call["argv"][call["argv"].index("--input") + 1].endswith("input.nii")
    assert workDirs(harness) == []
    assert harness.qtUsage == []


def test_segmentation_node_has_both_segments_on_the_input_geometry(harness, logic, fakeCli, fakeModels):
    import slicer
    from CovidGANSegModuleLib import segmentations, tables, volumeio
    from CovidGANSegLib.quantify import mosmed_category

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ct = addCtVolume(SHAPE_KJI)
    result = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "auto")
    seg = result["segmentation"]
    assert seg.GetName() == "chest CT segmentation"
    assert seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is ct
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["Lungs", "Lesion"]
    np.testing.assert_allclose(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Lesion")).GetColor(),
                               segmentations.LESION_COLOR)
    # the stored labelmaps carry the CT's IJK-to-RAS matrix and exactly the masks the child wrote
    for name, box in (("Lungs", LUNGS_BOX), ("Lesion", LESION_BOX)):
        sid = segmentation.GetSegmentIdBySegmentName(name)
        internal = seg.GetBinaryLabelmapInternalRepresentation(sid)
        import vtk

        m = vtk.vtkMatrix4x4()
        internal.GetImageToWorldMatrix(m)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(m), ijkToRas(ct), atol=1e-9)
        mask = segmentations.segmentMask(seg, name, ct)
        assert mask.shape == SHAPE_KJI
        np.testing.assert_array_equal(mask, boxKji(box))
    # with pseudo-healthy and difference volumes on the same grid
    assert volumeio.sameGeometry(result["pseudoHealthy"], ct) and volumeio.sameGeometry(result["difference"], ct)
    # the quantification table: hand-computed from the boxes and the voxel volume
    lesionMl = boxKji(LESION_BOX).sum() * voxelMl(ct)
    lungMl = boxKji(LUNGS_BOX).sum() * voxelMl(ct)
    row = tables.tableRows(result["quantificationTable"])[0]
    assert row["Lesion volume"] == pytest.approx(lesionMl, rel=1e-9)
    assert row["Lung volume"] == pytest.approx(lungMl, rel=1e-9)
    assert row["Involvement"] == pytest.approx(100 * lesionMl / lungMl, rel=1e-9)
    assert row["MosMed category"] == mosmed_category(100 * lesionMl / lungMl)
    assert result["quantificationTable"].GetColumnUnitLabel("Lesion volume") == "mL"
    # the child's own report agrees with the Slicer-side numbers
    assert result["report"]["lesion_ml"] == pytest.approx(lesionMl, rel=1e-6)
    assert workDirs(harness) == []


def test_quantify_reads_the_edited_segmentation(harness, logic, fakeCli, fakeModels):
    import slicer
    from CovidGANSegModuleLib import tables

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ct = addCtVolume(SHAPE_KJI)
    seg = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu", pseudoHealthy=False)["segmentation"]
    # a Segment Editor correction: erase half of the lesion
    edited = boxKji(LESION_BOX).astype(np.uint8)
    edited[:, :, :14] = 0
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, seg, sid, ct)
    before = harness.scene.GetNumberOfNodes()
    table = logic.quantify(seg, ct)
    assert harness.scene.GetNumberOfNodes() == before + 1  # only the table: no temporary node left behind
    row = tables.tableRows(table)[0]
    assert row["Lesion volume"] == pytest.approx(edited.sum() * voxelMl(ct), rel=1e-9)
    # refilling the same table keeps one row
    logic.quantify(seg, ct, tableNode=table)
    assert table.GetNumberOfRows() == 1


def test_segmenting_again_with_the_edited_lungs(harness, logic, fakeCli, fakeModels):
    """A Lungs segment corrected in the Segment Editor (here: consolidation at the chest wall added)
    goes to the child as ``--input-lungs`` on the input's grid, is checked there by the library's own
    reader, and is the lung mask of the new segmentation and of its quantification."""
    import slicer
    from CovidGANSegModuleLib import segmentations, tables

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ct = addCtVolume(SHAPE_KJI)
    first = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu", pseudoHealthy=False)["segmentation"]
    assert "--input-lungs" not in fakeCli.calls()[-1]["argv"]
    edited = boxKji(LUNGS_BOX)
    edited[2:18, 28:31, 4:36] = True  # a posterior band the computed mask had left out
    sid = first.GetSegmentation().GetSegmentIdBySegmentName("Lungs")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), first, sid, ct)

    result = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu", pseudoHealthy=False, lungSegmentation=first)
    assert "--input-lungs" in fakeCli.calls()[-1]["argv"]
    second = result["segmentation"]
    assert second is not first
    np.testing.assert_array_equal(segmentations.segmentMask(second, "Lungs", ct), edited)
    np.testing.assert_array_equal(segmentations.segmentMask(first, "Lungs", ct), edited)  # the edited one is left as it is
    row = tables.tableRows(result["quantificationTable"])[0]
    assert row["Lung volume"] == pytest.approx(edited.sum() * voxelMl(ct), rel=1e-9)
    assert workDirs(harness) == []


@pytest.mark.parametrize("problem", ["no lungs segment", "empty lungs segment"])
def test_edited_lungs_that_cannot_be_used_are_refused_before_anything_runs(harness, logic, fakeCli, fakeModels, problem):
    import slicer
    from CovidGANSegModuleLib import segmentations

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ct = addCtVolume(SHAPE_KJI)
    if problem == "no lungs segment":
        node = segmentations.createSegmentationNode(slicer.mrmlScene, "lesions only", ct,
                                                    [("Lesion", boxKji(LESION_BOX).astype(np.uint8), segmentations.LESION_COLOR)])
        message = "no segment named 'Lungs'"
    else:
        node = _segmentationFromMasks(ct, boxKji(LESION_BOX), lungs=np.zeros(SHAPE_KJI, dtype=bool))
        message = "'Lungs' segment of 'prediction' is empty"
    before = nodeIds(harness.scene)
    with pytest.raises(ValueError, match=message):
        logic.startSegmentation(ct, fakeModels["gan"], fakeModels["seg"], "cpu", pseudoHealthy=False, lungSegmentation=node)
    assert nodeIds(harness.scene) == before
    assert fakeCli.calls() == [] and workDirs(harness) == []


# --------------------------------------------------------------------------------------------
# comparison with a ground truth: hand-known metrics, resampling, refusal
# --------------------------------------------------------------------------------------------

def _segmentationFromMasks(ct, lesion, lungs=None):
    import slicer
    from CovidGANSegModuleLib import segmentations

    lungs = boxKji(LUNGS_BOX) if lungs is None else lungs
    return segmentations.createSegmentationNode(slicer.mrmlScene, "prediction", ct, [
        ("Lungs", lungs.astype(np.uint8), segmentations.LUNGS_COLOR), ("Lesion", lesion.astype(np.uint8), segmentations.LESION_COLOR)])


def _expectedMetrics(pred, truth, ml):
    tp = np.count_nonzero(pred & truth)
    fp = np.count_nonzero(pred & ~truth)
    fn = np.count_nonzero(~pred & truth)
    tn = pred.size - tp - fp - fn
    return {"Dice": 2 * tp / (2 * tp + fp + fn), "Sensitivity": tp / (tp + fn), "Specificity": tn / (tn + fp),
            "Precision": tp / (tp + fp), "Volume difference": (pred.sum() - truth.sum()) * ml,
            "Segmented volume": pred.sum() * ml, "Ground truth volume": truth.sum() * ml}


def test_compare_with_labelmap_ground_truth_gives_hand_known_metrics(harness, logic):
    import slicer
    from CovidGANSegModuleLib import tables

    ct = addCtVolume(SHAPE_KJI)
    pred = boxKji([10, 18, 8, 20, 5, 12])   # 8 x 12 x 7 = 672 voxels
    truth = boxKji([12, 20, 8, 20, 5, 10])  # 8 x 12 x 5 = 480; overlap 6 x 12 x 5 = 360
    seg = _segmentationFromMasks(ct, pred)
    gt = slicer.util.addVolumeFromArray(truth.astype(np.uint8), ijkToRas(ct), "truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    before = nodeIds(harness.scene)
    table = logic.compare(seg, gt, ct)
    assert [i for i in nodeIds(harness.scene) if i not in before] == [table.GetID()]
    row = tables.tableRows(table)[0]
    assert row["Dice"] == pytest.approx(2 * 360 / (672 + 480), rel=1e-12)
    assert row["Sensitivity"] == pytest.approx(360 / 480, rel=1e-12)
    assert row["Precision"] == pytest.approx(360 / 672, rel=1e-12)
    n = np.prod(SHAPE_KJI)
    assert row["Specificity"] == pytest.approx((n - 672 - 480 + 360) / (n - 480), rel=1e-12)
    assert row["Volume difference"] == pytest.approx((672 - 480) * voxelMl(ct), rel=1e-9)
    assert row["Relative volume difference"] == pytest.approx(100 * (672 - 480) / 480, rel=1e-9)
    assert row["Ground truth resampled"] == "no" and row["Ground truth"] == "truth"
    assert math.isfinite(row["HD95"]) and row["HD95"] > 0
    # shown in the table view of the layout
    logic.showTable(table)
    assert harness.applicationLogic.GetSelectionNode().GetActiveTableID() == table.GetID()
    assert harness.layoutNode.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView


def test_compare_with_segmentation_ground_truth_picks_the_lesion_segment(harness, logic):
    import slicer
    from CovidGANSegModuleLib import segmentations, tables

    ct = addCtVolume(SHAPE_KJI)
    pred = boxKji([10, 18, 8, 20, 5, 12])
    truth = boxKji([12, 20, 8, 20, 5, 10])
    seg = _segmentationFromMasks(ct, pred)
    gt = segmentations.createSegmentationNode(slicer.mrmlScene, "expert", ct, [
        ("right lung", boxKji(LUNGS_BOX).astype(np.uint8), (0, 0, 1)), ("infection", truth.astype(np.uint8), (1, 1, 0))])
    row = tables.tableRows(logic.compare(seg, gt, ct))[0]
    assert row["Dice"] == pytest.approx(_expectedMetrics(pred, truth, voxelMl(ct))["Dice"], rel=1e-12)
    assert row["Ground truth resampled"] == "no"


def test_ground_truth_on_another_grid_is_resampled(harness, logic):
    """A labelmap at half the in-plane resolution, aligned so nearest-neighbour resampling is exact."""
    import slicer
    from CovidGANSegModuleLib import tables

    ct = addCtVolume(SHAPE_KJI)
    pred = boxKji([10, 18, 8, 20, 5, 12])
    seg = _segmentationFromMasks(ct, pred)
    # coarse grid: voxel (I, J, k) covers fine voxels (2I, 2I+1) x (2J, 2J+1) x k; centres shifted by half a fine voxel
    coarse = ijkToRas(ct).copy()
    coarse[:3, 0] *= 2
    coarse[:3, 1] *= 2
    coarse[:3, 3] = ijkToRas(ct)[:3, :3] @ np.array([0.5, 0.5, 0.0]) + ijkToRas(ct)[:3, 3]
    truthCoarse = np.zeros((SHAPE_KJI[0], SHAPE_KJI[1] // 2, SHAPE_KJI[2] // 2), dtype=np.uint8)
    truthCoarse[5:10, 4:10, 6:10] = 1  # fine: i 12..19, j 8..19, k 5..9
    gt = slicer.util.addVolumeFromArray(truthCoarse, coarse, "coarse truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    row = tables.tableRows(logic.compare(seg, gt, ct))[0]
    expected = _expectedMetrics(pred, boxKji([12, 20, 8, 20, 5, 10]), voxelMl(ct))
    assert row["Ground truth resampled"] == "yes"
    for key in ("Dice", "Sensitivity", "Specificity", "Precision", "Volume difference"):
        assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_ground_truth_outside_the_ct_is_refused(harness, logic):
    import slicer

    ct = addCtVolume(SHAPE_KJI)
    seg = _segmentationFromMasks(ct, boxKji(LESION_BOX))
    far = ijkToRas(ct).copy()
    far[:3, 3] += 1000.0
    gt = slicer.util.addVolumeFromArray(boxKji(LESION_BOX).astype(np.uint8), far, "other patient", nodeClassName="vtkMRMLLabelMapVolumeNode")
    before = harness.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="does not overlap the CT volume 'chest CT'"):
        logic.compare(seg, gt, ct)
    with pytest.raises(ValueError, match="No ground truth"):
        logic.compare(seg, None, ct)
    assert harness.scene.GetNumberOfNodes() == before


# --------------------------------------------------------------------------------------------
# cancel, failures, CPU fallback
# --------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return False
    return "State:\tZ" not in status.read_text()  # a zombie has ended; only its exit status is left


def test_cancel_kills_the_process_tree_and_leaves_the_scene_unchanged(harness, logic, fakeCli, fakeModels, tmp_path):
    grandchildPid = tmp_path / "grandchild.pid"
    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, steps=100, step_seconds=0.1, grandchild=str(grandchildPid))
    ct = addCtVolume(SHAPE_KJI)
    before = nodeIds(harness.scene)
    job = logic.startSegmentation(ct, fakeModels["gan"], fakeModels["seg"], "cpu")
    assert len(workDirs(harness)) == 1
    deadline = time.monotonic() + 30
    while job.poll().fraction <= job.progressRange[0] or not grandchildPid.exists():
        assert time.monotonic() < deadline, "the child never reported progress"
        time.sleep(0.05)
    pids = [job.child.pid, int(grandchildPid.read_text())]
    assert all(_alive(p) for p in pids)
    job.cancel()
    assert job.state.value == "cancelled" and job.poll().done
    assert not any(_alive(p) for p in pids), "cancel must end the whole process tree"
    assert nodeIds(harness.scene) == before
    assert workDirs(harness) == []
    with pytest.raises(Exception, match="cancelled"):
        job.raiseIfFailed()


def test_failure_shows_the_childs_error_with_the_volume_name(harness, logic, fakeCli, fakeModels):
    from CovidGANSegModuleLib.jobs import JobFailed

    fakeCli.set(fail="intensities range 0..1, which is not Hounsfield units")
    ct = addCtVolume(SHAPE_KJI)
    before = nodeIds(harness.scene)
    with pytest.raises(JobFailed) as info:
        logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu")
    message = str(info.value)
    assert "Lesion segmentation failed" in message
    assert "input volume 'chest CT': intensities range 0..1, which is not Hounsfield units" in message
    assert "input.nii" not in message  # temporary paths are not shown to the user
    assert nodeIds(harness.scene) == before and workDirs(harness) == []


@pytest.mark.parametrize("problem,device", [("oom", "auto"), ("oom", "cuda"), ("missing", "cuda")])
def test_cuda_problems_rerun_on_the_cpu(harness, logic, fakeCli, fakeModels, problem, device):
    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, cuda=problem)
    ct = addCtVolume(SHAPE_KJI)
    job = logic.startPseudoHealthy(ct, fakeModels["gan"], device)
    job.wait()
    assert job.state.value == "succeeded"
    assert [c["device"] for c in fakeCli.calls()] == [device, "cpu"]
    assert job.device == "cpu" and any("running again on the CPU" in m for m in job.messages)
    assert ("out of memory" if problem == "oom" else "not available") in job.messages[0]


def test_library_warnings_reach_the_user_and_the_gan_is_optional_for_segmentation(harness, logic, fakeCli, fakeModels):
    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, warning="CUDA requested but not available; running on the CPU")
    ct = addCtVolume(SHAPE_KJI)
    job = logic.startSegmentation(ct, None, fakeModels["seg"], "cuda", pseudoHealthy=False)
    result = job.wait()
    assert "CUDA requested but not available; running on the CPU" in job.messages
    assert "--gan" not in fakeCli.calls()[-1]["argv"] and "pseudoHealthy" not in result
    with pytest.raises(ValueError, match="No pseudo-healthy GAN model is selected"):
        logic.startSegmentation(ct, None, fakeModels["seg"], "cpu")  # pseudo-healthy volumes need the GAN


def test_no_fallback_when_the_cpu_itself_fails(harness, logic, fakeCli, fakeModels):
    from CovidGANSegModuleLib.jobs import JobFailed

    fakeCli.set(fail="broken input")
    with pytest.raises(JobFailed, match="broken input"):
        logic.generatePseudoHealthy(addCtVolume(SHAPE_KJI), fakeModels["gan"], "cuda")
    assert len(fakeCli.calls()) == 1


def test_outputs_on_a_wrong_grid_are_refused(harness, logic, fakeCli, fakeModels):
    from CovidGANSegModuleLib.jobs import JobFailed

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, shift_affine=True)
    ct = addCtVolume(SHAPE_KJI)
    before = nodeIds(harness.scene)
    with pytest.raises(JobFailed, match="differs from the input volume"):
        logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu")
    assert nodeIds(harness.scene) == before and workDirs(harness) == []


# --------------------------------------------------------------------------------------------
# bad inputs: clear errors before any process starts
# --------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(harness, logic, fakeCli, fakeModels, tmp_path):
    import slicer
    from CovidGANSegLib.checkpoints import write_model_card

    ct = addCtVolume(SHAPE_KJI)
    scout = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32), np.int16), name="scout")
    labels = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.uint8), name="labels", nodeClassName="vtkMRMLLabelMapVolumeNode")
    gan, seg = fakeModels["gan"], fakeModels["seg"]
    cases = [
        (lambda: logic.startSegmentation(None, gan, seg), "No input volume is selected"),
        (lambda: logic.startSegmentation(scout, gan, seg), r"'scout' is 2D \(32 x 32 x 1 voxels\)"),
        (lambda: logic.startPseudoHealthy(labels, gan), "'labels' is a labelmap volume, not a CT"),
        (lambda: logic.startSegmentation(ct, "", seg), "No pseudo-healthy GAN model is selected"),
        (lambda: logic.startSegmentation(ct, str(tmp_path / "missing.pt"), seg), "missing.pt: pseudo-healthy GAN checkpoint not found"),
        (lambda: logic.startSegmentation(ct, seg, gan), "this is a lesion segmenter checkpoint; a pseudo-healthy GAN is needed"),
        (lambda: logic.startSegmentation(ct, gan, seg, "tpu"), "device must be one of"),
    ]
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"\x80\x02some other project's weights")
    cases.append((lambda: logic.startSegmentation(ct, str(foreign), seg), "foreign.pt: not a CovidGANSeg model"))
    tampered = tmp_path / "tampered" / "model.pt"
    tampered.parent.mkdir()
    tampered.write_bytes(b"original")
    write_model_card(tampered, name="t", kind="gan", arch="a", config_name="tiny", config={}, trained_on="x", demo=True)
    tampered.write_bytes(b"replaced")
    cases.append((lambda: logic.startSegmentation(ct, str(tampered), seg), "does not match its model card"))
    before = harness.scene.GetNumberOfNodes()
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert fakeCli.calls() == [] and workDirs(harness) == []
    assert harness.scene.GetNumberOfNodes() == before


def test_model_listing_marks_demonstration_models(harness, logic, fakeModels):
    from CovidGANSegModuleLib import models

    gans, segs = logic.listModels(fakeModels["folder"])
    assert [c["name"] for c in gans] == ["phantom-gan"] and [c["name"] for c in segs] == ["phantom-seg"]
    assert models.displayName(gans[0]).endswith("[DEMO]")
    text = logic.describeModels(fakeModels["gan"], fakeModels["seg"])
    assert "DEMONSTRATION ONLY" in text and "not for clinical use" in text and "synthetic phantoms" in text
    assert logic.listModels(fakeModels["folder"] / "nothing-here") == ([], [])


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------

def _writeCts(folder: Path, names) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        if not name.endswith((".nii", ".nii.gz")):
            (folder / name).write_text("not an image")
            continue
        hu = rng.normal(-500, 300, SHAPE_KJI[::-1]).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 2.5, 1.0])), str(folder / name))


def test_batch_without_growth_runs_every_case_with_no_growth(harness, logic, fakeCli, fakeModels, tmp_path):
    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    _writeCts(tmp_path / "in", ["study_0001.nii.gz", "study_0002.nii"])
    result = logic.runBatch(tmp_path / "in", tmp_path / "out", fakeModels["gan"], fakeModels["seg"], "cpu", grow=False)
    assert result["failed"] == 0
    calls = fakeCli.calls()
    assert len(calls) == 2 and all("--no-growth" in c["argv"] for c in calls)
    logic.runBatch(tmp_path / "in", tmp_path / "out2", fakeModels["gan"], fakeModels["seg"], "cpu")
    assert all("--no-growth" not in c["argv"] for c in fakeCli.calls()[2:])


def test_batch_writes_segmentations_and_one_csv(harness, logic, fakeCli, fakeModels, tmp_path):
    import csv

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, fail="not a chest CT", fail_on="study_0002")
    _writeCts(tmp_path / "in", ["study_0001.nii.gz", "study_0002.nii.gz", "study_0003.nii", "notes.txt"])
    before = harness.scene.GetNumberOfNodes()
    result = logic.runBatch(tmp_path / "in", tmp_path / "out", fakeModels["gan"], fakeModels["seg"], "cpu")
    rows = list(csv.DictReader(open(result["csv"])))
    assert [r["case"] for r in rows] == ["study_0001", "study_0002", "study_0003"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"] and result["failed"] == 1
    assert "not a chest CT" in rows[1]["message"]
    ml = 0.7 * 0.7 * 2.5 / 1000
    assert float(rows[0]["lesion_ml"]) == pytest.approx(boxKji(LESION_BOX).sum() * ml, rel=1e-6)
    for case in ("study_0001", "study_0003"):
        assert (tmp_path / "out" / f"{case}_lesion.nii.gz").is_file() and (tmp_path / "out" / f"{case}_lungs.nii.gz").is_file()
    assert not (tmp_path / "out" / "study_0002_lesion.nii.gz").exists()
    assert harness.scene.GetNumberOfNodes() == before  # a batch works on files only


def test_batch_cancel_keeps_finished_cases_only(harness, logic, fakeCli, fakeModels, tmp_path):
    import csv

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX, steps=10, step_seconds=0.05)
    _writeCts(tmp_path / "in", [f"case{i}.nii" for i in range(4)])
    job = logic.startBatch(tmp_path / "in", tmp_path / "out", fakeModels["gan"], fakeModels["seg"], "cpu")
    deadline = time.monotonic() + 60
    while len(job.rows) < 1:
        job.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.cancel()
    rows = list(csv.DictReader(open(tmp_path / "out" / "covidganseg_results.csv")))
    assert [r["case"] for r in rows] == ["case0"]
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if "partial" in p.name]
    assert leftovers == []


def test_batch_input_checks(harness, logic, fakeModels, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no NIfTI CT files"):
        logic.startBatch(tmp_path / "empty", tmp_path / "out", fakeModels["gan"], fakeModels["seg"])
    with pytest.raises(ValueError, match="other than the input folder"):
        logic.startBatch(tmp_path / "empty", tmp_path / "empty", fakeModels["gan"], fakeModels["seg"])


# --------------------------------------------------------------------------------------------
# parameter node, segment editor, dependencies
# --------------------------------------------------------------------------------------------

def test_parameter_node_is_typed_and_saved_in_slicers_format(harness, scriptedModule, logic):
    import slicer

    p = logic.getParameterNode()
    assert p.parameterNode.GetSingletonTag() == "CovidGANSeg" and p.parameterNode.GetAttribute("ModuleName") == "CovidGANSeg"
    assert (p.device, p.overlayOpacity, p.differenceThreshold) == ("auto", 0.5, 100.0)
    ct = addCtVolume(SHAPE_KJI)
    p.inputVolume = ct
    assert p.parameterNode.GetNodeReferenceID("inputVolume") == ct.GetID()
    p.overlayOpacity = 0.25
    assert p.parameterNode.GetParameter("overlayOpacity") == "0.25"
    with pytest.raises(ValueError):
        p.overlayOpacity = 1.5
    with pytest.raises(ValueError):
        p.device = "tpu"
    with pytest.raises(TypeError):
        p.segmentation = ct
    # one parameter node per scene, found again by a new logic
    assert scriptedModule.CovidGANSegLogic().getParameterNode().inputVolume is ct
    assert len(slicer.util.getNodesByClass("vtkMRMLScriptedModuleNode")) == 1


def test_segment_editor_gets_the_segmentation_and_the_ct(harness, logic):
    ct = addCtVolume(SHAPE_KJI)
    seg = _segmentationFromMasks(ct, boxKji(LESION_BOX))
    editor = logic.prepareSegmentEditor(seg, ct)
    assert editor.GetSegmentationNode() is seg and editor.GetSourceVolumeNode() is ct
    assert editor.GetSelectedSegmentID() == seg.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
    assert logic.prepareSegmentEditor(seg, ct) is editor  # the Segment Editor's singleton node


def test_dependencies_are_installed_only_after_asking(monkeypatch):
    """torch via the PyTorch extension, other packages via pip_ensure / pip_install - each after a yes."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CovidGANSeg"))
    from CovidGANSegModuleLib import dependencies

    calls = []
    fakeSlicer = types.SimpleNamespace(util=types.SimpleNamespace(pip_install=lambda reqs: calls.append(("pip_install", list(reqs)))))
    monkeypatch.setattr(dependencies, "torchInstalled", lambda: False)
    monkeypatch.setattr(dependencies, "missingPackages", lambda reqs=None: ["einops>=0.7"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: types.SimpleNamespace(
        installTorch=lambda **kw: calls.append(("installTorch", kw)) or "torch")))
    questions = []
    assert dependencies.ensureDependencies(lambda q: questions.append(q) or False, slicerModule=fakeSlicer) is False
    assert calls == [] and "PyTorch" in questions[0]
    dependencies.ensureDependencies(lambda q: questions.append(q) or True, slicerModule=fakeSlicer)
    assert calls[0] == ("installTorch", {"askConfirmation": False, "torchVersionRequirement": ">=2.1"})
    assert calls[1] == ("pip_install", ["einops>=0.7"]) and "einops>=0.7" in questions[-1]
    # Slicer with slicer.packaging: pip_ensure asks by itself
    calls.clear()
    monkeypatch.setattr(dependencies, "torchInstalled", lambda: True)
    fakeSlicer.packaging = types.SimpleNamespace(pip_ensure=lambda reqs, requester: calls.append(("pip_ensure", list(reqs), requester)))
    dependencies.ensureDependencies(lambda q: pytest.fail("pip_ensure asks the user itself"), slicerModule=fakeSlicer)
    assert calls == [("pip_ensure", ["einops>=0.7"], "CovidGANSeg")]
    # requirements are lower bounds, never exact pins
    assert all("==" not in r for r in dependencies.requirements())
