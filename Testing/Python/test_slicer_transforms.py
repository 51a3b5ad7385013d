"""The module's numbers for a CT under a parent transform, and for a ground truth on another grid
(and in another coordinate frame), on real MRML nodes: segments read back where they were
written, the stored reference geometry is the CT's, Quantify / Compare / the AI-result comparison
and Export give the figures known by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures
from slicer_harness.fixtures import addCtVolume  # noqa: E402

pytestmark = pytest.mark.slicer

SHAPE_KJI = (20, 32, 40)
LESION_BOX = [10, 18, 8, 20, 5, 12]  # i0, i1, j0, j1, k0, k1
LUNGS_BOX = [4, 36, 4, 28, 2, 18]


def boxKji(box, shape=SHAPE_KJI) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[k0:k1, j0:j1, i0:i1] = True
    return mask


def ijkToRas(node) -> np.ndarray:
    from CovidGANSegModuleLib import volumeio

    return volumeio.ijkToRasArray(node)


def linearTransform(matrix: np.ndarray, name="10 mm shift"):
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node


def shift(mm=(10.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = mm
    return m


def rotationShift() -> np.ndarray:
    c, s = np.cos(np.radians(7.0)), np.sin(np.radians(7.0))
    return np.array([[c, -s, 0, 10.0], [s, c, 0, -4.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])


def segmentation(ct, lesion, lungs=None):
    import slicer
    from CovidGANSegModuleLib import segmentations

    lungs = boxKji(LUNGS_BOX) if lungs is None else lungs
    return segmentations.createSegmentationNode(slicer.mrmlScene, "prediction", ct, [
        ("Lungs", lungs.astype(np.uint8), segmentations.LUNGS_COLOR), ("Lesion", lesion.astype(np.uint8), segmentations.LESION_COLOR)])


def expectedDice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (a.sum() + b.sum())


@pytest.mark.parametrize("matrix", [shift(), rotationShift()], ids=["10mm", "rotation+shift"])
def test_segments_read_back_where_they_were_written_under_a_transform(harness, logic, matrix):
    """Issue 9 item 2: the parent transform was applied twice (0 of 500 voxels overlapped)."""
    from CovidGANSegModuleLib import segmentations

    ct = addCtVolume(SHAPE_KJI)
    ct.SetAndObserveTransformNodeID(linearTransform(matrix).GetID())
    lesion = boxKji(LESION_BOX)
    seg = segmentation(ct, lesion)
    assert seg.GetTransformNodeID() == ct.GetTransformNodeID()
    np.testing.assert_array_equal(segmentations.segmentMask(seg, "Lesion", ct), lesion)
    np.testing.assert_array_equal(segmentations.segmentMask(seg, "Lungs", ct), boxKji(LUNGS_BOX))


def test_reference_geometry_is_the_cts_own_under_a_transform(harness, logic):
    """Issue 9 item 3: the geometry was stored before the transform was observed (shifted by it)."""
    import slicer

    ct = addCtVolume(SHAPE_KJI)
    ct.SetAndObserveTransformNodeID(linearTransform(shift()).GetID())
    seg = segmentation(ct, boxKji(LESION_BOX))
    geometry = seg.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    reference = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference)
    m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    reference.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(m), ijkToRas(ct), atol=1e-6)
    assert tuple(reference.GetDimensions()) == tuple(reversed(SHAPE_KJI))


def test_quantify_and_compare_under_a_transform(harness, logic):
    import slicer
    from CovidGANSegModuleLib import tables

    ct = addCtVolume(SHAPE_KJI)
    ct.SetAndObserveTransformNodeID(linearTransform(rotationShift()).GetID())
    pred, truth = boxKji([10, 18, 8, 20, 5, 12]), boxKji([12, 20, 8, 20, 5, 10])
    seg = segmentation(ct, pred)
    ml = abs(np.linalg.det(ijkToRas(ct)[:3, :3])) / 1000.0
    row = tables.tableRows(logic.quantify(seg, ct))[0]
    assert row["Lesion volume"] == pytest.approx(pred.sum() * ml, rel=1e-9)
    # a labelmap on the CT's grid under the same transform
    gt = slicer.util.addVolumeFromArray(truth.astype(np.uint8), ijkToRas(ct), "truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    gt.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
    row = tables.tableRows(logic.compare(seg, gt, ct))[0]
    assert row["Ground truth resampled"] == "no"
    assert row["Dice"] == pytest.approx(expectedDice(pred, truth), rel=1e-12)


def _coarseTruth(ct):
    """A labelmap at half the in-plane resolution whose voxels cover fine voxels i 12..19, j 8..19, k 5..9."""
    coarse = ijkToRas(ct).copy()
    coarse[:3, 0] *= 2
    coarse[:3, 1] *= 2
    coarse[:3, 3] = ijkToRas(ct)[:3, :3] @ np.array([0.5, 0.5, 0.0]) + ijkToRas(ct)[:3, 3]
    truthCoarse = np.zeros((SHAPE_KJI[0], SHAPE_KJI[1] // 2, SHAPE_KJI[2] // 2), dtype=np.uint8)
    truthCoarse[5:10, 4:10, 6:10] = 1
    return coarse, truthCoarse, boxKji([12, 20, 8, 20, 5, 10])


@pytest.mark.parametrize("frame", ["same transform", "world, transform hardened"])
def test_labelmap_ground_truth_on_another_grid_under_a_transform(harness, logic, frame):
    """Issue 9 item 2 (ground-truth path): ``CreateOrientedImageDataFromVolumeNode`` already applies
    the labelmap's parent transform; applying it again moved the truth away."""
    import slicer
    from CovidGANSegModuleLib import tables

    ct = addCtVolume(SHAPE_KJI)
    matrix = rotationShift()
    ct.SetAndObserveTransformNodeID(linearTransform(matrix).GetID())
    pred = boxKji([10, 18, 8, 20, 5, 12])
    seg = segmentation(ct, pred)
    coarse, truthCoarse, truthFine = _coarseTruth(ct)
    if frame == "same transform":
        gt = slicer.util.addVolumeFromArray(truthCoarse, coarse, "coarse truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
        gt.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
    else:  # the same labelmap in world coordinates, no transform
        gt = slicer.util.addVolumeFromArray(truthCoarse, matrix @ coarse, "coarse truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    row = tables.tableRows(logic.compare(seg, gt, ct))[0]
    assert row["Ground truth resampled"] == "yes"
    assert row["Dice"] == pytest.approx(expectedDice(pred, truthFine), rel=1e-9)
    assert row["Ground truth volume"] == pytest.approx(truthFine.sum() * abs(np.linalg.det(ijkToRas(ct)[:3, :3])) / 1000, rel=1e-9)


def test_segmentation_ground_truth_in_world_coordinates_for_a_transformed_ct(harness, logic):
    import slicer
    from CovidGANSegModuleLib import segmentations, tables

    ct = addCtVolume(SHAPE_KJI)
    pred, truth = boxKji([10, 18, 8, 20, 5, 12]), boxKji([12, 20, 8, 20, 5, 10])
    expert = segmentations.createSegmentationNode(slicer.mrmlScene, "expert", ct, [("infection", truth.astype(np.uint8), (1, 1, 0))])
    transform = linearTransform(shift())
    ct.SetAndObserveTransformNodeID(transform.GetID())
    expert.SetAndObserveTransformNodeID(transform.GetID())
    expert.HardenTransform()  # the expert's segmentation now lives in world coordinates, no transform
    assert expert.GetTransformNodeID() is None
    seg = segmentation(ct, pred)
    row = tables.tableRows(logic.compare(seg, expert, ct))[0]
    assert row["Dice"] == pytest.approx(expectedDice(pred, truth), rel=1e-9)


def test_segment_lesions_under_a_transform_lands_on_the_ct(harness, logic, fakeCli, fakeModels):
    from CovidGANSegModuleLib import segmentations, tables, volumeio

    fakeCli.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    ct = addCtVolume(SHAPE_KJI)
    ct.SetAndObserveTransformNodeID(linearTransform(shift()).GetID())
    result = logic.segmentLesions(ct, fakeModels["gan"], fakeModels["seg"], "cpu")
    seg = result["segmentation"]
    assert seg.GetTransformNodeID() == ct.GetTransformNodeID()
    for node in (result["pseudoHealthy"], result["difference"]):
        assert volumeio.sameGeometry(node, ct)
    np.testing.assert_array_equal(segmentations.segmentMask(seg, "Lesion", ct), boxKji(LESION_BOX))
    row = tables.tableRows(logic.quantify(seg, ct))[0]
    assert row["Lesion volume"] == pytest.approx(boxKji(LESION_BOX).sum() * abs(np.linalg.det(ijkToRas(ct)[:3, :3])) / 1000, rel=1e-9)
