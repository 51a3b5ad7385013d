"""Showing results: difference-map overlay, table view, Segment Editor hand-over (MRML only, no Qt).

Everything here works through MRML nodes (slice composite nodes, the layout node, the selection
node, the segment editor node), so it behaves the same in the full application, in headless
Slicer (where there are simply no slice views to update) and in the test harness.
"""

from __future__ import annotations

#: heat colour maps for the difference overlay, best first (file-based tables exist only in the
#: full application; the procedural PET-Heat and the built-in Iron table exist everywhere)
HEAT_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
#: difference (HU) mapped to the top of the colour map
DIFFERENCE_WINDOW_MAX_HU = 600.0


def heatColorNodeID(scene) -> str | None:
    for nodeID in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(nodeID) is not None:
            return nodeID
    return None


def styleDifferenceVolume(differenceNode, *, thresholdHU: float) -> None:
    """Heat colours, window 0..600 HU, voxels below ``thresholdHU`` transparent (no colour wash)."""
    display = differenceNode.GetDisplayNode()
    if display is None:
        differenceNode.CreateDefaultDisplayNodes()
        display = differenceNode.GetDisplayNode()
    scene = differenceNode.GetScene()
    colorID = heatColorNodeID(scene) if scene is not None else None
    if colorID:
        display.SetAndObserveColorNodeID(colorID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, DIFFERENCE_WINDOW_MAX_HU)
    display.SetApplyThreshold(True)
    display.SetAutoThreshold(False)
    display.SetLowerThreshold(float(thresholdHU))
    display.SetUpperThreshold(1.0e6)


def styleCtVolume(volumeNode) -> None:
    """A lung window for the CT background, so lesions read as they do on a workstation."""
    display = volumeNode.GetDisplayNode()
    if display is None:
        volumeNode.CreateDefaultDisplayNodes()
        display = volumeNode.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1500.0, -600.0)


def sliceCompositeNodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def showOverlay(scene, backgroundNode, foregroundNode, opacity: float) -> int:
    """Background CT + foreground heat map in every slice view; returns the number of views set."""
    views = sliceCompositeNodes(scene)
    for composite in views:
        composite.SetBackgroundVolumeID(backgroundNode.GetID() if backgroundNode is not None else None)
        composite.SetForegroundVolumeID(foregroundNode.GetID() if foregroundNode is not None else None)
        composite.SetForegroundOpacity(float(opacity))
    return len(views)


def setOverlayOpacity(scene, opacity: float, foregroundNode=None) -> None:
    for composite in sliceCompositeNodes(scene):
        if foregroundNode is None or composite.GetForegroundVolumeID() == foregroundNode.GetID():
            composite.SetForegroundOpacity(float(opacity))


def layoutNode(scene):
    return scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode") or (
        scene.GetNthNodeByClass(0, "vtkMRMLLayoutNode") if scene.GetNumberOfNodesByClass("vtkMRMLLayoutNode") else None)


def showTable(scene, applicationLogic, tableNode) -> None:
    """Show ``tableNode`` in the layout's table view (switching to a layout that has one)."""
    import slicer

    layout = layoutNode(scene)
    if layout is not None:
        withTable = (slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView, slicer.vtkMRMLLayoutNode.SlicerLayout3DTableView,
                     slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        if layout.GetViewArrangement() not in withTable:
            layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    if applicationLogic is not None:
        selection = applicationLogic.GetSelectionNode()
        if selection is not None:
            selection.SetActiveTableID(tableNode.GetID())
            applicationLogic.PropagateTableSelection()


def prepareSegmentEditor(scene, segmentationNode, sourceVolumeNode, selectedSegmentName: str | None = None):
    """Point the Segment Editor's parameter node at the segmentation and its CT."""
    editorNode = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    if editorNode is None:
        editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorNode.SetSingletonTag("SegmentEditor")
    editorNode.SetAndObserveSegmentationNode(segmentationNode)
    if hasattr(editorNode, "SetAndObserveSourceVolumeNode"):
        editorNode.SetAndObserveSourceVolumeNode(sourceVolumeNode)
    else:  # Slicer < 5.2
        editorNode.SetAndObserveMasterVolumeNode(sourceVolumeNode)
    if selectedSegmentName:
        sid = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(selectedSegmentName)
        if sid:
            editorNode.SetSelectedSegmentID(sid)
    return editorNode
