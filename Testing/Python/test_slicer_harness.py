"""The harness's fakes behave as the real Slicer code they stand for (Slicer 5.6 unless a test says
otherwise): each test states the Slicer behaviour it pins. The parameter-node tests also pass with
Slicer's own ``parameterNodeWrapper`` in place of the fake (see ``slicer_harness/with_slicer_source.py``).
"""

from __future__ import annotations

import os
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Slicer"))
from slicer_harness.fixtures import *  # noqa: E402,F401,F403 - pytest fixtures

pytestmark = pytest.mark.slicer


def _wrapperClass(annotations: dict, defaults: dict | None = None):
    from slicer.parameterNodeWrapper import parameterNodeWrapper

    cls = type("HarnessCheckParameterNode", (), {"__annotations__": annotations, **(defaults or {})})
    return parameterNodeWrapper(cls)


def _newNode():
    import slicer

    return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")


def test_a_union_of_node_types_is_nullable_only_when_declared(harness):
    import slicer

    plain = _wrapperClass({"node": typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]})
    with pytest.raises(TypeError, match="Unable to write value 'None'"):
        plain(_newNode())  # the default (None) cannot be written: Slicer fails the same way
    optional = _wrapperClass({"node": typing.Optional[typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]]})
    p = optional(_newNode())
    assert p.node is None
    single = _wrapperClass({"node": slicer.vtkMRMLSegmentationNode})(_newNode())  # a single node type: None allowed
    assert single.node is None


def test_union_storage_uses_indexed_names_and_reference_roles(harness):
    import slicer

    cls = _wrapperClass({"node": typing.Optional[typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]]})
    raw = _newNode()
    p = cls(raw)
    assert raw.GetParameter("node.2") == "True" and not raw.HasParameter("node")  # None member
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    p.node = labelmap
    assert raw.GetNodeReferenceID("node.1") == labelmap.GetID() and raw.HasParameter("node.1")
    assert not raw.HasParameter("node.2") and not raw.HasParameter("node.0")
    with pytest.raises(TypeError):
        p.node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # not a member: refused
    assert p.node is labelmap


def test_values_are_cached_and_refreshed_on_modified_event(harness):
    import slicer

    cls = _wrapperClass({"value": float, "text": str}, {"value": 1.0})
    raw = _newNode()
    a, b = cls(raw), cls(raw)
    with slicer.util.NodeModify(raw):
        a.value = 2.5
        assert a.value == 2.5 and b.value == 1.0  # b's cache refreshes on ModifiedEvent, fired at EndModify
    assert b.value == 2.5
    raw.SetParameter("text", "set behind the wrapper's back")
    assert b.text == "set behind the wrapper's back"  # SetParameter fires ModifiedEvent


@pytest.mark.parametrize("version,tagged", [((5, 6), False), ((5, 8), False), ((5, 10), True)])
def test_connect_gui_returns_a_tag_only_from_5_10(harness, version, tagged):
    import ctk
    import qt
    import slicer

    if "slicer_harness" not in slicer.parameterNodeWrapper.__name__ + getattr(slicer.parameterNodeWrapper, "__file__", ""):
        pytest.skip("Slicer's own wrapper runs: it is the version of its checkout, not the emulated one")
    harness.emulate(version)
    cls = _wrapperClass({"folder": Path, "name": str})
    p = cls(_newNode())
    ui = type("ui", (), {})()
    ui.folderButton = ctk.ctkDirectoryButton()
    ui.folderButton.setProperty("SlicerParameterName", "folder")
    ui.nameEdit = qt.QLineEdit()
    ui.nameEdit.setProperty("SlicerParameterName", "name")
    tag = p.connectGui(ui)
    assert (tag is not None) == tagged
    assert isinstance(p.connectParametersToGui({"name": ui.nameEdit}), int)  # a tag in every version


def test_gui_connectors_match_the_exact_widget_class(harness):
    import qt

    class MyComboBox(qt.QComboBox):
        pass

    from slicer.parameterNodeWrapper import Choice

    cls = _wrapperClass({"device": typing.Annotated[str, Choice(["cpu", "cuda"])]}, {"device": "cpu"})
    p = cls(_newNode())
    with pytest.raises(RuntimeError, match="Unable to create GUI connector"):
        p.connectParametersToGui({"device": MyComboBox()})
    combo = qt.QComboBox()
    p.connectParametersToGui({"device": combo})
    assert [combo.itemText(i) for i in range(combo.count)] == ["cpu", "cuda"] and combo.currentText == "cpu"


def test_directory_button_behaves_as_ctk(harness):
    import ctk

    button = ctk.ctkDirectoryButton()
    changed, selected = [], []
    button.connect("directoryChanged(QString)", changed.append)
    button.connect("directorySelected(QString)", selected.append)
    assert button.directory == "." and button.displayedText() == os.getcwd()  # the working folder is shown
    button.directory = os.getcwd()  # the same folder: selected, not changed
    assert changed == [] and selected == [os.getcwd()] and button.directory == "."
    button.directory = "/tmp"
    assert changed == ["/tmp"] and button.directory == "/tmp"
    button.text = "Choose"
    assert button.displayedText() == "Choose"


def test_node_combo_box_selects_as_qmrml_does(harness):
    import slicer

    combo = slicer.qMRMLNodeComboBox()
    combo.nodeTypes = ("vtkMRMLScalarVolumeNode",)
    combo.showChildNodeTypes = False
    combo.noneEnabled = False
    combo.setMRMLScene(slicer.mrmlScene)
    seen = []
    combo.connect("currentNodeChanged(vtkMRMLNode*)", seen.append)
    a = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    assert combo.currentNode() is a and seen == [a]  # without "None", the first node added becomes current
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labelmap")  # a child type: not listed
    b = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "b")
    assert combo.nodeCount() == 2 and combo.currentNode() is a
    slicer.mrmlScene.RemoveNode(a)
    assert combo.currentNode() is b  # the removed current node is replaced by the next one
    withNone = slicer.qMRMLNodeComboBox()
    withNone.nodeTypes = ("vtkMRMLScalarVolumeNode",)
    withNone.noneEnabled = True
    withNone.setMRMLScene(slicer.mrmlScene)
    assert withNone.currentNode() is None


@pytest.mark.parametrize("testing", [True, False])
def test_testing_mode_both_ways(harness, testing, caplog):
    import slicer
    from slicer_harness import widgets

    harness.app.setTestingEnabled(testing)
    harness.setMainWindow(True)
    widgets.QMessageBox.queueAnswer(widgets.QMessageBox.Cancel)
    answer = slicer.util.confirmOkCancelDisplay("Install?")
    slicer.util.errorDisplay("broken")
    if testing:  # no box, logged. Slicer's confirmOkCancelDisplay documents True here, but its code returns
        # "True == qt.QMessageBox.Ok", which is False (5.6 - 5.10): the harness runs that code as it is
        assert answer is False and widgets.QMessageBox.shown == []
        assert "broken" in caplog.text
    else:  # boxes shown (recorded), the user's answer used
        assert answer is False and [box["text"] for box in widgets.QMessageBox.shown] == ["Install?", "broken"]
    harness.setMainWindow(False)
    del widgets.QMessageBox.shown[:]
    slicer.util.errorDisplay("no window")
    assert widgets.QMessageBox.shown == []  # errorDisplay needs a main window


def test_what_the_supported_releases_do_not_have(harness):
    import importlib

    import slicer

    assert not hasattr(slicer, "packaging")  # slicer.packaging: Slicer 5.12+
    with pytest.raises(ImportError):
        importlib.import_module("slicer.packaging")
    assert not hasattr(slicer.app, "layoutManager") or slicer.app.layoutManager() is None  # --no-main-window
    assert not hasattr(slicer.app, "isTestHarness")  # no marker the real application lacks: code cannot tell the fake apart
