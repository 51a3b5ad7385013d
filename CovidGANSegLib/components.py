"""Connected-component helpers on boolean volumes (numpy / scipy only, no torch).

Shared by the lung mask (:mod:`lungmask`), the refined pseudo-mask rule (:mod:`gan.pseudomasks`)
and the segmenter's post-processing (:mod:`seg.postprocess`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: in-plane 4-connectivity as a 3D ``(x, y, z)`` structure: the adjacent pixels of a slice, no step between
#: slices (read-only; the lung mask's per-slice steps and the post-processing's in-plane rings and rims)
IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_4[1, :, 1] = IN_PLANE_4[:, 1, 1] = True
IN_PLANE_4.flags.writeable = False


def label_components(region: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """``ndi.label`` of ``region`` with ``connectivity`` 26 (faces, edges and corners) or 6 (faces only)."""
    if connectivity not in (6, 26):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    structure = np.ones((3, 3, 3), dtype=bool) if connectivity == 26 else ndi.generate_binary_structure(3, 1)
    lab, n = ndi.label(region, structure=structure)
    return lab, int(n)


def labelled_components_touching(seeds: np.ndarray, lab: np.ndarray, n: int) -> np.ndarray:
    """Voxels of the labelled components (``lab``, ``n`` from :func:`label_components`) that contain a
    voxel of ``seeds``."""
    hit = np.zeros(n + 1, dtype=bool)
    hit[np.unique(lab[seeds])] = True
    hit[0] = False
    return hit[lab]


def components_touching(seeds: np.ndarray, region: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Voxels of ``region`` whose ``connectivity``-connected component (26: faces, edges and corners;
    6: faces only) contains a voxel of ``seeds`` (hysteresis)."""
    lab, n = label_components(region, connectivity)
    if n == 0:
        return region
    return labelled_components_touching(seeds, lab, n)
