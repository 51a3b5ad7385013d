"""Stand-in Qt / CTK / qMRML widgets for running the module's Widget without Qt.

Written from the behaviour of the real classes (Qt 5 documentation and sources; CTK
``Libs/Widgets/ctkDirectoryButton.cpp``, ``ctkSliderWidget.cpp``, ``ctkCollapsibleButton.cpp``;
Slicer ``Libs/MRML/Widgets/qMRMLNodeComboBox.cxx``, ``qMRMLWidget.cxx``, ``qMRMLTableView.cxx`` at
tag v5.6.0). Only the members the module and Slicer's own Python helpers use exist: anything else
raises ``AttributeError``, so a widget call the stand-in does not know fails the test instead of
passing silently. What each class keeps from the real one is said in its docstring.

PythonQt conventions kept: properties as attributes (``button.text = "x"``), signals both as
``obj.connect("clicked(bool)", slot)`` and ``obj.clicked.connect(slot)``, a slot receives only as
many signal arguments as it accepts, ``obj.name`` is the object name, ``blockSignals`` returns the
previous state. The ``.ui`` loader (:class:`QUiLoader`) builds these widgets from the XML, sets
the declared properties (an unknown static property is an error, as for uic), keeps dynamic
properties such as ``SlicerParameterName`` and makes the ``<connections>`` (e.g.
``mrmlSceneChanged(vtkMRMLScene*)`` -> ``setMRMLScene(vtkMRMLScene*)``).
"""

from __future__ import annotations

import inspect
import os
import xml.etree.ElementTree as ET
from typing import Any, Callable

# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------


def _argumentCount(slot: Callable) -> int | None:
    """Positional arguments a Python slot accepts (None: any number), as PythonQt decides."""
    try:
        signature = inspect.signature(slot)
    except (TypeError, ValueError):
        return None
    count = 0
    for p in signature.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class BoundSignal:
    """``obj.clicked``: ``connect`` / ``disconnect`` / ``emit`` for one signal name (all overloads)."""

    def __init__(self, owner: "QObject", name: str) -> None:
        self._owner, self._name = owner, name

    def connect(self, slot: Callable) -> bool:
        self._owner._connections.setdefault(self._name, []).append(slot)
        return True

    def disconnect(self, slot: Callable | None = None) -> bool:
        slots = self._owner._connections.get(self._name, [])
        if slot is None:
            slots.clear()
            return True
        for i, s in enumerate(slots):
            if s == slot:
                del slots[i]
                return True
        raise RuntimeError(f"{type(self._owner).__name__}.{self._name}: disconnect of a slot that is not connected")

    def emit(self, *args) -> None:
        self._owner._emit(self._name, *args)


class QObject:
    #: signal name -> accepted signatures (argument lists as Qt writes them)
    SIGNALS: dict[str, tuple[str, ...]] = {"destroyed": ("()",), "objectNameChanged": ("(QString)",)}
    #: property name -> default value (attribute access); static Qt properties the .ui may set
    PROPERTIES: dict[str, Any] = {}

    def __init__(self, parent: "QObject | None" = None) -> None:
        object.__setattr__(self, "_connections", {})
        object.__setattr__(self, "_dynamic", {})
        object.__setattr__(self, "_signalsBlocked", False)
        object.__setattr__(self, "_children", [])
        object.__setattr__(self, "_parentObject", None)
        object.__setattr__(self, "_values", {})
        for klass in reversed(type(self).__mro__):
            for key, value in getattr(klass, "PROPERTIES", {}).items():
                self._values[key] = value
        object.__setattr__(self, "objectName", "")
        if parent is not None:
            self.setParent(parent)

    # PythonQt: properties as attributes; anything unknown is an error here
    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        for klass in type(self).__mro__:
            if name in getattr(klass, "SIGNALS", {}):
                return BoundSignal(self, name)
        raise AttributeError(f"{type(self).__name__} stand-in has no attribute '{name}'")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_") or name in ("objectName",):
            object.__setattr__(self, name, value)
            return
        setter = getattr(type(self), "set" + name[0].upper() + name[1:], None)
        if name in self._values and callable(setter):
            setter(self, value)
            return
        if name in self._values:
            self._values[name] = value
            return
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"{type(self).__name__} stand-in has no property '{name}'")

    @property
    def name(self) -> str:
        return self.objectName

    @name.setter
    def name(self, value: str) -> None:
        self.objectName = value

    def setObjectName(self, value: str) -> None:
        self.objectName = value

    # -- object tree ---------------------------------------------------------------------------
    def setParent(self, parent) -> None:
        old = self._parentObject
        if old is not None and self in old._children:
            old._children.remove(self)
        object.__setattr__(self, "_parentObject", parent)
        if parent is not None:
            parent._children.append(self)

    def parent(self):
        return self._parentObject

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, klass=None, name: str | None = None) -> list:
        out = []
        for child in self._children:
            if (klass is None or isinstance(child, klass)) and (name is None or child.objectName == name):
                out.append(child)
            out.extend(child.findChildren(klass, name))
        return out

    def findChild(self, klass, name: str):
        found = self.findChildren(klass, name)
        return found[0] if found else None

    def isWidgetType(self) -> bool:
        return False

    # -- dynamic properties --------------------------------------------------------------------
    def property(self, name: str):
        if name in self._dynamic:
            return self._dynamic[name]
        return self._values.get(name)

    def setProperty(self, name: str, value) -> bool:
        if name in self._values:
            setattr(self, name, value)
            return True
        self._dynamic[name] = value
        return False

    # -- signals -------------------------------------------------------------------------------
    def _signature(self, signature: str) -> str:
        name, _, rest = signature.partition("(")
        for klass in type(self).__mro__:
            if "(" + rest in getattr(klass, "SIGNALS", {}).get(name, ()):
                return name
        raise RuntimeError(f"{type(self).__name__} stand-in has no signal {signature}")

    def connect(self, signature: str, slot: Callable) -> bool:
        return BoundSignal(self, self._signature(signature)).connect(slot)

    def disconnect(self, signature: str, slot: Callable | None = None) -> bool:
        return BoundSignal(self, self._signature(signature)).disconnect(slot)

    def blockSignals(self, block: bool) -> bool:
        old = self._signalsBlocked
        object.__setattr__(self, "_signalsBlocked", bool(block))
        return old

    def signalsBlocked(self) -> bool:
        return self._signalsBlocked

    def _emit(self, name: str, *args) -> None:
        if self._signalsBlocked:
            return
        for slot in list(self._connections.get(name, [])):
            n = _argumentCount(slot)
            slot(*(args if n is None else args[:n]))

    def deleteLater(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# core Qt
# ---------------------------------------------------------------------------------------------

class Qt:
    WaitCursor = 3
    ArrowCursor = 0
    AlignLeft, AlignRight, AlignCenter = 0x1, 0x2, 0x84
    Horizontal, Vertical = 1, 2
    RichText, PlainText, AutoText = 1, 0, 2
    UserRole = 0x100


class QSettings(QObject):
    """Empty settings: ``value(key, default)`` returns the default (a fresh profile)."""

    _store: dict = {}

    def value(self, key, default=None):
        return QSettings._store.get(key, default)

    def setValue(self, key, value) -> None:
        QSettings._store[key] = value

    def contains(self, key) -> bool:
        return key in QSettings._store


class QTimer(QObject):
    """No event loop: the test drives time with :meth:`fire` (one ``timeout()``)."""

    SIGNALS = {"timeout": ("()",)}
    PROPERTIES = {"interval": 0, "singleShot": False, "active": False}

    def setInterval(self, msec: int) -> None:
        self._values["interval"] = int(msec)

    def start(self, msec: int | None = None) -> None:
        if msec is not None:
            self.setInterval(msec)
        self._values["active"] = True

    def stop(self) -> None:
        self._values["active"] = False

    def isActive(self) -> bool:
        return self._values["active"]

    def fire(self) -> None:
        """Test helper: one timer period elapsed."""
        if self._values["active"]:
            if self._values["singleShot"]:
                self._values["active"] = False
            self._emit("timeout")

    @staticmethod
    def singleShot(msec, callback) -> None:
        callback()  # no event loop: run at once


class QLayout(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__(None)
        object.__setattr__(self, "_items", [])
        if parent is not None:
            parent.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        self._items.append(widget)
        owner = self.parent()
        if owner is not None:
            widget.setParent(owner)

    def addRow(self, *widgets) -> None:
        for w in widgets:
            if isinstance(w, QWidget):
                self.addWidget(w)

    def addLayout(self, layout, *args) -> None:
        self._items.append(layout)

    def addStretch(self, *args) -> None:
        pass

    def setContentsMargins(self, *args) -> None:
        pass

    def count(self) -> int:
        return len(self._items)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QWidget(QObject):
    PROPERTIES = {"enabled": True, "visible": True, "toolTip": "", "geometry": None, "minimumSize": None, "sizePolicy": None,
                  "statusTip": "", "whatsThis": "", "windowTitle": ""}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_layout", None)

    def isWidgetType(self) -> bool:
        return True

    def setEnabled(self, enabled: bool) -> None:
        self._values["enabled"] = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self._values["visible"] = bool(visible)

    def show(self) -> None:
        self.setVisible(True)

    def hide(self) -> None:
        self.setVisible(False)

    def setToolTip(self, text: str) -> None:
        self._values["toolTip"] = text

    def setLayout(self, layout: QLayout) -> None:
        object.__setattr__(self, "_layout", layout)
        layout.setParent(self)

    def layout(self):
        return self._layout

    def setSizePolicy(self, *args) -> None:
        pass


class qSlicerMainWindow(QWidget):
    """Only what ``slicer.util`` asks of the main window here: ``moduleSelector()``."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_selector", None)

    def setModuleSelector(self, selector) -> None:
        object.__setattr__(self, "_selector", selector)

    def moduleSelector(self):
        return self._selector


class QLabel(QWidget):
    PROPERTIES = {"text": "", "wordWrap": False, "textFormat": Qt.AutoText, "openExternalLinks": False, "alignment": Qt.AlignLeft}

    def setText(self, text: str) -> None:
        self._values["text"] = str(text)


class QAbstractButton(QWidget):
    """``clicked(bool)`` on :meth:`click` (only when enabled), ``toggled(bool)`` when a checkable
    button's state changes; ``checked`` can only be set on a checkable button (as in Qt)."""

    SIGNALS = {"clicked": ("()", "(bool)"), "toggled": ("(bool)",), "pressed": ("()",), "released": ("()",)}
    PROPERTIES = {"text": "", "checkable": False, "checked": False, "icon": None, "iconSize": None}

    def setText(self, text: str) -> None:
        self._values["text"] = str(text)

    def setCheckable(self, checkable: bool) -> None:
        self._values["checkable"] = bool(checkable)
        if not checkable:
            self.setChecked(False)

    def setChecked(self, checked: bool) -> None:
        if not self._values["checkable"]:
            return
        if bool(checked) != self._values["checked"]:
            self._values["checked"] = bool(checked)
            self._emit("toggled", bool(checked))

    def click(self) -> None:
        if not self._values["enabled"]:
            return
        if self._values["checkable"]:
            self.setChecked(not self._values["checked"])
        self._emit("clicked", self._values["checked"])


class QPushButton(QAbstractButton):
    def __init__(self, text=None, parent=None) -> None:
        super().__init__(parent if not isinstance(text, QObject) else text)
        if isinstance(text, str):
            self._values["text"] = text


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    SIGNALS = {"stateChanged": ("(int)",)}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._values["checkable"] = True

    def setChecked(self, checked: bool) -> None:
        changed = bool(checked) != self._values["checked"]
        super().setChecked(checked)
        if changed:
            self._emit("stateChanged", 2 if checked else 0)


class QComboBox(QWidget):
    """Items with user data; adding the first item selects it (index 0) and clearing gives -1, both
    emitting ``currentIndexChanged(int)`` as Qt does; a removed current item moves the selection
    as ``QComboBox`` does (to the same row, else the last)."""

    SIGNALS = {"currentIndexChanged": ("(int)", "(QString)"), "currentTextChanged": ("(QString)",), "activated": ("(int)",)}
    PROPERTIES = {"editable": False, "maxVisibleItems": 10}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_items", [])
        object.__setattr__(self, "_current", -1)

    def _setIndex(self, index: int) -> None:
        if index != self._current:
            object.__setattr__(self, "_current", index)
            self._emit("currentIndexChanged", index)
            self._emit("currentTextChanged", self.currentText)

    def addItem(self, text: str, userData=None) -> None:
        self._items.append((str(text), userData))
        if len(self._items) == 1:
            self._setIndex(0)

    def addItems(self, texts) -> None:
        for t in texts:
            self.addItem(t)

    def clear(self) -> None:
        self._items.clear()
        self._setIndex(-1)

    def removeItem(self, index: int) -> None:
        if not 0 <= index < len(self._items):
            return
        del self._items[index]
        if index == self._current:
            object.__setattr__(self, "_current", -1)
            self._setIndex(min(len(self._items) - 1, max(index, 0)) if self._items else -1)
        elif index < self._current:
            object.__setattr__(self, "_current", self._current - 1)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        index = int(index)
        if not -1 <= index < len(self._items):
            index = -1
        self._setIndex(index)

    @property
    def currentText(self) -> str:
        return self._items[self._current][0] if self._current >= 0 else ""

    @property
    def currentData(self):
        return self._items[self._current][1] if self._current >= 0 else None

    def itemData(self, index: int):
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text: str) -> int:
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)


class QProgressBar(QWidget):
    SIGNALS = {"valueChanged": ("(int)",)}
    PROPERTIES = {"value": -1, "minimum": 0, "maximum": 100, "textVisible": True, "format": "%p%"}

    def setValue(self, value: int) -> None:
        value = int(value)
        if self._values["minimum"] <= value <= self._values["maximum"] and value != self._values["value"]:
            self._values["value"] = value
            self._emit("valueChanged", value)

    def setRange(self, minimum: int, maximum: int) -> None:
        self._values["minimum"], self._values["maximum"] = int(minimum), int(maximum)


class QLineEdit(QWidget):
    SIGNALS = {"textChanged": ("(QString)",), "editingFinished": ("()",)}
    PROPERTIES = {"text": "", "placeholderText": "", "readOnly": False}

    def setText(self, text: str) -> None:
        if str(text) != self._values["text"]:
            self._values["text"] = str(text)
            self._emit("textChanged", str(text))


class QFrame(QWidget):
    PROPERTIES = {"frameShape": 0, "frameShadow": 0}


class QMessageBox(QWidget):
    """Modal boxes never open here: ``exec_()`` records the box and returns the answer queued with
    :meth:`queueAnswer` (default ``Ok``)."""

    Ok, Cancel, Yes, No = 0x400, 0x400000, 0x4000, 0x10000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4
    shown: list = []
    _answers: list = []

    @classmethod
    def queueAnswer(cls, answer) -> None:
        cls._answers.append(answer)

    def exec_(self):
        QMessageBox.shown.append(dict(self._values))
        return QMessageBox._answers.pop(0) if QMessageBox._answers else QMessageBox.Ok


class ctkMessageBox(QMessageBox):
    PROPERTIES = {"text": "", "detailedText": "", "windowTitle": "", "icon": 0, "standardButtons": 0, "informativeText": "",
                  "dontShowAgainSettingsKey": "", "dontShowAgainVisible": False}


class QFile:
    ReadOnly = 1

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def open(self, mode) -> bool:
        return self.exists()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# CTK
# ---------------------------------------------------------------------------------------------

class ctkCollapsibleButton(QAbstractButton):
    SIGNALS = {"contentsCollapsed": ("(bool)",)}
    PROPERTIES = {"collapsed": False, "collapsedHeight": 10, "contentsFrameShape": 0}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._values["checkable"] = True
        self._values["checked"] = True

    def setCollapsed(self, collapsed: bool) -> None:
        if bool(collapsed) != self._values["collapsed"]:
            self._values["collapsed"] = bool(collapsed)
            self._values["checked"] = not collapsed
            self._emit("contentsCollapsed", bool(collapsed))


class ctkSliderWidget(QWidget):
    """Value clamped into [minimum, maximum]; ``valueChanged(double)`` only on a change; changing
    the range moves the value into it (and signals), as ``ctkSliderWidget`` does."""

    SIGNALS = {"valueChanged": ("(double)",), "valueIsChanging": ("(double)",)}
    PROPERTIES = {"value": 0.0, "minimum": 0.0, "maximum": 99.0, "singleStep": 1.0, "pageStep": 10.0, "decimals": 2,
                  "tracking": True, "suffix": "", "prefix": "", "tickInterval": 0.0}

    def setValue(self, value: float) -> None:
        value = min(max(float(value), self._values["minimum"]), self._values["maximum"])
        value = round(value, self._values["decimals"])
        if value != self._values["value"]:
            self._values["value"] = value
            self._emit("valueChanged", value)

    def setMinimum(self, minimum: float) -> None:
        self.setRange(minimum, max(float(minimum), self._values["maximum"]))

    def setMaximum(self, maximum: float) -> None:
        self.setRange(min(float(maximum), self._values["minimum"]), maximum)

    def setRange(self, minimum: float, maximum: float) -> None:
        self._values["minimum"], self._values["maximum"] = float(minimum), float(maximum)
        self.setValue(self._values["value"])

    def setDecimals(self, decimals: int) -> None:
        self._values["decimals"] = int(decimals)

    def setSingleStep(self, step: float) -> None:
        self._values["singleStep"] = float(step)


class ctkDirectoryButton(QWidget):
    """CTK's ``ctkDirectoryButton``: ``directory`` is the stored ``QDir``'s path (``"."`` until set);
    ``setDirectory(d)`` stores the *absolute* path, emits ``directorySelected`` always but
    ``directoryChanged`` only when the folder differs (``QDir`` equality: same absolute folder);
    the button shows the absolute path (Slicer's working folder while the path is ``"."``) unless
    ``text`` is set. :meth:`browse` stands for the user picking a folder in the dialog."""

    SIGNALS = {"directoryChanged": ("(QString)",), "directorySelected": ("(QString)",)}
    PROPERTIES = {"caption": "", "text": None, "options": 0, "acceptMode": 0}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_directory", ".")

    @property
    def directory(self) -> str:
        return self._directory

    @directory.setter
    def directory(self, value: str) -> None:
        self.setDirectory(value)

    def setDirectory(self, value: str) -> None:
        new = os.path.abspath(str(value) or ".")
        if os.path.normpath(os.path.abspath(self._directory)) == os.path.normpath(new):
            self._emit("directorySelected", new)
            return
        object.__setattr__(self, "_directory", new)
        self._emit("directorySelected", new)
        self._emit("directoryChanged", new)

    def setText(self, text) -> None:
        self._values["text"] = text

    def displayedText(self) -> str:
        """What the button shows (test helper)."""
        text = self._values["text"]
        return text if text is not None else os.path.abspath(self._directory)

    def browse(self, chosen: str | None = None) -> str:
        """Test helper for the folder dialog: ``chosen`` is what the user picks (None: cancelled)."""
        if not chosen:
            return ""
        self.setDirectory(chosen)
        return chosen


# ---------------------------------------------------------------------------------------------
# qMRML
# ---------------------------------------------------------------------------------------------

class qMRMLWidget(QWidget):
    """``setMRMLScene`` emits ``mrmlSceneChanged(vtkMRMLScene*)`` (the .ui connects it to children)."""

    SIGNALS = {"mrmlSceneChanged": ("(vtkMRMLScene*)",)}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_scene", None)

    def setMRMLScene(self, scene) -> None:
        if scene is self._scene:
            return
        object.__setattr__(self, "_scene", scene)
        self._emit("mrmlSceneChanged", scene)

    def mrmlScene(self):
        return self._scene


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The C++ panel a scripted module's Python widget gets as ``parent`` (``isEntered``);
    ``self()`` is the Python widget object (what ``slicer.util.getModuleWidget`` returns)."""

    PROPERTIES = {"isEntered": False}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_pythonWidget", None)

    def self(self_):  # noqa: N805 - PythonQt's name for it
        return self_._pythonWidget

    def setPythonWidget(self, widget) -> None:
        object.__setattr__(self, "_pythonWidget", widget)


class qMRMLNodeComboBox(qMRMLWidget):
    """Slicer's node selector over a real scene (``qMRMLNodeComboBox.cxx`` v5.6.0).

    Items: the scene's nodes whose class is one of ``nodeTypes`` (subclasses only with
    ``showChildNodeTypes``), minus ``hideChildNodeTypes`` and nodes hidden from editors, in scene
    order, after a "None" item when ``noneEnabled``. Kept behaviours that change parameters
    without the user: without "None", the first node added to an empty list becomes current; when
    the current node is removed, the combo box selects the item now in its row (else the last),
    so "None" only when nothing else is left; every change emits ``currentNodeChanged``.
    """

    SIGNALS = {"currentNodeChanged": ("(vtkMRMLNode*)", "(bool)"), "currentNodeIDChanged": ("(QString)",),
               "nodeAdded": ("(vtkMRMLNode*)",), "nodeActivated": ("(vtkMRMLNode*)",)}
    PROPERTIES = {"nodeTypes": (), "showChildNodeTypes": True, "hideChildNodeTypes": (), "noneEnabled": False, "addEnabled": True,
                  "removeEnabled": True, "editEnabled": False, "renameEnabled": False, "selectNodeUponCreation": True,
                  "showHidden": False, "noneDisplay": "None", "baseName": ""}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_nodeIds", [])
        object.__setattr__(self, "_index", -1)
        object.__setattr__(self, "_observers", [])

    # -- item list --------------------------------------------------------------------------
    def _accepts(self, node) -> bool:
        if node is None or (node.GetHideFromEditors() and not self._values["showHidden"]):
            return False
        cls = node.GetClassName()
        types = list(self._values["nodeTypes"])
        if self._values["showChildNodeTypes"]:
            ok = any(node.IsA(t) for t in types)
        else:
            ok = cls in types
        return ok and not any(node.IsA(t) for t in self._values["hideChildNodeTypes"])

    def _offset(self) -> int:
        return 1 if self._values["noneEnabled"] else 0

    def _rebuild(self, keepId: str | None) -> None:
        scene = self._scene
        ids = []
        if scene is not None:
            for i in range(scene.GetNumberOfNodes()):
                node = scene.GetNthNode(i)
                if self._accepts(node):
                    ids.append(node.GetID())
        object.__setattr__(self, "_nodeIds", ids)
        if keepId and keepId in ids:
            object.__setattr__(self, "_index", ids.index(keepId) + self._offset())
        else:
            object.__setattr__(self, "_index", 0 if self._values["noneEnabled"] else -1)

    def _emitCurrent(self) -> None:
        node = self.currentNode()
        self._emit("currentNodeChanged", node)
        self._emit("currentNodeIDChanged", node.GetID() if node is not None else "")

    def _setIndex(self, index: int) -> None:
        if index != self._index:
            object.__setattr__(self, "_index", index)
            self._emitCurrent()

    def setMRMLScene(self, scene) -> None:
        if scene is self._scene:
            return
        old = self._scene
        for tag in self._observers:
            old.RemoveObserver(tag)
        self._observers.clear()
        oldId = self.currentNodeID
        object.__setattr__(self, "_scene", scene)
        before = self._index
        self._rebuild(oldId)
        if scene is not None:
            self._observers.append(scene.AddObserver(scene.NodeAddedEvent, self._onNodeAdded))
            self._observers.append(scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved))
            if not self._values["noneEnabled"] and self._index == -1 and self._nodeIds:
                object.__setattr__(self, "_index", 0)
        self._emit("mrmlSceneChanged", scene)
        if self._index != before:
            self._emitCurrent()

    def _onNodeAdded(self, caller, event) -> None:
        current = self.currentNodeID
        wasEmpty = not self._nodeIds
        self._rebuild(current)
        if wasEmpty and self._nodeIds and not self._values["noneEnabled"] and not current:
            object.__setattr__(self, "_index", -1)
            self._setIndex(0)  # QComboBox selects the first item inserted into an empty model

    def _listedCurrentId(self) -> str:
        i = self._index - self._offset()
        return self._nodeIds[i] if 0 <= i < len(self._nodeIds) else ""

    def _onNodeRemoved(self, caller, event) -> None:
        current = self._listedCurrentId()  # from the item list: the scene no longer has the node
        oldIndex = self._index
        if current and self._scene.GetNodeByID(current) is None:
            self._rebuild(None)
            object.__setattr__(self, "_index", -2)  # the current row went away
            count = len(self._nodeIds) + self._offset()
            self._setIndex(min(count - 1, max(oldIndex, 0)) if count else -1)
        else:
            self._rebuild(current)

    def _ownerNode(self):
        return None

    # -- API ------------------------------------------------------------------------------------
    def setNodeTypes(self, types) -> None:
        self._values["nodeTypes"] = tuple(t for t in types if t)
        self._rebuild(self.currentNodeID)

    def setNoneEnabled(self, enabled: bool) -> None:
        current = self.currentNodeID
        self._values["noneEnabled"] = bool(enabled)
        self._rebuild(current)

    def setShowChildNodeTypes(self, show: bool) -> None:
        self._values["showChildNodeTypes"] = bool(show)
        self._rebuild(self.currentNodeID)

    def nodeCount(self) -> int:
        return len(self._nodeIds) if self._scene is not None else 0

    def nodeFromIndex(self, index: int):
        return self._scene.GetNodeByID(self._nodeIds[index]) if 0 <= index < len(self._nodeIds) else None

    def currentNode(self):
        i = self._index - self._offset()
        return self.nodeFromIndex(i)

    @property
    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node) -> None:
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeId: str) -> None:
        if nodeId and nodeId in self._nodeIds:
            self._setIndex(self._nodeIds.index(nodeId) + self._offset())
        else:
            self._setIndex(0 if self._values["noneEnabled"] else -1)


class qMRMLTableView(qMRMLWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_table", None)

    def setMRMLTableNode(self, node) -> None:
        object.__setattr__(self, "_table", node)

    def mrmlTableNode(self):
        return self._table


class qMRMLSliderWidget(ctkSliderWidget):
    pass


# ---------------------------------------------------------------------------------------------
# .ui loading
# ---------------------------------------------------------------------------------------------

QT_CLASSES = {c.__name__: c for c in (QWidget, QLabel, QPushButton, QToolButton, QCheckBox, QComboBox, QProgressBar, QLineEdit,
                                     QFrame, QVBoxLayout, QHBoxLayout, QFormLayout, QGridLayout)}
CTK_CLASSES = {c.__name__: c for c in (ctkCollapsibleButton, ctkSliderWidget, ctkDirectoryButton)}
QMRML_CLASSES = {c.__name__: c for c in (qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView, qMRMLSliderWidget,
                                         qSlicerScriptedLoadableModuleWidget)}
ALL_CLASSES = {**QT_CLASSES, **CTK_CLASSES, **QMRML_CLASSES}
_LAYOUT_ONLY_PROPERTIES = {"geometry", "sizeHint", "orientation", "sizeType", "minimumSize"}


def _propertyValue(element):
    child = list(element)[0]
    tag, text = child.tag, child.text or ""
    if tag == "string":
        return text
    if tag == "bool":
        return text.strip() == "true"
    if tag == "double":
        return float(text)
    if tag == "number":
        return int(text)
    if tag == "stringlist":
        return tuple(s.text or "" for s in child.findall("string"))
    if tag == "enum" or tag == "set":
        return text
    return None  # rect, size, sizepolicy, font: layout only


class QUiLoader:
    """Builds stand-in widgets from a ``.ui`` file (see the module docstring)."""

    def load(self, qfile: QFile, parent=None):
        root = ET.parse(qfile.path).getroot()
        top = root.find("widget")
        byName: dict[str, QObject] = {}
        widget = self._build(top, parent, byName)
        for connection in root.iter("connection"):
            sender, receiver = byName[connection.findtext("sender")], byName[connection.findtext("receiver")]
            slotName = connection.findtext("slot").split("(")[0]
            sender.connect(connection.findtext("signal"), getattr(receiver, slotName))
        return widget

    def _build(self, element, parent, byName):
        className = element.get("class")
        if className not in ALL_CLASSES:
            raise RuntimeError(f"the harness has no stand-in for widget class {className}")
        widget = ALL_CLASSES[className](parent) if not issubclass(ALL_CLASSES[className], QLayout) else ALL_CLASSES[className]()
        widget.objectName = element.get("name") or ""
        byName[widget.objectName] = widget
        for prop in element.findall("property"):
            name = prop.get("name")
            if prop.get("stdset") == "0":
                widget.setProperty(name, _propertyValue(prop))
                continue
            if name in _LAYOUT_ONLY_PROPERTIES:
                continue
            value = _propertyValue(prop)
            if name not in widget._values:
                raise RuntimeError(f"{className} '{widget.objectName}': unknown property '{name}' in the .ui")
            setattr(widget, name, value)
        for layoutElement in element.findall("layout"):
            layout = ALL_CLASSES[layoutElement.get("class")](widget)
            self._buildLayout(layoutElement, widget, layout, byName)
        for childElement in element.findall("widget"):
            self._build(childElement, widget, byName)
        return widget

    def _buildLayout(self, element, owner, layout, byName):
        for item in element.findall("item"):
            for childElement in item.findall("widget"):
                layout.addWidget(self._build(childElement, owner, byName))
            for nested in item.findall("layout"):
                inner = ALL_CLASSES[nested.get("class")]()
                layout.addLayout(inner)
                self._buildLayout(nested, owner, inner, byName)
