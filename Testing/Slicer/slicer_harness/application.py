"""The application layer that the ``slicer-core`` wheel lacks: ``slicer.app``, ``slicer.mrmlScene``,
``slicer.modules``, the module logics, the standard slice views, and loading a scripted module.

What is real: the MRML scene, every node, the application logic (``vtkSlicerApplicationLogic``),
the Volumes / Segmentations / Colors / Tables / SubjectHierarchy module logics, slice logics with
their slice and composite nodes (as the layout manager creates them for Red, Yellow and Green),
the layout node, ``slicer.util`` itself, and the module's own code.

What is emulated, and how:

* ``slicer.app`` behaves like the application started with ``--testing`` and
  ``--no-main-window`` by default: ``testingEnabled()`` is True (message boxes are logged, not
  shown, as in Slicer's own test runs), ``layoutManager()`` is None, ``processEvents()`` does
  nothing (there is no event loop), ``temporaryPath`` is a folder the tests choose. Tests switch
  testing mode off (``app.setTestingEnabled(False)``) and give it a main window
  (``Harness.setMainWindow(True)``: message boxes shown and recorded, module selector).
* The emulated release is Slicer 5.6 unless a test calls ``Harness.emulate((5, 8))`` / ``(5, 10)``.
* ``slicer.modules.<name>`` are small module objects with ``logic()``, ``name``, ``path`` and a
  widget representation created on first use (``Harness.createModuleWidget``); a loaded scripted
  module also gets ``slicer.modules.<Name>Instance`` like in Slicer.
* ``qt`` / ``ctk``: stub modules giving the stand-in widgets of :mod:`.widgets`; any other class
  raises when used. The harness records each use, so a test can assert that the Logic never
  needed Qt.

Slicer file followed: the application behaviour of ``qSlicerApplication`` /
``qSlicerScriptedLoadableModuleWidget`` in a ``--testing`` session (v5.6.0); see
``Testing/Slicer/README.md`` for what is not covered.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import tempfile
import types
from pathlib import Path

log = logging.getLogger(__name__)


class QtUnavailable(RuntimeError):
    """Raised when code under test reaches for Qt, which the harness does not have."""


class _QtStubModule(types.ModuleType):
    """``qt`` / ``ctk`` stand-in module: the stand-in classes of :mod:`.widgets` where the harness
    has one, else a class that raises when used. Every attribute access is recorded, so a test can
    assert that the Logic never touched Qt."""

    def __init__(self, name: str, usage: list[str], classes: dict) -> None:
        super().__init__(name)
        self.__dict__["_usage"] = usage
        self.__dict__["_classes"] = classes
        self.__file__ = f"<slicer-harness {name} stub>"

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        usage = self.__dict__["_usage"]
        qualified = f"{self.__name__}.{attr}"
        usage.append(qualified)
        if attr in self.__dict__["_classes"]:
            return self.__dict__["_classes"][attr]

        class _Unavailable:
            def __init__(self, *args, **kwargs):
                raise QtUnavailable(f"{qualified} is not available in the slicer-core test harness (no stand-in)")

            def __class_getitem__(cls, item):
                return cls

        _Unavailable.__name__ = attr
        _Unavailable.__qualname__ = qualified
        return _Unavailable


class _CommandOptions:
    def __init__(self) -> None:
        self.testingEnabled = True
        self.noMainWindow = True
        self.runPythonAndExit = False


class _ModuleManager:
    def __init__(self, modules: "_Modules") -> None:
        self._modules = modules
        self._slots: dict[str, list] = {}

    def module(self, name: str):
        return self._modules.byName(name)

    def factoryManager(self):
        return self

    def loadedModuleNames(self) -> list[str]:
        return self._modules.names()

    def connect(self, signal: str, slot) -> bool:
        self._slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal: str, slot) -> bool:
        slots = self._slots.get(signal, [])
        if slot in slots:
            slots.remove(slot)
        return True

    def emit(self, signal: str, *args) -> None:
        for slot in list(self._slots.get(signal, [])):
            slot(*args)


class _ModuleSelector:
    def __init__(self, harness: "Harness") -> None:
        self._harness = harness

    def selectModule(self, name: str) -> None:
        self._harness.selectModule(name)


class LoadableModule:
    """A loaded module as ``slicer.modules.<name>`` exposes it (logic, name, path, title)."""

    def __init__(self, name: str, logic=None, path: str = "", title: str | None = None) -> None:
        self.name = name
        self.title = title or name
        self.path = path
        self._logic = logic
        self.categories: list[str] = []
        self.dependencies: list[str] = []
        self.contributors: list[str] = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.icon = None
        self.isEntered = False
        self._panel = None
        self._widgetFactory = None

    def logic(self):
        return self._logic

    def widgetRepresentation(self):
        """The module panel, created on first use as Slicer does (None for modules without one)."""
        if self._panel is None and self._widgetFactory is not None:
            self._panel = self._widgetFactory()
        return self._panel

    def createNewWidgetRepresentation(self):
        return self._widgetFactory() if self._widgetFactory is not None else None


class _Modules(types.SimpleNamespace):
    """``slicer.modules``: attributes by lower-case module name, plus ``<Name>Instance``."""

    def byName(self, name: str):
        for value in vars(self).values():
            if isinstance(value, LoadableModule) and value.name == name:
                return value
        return None

    def names(self) -> list[str]:
        return [v.name for v in vars(self).values() if isinstance(v, LoadableModule)]


class FakeApplication:
    """``slicer.app`` of a ``--testing --no-main-window`` session (see the module docstring)."""

    applicationName = "3D Slicer (slicer-core test harness)"
    #: the emulated release (see :meth:`Harness.emulate`); the oldest supported one by default
    applicationVersion = "5.6.0"
    majorVersion, minorVersion = 5, 6
    documentationBaseUrl = "https://slicer.readthedocs.io/en/latest/"

    def __init__(self, scene, applicationLogic, modules: _Modules, temporaryPath: Path) -> None:
        self._scene = scene
        self._applicationLogic = applicationLogic
        self._modules = modules
        self._moduleManager = _ModuleManager(modules)
        self._commandOptions = _CommandOptions()
        self.temporaryPath = str(temporaryPath)
        self.processEventsCalls = 0
        self.startupCompletedCallbacks: list = []
        self.mainWindowWidget = None  # --no-main-window

    def testingEnabled(self) -> bool:
        return self._commandOptions.testingEnabled

    def setTestingEnabled(self, enabled: bool) -> None:
        """``--testing`` on (message boxes logged) or off (boxes shown: the stand-in records them)."""
        self._commandOptions.testingEnabled = bool(enabled)

    def topLevelWidgets(self) -> list:
        return [self.mainWindowWidget] if self.mainWindowWidget is not None else []

    def commandOptions(self) -> _CommandOptions:
        return self._commandOptions

    def mrmlScene(self):
        return self._scene

    def applicationLogic(self):
        return self._applicationLogic

    def moduleManager(self) -> _ModuleManager:
        return self._moduleManager

    def layoutManager(self):
        return None  # no main window

    def processEvents(self) -> None:
        self.processEventsCalls += 1

    def pauseRender(self) -> None:
        pass

    def resumeRender(self) -> None:
        pass

    def moduleDocumentationUrl(self, moduleName: str) -> str:
        return self.documentationBaseUrl + f"user_guide/modules/{moduleName.lower()}.html"

    def connect(self, signal: str, callback) -> bool:
        if signal == "startupCompleted()":
            self.startupCompletedCallbacks.append(callback)
        return True

    def setOverrideCursor(self, *args) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def exit(self, status: int = 0) -> None:
        raise SystemExit(status)


class Harness:
    """One emulated application per process (``slicer.app`` etc. are globals, as in Slicer)."""

    SLICE_VIEWS = ("Red", "Yellow", "Green")

    def __init__(self, temporaryPath: Path | None = None) -> None:
        import slicer
        import vtk

        self.slicer = slicer
        self.qtUsage: list[str] = []
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self._sliceLogicCollection = vtk.vtkCollection()
        self.applicationLogic.SetSliceLogics(self._sliceLogicCollection)
        self._viewLogicCollection = vtk.vtkCollection()
        self.applicationLogic.SetViewLogics(self._viewLogicCollection)
        self._homeDirectory = tempfile.mkdtemp(prefix="slicer-harness-home-")
        self.applicationLogic.SetHomeDirectory(self._homeDirectory)
        self.applicationLogic.SetShareDirectory("share/Slicer-5.11")
        (Path(self._homeDirectory) / "share" / "Slicer-5.11" / "ColorFiles").mkdir(parents=True)  # no file colour tables here
        self._ownedFolders = [self._homeDirectory]
        if temporaryPath is None:
            temporaryPath = tempfile.mkdtemp(prefix="slicer-harness-tmp-")
            self._ownedFolders.append(temporaryPath)
        self.temporaryPath = Path(temporaryPath)
        self.temporaryPath.mkdir(parents=True, exist_ok=True)

        self.modules = _Modules()
        self.moduleLogics = {}
        for name, className in (("Colors", "vtkSlicerColorLogic"), ("Volumes", "vtkSlicerVolumesLogic"),
                                ("Segmentations", "vtkSlicerSegmentationsModuleLogic"), ("Tables", "vtkSlicerTablesLogic"),
                                ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic")):
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            logic.SetMRMLScene(self.scene)
            self.applicationLogic.SetModuleLogic(name, logic)
            if name == "Colors":
                self.applicationLogic.SetColorLogic(logic)
            self.moduleLogics[name] = logic
            setattr(self.modules, name.lower(), LoadableModule(name, logic))

        # the layout node with Slicer's standard layouts and the three slice views of the
        # four-up layout, with their slice logics (what qSlicerLayoutManager creates)
        self.layoutLogic = slicer.vtkMRMLLayoutLogic()
        self.layoutLogic.SetMRMLScene(self.scene)
        self.layoutNode = self.layoutLogic.GetLayoutNode()
        self.layoutNode.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        self.sliceLogics = {}
        for name in self.SLICE_VIEWS:
            sliceLogic = slicer.vtkMRMLSliceLogic()
            sliceLogic.SetMRMLApplicationLogic(self.applicationLogic)
            sliceLogic.SetMRMLScene(self.scene)
            sliceNode = self.scene.GetSingletonNode(name, "vtkMRMLSliceNode")  # created by the layout logic
            if sliceNode is not None:
                sliceLogic.SetSliceNode(sliceNode)
            else:
                sliceLogic.AddSliceNode(name)
            self._sliceLogicCollection.AddItem(sliceLogic)
            self.sliceLogics[name] = sliceLogic

        self.app = FakeApplication(self.scene, self.applicationLogic, self.modules, self.temporaryPath)
        self.currentModuleWidget = None

    # -- installation into the ``slicer`` namespace --------------------------------------------
    def install(self) -> "Harness":
        from . import ScriptedLoadableModule, i18n, parameterNodeWrapper

        slicer = self.slicer
        slicer.app = self.app
        slicer.mrmlScene = self.scene
        slicer.modules = self.modules
        slicer.selfTests = getattr(slicer, "selfTests", {})
        for name, module in (("ScriptedLoadableModule", ScriptedLoadableModule), ("parameterNodeWrapper", parameterNodeWrapper),
                             ("i18n", i18n)):
            sys.modules[f"slicer.{name}"] = module
            setattr(slicer, name, module)
        from . import widgets

        for name, classes in (("qt", {**widgets.QT_CLASSES, **{c.__name__: c for c in (
                widgets.Qt, widgets.QTimer, widgets.QSettings, widgets.QFile, widgets.QUiLoader, widgets.QMessageBox, widgets.QObject)}}),
                              ("ctk", {**widgets.CTK_CLASSES, "ctkMessageBox": widgets.ctkMessageBox})):
            if name not in sys.modules or isinstance(sys.modules[name], _QtStubModule):
                sys.modules[name] = _QtStubModule(name, self.qtUsage, classes)
        for name, cls in widgets.QMRML_CLASSES.items():
            setattr(slicer, name, cls)
        # other widget classes Slicer's Python code names (parameterNodeWrapper v5.10 GUI connectors): present
        # as names, unusable as in the qt / ctk stubs
        for name in ("qMRMLRangeWidget", "qMRMLSpinBox", "qSlicerWidget"):
            if not hasattr(slicer, name):
                setattr(slicer, name, _QtStubModule("slicer", [], {}).__getattr__(name))
        return self

    # -- emulated release, testing mode, main window -------------------------------------------
    def emulate(self, version: tuple[int, int]) -> "Harness":
        """Behave as Slicer ``major.minor`` (5.6, 5.8 or 5.10) where the fakes differ between them."""
        if tuple(version) not in ((5, 6), (5, 8), (5, 10)):
            raise ValueError(f"unsupported Slicer version {version}")
        self.app.majorVersion, self.app.minorVersion = version
        self.app.applicationVersion = f"{version[0]}.{version[1]}.0"
        return self

    def setMainWindow(self, present: bool) -> None:
        """A main window (message boxes shown when testing is off) or none (``--no-main-window``)."""
        from . import widgets

        if present:
            window = widgets.qSlicerMainWindow()
            window.objectName = "qSlicerMainWindow"
            window.setModuleSelector(_ModuleSelector(self))
            self.app.mainWindowWidget = window
        else:
            self.app.mainWindowWidget = None

    # -- module widgets ------------------------------------------------------------------------
    def _panelFor(self, widgetClass):
        """What ``qSlicerScriptedLoadableModuleWidget`` does: a panel widget (with ``isEntered``) as
        parent, the Python ``<Name>Widget(parent)``, then its ``setup()``."""
        from . import widgets

        panel = widgets.qSlicerScriptedLoadableModuleWidget()
        panel.setLayout(widgets.QVBoxLayout())
        panel.setMRMLScene(self.scene)
        widget = widgetClass(panel)
        panel.setPythonWidget(widget)
        widget.setup()
        return panel

    def createModuleWidget(self, pythonModule, name: str):
        """The module's panel as Slicer creates it when the module is first shown; returns the Python widget."""
        module = self.modules.byName(name)
        module._widgetFactory = lambda: self._panelFor(getattr(pythonModule, f"{name}Widget"))
        module._panel = None
        return module.widgetRepresentation().self()

    def addSegmentEditorModule(self) -> None:
        """A stand-in Segment Editor module (see :mod:`.segmentEditor`)."""
        from . import segmentEditor

        module = LoadableModule("SegmentEditor", title="Segment Editor")

        def factory():
            from . import widgets

            panel = widgets.qSlicerScriptedLoadableModuleWidget()
            panel.setLayout(widgets.QVBoxLayout())
            panel.setPythonWidget(segmentEditor.SegmentEditorWidget(panel))
            return panel

        module._widgetFactory = factory
        self.modules.segmenteditor = module

    def enterModule(self, widget) -> None:
        widget.parent.isEntered = True
        widget.enter()
        self.currentModuleWidget = widget

    def exitModule(self, widget) -> None:
        widget.exit()
        widget.parent.isEntered = False
        if self.currentModuleWidget is widget:
            self.currentModuleWidget = None

    def selectModule(self, name: str) -> None:
        """The main window's module selector: exit the shown module, show (create) and enter ``name``."""
        module = self.modules.byName(name)
        if module is None:
            raise RuntimeError(f"no module named {name}")
        widget = module.widgetRepresentation().self()
        if self.currentModuleWidget is not None and self.currentModuleWidget is not widget:
            self.exitModule(self.currentModuleWidget)
        self.enterModule(widget)

    def unloadModule(self, name: str) -> None:
        self.app.moduleManager().emit("moduleAboutToBeUnloaded(QString)", name)

    # -- scripted modules ----------------------------------------------------------------------
    def loadScriptedModule(self, moduleFile: str | Path):
        """Import a scripted module file and instantiate its module class, as Slicer's module factory does.

        The module's folder goes on ``sys.path`` (so its helper packages import), the module
        object is registered as ``slicer.modules.<name lower>`` and the Python instance as
        ``slicer.modules.<Name>Instance``. Returns the imported Python module.
        """
        moduleFile = Path(moduleFile).resolve()
        name = moduleFile.stem
        folder = str(moduleFile.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "")).resolve() == moduleFile:
            pythonModule = sys.modules[name]
        else:
            spec = importlib.util.spec_from_file_location(name, moduleFile)
            pythonModule = importlib.util.module_from_spec(spec)
            sys.modules[name] = pythonModule
            spec.loader.exec_module(pythonModule)
        parent = LoadableModule(name, path=str(moduleFile))
        instance = getattr(pythonModule, name)(parent)
        setattr(self.modules, name.lower(), parent)
        setattr(self.modules, f"{name}Instance", instance)
        return pythonModule

    def shutdown(self) -> None:
        """Tear down in a fixed order at exit (like the application does): scene emptied, logics
        detached, then the scene itself. Left to Python's garbage collector, the VTK objects are
        destroyed in arbitrary order and the interpreter can crash on exit."""
        try:
            self.scene.Clear(1)
            for sliceLogic in self.sliceLogics.values():
                sliceLogic.SetMRMLScene(None)
            self._sliceLogicCollection.RemoveAllItems()
            for name in sorted(self.moduleLogics, key=lambda n: n == "SubjectHierarchy"):
                self.moduleLogics[name].SetMRMLScene(None)  # subject hierarchy last: the others query it
            self.layoutLogic.SetMRMLScene(None)
            self.applicationLogic.SetMRMLScene(None)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.exception("harness shutdown")
        for name in ("app", "mrmlScene", "modules"):  # noqa: B007
            if getattr(self.slicer, name, None) is not None:
                setattr(self.slicer, name, None)
        self.sliceLogics.clear()
        self.moduleLogics.clear()
        for folder in self._ownedFolders:
            shutil.rmtree(folder, ignore_errors=True)

    def reset(self) -> None:
        """``slicer.mrmlScene.Clear()`` as Slicer's tests do between cases (keeps singletons); back to
        the defaults: Slicer 5.6, testing mode, no main window."""
        self.scene.Clear(0)
        self.emulate((5, 6))
        self.app.setTestingEnabled(True)
        self.setMainWindow(False)
        self.currentModuleWidget = None
        from . import widgets

        del widgets.QMessageBox.shown[:]
        del widgets.QMessageBox._answers[:]

    def userNodeCount(self) -> int:
        return self.scene.GetNumberOfNodes()


_harness: Harness | None = None


def install(temporaryPath: Path | None = None) -> Harness:
    """Create (once per process) and install the harness; returns it."""
    global _harness
    if _harness is None:
        import atexit

        _harness = Harness(temporaryPath).install()
        atexit.register(_harness.shutdown)
    elif temporaryPath is not None:
        _harness.app.temporaryPath = str(temporaryPath)
    return _harness


def slicerCoreAvailable() -> bool:
    try:
        import slicer  # noqa: F401

        return hasattr(slicer, "vtkMRMLScene")
    except Exception:  # noqa: BLE001 - an undefined symbol from a mismatched vtk raises ImportError or OSError
        return False
