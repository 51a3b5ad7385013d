"""Segmentation nodes: build "Lungs" + "Lesion" from the child's masks, read masks back, ground truth.

The result is an ordinary ``vtkMRMLSegmentationNode`` whose reference geometry is the input CT,
so the Segment Editor edits it on the CT's own voxel grid and the quantification that follows
reads the edited masks. "Lesion" lies inside "Lungs"; each segment has its own labelmap layer,
so they may overlap.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from . import volumeio

LUNGS_NAME = "Lungs"
LESION_NAME = "Lesion"
#: sensible colours: lungs pale blue (mostly outline), lesion an opaque warm red
LUNGS_COLOR = (0.45, 0.70, 0.95)
LESION_COLOR = (0.93, 0.20, 0.12)
LUNGS_FILL_OPACITY = 0.10
LESION_FILL_OPACITY = 0.60

#: segment names taken as lesion in a ground-truth segmentation (else all its segments are used)
GROUND_TRUTH_LESION_PATTERN = re.compile(r"lesion|infect|covid|ggo|ground.?glass|consolid|opacit|mask", re.IGNORECASE)


def newOrientedMask(referenceNode):
    """An empty uint8 ``vtkOrientedImageData`` on the reference grid and a ``[k, j, i]`` numpy view of it."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    ni, nj, nk = volumeio.dimensions(referenceNode)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    m = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    return image, numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)


def orientedMaskFromFile(path, referenceNode):
    """Read a 0/1 mask file (on the reference grid) straight into a labelmap image: ``(image, view)``."""
    image, view = newOrientedMask(referenceNode)
    volumeio.readNiftiInto(path, referenceNode, view)
    np.minimum(view, 1, out=view)
    return image, view


def _orientedImageFromMask(mask_kji: np.ndarray, referenceNode):
    image, view = newOrientedMask(referenceNode)
    if view.shape != mask_kji.shape:
        raise ValueError(f"mask shape {mask_kji.shape} differs from the reference grid {view.shape}")
    view[...] = mask_kji
    return image


def createSegmentationNode(scene, name: str, referenceNode, masks: list[tuple[str, Any, tuple[float, float, float]]]):
    """A new segmentation node on ``referenceNode``'s geometry with one segment per ``(name, mask, colour)``;
    ``mask`` is a ``[k, j, i]`` array or a ``vtkOrientedImageData`` on that geometry.

    On error the node is removed again: nothing partial remains in the scene.
    """
    import slicer

    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    try:
        node.CreateDefaultDisplayNodes()
        # the transform first: the reference geometry is computed in the segmentation's own frame
        # (set before, it would include the CT's transform and the stored grid would be shifted)
        node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity2DFill(1.0)  # the per-segment opacities below are the effective ones
            display.SetSliceIntersectionThickness(2)  # outlines readable on a 512 x 512 slice
        for segmentName, mask, color in masks:
            image = mask if isinstance(mask, slicer.vtkOrientedImageData) else _orientedImageFromMask(mask, referenceNode)
            segmentId = node.AddSegmentFromBinaryLabelmapRepresentation(image, segmentName, list(color))
            if not segmentId:
                raise RuntimeError(f"could not add segment '{segmentName}'")
            if display is not None:
                fill = LUNGS_FILL_OPACITY if segmentName == LUNGS_NAME else LESION_FILL_OPACITY
                display.SetSegmentOpacity2DFill(segmentId, fill)
                display.SetSegmentOpacity2DOutline(segmentId, 1.0)
    except Exception:
        volumeio.removeNode(scene, node)
        raise
    return node


def segmentId(segmentationNode, segmentName: str) -> str:
    segmentation = segmentationNode.GetSegmentation()
    sid = segmentation.GetSegmentIdBySegmentName(segmentName)
    if not sid:
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment named '{segmentName}' (it has {names})")
    return sid


def segmentMask(segmentationNode, segmentName: str, referenceNode) -> np.ndarray:
    """Binary ``[k, j, i]`` mask of a segment on ``referenceNode``'s grid, as the segment is now (after edits).

    Resampled in memory (``vtkOrientedImageDataResample``, nearest neighbour): the labelmap is
    taken in the segmentation's own frame and mapped once into the reference's frame (the
    transform between their parent transforms; identity when they share one). Unlike ``slicer.util.arrayFromSegmentBinaryLabelmap`` this adds no temporary node to
    the scene (that function leaves a labelmap display node behind on every call).
    """
    sid = segmentId(segmentationNode, segmentName)
    return _segmentsOnReference(segmentationNode, [sid], referenceNode)


def _transformToReference(node, referenceNode):
    """Transform from ``node``'s coordinate frame to ``referenceNode``'s (None if identical)."""
    import slicer
    import vtk

    a, b = node.GetParentTransformNode(), referenceNode.GetParentTransformNode()
    if (a.GetID() if a is not None else None) == (b.GetID() if b is not None else None):
        return None  # the same frame (no transform, or both under the same transform node)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(a, b, transform)
    return transform


def _resampleToReference(image, referenceNode, transform) -> np.ndarray:
    """Nearest-neighbour resampling of an oriented image onto the reference grid -> ``[k, j, i]`` array."""
    import slicer
    from vtk.util import numpy_support

    reference = _referenceOriented(referenceNode)
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, output, False, False,
                                                                                             transform):
        raise RuntimeError("resampling onto the CT grid failed")
    ni, nj, nk = volumeio.dimensions(referenceNode)
    extent = output.GetExtent()
    if tuple(extent) != (0, ni - 1, 0, nj - 1, 0, nk - 1):
        raise RuntimeError(f"resampled extent {tuple(extent)} does not match the CT grid {(ni, nj, nk)}")
    return numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(nk, nj, ni).copy()


def _segmentsOnReference(segmentationNode, segmentIds, referenceNode) -> np.ndarray:
    """Union of segments as a boolean ``[k, j, i]`` mask on the reference grid."""
    import slicer

    transform = _transformToReference(segmentationNode, referenceNode)
    union = None
    for sid in segmentIds:
        image = slicer.vtkOrientedImageData()
        # applyParentTransform=False: the transform to the reference frame is applied once, below
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, sid, image, False):
            raise RuntimeError(f"segment '{sid}' of '{segmentationNode.GetName()}' has no binary labelmap")
        dims = image.GetDimensions()
        if min(dims) <= 0 or image.GetPointData().GetScalars() is None:
            mask = np.zeros(tuple(reversed(volumeio.dimensions(referenceNode))), dtype=bool)
        else:
            mask = _resampleToReference(image, referenceNode, transform) > 0
        union = mask if union is None else (union | mask)
    if union is None:
        union = np.zeros(tuple(reversed(volumeio.dimensions(referenceNode))), dtype=bool)
    return union


def _rasBounds(node) -> np.ndarray:
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return np.asarray(bounds, dtype=np.float64)


def _boundsValid(b: np.ndarray) -> bool:
    return bool(np.all(b[0::2] <= b[1::2]))


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(np.maximum(a[0::2], b[0::2]) <= np.minimum(a[1::2], b[1::2])))


def groundTruthMask(groundTruthNode, referenceNode) -> tuple[np.ndarray, dict[str, Any]]:
    """A ground-truth lesion mask on the reference CT's grid, and how it was obtained.

    Accepts a labelmap volume (every label > 0 is lesion) or a segmentation (segments whose name
    looks like a lesion - "Lesion", "infection", "GGO", ... - or else all its segments). A ground
    truth on another grid is **resampled** (nearest neighbour) onto the CT's grid; one that does
    not overlap the CT at all is **refused** (it belongs to another image or coordinate system).

    Returns:
        ``(mask [k, j, i] bool, info)`` with ``info`` keys ``resampled`` (bool), ``segments``
        (names used), ``source`` (node name).
    """
    import slicer

    if groundTruthNode is None:
        raise ValueError("No ground truth is selected: choose a segmentation or labelmap volume with the true lesions.")
    name = groundTruthNode.GetName()
    isLabelmap = groundTruthNode.IsA("vtkMRMLLabelMapVolumeNode")
    isSegmentation = groundTruthNode.IsA("vtkMRMLSegmentationNode")
    if not (isLabelmap or isSegmentation):
        raise ValueError(f"Ground truth '{name}' is a {groundTruthNode.GetClassName()}: use a segmentation or a labelmap volume.")
    info: dict[str, Any] = {"source": name, "resampled": False, "segments": []}
    referenceBounds = _rasBounds(referenceNode)

    if isLabelmap:
        if groundTruthNode.GetImageData() is None:
            raise ValueError(f"Ground truth '{name}' has no voxel data.")
        if volumeio.sameGeometry(groundTruthNode, referenceNode):
            return slicer.util.arrayFromVolume(groundTruthNode) > 0, info
        if not _overlap(_rasBounds(groundTruthNode), referenceBounds):
            raise ValueError(_noOverlapMessage(name, referenceNode.GetName()))
        info["resampled"] = True
        # the labelmap's grid expressed in the CT's frame (its parent transform and the inverse of the
        # CT's are applied here); no further transform when resampling
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
            groundTruthNode, referenceNode.GetParentTransformNode())
        return _resampleToReference(image, referenceNode, None) > 0, info

    segmentation = groundTruthNode.GetSegmentation()
    n = segmentation.GetNumberOfSegments()
    if n == 0:
        raise ValueError(f"Ground truth '{name}' has no segments.")
    segments = [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName()) for i in range(n)]
    chosen = [(sid, sname) for sid, sname in segments if GROUND_TRUTH_LESION_PATTERN.search(sname or "")] or segments
    info["segments"] = [sname for _, sname in chosen]
    gtBounds = _rasBounds(groundTruthNode)
    if _boundsValid(gtBounds) and not _overlap(gtBounds, referenceBounds):
        raise ValueError(_noOverlapMessage(name, referenceNode.GetName()))
    geometry = groundTruthNode.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    info["resampled"] = bool(geometry) and geometry != slicer.vtkSegmentationConverter.SerializeImageGeometry(_referenceOriented(referenceNode))
    return _segmentsOnReference(groundTruthNode, [sid for sid, _ in chosen], referenceNode), info


def _referenceOriented(referenceNode):
    import slicer
    import vtk

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*volumeio.dimensions(referenceNode))
    m = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    return image


def _noOverlapMessage(gtName: str, ctName: str) -> str:
    return (f"Ground truth '{gtName}' does not overlap the CT volume '{ctName}' anywhere: it belongs to another image or "
            "coordinate system, so it was not compared. Load the ground truth that goes with this CT.")
