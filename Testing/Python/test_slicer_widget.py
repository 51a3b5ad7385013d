"""The module's Widget on the harness: its panel built from the real ``.ui`` with stand-in widgets,
bound through the parameter node wrapper as Slicer 5.6 / 5.8 / 5.10 bind it, driven by clicks and
timer ticks; the Segment Editor round trip (Segment -> correct -> compare with the AI result ->
export) on real MRML nodes, for a CT under a parent transform.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures
from slicer_harness.fixtures import FakeCli, addCtVolume  # noqa: E402

pytestmark = pytest.mark.slicer

SHAPE_KJI = (20, 32, 40)
LESION_BOX = [10, 18, 8, 20, 5, 12]  # i0, i1, j0, j1, k0, k1
LUNGS_BOX = [4, 36, 4, 28, 2, 18]
VERSIONS = [(5, 6), (5, 8), (5, 10)]


def boxKji(box, shape=SHAPE_KJI) -> np.ndarray:
    i0, i1, j0, j1, k0, k1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[k0:k1, j0:j1, i0:i1] = True
    return mask


@pytest.fixture
def panel(harness, scriptedModule, monkeypatch, tmp_path):
    """A factory of the module's panel as Slicer creates it, with an empty models folder. The child is the
    fake CLI (no torch), so the dependency check is told that everything is installed (it would
    otherwise ask to install torch and pip packages into this interpreter)."""
    from CovidGANSegModuleLib import dependencies

    monkeypatch.setenv("COVIDGANSEG_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setattr(dependencies, "torchInstalled", lambda: True)
    monkeypatch.setattr(dependencies, "missingPackages", lambda reqs=None: [])
    created = []

    def make(version=(5, 6)):
        harness.emulate(version)
        widget = harness.createModuleWidget(scriptedModule, "CovidGANSeg")
        created.append(widget)
        harness.enterModule(widget)
        return widget

    yield make
    for widget in created:
        harness.unloadModule("CovidGANSeg")
        if widget.parent.isEntered:
            widget.parent.isEntered = False


def runJob(harness, widget, timeout=60.0):
    """Tick the widget's QTimer until its job ends."""
    end = time.monotonic() + timeout
    while widget._job is not None:
        assert time.monotonic() < end, "job did not end"
        widget._timer.fire()
        time.sleep(0.02)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_panel_sets_up_and_binds_the_parameter_node(harness, panel, version):
    """Issue 9 item 1: with Slicer's union default the panel failed in setup()."""
    import slicer

    ct = addCtVolume(SHAPE_KJI)
    widget = panel(version)
    p = widget._parameterNode
    assert p.groundTruth is None and p.inputVolume is ct  # the first CT is taken; labelmaps are not
    # parameter -> GUI
    p.device = "cuda"
    assert widget.ui.deviceComboBox.currentText == "cuda"
    p.overlayOpacity = 0.25
    assert widget.ui.overlayOpacitySlider.value == pytest.approx(0.25)
    # GUI -> parameter
    widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")
    assert p.device == "cpu"
    widget.ui.overlayOpacitySlider.value = 0.7
    assert p.overlayOpacity == pytest.approx(0.7)
    widget.ui.exportStudyIdLineEdit.text = "12"
    assert p.exportStudyId == "12"
    # the node selectors got the scene through the .ui's connections and the node types from the wrapper
    assert widget.ui.inputVolumeSelector.currentNode() is ct
    assert widget.ui.groundTruthSelector.nodeTypes == ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode")
    labelmap = slicer.util.addVolumeFromArray(boxKji(LESION_BOX).astype(np.uint8), name="truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    widget.ui.groundTruthSelector.setCurrentNode(labelmap)
    assert p.groundTruth is labelmap
    assert p.parameterNode.GetNodeReferenceID("groundTruth.1") == labelmap.GetID()  # Slicer's union storage
    widget.ui.groundTruthSelector.setCurrentNode(None)
    assert p.groundTruth is None and p.parameterNode.GetParameter("groundTruth.2") == "True"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
def test_entering_again_adds_no_connectors(harness, panel, version):
    """Issue 9 item 6: connectGui returns None in 5.6 / 5.8, so disconnectGui did nothing and every
    enter() added another set of connectors and a parameter-node observer (in 5.10 too: a new wrapper
    per enter, each with an observer Slicer never removes). Counted on the widgets, so the test
    holds for Slicer's own wrapper as well as for the harness's."""
    widget = panel(version)
    for _ in range(4):
        harness.exitModule(widget)
        harness.enterModule(widget)
    combo = widget.ui.deviceComboBox
    assert len(combo._connections.get("currentIndexChanged", [])) == 1  # one connector listens to the widget
    writes = []
    original = combo.setCurrentIndex
    object.__setattr__(combo, "setCurrentIndex", lambda index: writes.append(index) or original(index))
    widget._parameterNode.device = "cuda"  # one parameter change: one GUI update, not one per enter()
    assert combo.currentText == "cuda" and writes == [combo.findText("cuda")]
    combo.currentIndex = combo.findText("cpu")  # and the GUI still writes the parameter
    assert widget._parameterNode.device == "cpu"


def test_folder_buttons_set_the_parameter_even_for_the_shown_folder(harness, panel, fakeModels, tmp_path):
    """Issue 9 item 4: a ctkDirectoryButton showed Slicer's working folder while the parameter was
    ".", and picking that folder signalled no change: "Segment all" stayed disabled."""
    widget = panel()
    p = widget._parameterNode
    p.modelsFolder = Path(fakeModels["folder"])
    assert p.ganCheckpoint and p.segCheckpoint
    button = widget.ui.batchInputButton
    assert button.displayedText() != os.getcwd()  # no folder shown that is not chosen
    assert not widget.ui.batchButton.enabled
    button.browse(os.getcwd())  # the user picks the folder the button started in
    widget.ui.batchOutputButton.browse(str(tmp_path))
    assert p.batchInputFolder == os.getcwd() and p.batchOutputFolder == str(tmp_path)
    assert widget.ui.batchButton.enabled
    assert button.displayedText() == os.getcwd()


def test_errors_in_setup_enter_and_jobs_are_shown_not_raised(harness, panel, scriptedModule, fakeModels, monkeypatch, caplog):
    """Issue 9 item 9: tryWithErrorDisplay re-raises, so errors escaped setup() / enter() and a failed
    job printed a traceback from the timer callback."""
    from slicer_harness import widgets

    harness.app.setTestingEnabled(False)
    harness.setMainWindow(True)
    with monkeypatch.context() as m:
        m.setattr(scriptedModule.CovidGANSegLogic, "listModels", lambda self, folder: (_ for _ in ()).throw(OSError("disk gone")))
        widget = panel()  # setup() and enter() list the models: the error is shown, the panel works
        assert any("Could not list the models" in box["text"] and "disk gone" in box["text"] for box in widgets.QMessageBox.shown)
        harness.exitModule(widget)
        harness.enterModule(widget)
    # a failing job: its message shown once, no traceback
    del widgets.QMessageBox.shown[:]
    fake = FakeCli(widget.logic, Path(harness.app.temporaryPath))
    fake.set(fail="not a CT in Hounsfield units")
    ct = addCtVolume(SHAPE_KJI)
    p = widget._parameterNode
    p.inputVolume = ct
    p.modelsFolder = Path(fakeModels["folder"])
    caplog.set_level(logging.DEBUG)
    widget.ui.segmentButton.click()
    assert widget.ui.segmentButton.text == "Cancel"
    runJob(harness, widget)
    assert widget.ui.segmentButton.text != "Cancel"
    assert len(widgets.QMessageBox.shown) == 1 and "not a CT in Hounsfield units" in widgets.QMessageBox.shown[0]["text"]
    assert "Traceback" not in caplog.text


def test_errors_are_logged_in_testing_mode(harness, panel, scriptedModule, monkeypatch, caplog):
    monkeypatch.setattr(scriptedModule.CovidGANSegLogic, "listModels", lambda self, folder: (_ for _ in ()).throw(OSError("disk gone")))
    with caplog.at_level(logging.ERROR):
        panel()
    assert "Could not list the models" in caplog.text and "disk gone" in caplog.text


def test_cleanup_stops_the_timer_and_the_job(harness, panel, fakeModels):
    """Issue 9 item 10: cleanup() never stopped the poll timer."""
    widget = panel()
    fake = FakeCli(widget.logic, Path(harness.app.temporaryPath))
    fake.set(steps=50, step_seconds=0.2)
    p = widget._parameterNode
    p.inputVolume = addCtVolume(SHAPE_KJI)
    p.modelsFolder = Path(fakeModels["folder"])
    widget.ui.pseudoHealthyButton.click()
    job = widget._job
    assert job is not None and widget._timer.isActive()
    harness.unloadModule("CovidGANSeg")
    assert not widget._timer.isActive() and widget._job is None and job.done


def test_category_is_translated_in_slicers_context(harness, scriptedModule):
    """Issue 9 item 8: the category is looked up as Slicer's own modules do."""
    import slicer
    from slicer_harness import i18n

    i18n.catalogue[("qSlicerAbstractCoreModule", "Segmentation")] = "Segmentación"
    try:
        harness.loadScriptedModule(Path(scriptedModule.__file__))
        assert slicer.modules.covidganseg.categories == ["Segmentación"]
    finally:
        i18n.catalogue.clear()


def test_segment_editor_round_trip_under_a_transform(harness, panel, fakeModels, tmp_path):
    """Segment -> one click opens the Segment Editor ("Lesion" selected, the CT as source) -> the
    radiologist corrects -> "Compare with AI result" -> "Export" as study_XXXX_mask.nii.gz on the
    CT's own grid, which the library's evaluate and MosMed readers take."""
    import slicer
    from CovidGANSegModuleLib import tables, volumeio
    from CovidGANSegLib import datasets, evaluation

    harness.setMainWindow(True)
    harness.addSegmentEditorModule()
    ct = addCtVolume(SHAPE_KJI, name="study_0007")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    widget = panel()
    FakeCli(widget.logic, tmp_path).set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    p = widget._parameterNode
    p.inputVolume = ct
    p.modelsFolder = Path(fakeModels["folder"])
    assert not widget.ui.segmentEditorButton.enabled and not widget.ui.compareAIButton.enabled
    widget.ui.segmentButton.click()
    runJob(harness, widget)
    seg = p.segmentation
    assert seg is not None and widget.ui.segmentEditorButton.enabled and widget.ui.compareAIButton.enabled
    # the AI result kept for the comparison is hidden: not offered as a ground truth or input
    from CovidGANSegModuleLib import review

    hidden = review.aiResult(seg)
    assert hidden is not None and hidden.GetHideFromEditors()
    combo = widget.ui.groundTruthSelector
    assert hidden.GetID() not in [combo.nodeFromIndex(i).GetID() for i in range(combo.nodeCount())]

    # one click: the Segment Editor shows the result with "Lesion" selected and the CT as source
    widget.ui.segmentEditorButton.click()
    editorWidget = slicer.util.getModuleWidget("SegmentEditor")
    assert harness.currentModuleWidget is editorWidget and not widget.parent.isEntered
    editor = editorWidget.editor
    lesionId = seg.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
    assert editor.segmentationNode() is seg and editor.sourceVolumeNode() is ct and editor.currentSegmentID() == lesionId

    # the radiologist's corrections: 2 slices of the lesion erased, a second lesion painted
    corrected = boxKji(LESION_BOX)
    corrected[5:7] = False
    corrected[14:16, 22:26, 25:30] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), seg, lesionId, ct)
    harness.selectModule("CovidGANSeg")

    widget.ui.compareAIButton.click()
    row = tables.tableRows(p.reviewTable)[0]
    ml = abs(np.linalg.det(volumeio.ijkToRasArray(ct)[:3, :3])) / 1000.0
    ai = boxKji(LESION_BOX)
    assert row["AI lesion volume"] == pytest.approx(ai.sum() * ml, rel=1e-9)
    assert row["Corrected lesion volume"] == pytest.approx(corrected.sum() * ml, rel=1e-9)
    assert row["Added"] == pytest.approx((corrected & ~ai).sum() * ml, rel=1e-9)
    assert row["Removed"] == pytest.approx((ai & ~corrected).sum() * ml, rel=1e-9)
    dice = 2.0 * (ai & corrected).sum() / (ai.sum() + corrected.sum())
    assert row["Dice AI vs corrected"] == pytest.approx(dice, rel=1e-12)
    assert (row["Lesion components (AI)"], row["Lesion components (corrected)"]) == (1, 2)
    assert widget.ui.resultsTableView.mrmlTableNode() is p.reviewTable
    assert p.reviewTable.GetColumnUnitLabel("Added") == "mL"

    # export into a MosMedData layout, next to the CT file
    root = tmp_path / "mosmed"
    (root / "studies" / "CT-1").mkdir(parents=True)
    volumeio.writeVolumeNifti(ct, root / "studies" / "CT-1" / "study_0007.nii.gz")
    assert not widget.ui.exportButton.enabled
    widget.ui.exportFolderButton.browse(str(root / "masks"))
    assert widget.ui.exportButton.enabled
    widget.ui.exportButton.click()
    exported = root / "masks" / "study_0007_mask.nii.gz"
    assert exported.is_file() and str(exported) in widget.ui.statusLabel.text
    assert datasets.lesion_mask_path(root, "study_0007") == exported
    # on the CT's own grid: the same affine as the CT file, the voxels of the corrected segment
    import nibabel as nib

    image, ctImage = nib.load(str(exported)), nib.load(str(root / "studies" / "CT-1" / "study_0007.nii.gz"))
    np.testing.assert_allclose(image.affine, ctImage.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), corrected.astype(np.uint8))
    # the library's evaluation takes it as the reference: Dice of the AI mask = the table's
    pred = tmp_path / "pred"
    pred.mkdir()
    aiImage = nib.Nifti1Image(ai.transpose(2, 1, 0).astype(np.uint8), ctImage.affine)
    nib.save(aiImage, str(pred / "study_0007_lesion.nii.gz"))
    summary = evaluation.evaluate_paths(pred, root / "masks", tmp_path / "eval")
    case = summary["per_case"]["prediction"][0]
    assert case["id"] == "study_0007" and case["dice"] == pytest.approx(dice, rel=1e-9)


def test_round_trip_logic_refuses_what_it_cannot_do(harness, logic, tmp_path):
    import slicer
    from CovidGANSegModuleLib import segmentations

    ct = addCtVolume(SHAPE_KJI, name="chest CT")
    seg = segmentations.createSegmentationNode(slicer.mrmlScene, "hand-made", ct, [("Lesion", boxKji(LESION_BOX).astype(np.uint8),
                                                                                    (1, 0, 0))])
    with pytest.raises(ValueError, match="no stored AI result"):
        logic.compareWithAIResult(seg, ct)
    with pytest.raises(ValueError, match="No study id"):
        logic.exportLesionMask(seg, ct, tmp_path)
    with pytest.raises(ValueError, match="No export folder"):
        logic.exportLesionMask(seg, ct, "", "3")
    path = logic.exportLesionMask(seg, ct, tmp_path, "3")
    assert path.name == "study_0003_mask.nii.gz"
    assert not list(tmp_path.glob(".export-*"))


def test_dependencies_use_slicer_packaging_only_where_it_exists(monkeypatch):
    """Issue 9 item 7: ``slicer.packaging`` (Slicer 5.12+) is a submodule that ``slicer/__init__`` does
    not import, so ``getattr(slicer, "packaging")`` never found it."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CovidGANSeg"))
    from CovidGANSegModuleLib import dependencies

    calls = []
    monkeypatch.setattr(dependencies, "torchInstalled", lambda: True)
    monkeypatch.setattr(dependencies, "missingPackages", lambda reqs=None: ["einops>=0.7"] if not calls else [])
    fakeSlicer = types.ModuleType("fakeslicer")
    fakeSlicer.__path__ = []
    fakeSlicer.util = types.SimpleNamespace(pip_install=lambda reqs: calls.append(("pip_install", list(reqs))))
    packaging = types.ModuleType("fakeslicer.packaging")
    packaging.pip_ensure = lambda reqs, requester: calls.append(("pip_ensure", list(reqs), requester))
    monkeypatch.setitem(sys.modules, "fakeslicer", fakeSlicer)
    monkeypatch.setitem(sys.modules, "fakeslicer.packaging", packaging)  # importable, not an attribute yet
    assert not hasattr(fakeSlicer, "packaging")
    assert dependencies.ensureDependencies(lambda q: pytest.fail("pip_ensure asks by itself"), slicerModule=fakeSlicer)
    assert calls == [("pip_ensure", ["einops>=0.7"], "CovidGANSeg")]
    # Slicer 5.6 - 5.10: no slicer.packaging; pip_install after our own question
    calls.clear()
    del sys.modules["fakeslicer.packaging"]
    assert dependencies.ensureDependencies(lambda q: True, slicerModule=fakeSlicer)
    assert calls == [("pip_install", ["einops>=0.7"])]


def test_growth_checkbox_reaches_the_segment_command(harness, panel, fakeModels, tmp_path):
    """The "Grow detections" checkbox is bound to ``growLesions`` (on by default) and unchecked it runs
    ``segment --no-growth`` (the detections alone)."""
    widget = panel()
    fake = FakeCli(widget.logic, tmp_path)
    fake.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    p = widget._parameterNode
    assert p.growLesions is True and widget.ui.growLesionsCheckBox.checked
    p.inputVolume = addCtVolume(SHAPE_KJI)
    p.modelsFolder = Path(fakeModels["folder"])
    widget.ui.segmentButton.click()
    runJob(harness, widget)
    assert "--no-growth" not in fake.calls()[-1]["argv"]
    widget.ui.growLesionsCheckBox.checked = False
    assert p.growLesions is False
    widget.ui.segmentButton.click()
    runJob(harness, widget)
    assert "--no-growth" in fake.calls()[-1]["argv"]


def test_edited_lungs_checkbox_reaches_the_segment_command(harness, panel, fakeModels, tmp_path, caplog):
    """ "Use the edited lungs" is bound to ``reuseLungs`` (off by default); checked before there is a
    segmentation it says what to do and starts nothing; after a run it sends that segmentation's
    Lungs segment, as edited, to ``segment --input-lungs``."""
    import slicer

    widget = panel()
    fake = FakeCli(widget.logic, tmp_path)
    fake.set(lesion_box=LESION_BOX, lungs_box=LUNGS_BOX)
    p = widget._parameterNode
    assert p.reuseLungs is False and not widget.ui.reuseLungsCheckBox.checked
    p.inputVolume = ct = addCtVolume(SHAPE_KJI)
    p.modelsFolder = Path(fakeModels["folder"])
    widget.ui.reuseLungsCheckBox.checked = True
    assert p.reuseLungs is True
    with caplog.at_level(logging.ERROR):
        widget.ui.segmentButton.click()
    assert "no segmentation yet" in caplog.text  # testing mode logs what a dialog would show
    assert widget._job is None and fake.calls() == []
    assert widget.ui.segmentButton.text != "Cancel"
    widget.ui.reuseLungsCheckBox.checked = False
    widget.ui.segmentButton.click()
    runJob(harness, widget)
    assert "--input-lungs" not in fake.calls()[-1]["argv"] and p.segmentation is not None
    edited = boxKji(LUNGS_BOX)
    edited[2:18, 28:31, 4:36] = True
    sid = p.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lungs")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), p.segmentation, sid, ct)
    first = p.segmentation
    widget.ui.reuseLungsCheckBox.checked = True
    widget.ui.segmentButton.click()
    runJob(harness, widget)
    assert "--input-lungs" in fake.calls()[-1]["argv"]
    from CovidGANSegModuleLib import segmentations

    assert p.segmentation is not first  # the new result, segmented with the edited lungs
    np.testing.assert_array_equal(segmentations.segmentMask(p.segmentation, "Lungs", ct), edited)
