"""``slicer.ScriptedLoadableModule`` for the harness: the four base classes of Slicer's template.

Behaviour kept from Slicer (``Base/Python/slicer/ScriptedLoadableModule.py``):

* ``ScriptedLoadableModule`` sets the default ``parent`` texts, finds the icon under
  ``Resources/Icons/<ModuleName>.png`` (stored as a path here: there is no ``qt.QIcon``), registers
  ``slicer.selfTests[<ModuleName>]`` and runs ``<ModuleName>Test`` from ``runTest(msec)``.
* ``ScriptedLoadableModuleLogic`` keeps the singleton parameter node logic: a
  ``vtkMRMLScriptedModuleNode`` with singleton tag and ``ModuleName`` attribute = module name.
* ``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` whose ``delayDisplay`` goes through
  ``slicer.util.delayDisplay`` (with ``msec < 400`` that is ``slicer.app.processEvents()``).

* ``ScriptedLoadableModuleWidget`` builds its panel from the stand-in widgets of :mod:`.widgets`.

Not emulated: the developer section (Reload / Test / Edit buttons).
"""

from __future__ import annotations

import importlib
import logging
import os
import unittest

import slicer

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"]


class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
        parent.helpText = "This module was created from a template and the help section has not yet been updated."
        parent.acknowledgementText = "This work is supported by NA-MIC, NAC, BIRN, NCIGT, and the Slicer Community."
        moduleDir = os.path.dirname(self.parent.path)
        for extension in (".svg", ".png"):
            iconPath = os.path.join(moduleDir, "Resources/Icons", self.moduleName + extension)
            if os.path.isfile(iconPath):
                parent.icon = iconPath  # qt.QIcon(iconPath) in Slicer
                break
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def getDefaultModuleDocumentationLink(self, docPage=None):
        url = slicer.app.documentationBaseUrl + (docPage or "")
        return f'<p>For more information see the <a href="{url}">online documentation</a>.</p>'

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        className = self.moduleName + "Test"
        try:
            testCaseClass = getattr(module, className)
        except AttributeError as exc:
            raise AssertionError(f"Test case class not found: {self.__module__}.{className} ") from exc
        testCase = testCaseClass()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    """The Widget base class over the stand-in widgets of :mod:`.widgets` (Slicer v5.6.0 behaviour).

    As in Slicer: without a parent it creates a ``qMRMLWidget`` with a ``QVBoxLayout``, gives it
    the scene, calls ``setup()`` and shows it; ``resourcePath`` resolves through the module's
    path; ``moduleAboutToBeUnloaded(QString)`` of the module manager calls ``cleanup()``; the
    developer section is absent (``Developer/DeveloperMode`` is false in a fresh profile).
    The application calls ``enter()`` / ``exit()``; tests do that through
    :meth:`Harness.enterModule` / :meth:`Harness.exitModule`.
    """

    def __init__(self, parent=None):
        import qt

        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        if not parent:
            self.parent = slicer.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def resourcePath(self, filename):
        scriptedModulesPath = os.path.dirname(slicer.util.modulePath(self.moduleName))
        return os.path.join(scriptedModulesPath, "Resources", filename)

    def cleanup(self):
        pass

    def _onModuleAboutToBeUnloaded(self, moduleName):
        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def setupDeveloperSection(self):
        if self.developerMode:
            raise RuntimeError("the harness has no developer section (Reload and Test)")

    def setup(self):
        self.setupDeveloperSection()

    def enter(self):
        pass

    def exit(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if parameterNode:
                if parameterNode.GetAttribute("ModuleName") != self.moduleName:
                    parameterNode.SetAttribute("ModuleName", self.moduleName)
                return parameterNode
        else:
            for nodeIndex in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                parameterNode = slicer.mrmlScene.GetNthNodeByClass(nodeIndex, "vtkMRMLScriptedModuleNode")
                if parameterNode.GetAttribute("ModuleName") == self.moduleName:
                    return parameterNode
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def getAllParameterNodes(self):
        found = []
        for nodeIndex in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            parameterNode = slicer.mrmlScene.GetNthNodeByClass(nodeIndex, "vtkMRMLScriptedModuleNode")
            if parameterNode.GetAttribute("ModuleName") == self.moduleName:
                found.append(parameterNode)
        return found

    def createParameterNode(self):
        if slicer.mrmlScene is None:
            return None
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        super(unittest.TestCase, self).__init__()
        self.enableScreenshots = False
        self.screenshotScaleFactor = 1.0

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        if hasattr(self, "messageDelay"):
            msec = self.messageDelay
        if msec is None:
            msec = requestedDelay
        if msec is None:
            msec = 100
        slicer.util.delayDisplay(message, msec)

    def takeScreenshot(self, name, description, type=-1):
        self.delayDisplay(description)
        if self.enableScreenshots:
            raise RuntimeError("screenshots need the Slicer application's views")

    def runTest(self):
        logging.warning("No test is defined in " + self.__class__.__name__)
