"""Connected-component helpers on boolean volumes (numpy / scipy only, no torch).

Shared by the lung mask (:mod:`lungmask`), the refined pseudo-mask rule (:mod:`gan.pseudomasks`)
and the segmenter's post-processing (:mod:`seg.inference`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def components_touching(seeds: np.ndarray, region: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Voxels of ``region`` whose ``connectivity``-connected component (26: faces, edges and corners;
    6: faces only) contains a voxel of ``seeds`` (hysteresis)."""
    if connectivity not in (6, 26):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    structure = np.ones((3, 3, 3), dtype=bool) if connectivity == 26 else ndi.generate_binary_structure(3, 1)
    lab, n = ndi.label(region, structure=structure)
    if n == 0:
        return region
    hit = np.zeros(n + 1, dtype=bool)
    hit[np.unique(lab[seeds & region])] = True
    hit[0] = False
    return hit[lab]
