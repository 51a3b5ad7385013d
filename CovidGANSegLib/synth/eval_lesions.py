"""An independent evaluation lesion model: analytic COVID-19 lesion shapes in mm (numpy / scipy only).

Held-out phantoms must not share their lesions' generator with the training lesion model
(:mod:`CovidGANSegLib.synth.lesions`, thresholded fractal Perlin noise), or a score measures how
well a model learned that generator. This module shares no code with it and uses no noise
thresholding for shapes. Every lesion is an explicit solid, drawn as a signed distance in mm:

* ``wedge``: lobular / segmental subpleural consolidation or ground glass, a cone with its base on
  the pleura and its apex toward the hilum, with an irregular (lobulated) surface;
* ``nodule``: rounded ground-glass opacity (GGO), some with a *halo* (dense core, GGO rim) or a
  *reversed halo* (GGO centre, dense ring, "atoll sign");
* ``band``: curvilinear subpleural bands parallel to the pleura, and perilobular arcs;
* ``patch``: patchy confluent areas, a union of a few overlapping ellipsoids.

Textures (independent of the training model's): GGO that raises the parenchyma partly while the
vessels inside it stay visible and thickened (grey dilation of the underlying image), consolidation
with air bronchograms (thin branching air tubes), crazy paving from a Voronoi (polygonal) septal
network; a low-frequency intralesional variation from a few random cosine waves. Lesion HU range
from about -750 (faint GGO) to +50 (consolidation).

**Partial volume.** Occupancy is averaged over each voxel's slab: the shape is evaluated at several
depths across the slice thickness (one sample per <= 1.6 mm, e.g. 5 for 8 mm slices, 4 for 5 mm)
and, in-plane, through a linear ramp one pixel wide across the surface. A voxel of occupancy
``f`` becomes ``hu + f * (T - hu)`` where ``T`` is the lesion's own HU there; lesions are applied
one after another, so the total lesion weight of a voxel is ``w = 1 - prod(1 - f_i)``.

**Mask rule (exact).** ``mask = lung & (w >= MASK_FRACTION)`` with ``MASK_FRACTION = 0.25``: the
voxels whose HU moved by at least a quarter of the full lesion change ``T - hu``. Voxels outside
the lung are never changed; lung voxels outside the mask carry at most a quarter of a lesion (the
faint partial-volume fringe a radiologist would not outline).

**Coverage.** Lesions are added, each sized from the volume still missing, until the mask holds
the requested fraction of the lung. The achieved fraction is within
``max(COVERAGE_TOLERANCE * coverage, MIN_TOLERANCE_ML / lung volume)`` of the target
(``COVERAGE_TOLERANCE = 0.1``, ``MIN_TOLERANCE_ML = 0.5``); :func:`synthesize_eval_lesions`
logs a warning when it is not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

MASK_FRACTION = 0.25
COVERAGE_TOLERANCE = 0.1
MIN_TOLERANCE_ML = 0.5
LESION_TYPES = ("wedge", "nodule", "band", "patch")
TEXTURES = ("ggo", "consolidation", "crazy_paving", "halo", "reversed_halo")
#: largest distance (mm) between depth samples across one slice's slab
_SLAB_STEP_MM = 1.6
_AIR_HU = -920.0
#: largest volume (mm^3) of one lesion of a kind: round nodules up to about 3.4 cm across
_MAX_VOLUME_MM3 = {"nodule": 20000.0, "band": 2500.0}


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.array([1.0, 0.0, 0.0])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


class _Waves:
    """A smooth random field in mm: the sum of a few cosine waves, roughly within +-1."""

    def __init__(self, rng: np.random.Generator, wavelength: tuple[float, float], n: int = 5) -> None:
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(wavelength[0], wavelength[1], n)
        self.k = (dirs * (2 * np.pi / lam)[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self.norm = np.float32(math.sqrt(2.0 / n))

    def __call__(self, x, y, z) -> np.ndarray:
        out = None
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            w = np.cos(x * kx + y * ky + z * kz + ph)
            out = w if out is None else out + w
        return out * self.norm


class _Lesion:
    """One lesion: a signed-distance shape (mm, > 0 inside) with a bounding radius around ``center``."""

    def __init__(self, kind: str, center: np.ndarray, radius: float) -> None:
        self.kind = kind
        self.center = np.asarray(center, np.float64)
        self.radius = float(radius)

    def sd(self, dx, dy, dz) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def inner(self, dx, dy, dz) -> np.ndarray | None:
        """Signed distance of an inner part (halo core / atoll centre), or None."""
        return None


class _Ellipsoids(_Lesion):
    """Union of rotated ellipsoids with a lobulated surface (nodules, patches)."""

    def __init__(self, kind, center, parts, waves: _Waves, lobulation: float, core: float = 0.0) -> None:
        ext = max(float(np.linalg.norm(off)) + max(ax) for off, _, ax in parts)
        super().__init__(kind, center, ext * (1.0 + lobulation) + 1.0)
        self.parts = parts  # (offset (3,), rotation (3, 3), semi-axes (3,))
        self.waves = waves
        self.lobulation = lobulation
        self.core = core  # inner fraction of the radius (halo / reversed halo), 0 = none

    def _rho(self, dx, dy, dz, off, rot, ax):
        x, y, z = dx - off[0], dy - off[1], dz - off[2]
        qs = [(x * rot[0, i] + y * rot[1, i] + z * rot[2, i]) / ax[i] for i in range(3)]
        return np.sqrt(qs[0] * qs[0] + qs[1] * qs[1] + qs[2] * qs[2])

    def _sd_scaled(self, dx, dy, dz, scale: float) -> np.ndarray:
        best = None
        wob = 1.0 + self.lobulation * self.waves(dx, dy, dz)
        for off, rot, ax in self.parts:
            rho = self._rho(dx, dy, dz, off, rot, ax * scale) / wob
            sd = (1.0 - rho) * np.float32(min(ax) * scale)
            best = sd if best is None else np.maximum(best, sd)
        return best

    def sd(self, dx, dy, dz):
        return self._sd_scaled(dx, dy, dz, 1.0)

    def inner(self, dx, dy, dz):
        return self._sd_scaled(dx, dy, dz, self.core) if self.core > 0 else None


class _Wedge(_Lesion):
    """Cone: base (radius ``rb``) on the pleura at ``center``, apex ``length`` mm along ``axis``."""

    def __init__(self, center, axis, rb: float, length: float, waves: _Waves, lobulation: float) -> None:
        super().__init__("wedge", center, math.hypot(rb, length) * (1.0 + lobulation) + rb)
        self.axis = _unit(np.asarray(axis, float)).astype(np.float32)
        self.rb, self.length = float(rb), float(length)
        self.waves, self.lobulation = waves, lobulation

    def sd(self, dx, dy, dz):
        a = self.axis
        s = dx * a[0] + dy * a[1] + dz * a[2]  # depth from the pleura toward the hilum
        px, py, pz = dx - s * a[0], dy - s * a[1], dz - s * a[2]
        r = np.sqrt(px * px + py * py + pz * pz)
        wob = 1.0 + self.lobulation * self.waves(dx, dy, dz)
        rad = self.rb * wob * np.clip(1.0 - s / self.length, 0.0, None)
        # the base reaches a little beyond the pleura (the lung mask clips it)
        return np.minimum(np.minimum(rad - r, self.length - s), s + self.rb)


class _Band(_Lesion):
    """Curvilinear band: a bent strip ``thickness`` thick, parallel to the pleura, or an arc."""

    def __init__(self, center, normal, tangent, length: float, thickness: float, bend: float, arc: bool) -> None:
        super().__init__("band", center, length / 2 + thickness + abs(bend) * length ** 2 / 4 + 2.0)
        self.n = _unit(np.asarray(normal, float)).astype(np.float32)
        t = np.asarray(tangent, float)
        t = _unit(t - t.dot(self.n) * self.n).astype(np.float32)
        self.t = t
        self.b = np.cross(self.n, self.t).astype(np.float32)
        self.length, self.thickness, self.bend, self.arc = float(length), float(thickness), float(bend), arc

    def sd(self, dx, dy, dz):
        n, t, b = self.n, self.t, self.b
        sn = dx * n[0] + dy * n[1] + dz * n[2]
        st = dx * t[0] + dy * t[1] + dz * t[2]
        sb = dx * b[0] + dy * b[1] + dz * b[2]
        if self.arc:  # perilobular arc: part of a ring of radius R in the (n, t) plane
            R = self.length / 2.0
            rr = np.sqrt((sn + R) ** 2 + st * st)
            ang = np.arctan2(st, sn + R)
            e = np.sqrt((rr - R) ** 2 + sb * sb)
            ends = (np.float32(1.1) - np.abs(ang)) * R  # about 126 degrees of arc
            return np.minimum(self.thickness / 2 - e, ends)
        tt = np.clip(st, -self.length / 2, self.length / 2)
        off = sn - self.bend * tt * tt
        e = np.sqrt(off * off + sb * sb * 0.25 + (st - tt) ** 2)  # wider along b: a strip, not a tube
        return self.thickness / 2 - e


class _Texture:
    """The HU a lesion drives its voxels to (``T``), from the underlying image in the lesion's box."""

    def __init__(self, rng: np.random.Generator, kind: str, spacing: Sequence[float]) -> None:
        self.kind = kind
        self.waves = _Waves(rng, (8.0, 30.0), 4)
        self.amp = float(rng.uniform(20.0, 60.0))
        self.ggo_hu = float(rng.uniform(-750.0, -350.0))
        self.ggo_opacity = float(rng.uniform(0.7, 0.95))
        self.cons_hu = float(rng.uniform(-60.0, 45.0))
        self.vessel_thickening = bool(rng.random() < 0.7)
        self.dense_hu = float(rng.uniform(-300.0, 20.0))  # halo core / atoll ring
        self.cell_mm = float(rng.uniform(5.0, 10.0))
        self.line_hu = float(rng.uniform(150.0, 300.0))
        self.spacing = tuple(float(s) for s in spacing)
        self.rng = rng

    def ggo(self, hu: np.ndarray, on: np.ndarray, x, y, z) -> np.ndarray:
        """GGO target HU at the voxels ``on`` of the box image ``hu`` (coordinates ``x, y, z`` there)."""
        h = hu[on]
        level = self.ggo_hu + self.amp * self.waves(x, y, z)
        t = h + self.ggo_opacity * (level - h)
        if self.vessel_thickening:  # vessels inside GGO stay visible and look thickened
            size = [max(1, int(round(2.5 / s))) | 1 for s in self.spacing[:2]] + [1]
            t = np.maximum(t, ndi.grey_dilation(hu, size=size)[on] - 40.0)
        return np.maximum(t, h)

    def consolidation(self, x, y, z) -> np.ndarray:
        return self.cons_hu + 0.5 * self.amp * self.waves(x, y, z)

    def septal_lines(self, x, y, z) -> np.ndarray:
        """Crazy paving's reticulation: walls of a Voronoi tessellation (cells ``cell_mm`` wide)."""
        lo = np.array([x.min(), y.min(), z.min()], float) - self.cell_mm
        ext = np.array([x.max(), y.max(), z.max()], float) + self.cell_mm - lo
        n_seeds = int(np.clip(np.prod(ext) / self.cell_mm ** 3, 8, 20000))
        seeds = lo + self.rng.uniform(0, 1, (n_seeds, 3)) * ext
        d, _ = cKDTree(seeds).query(np.stack([x, y, z], axis=1), k=2)
        gap = (d[:, 1] - d[:, 0]).astype(np.float32)
        return self.line_hu * np.clip(1.0 - gap / 1.2, 0.0, 1.0)  # walls about 1-1.5 mm thick


class _AirTree:
    """Air bronchograms: a few thin branching air tubes through a consolidation."""

    def __init__(self, rng: np.random.Generator, lesion: _Lesion, inward: np.ndarray) -> None:
        segs = []
        start = -0.6 * lesion.radius * _unit(inward)
        stack = [(start, _unit(-inward + 0.3 * rng.normal(size=3)), 0.6 * lesion.radius, float(rng.uniform(1.0, 1.6)))]
        while stack and len(segs) < 12:
            p, d, length, r = stack.pop()
            q = p + d * length
            segs.append((p, q, r))
            if r > 0.7 and length > 4.0:
                for _ in range(2):
                    nd = _unit(d + 0.6 * rng.normal(size=3))
                    stack.append((q, nd, length * 0.6, r * 0.75))
        self.segs = [(a.astype(np.float32), b.astype(np.float32), np.float32(r)) for a, b, r in segs]

    def sd(self, dx, dy, dz) -> np.ndarray:
        best = None
        for a, b, r in self.segs:
            ab = b - a
            L2 = max(float(ab @ ab), 1e-6)
            t = np.clip(((dx - a[0]) * ab[0] + (dy - a[1]) * ab[1] + (dz - a[2]) * ab[2]) / L2, 0.0, 1.0)
            ex, ey, ez = dx - a[0] - t * ab[0], dy - a[1] - t * ab[1], dz - a[2] - t * ab[2]
            sd = r - np.sqrt(ex * ex + ey * ey + ez * ez)
            best = sd if best is None else np.maximum(best, sd)
        return best


class _Placement:
    """Where lesions go: lung voxels of a coarse (about 4 mm in-plane) sub-grid, their depth below
    the pleura and the direction to their lung's hilum."""

    def __init__(self, lung: np.ndarray, spacing: Sequence[float], posterior_axis: int,
                 posterior_direction: int) -> None:
        self.lung = lung
        self.spacing = np.asarray(spacing, float)
        # depth below the pleura on a coarse grid (about 4 mm), cheap at any resolution
        f = [max(1, int(round(4.0 / s))) for s in spacing[:2]] + [1]
        coarse = lung[:: f[0], :: f[1], :: f[2]]
        depth = ndi.distance_transform_edt(np.pad(coarse, 1), sampling=self.spacing * f)[1:-1, 1:-1, 1:-1]
        self.f = np.asarray(f)
        self.depth = depth.astype(np.float32)
        self.cidx = np.argwhere(coarse)
        idx = self.cidx * self.f  # full-resolution indices of the candidate sites
        self.idx = idx
        pos = idx * self.spacing
        self.pos = pos
        # side of each lung voxel (split at the middle of the lungs along axis 0) and its hilum
        mid = 0.5 * (pos[:, 0].min() + pos[:, 0].max())
        self.side = pos[:, 0] > mid
        self.hila = []
        for s in (False, True):
            p = pos[self.side == s]
            if len(p) == 0:
                self.hila.append(pos.mean(axis=0))
                continue
            h = np.median(p, axis=0)
            h[0] = np.quantile(p[:, 0], 0.8 if not s else 0.2)  # medial
            h[2] = np.quantile(p[:, 2], 0.6)
            self.hila.append(h)
        ax = posterior_axis
        coord = pos[:, ax]
        lo, hi = coord.min(), coord.max()
        rel = (coord - lo) / max(hi - lo, 1e-6)
        self.posterior = rel if posterior_direction > 0 else 1.0 - rel  # 1 = most posterior

    def voxel_depth(self, sel: np.ndarray) -> np.ndarray:
        i = self.cidx[sel]
        return self.depth[i[:, 0], i[:, 1], i[:, 2]]

    def pick(self, rng: np.random.Generator, weight: np.ndarray, *, peripheral: bool, n_try: int = 64) -> int:
        """Index (into the site list) of a lesion site: not yet in the mask (lesion ``weight`` below
        the mask rule), peripheral / posterior when asked."""
        cand = rng.integers(0, len(self.idx), n_try)
        i = self.idx[cand]
        free = weight[i[:, 0], i[:, 1], i[:, 2]] < MASK_FRACTION
        cand = cand[free] if free.any() else cand
        d = self.voxel_depth(cand)
        w = 0.25 + 1.5 * self.posterior[cand]
        if peripheral:
            w = w * np.exp(-d / 8.0)
        else:
            w = w * (0.4 + np.exp(-d / 25.0))
        w = w / w.sum()
        return int(cand[rng.choice(len(cand), p=w)])

    def inward(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Unit direction from lung voxel ``k`` toward its lung's hilum (mm space), slightly jittered."""
        h = self.hila[int(self.side[k])]
        return _unit(h - self.pos[k] + rng.normal(0.0, 8.0, 3))


def _slab_offsets(sz: float) -> np.ndarray:
    n = max(1, int(math.ceil(sz / _SLAB_STEP_MM)))
    return ((np.arange(n) + 0.5) / n - 0.5) * sz


def _box(center: np.ndarray, radius: float, spacing: np.ndarray, shape) -> tuple[slice, slice, slice] | None:
    sl = []
    for a in range(3):
        ext = radius + (spacing[a] if a < 2 else spacing[a] / 2)
        lo = int(math.floor((center[a] - ext) / spacing[a] + 0.5))
        hi = int(math.ceil((center[a] + ext) / spacing[a] + 0.5))
        lo, hi = max(lo, 0), min(hi, shape[a])
        if hi <= lo:
            return None
        sl.append(slice(lo, hi))
    return tuple(sl)


def _volume_to_size(kind: str, vol_mm3: float, rng: np.random.Generator) -> dict:
    if kind == "nodule":
        return {"r": (3.0 * vol_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)}
    if kind == "wedge":
        aspect = float(rng.uniform(0.8, 1.5))  # length / base radius
        rb = (3.0 * vol_mm3 / (math.pi * aspect)) ** (1.0 / 3.0)
        return {"rb": rb, "length": rb * aspect}
    if kind == "band":
        th = float(rng.uniform(2.5, 6.0))
        return {"thickness": th, "length": float(np.clip(vol_mm3 / (th * th * 1.6), 12.0, 90.0))}
    k = int(rng.integers(2, 5))
    return {"k": k, "r": (3.0 * vol_mm3 / (4.0 * math.pi * k * 0.7)) ** (1.0 / 3.0)}


def _make_lesion(kind: str, site: np.ndarray, inward: np.ndarray, vol_mm3: float, rng: np.random.Generator,
                 scale: float) -> _Lesion:
    size = _volume_to_size(kind, vol_mm3, rng)
    waves = _Waves(rng, (6.0, 25.0), 5)
    lob = float(rng.uniform(0.05, 0.25))
    if kind == "wedge":
        return _Wedge(site - 2.0 * inward, inward, size["rb"] * scale, size["length"] * scale, waves, lob)
    if kind == "nodule":
        r = size["r"] * scale
        axes = np.array([r, r, r]) * rng.uniform(0.85, 1.15, 3)
        core = float(rng.uniform(0.45, 0.7))
        center = site + inward * min(r * rng.uniform(0.2, 0.9) + rng.uniform(0.0, 5.0), 40.0)
        return _Ellipsoids("nodule", center, [(np.zeros(3), _random_rotation(rng), axes)], waves, lob * 0.5, core)
    if kind == "band":
        tangent = rng.normal(size=3)
        arc = bool(rng.random() < 0.4)
        depth = float(rng.uniform(3.0, 12.0))
        bend = float(rng.uniform(-0.01, 0.01))
        thickness = size["thickness"] * max(scale, 0.6)
        return _Band(site + inward * depth, -inward, tangent, size["length"] * scale, thickness, bend, arc)
    r = size["r"] * scale
    parts = []
    for _ in range(size["k"]):
        off = rng.normal(0.0, 0.6 * r, 3)
        axes = r * rng.uniform(0.6, 1.4, 3)
        parts.append((off, _random_rotation(rng), axes))
    center = site + inward * min(r * rng.uniform(0.1, 0.6), 50.0)
    return _Ellipsoids("patch", center, parts, waves, lob, 0.0)


def _texture_for(kind: str, rng: np.random.Generator, coverage: float) -> str:
    if kind == "nodule":
        return str(rng.choice(["ggo", "halo", "reversed_halo", "crazy_paving"], p=[0.5, 0.2, 0.15, 0.15]))
    if kind == "band":
        return str(rng.choice(["consolidation", "ggo"], p=[0.6, 0.4]))
    dense = 0.15 + 0.3 * min(coverage / 0.5, 1.0)
    return str(rng.choice(["ggo", "consolidation", "crazy_paving"], p=[0.85 - dense, dense, 0.15]))


def _draw_kind(rng: np.random.Generator, coverage: float) -> str:
    if coverage < 0.05:
        p = [0.3, 0.35, 0.15, 0.2]
    elif coverage < 0.25:
        p = [0.35, 0.2, 0.1, 0.35]
    else:
        p = [0.35, 0.05, 0.05, 0.55]
    return str(rng.choice(LESION_TYPES, p=p))


def synthesize_eval_lesions(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float],
    coverage: float,
    posterior_axis: int = 1,
    posterior_direction: int = -1,
    slice_axis: int = 2,
    return_details: bool = False,
):
    """Insert analytic lesions covering ``coverage`` of the lung into a CT in HU.

    Args:
        hu: 3D CT in HU, any real dtype.
        lung_mask: lung voxels (same shape); lesions stay inside it.
        rng: random source; the result is a pure function of its state and the inputs.
        spacing: voxel size in mm along the three axes.
        coverage: target fraction of the lung in the lesion mask, in (0, 1).
        posterior_axis, posterior_direction: the antero-posterior axis and where posterior is
            (-1: low indices, as axis 1 of LAS / RAS arrays). Lesions favour posterior, subpleural
            sites.
        slice_axis: the axis across slices (2 for file / canonical ``(x, y, z)`` arrays, 0 for
            model-grid ``(D, H, W)`` arrays); its spacing is the slab thickness over which shapes
            are averaged.
        return_details: also return a dict with the lesion weight ``w`` (float32), the list of
            lesions (kind, texture, mL in the mask) and the coverage reached.

    Returns:
        ``(hu_out float32, mask bool)`` (plus the details dict when asked). ``mask`` is
        ``lung & (w >= MASK_FRACTION)`` (see the module docstring).
    """
    hu = np.asarray(hu)
    lung = np.asarray(lung_mask) > 0
    if hu.ndim != 3 or hu.shape != lung.shape:
        raise ValueError(f"hu {hu.shape} and lung_mask {lung.shape} must be 3D arrays of the same shape")
    sp = np.asarray([float(s) for s in spacing])
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    if posterior_axis not in (0, 1, 2) or posterior_direction not in (-1, 1):
        raise ValueError("posterior_axis must be 0, 1 or 2 and posterior_direction -1 or +1")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    if slice_axis != 2:  # work with the slices on the last axis, and move them back at the end
        order = [a for a in range(3) if a != slice_axis] + [slice_axis]
        res = synthesize_eval_lesions(
            np.moveaxis(hu, slice_axis, 2), np.moveaxis(lung, slice_axis, 2), rng, spacing=tuple(sp[order]),
            coverage=coverage, posterior_axis=order.index(posterior_axis), posterior_direction=posterior_direction,
            return_details=True)
        out = np.ascontiguousarray(np.moveaxis(res[0], 2, slice_axis))
        mask = np.ascontiguousarray(np.moveaxis(res[1], 2, slice_axis))
        details = res[2]
        details["w"] = np.ascontiguousarray(np.moveaxis(details["w"], 2, slice_axis))
        return (out, mask, details) if return_details else (out, mask)
    out = hu.astype(np.float32, copy=True)
    w_total = np.zeros(hu.shape, np.float32)
    details = {"lesions": [], "target": float(coverage)}
    n_lung = int(lung.sum())
    if n_lung == 0:
        details.update(w=w_total, coverage=0.0)
        return (out, lung.copy(), details) if return_details else (out, lung.copy())
    voxel_mm3 = float(np.prod(sp))
    target = coverage * n_lung
    tol = max(COVERAGE_TOLERANCE * target, MIN_TOLERANCE_ML * 1000.0 / voxel_mm3)
    lung_mm3 = n_lung * voxel_mm3
    place = _Placement(lung, sp, posterior_axis, posterior_direction)
    offsets = _slab_offsets(float(sp[2]))
    count = 0
    # a typical lesion volume for this coverage: mild cases get few-mL foci, severe large areas
    total_mm3 = coverage * lung_mm3
    v_hi_typ = float(np.clip(0.3 * total_mm3, 800.0, 0.2 * lung_mm3))
    failures = 0
    for _ in range(600):
        missing = target - count
        if missing <= 0.5 * tol or failures > 40:
            break
        kind = _draw_kind(rng, coverage)
        v_hi = min(v_hi_typ, 1.3 * missing * voxel_mm3)
        v_lo = min(400.0, v_hi)
        vol = float(np.exp(rng.uniform(math.log(v_lo), math.log(max(v_hi, v_lo * 1.0001)))))
        vol = min(vol, _MAX_VOLUME_MM3.get(kind, vol))
        k = place.pick(rng, w_total, peripheral=kind in ("wedge", "band") or rng.random() < 0.85)
        site = place.pos[k]
        inward = place.inward(k, rng)
        texture = _Texture(rng, _texture_for(kind, rng, coverage), sp)
        seed = int(rng.integers(0, 2 ** 31))
        scale = 1.0
        for attempt in range(5):
            lesion_rng = np.random.default_rng(seed)  # the same shape at each scale
            lesion = _make_lesion(kind, site, inward, vol, lesion_rng, scale)
            res = _render(lesion, texture, lesion_rng, inward, out, lung, sp, offsets)
            if res is None:
                break
            box, f, t_hu = res
            w_new = 1.0 - (1.0 - w_total[box]) * (1.0 - f)
            inside = lung[box]
            before = int(((w_total[box] >= MASK_FRACTION) & inside).sum())
            after = int(((w_new >= MASK_FRACTION) & inside).sum())
            gain = after - before
            if count + gain <= target + tol or gain <= 0:
                break
            scale *= 0.72
        else:
            res = None
        if res is None or gain <= 0:
            failures += 1
            continue
        if count + gain > target + tol:
            failures += 1
            continue
        out[box] += f * (t_hu - out[box])
        w_total[box] = w_new
        count += gain
        details["lesions"].append({"kind": kind, "texture": texture.kind, "ml": round(gain * voxel_mm3 / 1000.0, 3)})
    mask = lung & (w_total >= MASK_FRACTION)
    reached = float(mask.sum()) / n_lung
    if abs(mask.sum() - target) > tol:
        log.warning("evaluation lesions cover %.3f %% of the lung, target %.3f %%", 100 * reached, 100 * coverage)
    details.update(w=w_total, coverage=reached)
    return (out, mask, details) if return_details else (out, mask)


def _slab_occupancy(sd_fn, dx, dy, dz0, offsets: np.ndarray, ramp: np.float32, shape) -> np.ndarray:
    """Occupancy of ``sd_fn > 0`` averaged over each voxel's slab and a one-pixel in-plane ramp.

    The depth samples are taken only near the surface: where the signed distance at the slice
    centre is farther than half a slab (with a safety factor) from zero, the voxel is all in or out.
    """
    sd0 = np.broadcast_to(sd_fn(dx, dy, dz0), shape)
    margin = np.float32(0.75 * (offsets.max() - offsets.min() + 1e-3) + ramp)
    f = (sd0 > 0).astype(np.float32)
    near = np.nonzero(np.abs(sd0) < margin)
    if near[0].size:
        x = dx.ravel()[near[0]] if dx.shape[0] > 1 else np.full(near[0].size, dx.ravel()[0], np.float32)
        y = dy.ravel()[near[1]] if dy.shape[1] > 1 else np.full(near[0].size, dy.ravel()[0], np.float32)
        z0 = dz0.ravel()[near[2]] if dz0.shape[2] > 1 else np.full(near[0].size, dz0.ravel()[0], np.float32)
        acc = np.zeros(near[0].size, np.float32)
        for off in offsets:
            acc += np.clip(sd_fn(x, y, z0 + np.float32(off)) / ramp + 0.5, 0.0, 1.0)
        f[near] = acc * np.float32(1.0 / len(offsets))
    return f


def _render(lesion: _Lesion, texture: _Texture, rng: np.random.Generator, inward: np.ndarray, image: np.ndarray,
            lung: np.ndarray, sp: np.ndarray, offsets: np.ndarray):
    """Occupancy ``f`` (slab-averaged, inside the lung) and target HU ``T`` of one lesion in its box."""
    box = _box(lesion.center, lesion.radius, sp, image.shape)
    if box is None:
        return None
    inside = lung[box]
    if not inside.any():
        return None
    c = lesion.center
    dx = ((np.arange(box[0].start, box[0].stop) * sp[0]) - c[0]).astype(np.float32).reshape(-1, 1, 1)
    dy = ((np.arange(box[1].start, box[1].stop) * sp[1]) - c[1]).astype(np.float32).reshape(1, -1, 1)
    dz0 = ((np.arange(box[2].start, box[2].stop) * sp[2]) - c[2]).astype(np.float32).reshape(1, 1, -1)
    ramp = np.float32(max(sp[0], sp[1]))
    shape = inside.shape
    f = _slab_occupancy(lesion.sd, dx, dy, dz0, offsets, ramp, shape) * inside
    if not (f >= MASK_FRACTION).any():
        return None
    kind = texture.kind
    h = image[box]
    on = f > 0
    X, Y, Z = (np.broadcast_to(a + np.float32(o), shape)[on] for a, o in ((dx, c[0]), (dy, c[1]), (dz0, c[2])))
    t = h.copy()
    if kind in ("ggo", "halo", "reversed_halo", "crazy_paving"):
        ggo = texture.ggo(h, on, X, Y, Z)
    if kind == "ggo":
        t[on] = ggo
    elif kind == "crazy_paving":
        t[on] = ggo + texture.septal_lines(X, Y, Z)
    elif kind == "consolidation":
        tc = texture.consolidation(X, Y, Z)
        if lesion.kind in ("wedge", "patch"):  # air bronchograms
            air = _AirTree(rng, lesion, inward)
            a = np.minimum(_slab_occupancy(air.sd, dx, dy, dz0, offsets, ramp, shape)[on], 1.0)
            tc = tc + a * (_AIR_HU - tc)
        t[on] = tc
    else:
        f_in = _slab_occupancy(lesion.inner, dx, dy, dz0, offsets, ramp, shape)[on]
        dense = np.maximum(texture.dense_hu + 0.5 * texture.amp * texture.waves(X, Y, Z), h[on])
        core = np.clip(f_in / np.maximum(f[on], 1e-6), 0.0, 1.0)
        if kind == "halo":
            t[on] = ggo + core * (dense - ggo)
        else:  # reversed halo: GGO centre, dense rim
            t[on] = dense + core * (ggo - dense)
    return box, f, t.astype(np.float32)
