"""Figures of the GAN phase: loss curves, Fig. 3 triptychs and the Fig. 4 severity box plot.

Uses matplotlib's object-oriented API with the Agg canvas (no pyplot, no global backend change),
imported inside each function, so importing this module costs nothing and it is safe inside a
GUI process. Every PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from CovidGANSegLib.atomic import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def save_loss_curves(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss curves (D loss, G adversarial, G reconstruction) from ``losses.csv`` rows."""
    fig = _figure(10, 3.2)
    axes = fig.subplots(1, 3)
    it = np.array([r["iteration"] for r in rows], dtype=float)
    for ax, key, title in zip(axes, ("d_loss", "g_adv", "g_rec"), ("discriminator loss", "G adversarial loss", "G reconstruction MSE")):
        y = np.array([r[key] for r in rows], dtype=float)
        if len(y):
            ax.plot(it, y, lw=0.6, alpha=0.5, color="C0")
            if len(y) >= 10:
                k = max(1, len(y) // 20)
                smooth = np.convolve(y, np.ones(k) / k, mode="valid")
                ax.plot(it[k - 1:], smooth, lw=1.5, color="C1")
        if key == "g_rec" and len(y) and np.all(y > 0):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return _save(fig, path)


def save_triptych(original: np.ndarray, pseudo_healthy: np.ndarray, difference: np.ndarray, path: str | Path, *,
                  slice_index: int | None = None, title: str = "") -> Path:
    """Paper Fig. 3: original COVID slice, pseudo-healthy slice, difference (eq. 3).

    Arrays are ``(D, H, W)`` model-grid volumes in window units [0, 1]; one axial slice is shown
    (the middle one unless ``slice_index`` is given), anterior at the top.
    """
    if original.shape != pseudo_healthy.shape or original.shape != difference.shape or original.ndim != 3:
        raise ValueError("original, pseudo_healthy and difference must be 3D arrays of one shape")
    k = original.shape[0] // 2 if slice_index is None else int(slice_index)
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 3)
    show = lambda a: np.flipud(a[k])  # noqa: E731  (H increases anteriorly: flip so anterior is up)
    axes[0].imshow(show(original), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("original (COVID)")
    axes[1].imshow(show(pseudo_healthy), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("pseudo-healthy G(I_C)")
    vmax = max(float(np.abs(difference[k]).max()), 0.05)
    im = axes[2].imshow(show(difference), cmap="magma", vmin=0, vmax=vmax)
    axes[2].set_title("difference I_C - G(I_C)")
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(f"{title} (slice {k})")
    fig.tight_layout()
    return _save(fig, path)


def save_severity_boxplot(sums: np.ndarray, quartiles: dict[str, float], path: str | Path, *, units: str = "window units") -> Path:
    """Paper Fig. 4: box plot of the per-slice difference sums with the quartile thresholds."""
    sums = np.asarray(sums, dtype=float)
    fig = _figure(5, 5)
    ax = fig.subplots(1, 1)
    if sums.size:
        ax.boxplot(sums, whis=1.5, widths=0.5)
        x = np.random.default_rng(0).normal(1.0, 0.04, size=sums.size)
        ax.scatter(x, sums, s=4, alpha=0.3, color="C0")
    for key, color, label in (("q1", "C2", "Q1"), ("median", "C1", "median"), ("q3", "C3", "Q3 (high-infection threshold)")):
        if key in quartiles:
            ax.axhline(quartiles[key], color=color, ls="--", lw=1, label=f"{label} = {quartiles[key]:.3g}")
    ax.set_xticks([1])
    ax.set_xticklabels(["COVID slices"])
    ax.set_ylabel(f"sum of the difference map per slice ({units})")
    ax.set_title("infection severity per slice")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
