"""Figures of segmenter training: loss curves and sample segmentations (PNG, no GUI backend).

matplotlib is imported inside the functions and used through ``matplotlib.figure.Figure`` (no
pyplot), so importing this module is cheap and never touches a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from CovidGANSegLib.atomic import atomic_path

CURVES = (("loss", "total"), ("contrastive", "contrastive (eq. 4)"), ("sensitivity", "sensitivity-enhanced (eq. 5)"), ("mse", "MSE"))


def _finite(rows: Sequence[dict[str, Any]], key: str, *, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    it, val = [], []
    for r in rows:
        v = r.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and (v > 0 or not positive):
            it.append(float(r["iteration"]))
            val.append(v)
    return np.asarray(it), np.asarray(val)


def save_loss_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training losses per iteration (light) with a moving average, and validation loss / Dice."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for key, label in CURVES:
        it, val = _finite(rows, key, positive=True)  # log scale
        if len(it) == 0:
            continue
        line, = ax_loss.plot(it, val, alpha=0.25, linewidth=0.8)
        k = max(1, len(val) // 50)
        if k > 1:
            smooth = np.convolve(val, np.ones(k) / k, mode="valid")
            ax_loss.plot(it[k - 1:], smooth, color=line.get_color(), label=label)
        else:
            line.set_alpha(1.0)
            line.set_label(label)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training losses")
    ax_loss.set_yscale("log")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8)
    it, val = _finite(rows, "val_loss")
    if len(it):
        ax_val.plot(it, val, "o-", label="validation loss (eq. 5 + MSE)")
    it, dice = _finite(rows, "val_dice")
    if len(it):
        ax_val.plot(it, dice, "s-", label="validation Dice vs pseudo-masks")
    ax_val.set_xlabel("iteration")
    ax_val.set_title("validation (pseudo-masks of held-out volumes)")
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


def save_segmentation_samples(images: np.ndarray, targets: np.ndarray, probabilities: np.ndarray, path: str | Path, *,
                              title: str = "") -> Path:
    """Rows of (slice, pseudo-mask overlay, predicted probability) for ``(N, H, W)`` arrays."""
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(7.5, 2.5 * max(n, 1)), layout="constrained")
    axes = fig.subplots(max(n, 1), 3, squeeze=False)
    for i in range(n):
        a0, a1, a2 = axes[i]
        a0.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        a1.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        a1.imshow(np.ma.masked_where(targets[i] < 0.5, targets[i]), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        a2.imshow(probabilities[i], cmap="magma", vmin=0, vmax=1)
        if i == 0:
            a0.set_title("input slice", fontsize=9)
            a1.set_title("pseudo-mask", fontsize=9)
            a2.set_title("prediction (probability)", fontsize=9)
        for a in axes[i]:
            a.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return path
