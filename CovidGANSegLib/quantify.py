"""Lesion quantification: lesion and lung volume, percent of lung involved, MosMed category.

numpy only (the Slicer GUI process imports this without torch).

MosMedData categories by the share of lung parenchyma involved:
CT-0 none, CT-1 under 25 %, CT-2 25 % to under 50 %, CT-3 50 % to under 75 %, CT-4 75 % or more
(a band's lower bound belongs to that band: exactly 25 % is CT-2).

Tiny involvement: an automatic mask almost always has a few stray voxels, and MosMed's CT-0 means
"no signs of viral pneumonia", not "exactly zero voxels". Involvement below
``CT0_MAX_PERCENT`` (0.1 % of the lung, about 4 mL in a 4 L lung) is therefore reported as CT-0;
the exact percentage is always reported too, so the rule is visible and can be changed per call
(``ct0_max_percent=0`` gives CT-1 for any lesion voxel).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: MosMed bands: (category, lower bound in percent of lung, inclusive)
MOSMED_BANDS = (("CT-1", 0.0), ("CT-2", 25.0), ("CT-3", 50.0), ("CT-4", 75.0))
#: involvement (percent of lung) below which a scan counts as CT-0
CT0_MAX_PERCENT = 0.1


def mosmed_category(percent_involved: float, *, ct0_max_percent: float = CT0_MAX_PERCENT) -> str:
    """MosMed category CT-0..CT-4 implied by ``percent_involved`` (0..100)."""
    p = float(percent_involved)
    if not math.isfinite(p) or p < 0 or p > 100.0 + 1e-9:
        raise ValueError(f"percent_involved must be in [0, 100], got {percent_involved}")
    if ct0_max_percent < 0:
        raise ValueError(f"ct0_max_percent must be >= 0, got {ct0_max_percent}")
    if p == 0.0 or p < ct0_max_percent:
        return "CT-0"
    category = "CT-1"
    for name, lower in MOSMED_BANDS:
        if p >= lower:
            category = name
    return category


def _voxels_in_lung(mask: np.ndarray, lung_mask: np.ndarray, name: str) -> tuple[int, int]:
    """(voxels ``mask`` marks inside the lung, lung voxels); ``name`` names ``mask`` in a shape error."""
    marked = np.asarray(mask) > 0
    lung = np.asarray(lung_mask) > 0
    if marked.shape != lung.shape:
        raise ValueError(f"{name} {marked.shape} and lung mask {lung.shape} differ in shape")
    return int(np.count_nonzero(marked & lung)), int(np.count_nonzero(lung))


def _percent(marked_voxels: int, lung_voxels: int) -> float:
    return 100.0 * marked_voxels / lung_voxels if lung_voxels else 0.0


def percent_of_lung(mask: np.ndarray, lung_mask: np.ndarray) -> float:
    """Percent of the lung's voxels that ``mask`` marks (voxels outside the lung not counted; 0 for an empty lung)."""
    return _percent(*_voxels_in_lung(mask, lung_mask, "mask"))


def quantify(lesion_mask: np.ndarray, lung_mask: np.ndarray, spacing: tuple[float, float, float], *,
             ct0_max_percent: float = CT0_MAX_PERCENT) -> dict[str, Any]:
    """Lesion volume (mL, lesion voxels inside the lung), lung volume (mL), percent involved, category.

    Lesion voxels outside the lung mask are not counted (the percentage is of lung parenchyma).
    With an empty lung mask the percentage is 0 and ``lung_mask_empty`` is True.
    """
    lesion_voxels, lung_voxels = _voxels_in_lung(lesion_mask, lung_mask, "lesion mask")
    ndim = np.ndim(lesion_mask)
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be {ndim} positive values in mm, got {spacing}")
    voxel_ml = float(np.prod(s)) / 1000.0
    percent = _percent(lesion_voxels, lung_voxels)
    return {
        "lesion_ml": lesion_voxels * voxel_ml,
        "lung_ml": lung_voxels * voxel_ml,
        "percent_involved": percent,
        "mosmed_category": mosmed_category(percent, ct0_max_percent=ct0_max_percent),
        "ct0_max_percent": float(ct0_max_percent),
        "lesion_voxels": lesion_voxels,
        "lung_voxels": lung_voxels,
        "lung_mask_empty": lung_voxels == 0,
    }
