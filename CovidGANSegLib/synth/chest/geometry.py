"""Geometry of a phantom study: the output grid, its LAS affine, and small shape helpers.

All distances are in mm; signed distances are positive inside a shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZES = ("small", "mosmed")



def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One uniform draw in [lo, hi) as a float."""
    return float(rng.uniform(lo, hi))


def soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm, > 0 inside) over a ramp ``edge`` wide."""
    return np.clip(d * np.float32(1.0 / edge) + np.float32(0.5), 0.0, 1.0)


def ellipse_sd(du: np.ndarray, dv: np.ndarray, au, av, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm, > 0 inside) to an ellipse, first order near the edge."""
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = du * c + dv * s, -du * s + dv * c
    au = np.maximum(au, 1e-3)
    av = np.maximum(av, 1e-3)
    x = du / au
    y = dv / av
    q = x * x + y * y
    grad = 2.0 * np.sqrt((x / au) ** 2 + (y / av) ** 2)
    return (1.0 - q) / np.maximum(grad, 2.0 / np.maximum(au, av))


def overlap(center: np.ndarray, half: float, zc: np.ndarray, slab: float) -> np.ndarray:
    """Fraction of the slab ``[zc - slab/2, zc + slab/2]`` inside ``[center - half, center + half]``."""
    lo = np.maximum(center - half, zc - slab / 2)
    hi = np.minimum(center + half, zc + slab / 2)
    return np.clip((hi - lo) / slab, 0.0, 1.0)


def smooth_curve(rng: np.random.Generator, amplitude: float, terms: int = 3):
    """A smooth random function of t (roughly within +-amplitude)."""
    coef = rng.normal(0.0, 1.0, terms) / np.arange(1, terms + 1)
    phase = rng.uniform(0, 2 * np.pi, terms)
    norm = amplitude / max(1e-6, float(np.abs(coef).sum()))

    def f(t):
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros_like(t)
        for j in range(terms):
            out = out + coef[j] * np.sin(np.pi * (j + 1) * t + phase[j])
        return out * norm

    return f


def smoothstep(x):
    """Cubic smooth step from 0 (x <= 0) to 1 (x >= 1)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# --------------------------------------------------------------------------------------------
# geometry of a study


@dataclass(frozen=True)
class Grid:
    """Output grid of a study: shape (nx, ny, nz), spacing (mm), in-plane anatomy downsampling."""
    shape: tuple[int, int, int]  # output (nx, ny, nz)
    spacing: tuple[float, float, float]
    factor: int  # in-plane downsampling of the anatomy grid

    @property
    def fov(self) -> float:
        """In-plane field of view (mm)."""
        return self.shape[0] * self.spacing[0]

    def affine(self, z0: float) -> np.ndarray:
        """LAS affine: axis 0 toward the patient's left (world -x), axis 1 anterior, axis 2 superior."""
        sx, sy, sz = self.spacing
        nx, ny, _ = self.shape
        a = np.eye(4)
        a[0, 0] = -sx
        a[1, 1] = sy
        a[2, 2] = sz
        a[0, 3] = (nx - 1) * sx / 2.0
        a[1, 3] = -(ny - 1) * sy / 2.0
        a[2, 3] = z0
        return a


def draw_grid(rng: np.random.Generator, size: str, body_width: float) -> Grid:
    """Draw a study grid for ``size`` around a body ``body_width`` mm wide."""
    fov = body_width * uniform(rng, 1.05, 1.18)
    if size == "mosmed":
        n, nz_range, factor = 512, (32, 49), 2
        sp = float(np.clip(fov / n, 0.6, 0.8))
    elif size == "small":
        n, nz_range, factor = 128, (32, 41), 1
        sp = fov / n
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    nz = int(rng.integers(*nz_range))
    return Grid((n, n, nz), (sp, sp, 8.0), factor)



def seg_dist_2d(u, v, p0, p1):
    """In-plane distance (mm) from points (u, v) to the segment p0-p1."""
    ab = (p1[0] - p0[0], p1[1] - p0[1])
    L2 = ab[0] ** 2 + ab[1] ** 2
    tt = np.clip(((u - p0[0]) * ab[0] + (v - p0[1]) * ab[1]) / L2, 0.0, 1.0)
    du = u - (p0[0] + tt * ab[0])
    dv = v - (p0[1] + tt * ab[1])
    return np.sqrt(du * du + dv * dv)

