"""The radiologist's correction round trip: the AI result kept, compared with the corrected one, exported.

* :func:`storeAIResult` keeps the "Lesion" mask as the AI produced it, as a hidden labelmap on the
  CT's grid referenced by the segmentation node (role :data:`AI_RESULT_ROLE`), so that edits in
  the Segment Editor can later be compared with it (it is saved with the scene).
* :func:`reviewRow` measures what the correction changed: mL added and removed, Dice between the
  AI and the corrected lesion, and the number of lesion components (6-connected, as the
  library's lung mask) before and after.
* :func:`exportLesionMask` writes the corrected "Lesion" segment as a 0/1 NIfTI mask on the CT's
  own voxel grid (the CT node's IJK-to-RAS matrix, the grid of the CT file it was loaded from),
  named ``study_XXXX_mask.nii.gz`` as in MosMedData's ``masks/`` folder, so the library's
  ``evaluate`` and MosMed-layout readers take it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from . import segmentations, volumeio

#: node reference role from the segmentation node to its AI result labelmap
AI_RESULT_ROLE = "CovidGANSegAIResult"

REVIEW_COLUMNS: list = [
    ("Segmentation", "string", "", "segmentation reviewed (its Lesion segment)"),
    ("AI lesion volume", "double", "mL", "Lesion segment as the AI produced it"),
    ("Corrected lesion volume", "double", "mL", "Lesion segment now, after Segment Editor corrections"),
    ("Added", "double", "mL", "marked as lesion by the correction but not by the AI"),
    ("Removed", "double", "mL", "marked as lesion by the AI but removed by the correction"),
    ("Dice AI vs corrected", "double", "", "2 |AI and corrected| / (|AI| + |corrected|); 1 when both are empty"),
    ("Lesion components (AI)", "double", "", "separate lesions (6-connected components) in the AI result"),
    ("Lesion components (corrected)", "double", "", "separate lesions (6-connected components) after correction"),
]

_STUDY_PATTERN = re.compile(r"study_(\d+)", re.IGNORECASE)


def storeAIResult(scene, segmentationNode, lesionKji: np.ndarray, referenceNode):
    """A hidden labelmap copy of the AI lesion mask (``[k, j, i]``) on the reference grid, referenced
    by ``segmentationNode``; returns the labelmap node."""
    image, view = volumeio._newImageData(volumeio.dimensions(referenceNode), np.uint8)
    view[...] = lesionKji
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(f"{segmentationNode.GetName()} AI lesion"))
    try:
        node.SetHideFromEditors(True)  # not offered in node selectors, not shown
        volumeio.copyGeometry(referenceNode, node)
        node.SetAndObserveImageData(image)
        segmentationNode.SetNodeReferenceID(AI_RESULT_ROLE, node.GetID())
    except Exception:
        volumeio.removeNode(scene, node)
        raise
    return node


def aiResult(segmentationNode):
    """The AI result labelmap of a segmentation made by this module, or None."""
    return segmentationNode.GetNodeReference(AI_RESULT_ROLE) if segmentationNode is not None else None


def _aiMaskOnReference(segmentationNode, referenceNode) -> np.ndarray:
    labelmap = aiResult(segmentationNode)
    if labelmap is None or labelmap.GetImageData() is None:
        raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no stored AI result: only segmentations made by "
                         "CovidGANSeg's Segment button can be compared with the AI result.")
    mask, _ = segmentations.groundTruthMask(labelmap, referenceNode)
    return mask


def countComponents(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))[1])


def reviewRow(segmentationNode, referenceNode) -> dict[str, Any]:
    """What the correction changed, as one table row (see :data:`REVIEW_COLUMNS`)."""
    ai = _aiMaskOnReference(segmentationNode, referenceNode)
    corrected = segmentations.segmentMask(segmentationNode, segmentations.LESION_NAME, referenceNode)
    voxelMl = float(abs(np.linalg.det(volumeio.ijkToRasArray(referenceNode)[:3, :3]))) / 1000.0
    nAi, nCorrected = int(np.count_nonzero(ai)), int(np.count_nonzero(corrected))
    both = int(np.count_nonzero(ai & corrected))
    return {
        "Segmentation": segmentationNode.GetName(),
        "AI lesion volume": nAi * voxelMl,
        "Corrected lesion volume": nCorrected * voxelMl,
        "Added": (nCorrected - both) * voxelMl,
        "Removed": (nAi - both) * voxelMl,
        "Dice AI vs corrected": 1.0 if nAi + nCorrected == 0 else 2.0 * both / (nAi + nCorrected),
        "Lesion components (AI)": countComponents(ai),
        "Lesion components (corrected)": countComponents(corrected),
    }


def studyId(referenceNode, given: Optional[Union[str, int]] = None) -> str:
    """``study_XXXX`` from ``given`` (``"study_0012"``, ``"12"`` or 12), else from the CT's file name
    or node name; ValueError when none of them has one."""
    candidates = []
    if given not in (None, ""):
        text = str(given).strip()
        if text.isdigit():
            return f"study_{int(text):04d}"
        candidates.append(text)
    else:
        storage = referenceNode.GetStorageNode() if referenceNode.IsA("vtkMRMLStorableNode") else None
        if storage is not None and storage.GetFileName():
            candidates.append(os.path.basename(storage.GetFileName()))
        candidates.append(referenceNode.GetName() or "")
    for text in candidates:
        match = _STUDY_PATTERN.search(text)
        if match:
            return f"study_{int(match.group(1)):04d}"
    raise ValueError(f"No study id: '{candidates[0] if candidates else referenceNode.GetName()}' has no 'study_<number>' in it. "
                     "Enter the study number (e.g. 12 for study_0012).")


def exportLesionMask(segmentationNode, referenceNode, folder, study: Optional[Union[str, int]] = None) -> Path:
    """Write the "Lesion" segment as ``<folder>/study_XXXX_mask.nii.gz`` (uint8 0/1) on the CT's grid."""
    import nibabel as nib

    if folder in (None, "") or str(folder) == ".":
        raise ValueError("No export folder is selected.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{studyId(referenceNode, study)}_mask.nii.gz"
    mask = segmentations.segmentMask(segmentationNode, segmentations.LESION_NAME, referenceNode)
    affine = volumeio.ijkToRasArray(referenceNode)
    image = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8), affine)  # (i, j, k)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = folder / name
    fd, temporary = tempfile.mkstemp(prefix=".export-", suffix=".nii.gz", dir=str(folder))
    os.close(fd)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)  # atomic: never a half-written mask under the final name
    except Exception:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
