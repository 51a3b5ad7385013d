"""Segmentation metrics: standard confusion-matrix metrics, HD95, and the predecessor's protocol.

numpy / scipy only (the Slicer GUI process imports this without torch).

Standard metrics count voxels over the WHOLE volume (or the whole slice for per-slice metrics):
``TP, FP, FN, TN`` of the binary prediction against the binary truth, then

* Dice = 2 TP / (2 TP + FP + FN), sensitivity = TP / (TP + FN), specificity = TN / (TN + FP),
  precision = TP / (TP + FP), absolute volume difference = |V_pred - V_truth| in mL.
* HD95 = the symmetric 95th-percentile Hausdorff distance in mm: the larger of the two directed
  95th percentiles of surface-to-surface distances (surface voxels = mask minus its 6-connected
  erosion, distances by a Euclidean distance transform with the voxel spacing), as MONAI does.

Empty masks (chosen conventions, tested):

* both truth and prediction empty: Dice 1.0, HD95 0.0 (a perfect "nothing there");
* exactly one empty: Dice 0.0, HD95 NaN (no surface to measure from);
* sensitivity is NaN when the truth is empty (no positives to find), precision is NaN when the
  prediction is empty (no positive calls), specificity NaN when there are no negatives.

NaN values are left out of means, and summaries report how many values each mean is over.

The predecessor's slice protocol (Shabani et al. 2022) is implemented separately, clearly labelled,
for comparison only: it scores a slice only when its truth has more than 163 pixels and infection
covers more than 1 % of the slice's lung, and binarises the prediction at 0.2 x the slice maximum.
It is never a replacement for the standard metrics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

#: the predecessor's slice protocol constants
PREDECESSOR_MIN_TRUTH_PIXELS = 163
PREDECESSOR_MIN_LUNG_FRACTION = 0.01
PREDECESSOR_RELATIVE_THRESHOLD = 0.2

METRIC_NAMES = ("dice", "sensitivity", "specificity", "precision", "abs_volume_diff_ml", "hd95_mm")


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(mask)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be a numeric or boolean array, got {a.dtype}")
    return a > 0


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_bool(pred, "prediction")
    t = _as_bool(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    return p, t


def _check_spacing(spacing: tuple[float, ...] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be {ndim} positive values, got {spacing}")
    return s


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` voxel counts over all elements."""
    p, t = _check_pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def from_confusion(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, sensitivity, specificity and precision from counts, with the empty-mask conventions."""
    if tp + fp + fn == 0:
        dice = 1.0  # both empty
    else:
        dice = 2.0 * tp / (2.0 * tp + fp + fn)
    return {
        "dice": dice,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion by the face-connected (cross) structure.

    Voxels at the array border count as surface (``border_value=0``).
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m.copy()
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    a, b = _check_pair(a, b)
    s = _check_spacing(spacing, a.ndim)
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        return np.zeros(0, dtype=np.float64)
    # crop to the joint bounding box (+1 voxel) so the distance transform stays small
    idx = np.argwhere(sa | sb)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, a.shape)
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    dist_to_b = ndimage.distance_transform_edt(~sb[box], sampling=s)
    return dist_to_b[sa[box]].astype(np.float64)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (0.0 if both empty, NaN if one is)."""
    p, t = _check_pair(pred, truth)
    _check_spacing(spacing, p.ndim)
    pe, te = not p.any(), not t.any()
    if pe and te:
        return 0.0
    if pe or te:
        return math.nan
    d_pt = surface_distances(p, t, spacing)
    d_tp = surface_distances(t, p, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def volume_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None, *, with_hd95: bool = True) -> dict[str, float]:
    """All standard metrics of one volume (or one slice), over all its voxels.

    ``spacing`` is the voxel size in mm per axis (for volumes in mL and HD95 in mm).
    """
    p, t = _check_pair(pred, truth)
    s = _check_spacing(spacing, p.ndim)
    tp, fp, fn, tn = confusion(p, t)
    voxel_ml = float(np.prod(s)) / 1000.0 if p.ndim == 3 else math.nan
    out: dict[str, Any] = from_confusion(tp, fp, fn, tn)
    vp, vt = (tp + fp) * voxel_ml, (tp + fn) * voxel_ml
    out.update({
        "abs_volume_diff_ml": abs(vp - vt),
        "pred_ml": vp,
        "truth_ml": vt,
        "hd95_mm": hd95(p, t, s) if with_hd95 else math.nan,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    })
    return out


def slice_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float] | None = None, *, axis: int = 2,
                  with_hd95: bool = True) -> list[dict[str, float]]:
    """Standard metrics per slice along ``axis`` (2 = axial for canonical ``(x, y, z)`` arrays).

    Each row has ``slice`` (index), ``truth_px``, ``pred_px``, the counts and the metrics (areas
    instead of volumes: ``abs_area_diff_mm2``; HD95 with the in-plane spacing).
    """
    p, t = _check_pair(pred, truth)
    if p.ndim != 3:
        raise ValueError(f"slice_metrics needs 3D arrays, got {p.ndim}D")
    s = _check_spacing(spacing, 3)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    in_plane = tuple(v for i, v in enumerate(s) if i != axis)
    px_mm2 = in_plane[0] * in_plane[1]
    rows = []
    for k in range(p.shape[axis]):
        ps, ts = np.take(p, k, axis=axis), np.take(t, k, axis=axis)
        tp, fp, fn, tn = confusion(ps, ts)
        row: dict[str, Any] = {"slice": k, "truth_px": tp + fn, "pred_px": tp + fp, **from_confusion(tp, fp, fn, tn)}
        row["abs_area_diff_mm2"] = abs((tp + fp) - (tp + fn)) * px_mm2
        row["hd95_mm"] = hd95(ps, ts, in_plane) if with_hd95 else math.nan
        row.update({"tp": tp, "fp": fp, "fn": fn, "tn": tn})
        rows.append(row)
    return rows


def predecessor_slice_protocol(prediction: np.ndarray, truth: np.ndarray, lung_mask: np.ndarray, *, axis: int = 2) -> list[dict[str, float]]:
    """The predecessor's slice protocol (comparison only, not the project's metric).

    A slice is scored only if its truth has more than 163 pixels AND the truth covers more than
    1 % of the slice's lung pixels; the prediction (probabilities or a mask) is binarised at
    0.2 x its slice maximum (``p > 0.2 max``; an all-zero slice predicts nothing). The predecessor
    applied this on its 128 x 128 model grid; here it runs on whatever grid the arrays are on.
    Returns one row per scored slice with Dice, sensitivity, specificity and precision.
    """
    pred = np.asarray(prediction, dtype=np.float32)
    t = _as_bool(truth, "truth")
    lung = _as_bool(lung_mask, "lung mask")
    if not pred.shape == t.shape == lung.shape:
        raise ValueError(f"prediction {pred.shape}, truth {t.shape} and lung mask {lung.shape} must have the same shape")
    if pred.ndim != 3:
        raise ValueError(f"predecessor_slice_protocol needs 3D arrays, got {pred.ndim}D")
    rows = []
    for k in range(pred.shape[axis]):
        ts = np.take(t, k, axis=axis)
        n_truth = int(ts.sum())
        n_lung = int(np.take(lung, k, axis=axis).sum())
        if n_truth <= PREDECESSOR_MIN_TRUTH_PIXELS or n_lung == 0 or n_truth / n_lung <= PREDECESSOR_MIN_LUNG_FRACTION:
            continue
        ps = np.take(pred, k, axis=axis)
        peak = float(ps.max())
        binary = ps > PREDECESSOR_RELATIVE_THRESHOLD * peak if peak > 0 else np.zeros_like(ts)
        tp, fp, fn, tn = confusion(binary, ts)
        rows.append({"slice": k, "truth_px": n_truth, "lung_px": n_lung, **from_confusion(tp, fp, fn, tn)})
    return rows


def summarise(values: list[float] | np.ndarray) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the finite values (sample std, ddof=1; 0.0 for n = 1).

    Mean and std are None when no value is finite (so the result stays valid JSON).
    """
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "n": int(a.size)}
