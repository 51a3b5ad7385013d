"""Volumes in and out of the child process as NIfTI files on the input's exact geometry.

Conventions (the part that is easy to get wrong):

* Slicer's ``IJKToRAS`` matrix maps voxel indices (i, j, k) to RAS millimetres; nibabel's affine
  maps the same indices to the same RAS+ world. So the NIfTI affine *is* ``IJKToRAS`` (the LPS
  world of DICOM / ITK never appears: ITK would flip two axes on write and back on read).
* ``slicer.util.arrayFromVolume`` returns the voxels as ``[k, j, i]``; NIfTI stores ``(i, j, k)``
  in Fortran order. The input is written as the transposed *view* (no copy); outputs are read
  slab by slab straight into the new node's VTK buffer.
* The library writes every output on the input file's own grid (``nifti.save_like``). The reader
  checks shape and affine against the input node and refuses anything else, then gives the new
  node the input node's exact ``IJKToRAS`` matrix and parent transform (NIfTI stores the affine
  in float32; copying the matrix avoids a 1e-5 mm drift between input and outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: largest slab (bytes of output voxels) read at once, to keep the GUI process's peak memory low
SLAB_BYTES = 4 << 20
#: affine agreement needed between an output file and the input node (mm)
AFFINE_ATOL_MM = 1e-3


class GeometryError(ValueError):
    """An output file is not on the input volume's grid."""


def ijkToRasArray(volumeNode) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def dimensions(volumeNode) -> tuple[int, int, int]:
    """Voxel counts along (i, j, k)."""
    image = volumeNode.GetImageData()
    return tuple(int(d) for d in image.GetDimensions()) if image is not None else (0, 0, 0)


def sameGeometry(a, b, *, atol: float = AFFINE_ATOL_MM) -> bool:
    """Same voxel grid: equal dimensions and IJKToRAS matrices, same parent transform."""
    return (dimensions(a) == dimensions(b) and np.allclose(ijkToRasArray(a), ijkToRasArray(b), atol=atol, rtol=0)
            and (a.GetTransformNodeID() or "") == (b.GetTransformNodeID() or ""))


def checkInputVolume(volumeNode) -> None:
    """Refuse what is not a 3D scalar CT volume, with a message naming the node and the problem."""
    if volumeNode is None:
        raise ValueError("No input volume is selected. Load a chest CT and select it as input volume.")
    name = volumeNode.GetName()
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(f"'{name}' is a {volumeNode.GetClassName()}, not a scalar volume: select a CT volume.")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"'{name}' is a labelmap volume, not a CT: select the CT volume as input.")
    image = volumeNode.GetImageData()
    if image is None:
        raise ValueError(f"'{name}' has no voxel data.")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel (colour image?): a CT in "
                         "Hounsfield units has one.")
    dims = dimensions(volumeNode)
    if min(dims) < 2:
        raise ValueError(f"'{name}' is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels): a 3D chest CT volume is needed.")
    if abs(np.linalg.det(ijkToRasArray(volumeNode)[:3, :3])) < 1e-12:
        raise ValueError(f"'{name}' has a degenerate geometry (zero voxel spacing).")
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None and not transformNode.IsTransformToWorldLinear():
        raise ValueError(f"'{name}' is under a non-linear transform: harden the transform first (Data module).")


def writeVolumeNifti(volumeNode, path: str | Path) -> Path:
    """Write the node's voxels and IJKToRAS as an uncompressed NIfTI file (fast, no voxel copy)."""
    import slicer

    return _writeOnGrid(slicer.util.arrayFromVolume(volumeNode), volumeNode, path)  # [k, j, i] view of the VTK buffer


def writeMaskNifti(maskKji: np.ndarray, referenceNode, path: str | Path) -> Path:
    """Write a ``[k, j, i]`` mask on ``referenceNode``'s grid as an uncompressed uint8 NIfTI file
    with the node's IJKToRAS as its affine (the grid ``writeVolumeNifti`` gives the input)."""
    mask = np.asarray(maskKji)
    if mask.shape != tuple(reversed(dimensions(referenceNode))):
        raise GeometryError(f"mask of shape {mask.shape} is not on the grid of '{referenceNode.GetName()}'")
    return _writeOnGrid((mask > 0).astype(np.uint8), referenceNode, path)


def _writeOnGrid(voxelsKji: np.ndarray, referenceNode, path: str | Path) -> Path:
    """``[k, j, i]`` voxels as NIfTI ``(i, j, k)`` (a transposed view, Fortran-contiguous: no copy) with
    ``referenceNode``'s IJKToRAS as qform and sform, millimetres, no scaling."""
    import nibabel as nib

    path = Path(path)
    affine = ijkToRasArray(referenceNode)
    image = nib.Nifti1Image(voxelsKji.transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))
    return path


def _checkOnGrid(image, referenceNode, path: Path) -> None:
    dims = dimensions(referenceNode)
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if shape != dims:
        raise GeometryError(f"{path.name}: grid {shape} differs from the input volume's {dims}")
    if not np.allclose(np.asarray(image.affine, dtype=np.float64), ijkToRasArray(referenceNode), atol=AFFINE_ATOL_MM, rtol=1e-6):
        raise GeometryError(f"{path.name}: its voxel-to-RAS matrix differs from the input volume's; the output would not overlay the CT")


def readNiftiInto(path: str | Path, referenceNode, target: np.ndarray) -> None:
    """Read a NIfTI file that lies on ``referenceNode``'s grid into ``target`` (``[k, j, i]``), slab by slab."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the processing step did not write {path.name}")
    image = nib.load(str(path), mmap=False)
    _checkOnGrid(image, referenceNode, path)
    proxy = image.dataobj
    nk, nj, ni = target.shape
    if str(path).endswith(".gz"):  # gzip cannot seek: read once
        data = np.asanyarray(proxy)
        data = data.reshape(ni, nj, nk)
        target[...] = data.transpose(2, 1, 0)
        return
    step = max(1, SLAB_BYTES // max(1, ni * nj * target.itemsize))
    extra = (0,) if len(image.shape) == 4 else ()
    for k0 in range(0, nk, step):
        k1 = min(nk, k0 + step)
        slab = np.asanyarray(proxy[(slice(None), slice(None), slice(k0, k1), *extra)])  # (i, j, s)
        target[k0:k1] = slab.transpose(2, 1, 0)


def _newImageData(dims: tuple[int, int, int], dtype: np.dtype):
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
    view = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    return image, view


def addVolumeFromNifti(scene, path: str | Path, referenceNode, name: str, *, dtype: Any = np.float32,
                       nodeClass: str = "vtkMRMLScalarVolumeNode"):
    """Create a volume node from an output file, on the reference node's exact geometry.

    The voxels are read into a fresh ``vtkImageData`` first; the node is added to the scene only
    when the whole file has been read and checked, so a failed read leaves no node behind.
    """
    image, view = _newImageData(dimensions(referenceNode), dtype)
    readNiftiInto(path, referenceNode, view)
    node = scene.AddNewNodeByClass(nodeClass, scene.GenerateUniqueName(name))
    try:
        copyGeometry(referenceNode, node)
        node.SetAndObserveImageData(image)
        node.CreateDefaultDisplayNodes()
    except Exception:
        removeNode(scene, node)
        raise
    return node


def copyGeometry(referenceNode, node) -> None:
    """Give ``node`` the reference's IJKToRAS matrix and parent transform."""
    import vtk

    m = vtk.vtkMatrix4x4()
    referenceNode.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())


def removeNode(scene, node) -> None:
    """Remove a node and the display / storage nodes it created."""
    if node is None or node.GetScene() is None:
        return
    if node.IsA("vtkMRMLDisplayableNode"):
        for i in range(node.GetNumberOfDisplayNodes() - 1, -1, -1):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                scene.RemoveNode(display)
    if node.IsA("vtkMRMLStorableNode"):
        for i in range(node.GetNumberOfStorageNodes() - 1, -1, -1):
            storage = node.GetNthStorageNode(i)
            if storage is not None:
                scene.RemoveNode(storage)
    scene.RemoveNode(node)
