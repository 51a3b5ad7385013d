"""A stand-in Segment Editor module for the harness (no Qt, no effects), over real MRML nodes.

Follows ``Modules/Scripted/SegmentEditor/SegmentEditor.py`` (v5.6.0): the module widget uses the
scene's singleton ``vtkMRMLSegmentEditorNode`` tagged "SegmentEditor" (created when missing) and
on ``enter()`` reads it; when that node has no segmentation it takes the scene's first
segmentation. The editor (``qMRMLSegmentEditorWidget``) keeps its state in that node:
``setSegmentationNode`` / ``setSourceVolumeNode`` / ``setCurrentSegmentID`` write it, the getters
read it; a new segmentation whose segments do not include the selected one selects its first
segment (as the segments table does). Not covered: effects, undo, views, masking settings.
"""

from __future__ import annotations

import slicer

from . import widgets


class qMRMLSegmentEditorWidget(widgets.qMRMLWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        object.__setattr__(self, "_node", None)

    def setMRMLSegmentEditorNode(self, node) -> None:
        object.__setattr__(self, "_node", node)

    def mrmlSegmentEditorNode(self):
        return self._node

    def _need(self):
        if self._node is None:
            raise RuntimeError("qMRMLSegmentEditorWidget: no segment editor node")
        return self._node

    def setSegmentationNode(self, node) -> None:
        editorNode = self._need()
        editorNode.SetAndObserveSegmentationNode(node)
        selected = editorNode.GetSelectedSegmentID()
        segmentation = node.GetSegmentation() if node is not None else None
        if segmentation is not None and (not selected or segmentation.GetSegment(selected) is None):
            editorNode.SetSelectedSegmentID(segmentation.GetNthSegmentID(0) if segmentation.GetNumberOfSegments() else None)

    def segmentationNode(self):
        return self._need().GetSegmentationNode()

    def segmentationNodeID(self) -> str:
        node = self.segmentationNode()
        return node.GetID() if node is not None else ""

    def setSourceVolumeNode(self, node) -> None:
        self._need().SetAndObserveSourceVolumeNode(node)

    def sourceVolumeNode(self):
        return self._need().GetSourceVolumeNode()

    def sourceVolumeNodeID(self) -> str:
        node = self.sourceVolumeNode()
        return node.GetID() if node is not None else ""

    def setSourceVolumeNodeID(self, nodeId) -> None:
        self.setSourceVolumeNode(slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None)

    def setCurrentSegmentID(self, segmentId: str) -> None:
        self._need().SetSelectedSegmentID(segmentId)

    def currentSegmentID(self) -> str:
        return self._need().GetSelectedSegmentID() or ""

    def updateWidgetFromMRML(self) -> None:
        pass

    def turnOffLightboxes(self) -> bool:
        return False

    def installKeyboardShortcuts(self) -> None:
        pass

    def uninstallKeyboardShortcuts(self) -> None:
        pass

    def setActiveEffect(self, effect) -> None:
        pass

    def removeViewObservations(self) -> None:
        pass


class SegmentEditorWidget:
    """``SegmentEditor.SegmentEditorWidget``: ``editor``, ``selectParameterNode``, ``enter``, ``exit``."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.parameterSetNode = None
        self.editor = qMRMLSegmentEditorWidget()
        self.selectParameterNode()
        self.editor.setMRMLScene(slicer.mrmlScene)

    def selectParameterNode(self) -> None:
        node = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SegmentEditor")
            node = slicer.mrmlScene.AddNode(node)
        if self.parameterSetNode is node:
            return
        self.parameterSetNode = node
        self.editor.setMRMLSegmentEditorNode(node)

    def enter(self) -> None:
        self.selectParameterNode()
        self.editor.updateWidgetFromMRML()
        if not self.editor.segmentationNodeID():
            segmentationNode = slicer.mrmlScene.GetFirstNode(None, "vtkMRMLSegmentationNode")
            if not segmentationNode:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            self.editor.setSegmentationNode(segmentationNode)

    def exit(self) -> None:
        self.editor.setActiveEffect(None)
