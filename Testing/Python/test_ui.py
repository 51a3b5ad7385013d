"""The module's .ui file, checked statically (no Qt here): XML, widget names and classes, the API
the Widget uses on each widget, parameter-node bindings and their widget types, MRML scene
connections. No slicer-core needed.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "CovidGANSeg" / "Resources" / "UI" / "CovidGANSeg.ui"
MODULE_FILE = ROOT / "CovidGANSeg" / "CovidGANSeg.py"

QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QToolButton", "QComboBox", "QCheckBox", "QRadioButton", "QSpinBox",
              "QDoubleSpinBox", "QSlider", "QLineEdit", "QTextEdit", "QTextBrowser", "QProgressBar", "QGroupBox", "QFrame",
              "QTableView", "QTableWidget", "QTabWidget", "QStackedWidget", "QScrollArea", "QSplitter"}
CTK_CLASSES = {"ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkSliderWidget", "ctkRangeWidget", "ctkDirectoryButton",
               "ctkPathLineEdit", "ctkCheckBox", "ctkComboBox", "ctkDoubleSpinBox", "ctkMenuButton"}
QMRML_CLASSES = {"qMRMLWidget", "qMRMLNodeComboBox", "qMRMLTableView", "qMRMLSegmentsTableView", "qMRMLSegmentSelectorWidget",
                 "qMRMLSubjectHierarchyTreeView", "qMRMLSliderWidget", "qMRMLSpinBox"}
LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}

#: members (properties, slots, methods, signals used with connect) of the classes the Widget touches
_COMMON = {"connect", "disconnect", "enabled", "visible", "toolTip", "setEnabled", "setVisible", "setToolTip", "blockSignals",
           "setMRMLScene", "objectName", "show", "hide"}
API = {
    "QPushButton": _COMMON | {"text", "setText", "checkable", "checked", "click", "clicked", "toggled"},
    "QComboBox": _COMMON | {"addItem", "addItems", "clear", "count", "currentIndex", "currentText", "currentData", "setCurrentIndex",
                            "itemData", "itemText", "findData", "findText", "currentIndexChanged"},
    "QLabel": _COMMON | {"text", "setText", "wordWrap", "textFormat"},
    "QProgressBar": _COMMON | {"value", "setValue", "minimum", "maximum", "setRange", "format", "textVisible"},
    "qMRMLTableView": _COMMON | {"setMRMLTableNode", "mrmlTableNode", "setMRMLTableNodeID"},
    "qMRMLNodeComboBox": _COMMON | {"currentNode", "setCurrentNode", "currentNodeID", "nodeTypes", "noneEnabled", "currentNodeChanged"},
    "ctkSliderWidget": _COMMON | {"value", "minimum", "maximum", "singleStep", "valueChanged"},
    "ctkDirectoryButton": _COMMON | {"directory", "setDirectory", "directoryChanged", "directorySelected", "text"},
    "QLineEdit": _COMMON | {"text", "setText", "placeholderText", "textChanged"},
    "ctkCollapsibleButton": _COMMON | {"collapsed", "text"},
}

#: widget classes Slicer's parameterNodeWrapper can bind to each parameter type (guiConnectors.py, v5.6.0: the
#: oldest supported release; 5.8 and 5.10 only add classes)
BINDABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


def _ui():
    return ET.parse(UI_FILE).getroot()


def _widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui().iter("widget")}


def _uiMembersUsed() -> dict[str, set[str]]:
    """``self.ui.<widget>.<member>`` in the module file, and bare ``self.ui.<widget>`` uses."""
    tree = ast.parse(MODULE_FILE.read_text())
    used: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            used.setdefault(node.attr, set())
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Attribute) \
                and node.value.value.attr == "ui":
            used.setdefault(node.value.attr, set()).add(node.attr)
    return used


def _parameterTypes() -> dict[str, str]:
    """Parameter name -> 'bool' / 'int' / 'float' / 'str' / 'pathlib.Path' / 'node', plus annotations text."""
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CovidGANSegParameterNode")
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            text = ast.unparse(stmt.annotation)
            base = text
            if text.startswith("Annotated["):
                base = ast.unparse(stmt.annotation.slice.elts[0])
            if "vtkMRML" in base:
                kind = "node"
            else:
                kind = base
            out[stmt.target.id] = (kind, text, base)
    return out


def test_ui_is_a_slicer_module_panel():
    ui = _ui()
    assert ui.tag == "ui" and ui.findtext("class") == "CovidGANSeg"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "CovidGANSeg"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique (they become self.ui attributes)"


def test_every_widget_class_is_known_and_declared():
    ui = _ui()
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    for name, cls in _widgets().items():
        assert cls in QT_CLASSES | CTK_CLASSES | QMRML_CLASSES, f"{name}: unknown widget class {cls}"
        if cls not in QT_CLASSES:
            assert cls in declared, f"{name}: {cls} is not declared in <customwidgets>"
    for layout in ui.iter("layout"):
        assert layout.get("class") in LAYOUTS


def test_every_widget_the_widget_code_uses_exists_with_that_api():
    widgets = _widgets()
    used = _uiMembersUsed()
    assert used, "the Widget uses no self.ui.* at all?"
    for name, members in used.items():
        assert name in widgets, f"CovidGANSeg.py uses self.ui.{name}, which is not in the .ui"
        cls = widgets[name]
        assert cls in API, f"self.ui.{name} is a {cls}; add its API to this test"
        unknown = members - API[cls]
        assert not unknown, f"self.ui.{name} ({cls}) has no {sorted(unknown)}"


def test_parameter_bindings_match_the_parameter_node():
    params = _parameterTypes()
    bound = {}
    for w in _ui().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                assert p.get("stdset") == "0", "dynamic property: stdset must be 0"
                bound[p.findtext("string")] = (w.get("name"), w.get("class"), w)
    assert bound, "no widget is bound to the parameter node"
    for parameter, (name, cls, element) in bound.items():
        assert parameter in params, f"{name} is bound to '{parameter}', which CovidGANSegParameterNode does not have"
        kind, text, base = params[parameter]
        assert cls in BINDABLE[kind], f"{name} ({cls}) cannot be bound to {parameter}: {text}"
        if cls == "QComboBox" and kind != "int":
            assert "Choice(" in text, f"{parameter}: a QComboBox needs a Choice annotation"
        if cls == "ctkSliderWidget":
            assert "WithinRange(" in text, f"{parameter}: a ctkSliderWidget needs a bounded (WithinRange) float"
        if cls == "qMRMLNodeComboBox":
            types = [s.text for s in element.iter("string") if s.text and s.text.startswith("vtkMRML")]
            assert sorted(types) == sorted(t for t in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode",
                                                        "vtkMRMLTableNode") if t in base), f"{name}: nodeTypes {types} vs {base}"
    # the parameters a user sets in the panel are all bound
    for parameter in ("inputVolume", "modelsFolder", "device", "overlayOpacity", "differenceThreshold", "groundTruth", "exportStudyId"):
        assert parameter in bound, f"{parameter} has no widget"
    # folders a user must choose are set by the Widget from directorySelected(QString), not bound: a bound
    # ctkDirectoryButton shows Slicer's working folder for an unset Path() parameter (".") and signals no
    # change when the user picks that folder (issue 9 item 4)
    source = MODULE_FILE.read_text()
    for parameter, button in (("batchInputFolder", "batchInputButton"), ("batchOutputFolder", "batchOutputButton"),
                              ("exportFolder", "exportFolderButton")):
        assert parameter not in bound and params[parameter][0] == "str", parameter
        assert f"self.ui.{button}, \"{parameter}\"" in source and 'directorySelected(QString)' in source, parameter


def test_every_widget_class_has_a_harness_stand_in():
    """The harness builds the panel from this .ui (Testing/Slicer/slicer_harness/widgets.py)."""
    import sys

    sys.path.insert(0, str(ROOT / "Testing" / "Slicer"))
    from slicer_harness import widgets

    missing = {cls for cls in _widgets().values() if cls not in widgets.ALL_CLASSES}
    layouts = {layout.get("class") for layout in _ui().iter("layout")} - set(widgets.ALL_CLASSES)
    assert not missing and not layouts, f"no stand-in for {sorted(missing | layouts)}"


def test_mrml_widgets_receive_the_scene():
    widgets = _widgets()
    connected = {c.findtext("receiver") for c in _ui().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for name, cls in widgets.items():
        if cls in QMRML_CLASSES - {"qMRMLWidget"}:
            assert name in connected, f"{name} ({cls}) never gets the scene: it would stay empty in Slicer"


def test_widget_code_stays_thin():
    """The Widget calls the Logic; it never computes or runs processes itself."""
    tree = ast.parse(MODULE_FILE.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CovidGANSegWidget")
    source = ast.unparse(widget)
    for forbidden in ("subprocess", "numpy", "np.", "nibabel", "import torch", "Popen", "arrayFromVolume"):
        assert forbidden not in source, f"the Widget should leave '{forbidden}' to the Logic"
    assert "_errorsShown" in source and "tryWithErrorDisplay" not in source  # errors shown, never re-raised out of a slot
