"""HU-threshold baseline: the rule of Slicer's Lung CT Analyzer (numpy only, no training).

Lung CT Analyzer's default thresholds classify lung voxels as emphysema (-1050..-950 HU),
inflated (-950..-750), infiltrated (-750..-400) and collapsed (-400..0). The baseline lesion mask
is "infiltrated or collapsed" inside the lung mask, on the CT's own (canonical) grid:

* infiltrated: -750 <= HU < -400 (label 1)
* collapsed:   -400 <= HU <= 0   (label 2)

Shared boundaries go to the denser class; 0 HU is still "collapsed", anything above is not lung.
Vessels and airway walls inside the lung mask fall in these ranges too, which is why this simple
baseline over-segments; that is the point of comparing against it.
"""

from __future__ import annotations

import numpy as np

INFILTRATED_HU = (-750.0, -400.0)
COLLAPSED_HU = (-400.0, 0.0)


def _check(hu: np.ndarray, lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(hu)
    lung = np.asarray(lung_mask) > 0
    if h.shape != lung.shape:
        raise ValueError(f"HU array {h.shape} and lung mask {lung.shape} differ in shape")
    return h, lung


def hu_threshold_classes(hu: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """uint8 labels inside the lung: 0 other, 1 infiltrated (-750..-400 HU), 2 collapsed (-400..0 HU)."""
    h, lung = _check(hu, lung_mask)
    labels = np.zeros(h.shape, dtype=np.uint8)
    labels[lung & (h >= INFILTRATED_HU[0]) & (h < INFILTRATED_HU[1])] = 1
    labels[lung & (h >= COLLAPSED_HU[0]) & (h <= COLLAPSED_HU[1])] = 2
    return labels


def hu_threshold_segment(hu: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """Boolean lesion mask: -750 <= HU <= 0 inside the lung mask (same shape as ``hu``)."""
    h, lung = _check(hu, lung_mask)
    return lung & (h >= INFILTRATED_HU[0]) & (h <= COLLAPSED_HU[1])
