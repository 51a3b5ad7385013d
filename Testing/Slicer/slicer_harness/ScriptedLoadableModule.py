"""``slicer.ScriptedLoadableModule`` for the harness: the four base classes of Slicer's template.

Behaviour kept from Slicer (``Base/Python/slicer/ScriptedLoadableModule.py``):

* ``ScriptedLoadableModule`` sets the default ``parent`` texts, finds the icon under
  ``Resources/Icons/<ModuleName>.png`` (stored as a path here: there is no ``qt.QIcon``), registers
  ``slicer.selfTests[<ModuleName>]`` and runs ``<ModuleName>Test`` from ``runTest(msec)``.
* ``ScriptedLoadableModuleLogic`` keeps the singleton parameter node logic: a
  ``vtkMRMLScriptedModuleNode`` with singleton tag and ``ModuleName`` attribute = module name.
* ``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` whose ``delayDisplay`` goes through
  ``slicer.util.delayDisplay`` (with ``msec < 400`` that is ``slicer.app.processEvents()``).

Not emulated: ``ScriptedLoadableModuleWidget`` needs Qt. Constructing it raises, so a test that
reaches widget code by mistake fails loudly instead of passing on a fake.
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
    """Needs Qt, which the harness does not have: constructing a widget is an error here."""

    def __init__(self, parent=None):
        raise RuntimeError("ScriptedLoadableModuleWidget needs Qt and the Slicer application; the slicer-core test harness "
                           "runs the Logic only (check the .ui statically instead)")


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
