"""Synthetic chest-CT phantoms in HU: the project's embedded default data set (numpy only).

Each phantom is an analytic chest rendered with partial-volume edges: air, a body outline with
skin, subcutaneous fat and muscle, ribs (cortex, marrow, costal cartilage), spine (vertebral body,
discs, canal, posterior elements), sternum and scapulae, a mediastinum with heart, aorta,
pulmonary trunk and arteries, superior vena cava, oesophagus, trachea and main bronchi, upper
abdominal organs under the diaphragm domes, a patient table, and two lungs that taper toward the
apex and sit on the domes. The lungs hold branching vessel trees (arteries and veins, tapering by
Murray's law, partial volume across 8 mm slices, so thin vessels have lesion-like HU) and
bronchi beside the arteries, over parenchyma near -850 HU with texture and a dependent
(posterior) density gradient. CT noise is added last.

COVID phantoms get multifocal, peripheral and posterior lesions from :mod:`lesions` (ground glass,
consolidation, crazy paving); the category follows MosMedData's bands of the *true* involvement.
Every phantom is a pure function of the generator state, and a cohort of its (seed, study number),
so the same seed gives the same bytes.

Arrays are in the file's voxel order, orientation LAS like MosMedData: axis 0 runs to the
patient's left, axis 1 anterior, axis 2 superior.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib.synth.lesions import LesionConfig, synthesize_lesions
from CovidGANSegLib.synth.perlin import fractal_noise_3d

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
SIZES = ("small", "mosmed")
CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: MosMedData bands of lung involvement: CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 > 75 %
CATEGORY_BANDS = ((0.25, "CT-1"), (0.50, "CT-2"), (0.75, "CT-3"), (math.inf, "CT-4"))
#: how COVID phantoms of a cohort cycle through the categories (mostly CT-1 / CT-2, like MosMed)
COHORT_CATEGORY_CYCLE = ("CT-1", "CT-2", "CT-1", "CT-3", "CT-1", "CT-2", "CT-4", "CT-1", "CT-2", "CT-1")
#: the involvement range each category is drawn from (inside its band, away from the edges)
INVOLVEMENT_RANGES = {"CT-1": (0.001, 0.22), "CT-2": (0.27, 0.48), "CT-3": (0.52, 0.73), "CT-4": (0.77, 0.88)}

#: tissue labels of :attr:`Phantom.labels`
LABELS = {
    "air": 0, "fat": 1, "muscle": 2, "bone": 3, "lung": 4, "vessel": 5, "airway": 6,
    "soft_tissue": 7, "table": 8, "cartilage": 9, "organ": 10,
}

HU_MIN, HU_MAX = -1024, 3071
#: vessels thinner than this (radius, mm) are rendered in batches
_SMALL_VESSEL_MM = 2.0


def category_for(involvement: float, covid: bool = True) -> str:
    """MosMedData category of a lung involvement fraction (CT-0 for healthy)."""
    if not covid:
        return "CT-0"
    for upper, name in CATEGORY_BANDS:
        if involvement < upper:
            return name
    return "CT-4"


@dataclass
class Phantom:
    """One synthetic chest CT (all arrays in file voxel order, LAS).

    Attributes:
        hu: int16 Hounsfield units.
        affine: voxel-to-world (RAS mm) affine, LAS orientation.
        lung_mask: anatomical lungs, including vessels, intrapulmonary airways and lesions,
            excluding the trachea and main bronchi.
        lesion_mask: exactly the voxels changed by lesions (empty for healthy phantoms).
        involvement: lesion volume / lung volume.
        category: "CT-0" (healthy) .. "CT-4", from the true involvement.
        labels: uint8 tissue labels (see :data:`LABELS`), before lesions.
    """

    hu: np.ndarray
    affine: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    involvement: float
    category: str
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def voxel_ml(self) -> float:
        sx, sy, sz = self.spacing
        return sx * sy * sz / 1000.0

    @property
    def lung_ml(self) -> float:
        return float(self.lung_mask.sum()) * self.voxel_ml

    @property
    def lesion_ml(self) -> float:
        return float(self.lesion_mask.sum()) * self.voxel_ml

    @property
    def covid(self) -> bool:
        return self.category != "CT-0"


# --------------------------------------------------------------------------------------------
# small geometric helpers (all distances in mm, positive inside)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm, > 0 inside) over a ramp ``edge`` wide."""
    return np.clip(d * np.float32(1.0 / edge) + np.float32(0.5), 0.0, 1.0)


def _ellipse_sd(du: np.ndarray, dv: np.ndarray, au, av, angle: float = 0.0) -> np.ndarray:
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


def _overlap(center: np.ndarray, half: float, zc: np.ndarray, slab: float) -> np.ndarray:
    """Fraction of the slab ``[zc - slab/2, zc + slab/2]`` inside ``[center - half, center + half]``."""
    lo = np.maximum(center - half, zc - slab / 2)
    hi = np.minimum(center + half, zc + slab / 2)
    return np.clip((hi - lo) / slab, 0.0, 1.0)


def _smooth_curve(rng: np.random.Generator, amplitude: float, terms: int = 3):
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


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# --------------------------------------------------------------------------------------------
# geometry of a study


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]  # output (nx, ny, nz)
    spacing: tuple[float, float, float]
    factor: int  # in-plane downsampling of the anatomy grid

    @property
    def fov(self) -> float:
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


def _draw_grid(rng: np.random.Generator, size: str, body_width: float) -> _Grid:
    fov = body_width * _u(rng, 1.05, 1.18)
    if size == "mosmed":
        n, nz_range, factor = 512, (32, 49), 2
        sp = float(np.clip(fov / n, 0.6, 0.8))
    elif size == "small":
        n, nz_range, factor = 128, (32, 41), 1
        sp = fov / n
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    nz = int(rng.integers(*nz_range))
    return _Grid((n, n, nz), (sp, sp, 8.0), factor)


class _Chest:
    """Renders one chest on the anatomy grid (file order (x, y, z), u = patient left, v = anterior)."""

    def __init__(self, rng: np.random.Generator, size: str) -> None:
        self.rng = rng
        r = rng
        # ---- body and grid
        self.A0 = _u(r, 135.0, 170.0)  # body half width (mm)
        self.grid = _draw_grid(r, size, 2 * self.A0 * 1.05)
        g = self.grid
        f = g.factor
        self.nx, self.ny, self.nz = g.shape[0] // f, g.shape[1] // f, g.shape[2]
        self.px = g.spacing[0] * f  # anatomy pixel (mm)
        self.sz = g.spacing[2]
        fov = g.fov
        self.A0 = min(self.A0, 0.45 * fov)
        self.u = ((np.arange(self.nx) + 0.5) * self.px - fov / 2).astype(np.float32).reshape(-1, 1, 1)
        self.v = ((np.arange(self.ny) + 0.5) * self.px - fov / 2).astype(np.float32).reshape(1, -1, 1)
        # z: 0 at the lung base; the scan covers the lungs plus margins
        extent = self.nz * self.sz
        room = extent - 40.0  # at least 24 mm of abdomen below the bases and 16 mm above the apices
        self.H = _u(r, min(235.0, room - 15.0), min(290.0, room))  # lung height base -> apex
        below = _u(r, 24.0, extent - self.H - 16.0)
        self.z0_world = -below - 100.0
        self.zc = ((np.arange(self.nz) + 0.5) * self.sz - below).astype(np.float32)
        self.z = self.zc.reshape(1, 1, -1)
        self.t = self.z / np.float32(self.H)  # (1, 1, nz) normalised lung height
        self.edge = self.px
        # ---- outputs
        self.hu = np.full((self.nx, self.ny, self.nz), -1000.0, dtype=np.float32)
        self.labels = np.zeros((self.nx, self.ny, self.nz), dtype=np.uint8)
        self.lung = np.zeros((self.nx, self.ny, self.nz), dtype=np.float32)

    # -- painting
    def paint(self, occ, value, label: int, box=None, weight=None) -> None:
        """Blend ``value`` into the image with occupancy ``occ`` (inside ``box`` when given)."""
        box = box if box is not None else (slice(None),) * 3
        occ = np.asarray(occ, dtype=np.float32)
        if weight is not None:
            occ = occ * weight
        h = self.hu[box]
        occ_b = np.broadcast_to(occ, h.shape)
        h += occ_b * (np.asarray(value, dtype=np.float32) - h)
        lab = self.labels[box]
        lab[occ_b > 0.5] = label

    def box(self, u0: float, u1: float, v0: float, v1: float, z0: float = -1e9, z1: float = 1e9):
        """Index box covering u in [u0, u1], v in [v0, v1], z in [z0, z1] (mm), with a margin."""
        fov = self.grid.fov
        m = 2 * self.px
        i0 = max(0, int((u0 - m + fov / 2) / self.px))
        i1 = min(self.nx, int((u1 + m + fov / 2) / self.px) + 1)
        j0 = max(0, int((v0 - m + fov / 2) / self.px))
        j1 = min(self.ny, int((v1 + m + fov / 2) / self.px) + 1)
        k0 = int(np.searchsorted(self.zc, z0 - self.sz))
        k1 = int(np.searchsorted(self.zc, z1 + self.sz))
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            return None
        return (slice(i0, i1), slice(j0, j1), slice(k0, k1))

    def coords(self, box):
        return self.u[box[0]], self.v[:, box[1]], self.z[:, :, box[2]]

    # ---------------------------------------------------------------- anatomy
    def render(self) -> None:
        self._draw_parameters()
        self._table()
        self._body_wall()
        self._abdomen()
        self._lungs()
        self._mediastinum()
        self._spine()
        self._ribs_and_bones()
        self._vessel_trees()

    def _draw_parameters(self) -> None:
        r = self.rng
        self.uc = _u(r, -8.0, 8.0)
        self.vc = _u(r, -25.0, 0.0)
        self.B_ant = self.A0 * _u(r, 0.66, 0.78)
        self.B_post = self.B_ant * _u(r, 0.9, 1.0)
        self.p_exp = _u(r, 2.2, 2.8)
        self.width_curve = _smooth_curve(r, 0.04)
        self.harm = [(_u(r, 0.0, 0.025), int(k), _u(r, 0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        self.F0 = _u(r, 4.0, 18.0)  # subcutaneous fat (mm)
        self.M0 = _u(r, 5.0, 9.0)  # muscle layer (mm)
        self.M_pect = _u(r, 6.0, 14.0)
        self.M_para = _u(r, 30.0, 40.0)
        self.M_shoulder = _u(r, 10.0, 20.0)
        self.R = _u(r, 8.0, 10.0)  # rib layer (mm)
        self.fat_hu = _u(r, -110.0, -85.0)
        self.muscle_hu = _u(r, 38.0, 55.0)
        self.blood_hu = _u(r, 35.0, 50.0)
        self.lung_hu = _u(r, -900.0, -865.0)
        self.lung_gradient = _u(r, 50.0, 100.0)
        self.cortex_hu = _u(r, 700.0, 1000.0)
        self.marrow_hu = _u(r, 160.0, 300.0)
        # spine (per patient)
        self.r_vb = _u(r, 15.0, 20.0)
        self.r_can = _u(r, 7.0, 9.0)
        # angles and radial geometry of the body (2D: body centre is fixed over z)
        du = self.u - self.uc
        dv = self.v - self.vc
        self.theta = np.arctan2(dv, du).astype(np.float32)  # (nx, ny, 1): +pi/2 anterior
        self.rad = np.sqrt(du * du + dv * dv).astype(np.float32)
        self.phi = np.arctan2(np.abs(du), -dv).astype(np.float32)  # 0 posterior midline .. pi anterior
        # posterior body surface and wall depth at the midline
        self.v_back = self.vc - self.B_post
        self.D_post = self.F0 * 0.8 + self.M0 + self.M_para + self.R
        self.v_vb = self.v_back + self.D_post + 0.3 * self.r_vb  # vertebral body centre
        self.v_can = self.v_vb - 0.85 * self.r_vb - self.r_can - 1.5

    # body shape ----------------------------------------------------------------------------
    def _body_radius(self) -> np.ndarray:
        """Body boundary radius along each ray, (nx, ny, nz)."""
        t = self.t
        widen = 1.0 + self.width_curve(t) + 0.07 * _smoothstep((t - 0.85) / 0.3) - 0.03 * _smoothstep(-t / 0.3)
        A = (self.A0 * widen).astype(np.float32)
        B = np.where(self.theta > 0, np.float32(self.B_ant), np.float32(self.B_post)).astype(np.float32)
        c = np.abs(np.cos(self.theta))
        s = np.abs(np.sin(self.theta))
        p = self.p_exp
        # superellipse radius along the ray: ((|c|/A)^p + (|s|/B)^p)^(-1/p)
        term_s = (s / B) ** p  # (nx, ny, 1)
        term_c = (c ** p) / (A ** p)  # (nx, ny, nz)
        rb = (term_c + term_s) ** np.float32(-1.0 / p)
        rb *= self._harmonics(self.theta)
        # flat back on the table
        rb = np.where(self.theta < 0, np.minimum(rb, (self.B_post / np.maximum(s, 1e-3)).astype(np.float32)), rb)
        return rb.astype(np.float32)

    def _harmonics(self, theta):
        mult = np.ones_like(theta)
        post = np.clip(-np.sin(theta), 0.0, 1.0) ** 2
        for amp, k, ph in self.harm:
            mult = mult + amp * (1.0 - 0.9 * post) * np.cos(k * theta + ph)
        return mult

    def _table(self) -> None:
        self.v_table = self.v_back - _u(self.rng, 1.0, 6.0)
        u = self.u
        top = self.v_table + 0.0005 * (u - self.uc) ** 2  # slightly curved, in mm
        thick = _u(self.rng, 30.0, 45.0)
        dv = top - self.v  # > 0 below the table top
        occ_out = _soft(np.minimum(dv, thick - dv), self.edge)
        occ_in = _soft(np.minimum(dv - 2.5, thick - 2.5 - dv), self.edge)
        self.paint(occ_out, _u(self.rng, 150.0, 300.0), LABELS["table"])
        self.paint(occ_in, -920.0, LABELS["table"])

    def _body_wall(self) -> None:
        r = self.rng
        rb = self._body_radius()
        self.depth = rb - self.rad  # (nx, ny, nz) radial depth below the skin, mm
        t = self.t
        phi = self.phi
        lateral = np.abs(np.cos(self.theta))
        fat_mod = 1.0 + 0.4 * lateral + 0.2 * (phi < 1.0) + 0.12 * np.cos(3 * self.theta + r.uniform(0, 6))
        F = (self.F0 * fat_mod * (1.0 + 0.5 * np.clip(-t, 0, 1))).astype(np.float32)
        pect = np.exp(-(((phi - 2.25) / 0.45) ** 2)) * _smoothstep((t - 0.35) / 0.3)
        para = np.exp(-((phi / 0.4) ** 2))
        shoulder = np.exp(-(((phi - 1.0) / 0.35) ** 2)) * _smoothstep((t - 0.45) / 0.3)
        M = (self.M0 + self.M_pect * pect + self.M_para * para + self.M_shoulder * shoulder).astype(np.float32)
        self.F, self.M = F, M
        self.D = F + M + self.R  # wall depth to the pleura
        d = self.depth
        e = self.edge
        body = _soft(d, e)
        self.paint(body, 25.0, LABELS["soft_tissue"])  # skin
        self.paint(_soft(d - 2.0, e), self.fat_hu, LABELS["fat"])
        self.paint(_soft(d - F, e), self.muscle_hu, LABELS["muscle"])
        # a fat plane between the superficial and deep muscles
        plane = _soft(np.minimum(d - F - 0.55 * M, F + 0.55 * M + 2.0 - d), e) * (M > 14)
        self.paint(plane, self.fat_hu + 20.0, LABELS["fat"], weight=0.8)
        self.cavity = _soft(d - self.D, e)  # thoracic / abdominal cavity
        self.paint(self.cavity, self.fat_hu + 10.0, LABELS["fat"])  # mediastinal / abdominal fat

    # diaphragm and abdomen ---------------------------------------------------------------------
    def _diaphragm(self) -> np.ndarray:
        """Dome height z (mm) over the plane, (nx, ny, 1): lungs lie above it."""
        r = self.rng
        H = self.H
        top_r = H * _u(r, 0.17, 0.26)
        top_l = top_r - _u(r, 5.0, 25.0)
        v_d = self.v_vb + _u(r, 55.0, 80.0)
        heights = []
        for sign, top in ((-1, top_r), (1, top_l)):
            u_d = self.uc + sign * _u(r, 45.0, 65.0)
            # the dome falls to z = -(0..10) mm at the postero-lateral costophrenic recess
            corner_u, corner_v = self.uc + sign * self.A0 * 0.92, self.v_back + 30.0
            dist2 = (corner_u - u_d) ** 2 + (corner_v - v_d) ** 2
            k = (top + _u(r, 0.0, 10.0)) / dist2
            heights.append(np.maximum(top - k * ((self.u - u_d) ** 2 + (self.v - v_d) ** 2), -15.0))
        w = _smoothstep((self.u - self.uc) / 40.0 + 0.5)
        self.dome_top_left = top_l
        self.dome_v = v_d
        return ((1 - w) * heights[0] + w * heights[1]).astype(np.float32)

    def _abdomen(self) -> None:
        r = self.rng
        self.z_dia = self._diaphragm()
        below = np.clip((self.z_dia - self.z) / self.sz + 0.5, 0.0, 1.0)  # fraction of slab below dome
        self.above_dia = 1.0 - below
        abd = self.cavity * below
        e = self.edge
        u, v, z = self.u, self.v, self.z
        # default abdominal content: bowel / fat mixture
        self.paint(abd, 15.0, LABELS["organ"], weight=0.6)
        # liver: right side and anterior left lobe
        liver_edge = self.uc + 10.0 + 0.45 * (v - self.v_vb - 50.0)
        liver = _soft(liver_edge - u, 6.0) * abd
        self.paint(liver, _u(r, 50.0, 65.0), LABELS["organ"])
        # spleen (left posterolateral) and stomach (left anterior, gas anteriorly)
        sp = _soft(_ellipse_sd(u - (self.uc + 0.55 * self.A0), v - (self.v_vb + 15), 30.0, 45.0, 0.6), e) * abd
        self.paint(sp, _u(r, 40.0, 50.0), LABELS["organ"])
        su, sv = self.uc + 0.3 * self.A0, self.v_vb + _u(r, 70.0, 95.0)
        st = _soft(_ellipse_sd(u - su, v - sv, 45.0, 35.0), e) * abd
        self.paint(st, _u(r, 5.0, 25.0), LABELS["organ"])
        gas = st * _soft(v - (sv + _u(r, 5.0, 25.0)), e)
        self.paint(gas, -1000.0, LABELS["air"])
        # kidneys at the lowest levels
        for sign in (-1, 1):
            kid = _soft(_ellipse_sd(u - (self.uc + sign * 60.0), v - (self.v_vb + 5.0), 28.0, 22.0, 0.5 * sign), e)
            kz = _soft(np.minimum(-45.0 - z, z + 160.0), self.sz)
            self.paint(kid * kz * self.cavity, 30.0, LABELS["organ"])

    # lungs ------------------------------------------------------------------------------------
    def _lungs(self) -> None:
        r = self.rng
        u, v, z, t = self.u, self.v, self.z, self.t
        e = self.edge
        uc = self.uc
        # apex: per side ellipsoidal cap above t_tap, centred posteriorly
        t_tap = _u(r, 0.55, 0.68)
        z_top = np.zeros((self.nx, self.ny, 1), np.float32)
        for sign in (-1, 1):
            cu, cv = uc + sign * _u(r, 42.0, 55.0), self.v_vb + _u(r, 15.0, 35.0)
            q = ((u - cu) / _u(r, 75.0, 95.0)) ** 2 + ((v - cv) / _u(r, 110.0, 140.0)) ** 2
            zs = self.H * (t_tap + (1.0 - t_tap) * np.clip(1.0 - q ** 0.75, 0.0, 1.0))
            side = (u - uc) * sign > 0
            z_top = np.where(side, zs, z_top)
        self.z_top = z_top
        apex = np.clip((z_top - z) / self.sz + 0.5, 0.0, 1.0)
        # mediastinal exclusion: central band (anterior junction thin, posterior wider), superior
        # mediastinum wider; organs add their own exclusions in _mediastinum()
        v_rel = np.clip((v - self.v_vb) / 140.0, 0.0, 1.0)
        hw = 20.0 - 13.0 * v_rel + 10.0 * _smoothstep((t - 0.6) / 0.25) * (1 - 0.5 * v_rel)
        band = _soft(hw - np.abs(u - uc), e)
        self._lung_geom = (apex, band)

    def _finish_lungs(self, exclusion: np.ndarray, airways: np.ndarray) -> None:
        apex, band = self._lung_geom
        above = np.clip((self.z - self.z_top) / 25.0, 0.0, 1.0) * _smoothstep((self.t - 0.6) / 0.2)
        self.paint(self.cavity * above * (1.0 - np.maximum(band, exclusion)), self.muscle_hu - 10.0, LABELS["muscle"])
        occ = self.cavity * self.above_dia * apex * (1.0 - np.maximum(band, exclusion)) * (1.0 - airways)
        self.lung = occ.astype(np.float32)
        r = self.rng
        # parenchyma: level + dependent gradient + low-frequency texture
        box = self._lung_box()
        if box is None:
            return
        v = self.coords(box)[1]
        lo = self.v_vb - 10.0
        hi = self.vc + self.B_ant - 20.0
        post = np.clip((hi - v) / (hi - lo), 0.0, 1.0) ** 2
        shape = self.hu[box].shape
        res = tuple(max(n * s / 60.0, 1.0) for n, s in zip(shape, (self.px, self.px, self.sz)))
        tex = fractal_noise_3d(shape, res, octaves=3, persistence=0.6, rng=r)
        value = self.lung_hu + self.lung_gradient * post + _u(r, 8.0, 15.0) * tex
        self.paint(self.lung[box], value, LABELS["lung"], box=box)

    def _lung_box(self):
        idx = np.nonzero(self.lung.max(axis=2) > 0)
        ks = np.nonzero(self.lung.max(axis=(0, 1)) > 0)[0]
        if len(idx[0]) == 0:
            return None
        return (slice(idx[0].min(), idx[0].max() + 1), slice(idx[1].min(), idx[1].max() + 1), slice(ks[0], ks[-1] + 1))

    # mediastinum -------------------------------------------------------------------------------
    def _mediastinum(self) -> None:
        r = self.rng
        u, v, z, t = self.u, self.v, self.z, self.t
        e = self.edge
        uc, H = self.uc, self.H
        excl = np.zeros((self.nx, self.ny, self.nz), np.float32)

        # heart: rotated ellipse sitting on the left dome
        hz0 = self.dome_top_left - _u(r, 5.0, 15.0)
        hz1 = hz0 + _u(r, 95.0, 120.0)
        hu_c = uc + _u(r, 12.0, 28.0)
        ha, hb = _u(r, 55.0, 70.0), _u(r, 40.0, 50.0)
        angle = _u(r, 0.45, 0.85)
        # behind the sternum, in front of the spine: fit the heart into the cavity's depth
        v_front = self.vc + self.B_ant - self.F0 - self.M0 - self.R
        room = v_front - (self.v_vb + self.r_vb) - 10.0
        ext_v = math.hypot(ha * math.sin(angle), hb * math.cos(angle))
        if 2 * ext_v > room:
            ha, hb = ha * room / (2 * ext_v), hb * room / (2 * ext_v)
            ext_v = room / 2
        hv_c = v_front - 5.0 - ext_v
        w = (z - (hz0 + hz1) / 2) / ((hz1 - hz0) / 2)
        prof = np.where(w < 0, np.clip(1 - np.abs(w) ** 3, 0, 1) ** (1 / 3), np.sqrt(np.clip(1 - w * w, 0, 1)))
        heart_box = self.box(hu_c - ha - 10, hu_c + ha + 10, hv_c - ha - 10, hv_c + ha + 10, hz0, hz1)
        fat_layer = _u(r, 2.0, 7.0)
        self.heart = (hu_c, hv_c, ha, hb, angle, hz0, hz1)
        if heart_box is not None:
            bu, bv, _ = self.coords(heart_box)
            pr = prof[:, :, heart_box[2]]
            sd = _ellipse_sd(bu - hu_c, bv - hv_c, ha * pr, hb * pr, angle)
            fat = _soft(sd + fat_layer, e) * (pr > 0.05)
            excl[heart_box] = np.maximum(excl[heart_box], _soft(sd + fat_layer + 2.0, e) * (pr > 0.05))
            cav = self.cavity[heart_box]
            self.paint(fat * cav, self.fat_hu, LABELS["fat"], box=heart_box)
            self.paint(_soft(sd, e) * (pr > 0.05) * cav, self.blood_hu, LABELS["soft_tissue"], box=heart_box)

        # descending aorta (left of the spine), moving anterior to the spine in the abdomen
        r_ao = _u(r, 10.0, 13.5)
        z_arch = H * _u(r, 0.72, 0.8)
        abd = _smoothstep(-t / 0.4)
        ao_u = uc + (0.6 * self.r_vb + r_ao * 0.9) * (1 - abd) + 3.0 * abd
        ao_v = self.v_vb + 0.5 * self.r_vb + (0.5 * self.r_vb + r_ao) * abd
        self.tube(ao_u, ao_v, r_ao, -1e9, z_arch, self.blood_hu, excl, margin=3.0)
        # ascending aorta, arch, great vessels, SVC
        asc_u, asc_v = uc - _u(r, 5.0, 15.0), hv_c + _u(r, 0.0, 15.0)
        r_asc = _u(r, 13.0, 17.0)
        self.tube(asc_u, asc_v, r_asc, hz1 - 30.0, z_arch, self.blood_hu, excl, margin=3.0)
        desc_top = (float(ao_u[0, 0, -1]), float(ao_v[0, 0, -1]), z_arch)
        r_e = _u(r, 6.0, 8.5)
        es_u, es_v = uc + _u(r, 0.0, 8.0), self.v_vb + 0.85 * self.r_vb + r_e + 1.0
        r_tr = _u(r, 7.5, 10.0)
        tr_u, tr_v = uc + _u(r, -3.0, 3.0), es_v + r_e * 0.75 + r_tr + 3.0
        # the arch passes anterior and left of the trachea
        arch_mid = (tr_u + r_tr + r_ao + 2.0, tr_v + 0.5 * r_tr, z_arch + 8.0)
        self.segment_paint((asc_u, asc_v, z_arch), arch_mid, r_ao + 1.0, self.blood_hu, excl, 3.0)
        self.segment_paint(arch_mid, desc_top, r_ao + 0.5, self.blood_hu, excl, 3.0)
        for du_, dv_, rr in ((-8.0, -3.0, 6.5), (5.0, -12.0, 5.0), (18.0, -22.0, 5.5)):
            self.tube(asc_u + 10.0 + du_, asc_v + dv_ - 10.0, rr, z_arch, 1e9, self.blood_hu, excl, margin=2.0)
        svc_u, svc_v = asc_u - r_asc - _u(r, 8.0, 12.0), asc_v - 5.0
        self.tube(svc_u, svc_v, _u(r, 8.0, 10.5), hz1 - 35.0, 1e9, self.blood_hu, excl, margin=2.0)
        # oesophagus, trachea and main bronchi
        self.tube(es_u, es_v, r_e, -1e9, 1e9, 35.0, excl, margin=2.0, ratio=0.75)
        z_car = H * _u(r, 0.56, 0.66)
        wall = _u(r, 1.5, 2.5)
        self.trachea = np.zeros_like(excl)
        self.tube(tr_u, tr_v, r_tr + wall, z_car, 1e9, 60.0, excl, margin=2.0, ratio=0.92, record=self.trachea)
        self.tube(tr_u, tr_v, r_tr, z_car, 1e9, -1000.0, None, ratio=0.92, label=LABELS["airway"])
        # pulmonary trunk and arteries; bronchi to the hila
        pt0 = (hu_c - 5.0, hv_c + 25.0, hz1 - 40.0)
        bif = (uc + 10.0, tr_v + 10.0, z_car - 15.0)
        self.segment_paint(pt0, bif, _u(r, 12.0, 15.0), self.blood_hu, excl, 3.0)
        self.hila = {}
        for sign in (-1, 1):
            hil = (uc + sign * _u(r, 48.0, 60.0), self.v_vb + _u(r, 25.0, 40.0), z_car - _u(r, 10.0, 30.0))
            self.segment_paint(bif, hil, _u(r, 9.0, 11.0), self.blood_hu, None, 0.0)
            b_end = (uc + sign * _u(r, 38.0, 50.0), tr_v - _u(r, 5.0, 15.0), z_car - _u(r, 15.0, 40.0))
            r_b = _u(r, 5.5, 7.0)
            self.segment_paint((tr_u, tr_v, z_car), b_end, r_b + wall, 60.0, None, 0.0, record=self.trachea)
            self.segment_paint((tr_u, tr_v, z_car), b_end, r_b, -1000.0, None, 0.0, label=LABELS["airway"])
            vein = (uc + sign * _u(r, 30.0, 40.0), hv_c - hb * 0.6, hz0 + _u(r, 30.0, 50.0))
            self.hila[sign] = (hil, b_end, vein)
        # spine exclusion: vertebral body and canal region
        sp = _soft(_ellipse_sd(u - uc, v - (self.v_vb - 10.0), self.r_vb + 6.0, self.r_vb + 16.0), e)
        excl = np.maximum(excl, sp)
        # the lungs exclude the trachea and main bronchi
        self._finish_lungs(excl, self.trachea)

    def tube(self, cu, cv, radius, z0, z1, value, excl, *, margin=0.0, ratio=1.0, label=None, record=None):
        """Vertical tube (per-slice centre possible) from z0 to z1 (mm)."""
        cu_a = np.asarray(cu, np.float32)
        cv_a = np.asarray(cv, np.float32)
        ext = radius + margin
        box = self.box(float(cu_a.min()) - ext, float(cu_a.max()) + ext, float(cv_a.min()) - ext, float(cv_a.max()) + ext, z0, z1)
        if box is None:
            return
        bu, bv, bz = self.coords(box)
        cu_b = cu_a[:, :, box[2]] if cu_a.ndim == 3 else cu_a
        cv_b = cv_a[:, :, box[2]] if cv_a.ndim == 3 else cv_a
        zocc = np.clip((bz - z0) / self.sz + 0.5, 0, 1) * np.clip((z1 - bz) / self.sz + 0.5, 0, 1)
        sd = _ellipse_sd(bu - cu_b, bv - cv_b, radius, radius * ratio)
        occ = _soft(sd, self.edge) * zocc
        if excl is not None:
            excl[box] = np.maximum(excl[box], _soft(sd + margin, self.edge) * zocc)
        if record is not None:
            record[box] = np.maximum(record[box], occ)
        self.paint(occ, value, LABELS["soft_tissue"] if label is None else label, box=box)

    def segment_occupancy(self, p0, p1, radius, box):
        """Partial-volume occupancy of a capsule (mm) inside ``box``, averaged over the slab."""
        bu, bv, bz = self.coords(box)
        a = np.asarray(p0, np.float32)
        b = np.asarray(p1, np.float32)
        ab = b - a
        L2 = float(ab @ ab) or 1e-6
        occ = None
        subs = (-0.375, -0.125, 0.125, 0.375) if radius < self.sz else (0.0,)
        for off in subs:
            zz = bz + np.float32(off * self.sz)
            # projection parameter of each voxel onto the segment
            tt = ((bu - a[0]) * ab[0] + (bv - a[1]) * ab[1] + (zz - a[2]) * ab[2]) / L2
            tt = np.clip(tt, 0.0, 1.0)
            du = bu - (a[0] + tt * ab[0])
            dv = bv - (a[1] + tt * ab[1])
            dz = zz - (a[2] + tt * ab[2])
            d = np.sqrt(du * du + dv * dv + dz * dz)
            o = _soft(radius - d, self.edge)
            occ = o if occ is None else occ + o
        return occ * np.float32(1.0 / len(subs))

    def small_segments_occupancy(self, segs, occ: np.ndarray, max_len: float = 10.0, chunk: int = 1500) -> None:
        """Add the partial-volume occupancy of many thin capsules to ``occ`` (batched, clipped to 1).

        Thin vessels rarely overlap, so occupancies are summed (np.bincount) instead of maxed.
        """
        if not segs:
            return
        pieces_a, pieces_b, pieces_r = [], [], []
        for a, b, rad in segs:  # split into pieces of at most max_len so all fit one box size
            n = max(1, int(math.ceil(float(np.linalg.norm(b - a)) / max_len)))
            ts = np.linspace(0.0, 1.0, n + 1)
            pts = a[None, :] + ts[:, None] * (b - a)[None, :]
            pieces_a.append(pts[:-1])
            pieces_b.append(pts[1:])
            pieces_r.append(np.full(n, rad))
        A = np.concatenate(pieces_a).astype(np.float32)
        B = np.concatenate(pieces_b).astype(np.float32)
        R = np.concatenate(pieces_r).astype(np.float32)
        fov = self.grid.fov
        px, sz = self.px, self.sz
        rmax = float(R.max())
        ext = max_len + 2 * rmax + 2 * px
        bi = int(math.ceil(ext / px)) + 1
        bk = int(math.ceil((max_len + 2 * rmax) / sz)) + 2
        lo = np.minimum(A, B) - (R[:, None] + px)
        i0 = np.floor((lo[:, 0] + fov / 2) / px).astype(np.int64)
        j0 = np.floor((lo[:, 1] + fov / 2) / px).astype(np.int64)
        k0 = np.searchsorted(self.zc, lo[:, 2] - sz / 2).astype(np.int64) - 1
        ar_i = np.arange(bi)
        ar_k = np.arange(bk)
        nx, ny, nz = occ.shape
        total = np.zeros(occ.size, np.float32)
        for s0 in range(0, len(R), chunk):
            sl = slice(s0, s0 + chunk)
            I = i0[sl, None, None, None] + ar_i[None, :, None, None]
            J = j0[sl, None, None, None] + ar_i[None, None, :, None]
            K = k0[sl, None, None, None] + ar_k[None, None, None, :]
            valid = (I >= 0) & (I < nx) & (J >= 0) & (J < ny) & (K >= 0) & (K < nz)
            u = ((I + 0.5) * px - fov / 2).astype(np.float32)
            v = ((J + 0.5) * px - fov / 2).astype(np.float32)
            zc = self.zc[np.clip(K, 0, nz - 1)]
            a = A[sl][:, :, None, None, None]
            ab = (B[sl] - A[sl])[:, :, None, None, None]
            L2 = np.maximum((ab * ab).sum(axis=1), 1e-6)
            rr = R[sl][:, None, None, None]
            acc = None
            for off in (-0.25, 0.25):  # two samples across the slab
                z = zc + np.float32(off * sz)
                tt = np.clip(((u - a[:, 0]) * ab[:, 0] + (v - a[:, 1]) * ab[:, 1] + (z - a[:, 2]) * ab[:, 2]) / L2, 0.0, 1.0)
                du = u - (a[:, 0] + tt * ab[:, 0])
                dv = v - (a[:, 1] + tt * ab[:, 1])
                dz = z - (a[:, 2] + tt * ab[:, 2])
                o = _soft(rr - np.sqrt(du * du + dv * dv + dz * dz), self.edge)
                acc = o if acc is None else acc + o
            acc *= np.float32(0.5)
            keep = valid & (acc > 0)
            flat = (I * ny + J) * nz + K
            total += np.bincount(flat[keep], weights=acc[keep], minlength=occ.size).astype(np.float32)
        np.maximum(occ, np.minimum(total.reshape(occ.shape), 1.0), out=occ)

    def segment_box(self, p0, p1, ext):
        return self.box(min(p0[0], p1[0]) - ext, max(p0[0], p1[0]) + ext, min(p0[1], p1[1]) - ext,
                        max(p0[1], p1[1]) + ext, min(p0[2], p1[2]) - ext, max(p0[2], p1[2]) + ext)

    def segment_paint(self, p0, p1, radius, value, excl, margin, *, label=None, record=None):
        box = self.segment_box(p0, p1, radius + margin)
        if box is None:
            return
        occ = self.segment_occupancy(p0, p1, radius, box)
        if excl is not None and margin > 0:
            occ_m = self.segment_occupancy(p0, p1, radius + margin, box)
            excl[box] = np.maximum(excl[box], occ_m)
        if record is not None:
            record[box] = np.maximum(record[box], occ)
        self.paint(occ, value, LABELS["soft_tissue"] if label is None else label, box=box)

    # bones -------------------------------------------------------------------------------------
    def _spine(self) -> None:
        r = self.rng
        e = self.edge
        uc = self.uc
        period = _u(r, 24.0, 28.0)
        phase = _u(r, 0.0, period)
        disc_h = _u(r, 4.0, 6.0)
        # distance (mm) from each slice centre to the nearest disc centre
        zz = self.zc.reshape(1, 1, -1)
        dz = ((zz - phase + period / 2) % period) - period / 2
        disc = _overlap(np.float32(0.0), disc_h / 2, dz, self.sz)
        mid_vert = np.abs(np.abs(dz) - period / 2) < period * 0.3  # slices through the vertebral middle
        bz = self.box(uc - 60, uc + 60, self.v_back, self.v_vb + self.r_vb + 5)
        if bz is None:
            return
        bu, bv, _ = self.coords(bz)
        dk = disc[:, :, bz[2]]
        mv = mid_vert[:, :, bz[2]]
        sd_vb = _ellipse_sd(bu - uc, bv - self.v_vb, self.r_vb * 1.05, self.r_vb * 0.85)
        vb = _soft(sd_vb, e)
        bone = self.marrow_hu + (self.cortex_hu - self.marrow_hu) * _soft(2.0 - sd_vb, e)
        value = bone * (1 - dk) + 80.0 * dk
        self.paint(vb, value, LABELS["bone"], box=bz)
        # posterior elements: ring around the canal, spinous and transverse processes
        sd_ring = _ellipse_sd(bu - uc, bv - self.v_can, self.r_can + 5.5, self.r_can + 5.0)
        ring = _soft(sd_ring, e) * (1 - dk)
        pedicle = _soft(np.minimum(sd_ring, 12.0 - np.abs(bu - uc)), e) * (bv > self.v_can)
        ring = np.maximum(ring * (bv < self.v_can + 3.0), pedicle * (1 - dk))
        self.paint(ring, self.cortex_hu * 0.8, LABELS["bone"], box=bz)
        canal = _soft(_ellipse_sd(bu - uc, bv - self.v_can, self.r_can, self.r_can * 0.9), e)
        self.paint(canal, 20.0, LABELS["soft_tissue"], box=bz)
        sp_len = _u(r, 22.0, 32.0)
        spin_top = self.v_can - self.r_can - 3.0
        spinous = _soft(np.minimum(3.0 - np.abs(bu - uc), np.minimum(spin_top - bv, bv - (spin_top - sp_len))), e)
        self.paint(spinous * mv * 0.9, self.cortex_hu * 0.6, LABELS["bone"], box=bz)
        for sign in (-1, 1):
            p0 = (uc + sign * (self.r_can + 3.0), self.v_can + 2.0)
            p1 = (uc + sign * (self.r_can + 20.0), self.v_can - 8.0)
            d = _seg_dist_2d(bu, bv, p0, p1)
            tp = _soft(3.5 - d, e) * mv
            self.paint(tp, self.cortex_hu * 0.6, LABELS["bone"], box=bz)

    def _ribs_and_bones(self) -> None:
        r = self.rng
        e = self.edge
        d = self.depth
        phi = self.phi
        D, R, F, M = self.D, self.R, self.F, self.M
        # rib layer radial band: cortex near the band edges
        inner = d - (D - R)  # 0 at the outer edge of the rib layer, R at the pleura
        band = _soft(np.minimum(inner - 0.5, R - 0.5 - inner), e)
        rim = np.clip(1.0 - np.minimum(inner - 0.5, R - 0.5 - inner) / 2.0, 0.0, 1.0)
        spacing = _u(r, 24.0, 30.0)
        height = _u(r, 9.0, 11.0)
        drop = _u(r, 45.0, 75.0)
        z_first = self.H * _u(r, 0.98, 1.06)  # first rib, posteriorly
        zpost = z_first + drop * (1 - np.cos(phi)) / 2.0 * -1.0  # (nx, ny, 1) height offset of a rib
        rel = zpost - self.z  # rib k is at rel - k*spacing = 0
        k = np.rint(rel / spacing)
        center = zpost - k * spacing
        ov = _overlap(center, height / 2, self.z, self.sz)  # (nx, ny, nz)
        # angular extent: ribs 0..6 reach the sternum (cartilage anteriorly), 7..9 shorter, 10..11 lateral
        kk = k
        end = np.where(kk <= 6, np.pi, np.where(kk <= 9, 2.4, 1.6))
        present = (kk >= 0) & (kk <= 11) & (phi > 0.28) & (phi < end - 0.12)
        ov = ov * present
        cart = phi > 2.3
        bone_val = self.marrow_hu + (self.cortex_hu - self.marrow_hu) * rim
        value = np.where(cart, _u(r, 100.0, 180.0), bone_val)
        occ = band * ov
        self.paint(occ, value, LABELS["bone"])
        self.labels[(occ > 0.5) & cart] = LABELS["cartilage"]
        # sternum
        t = self.t
        st = _soft(np.minimum(self.t - 0.22, 1.0 - self.t) * self.H, self.sz)
        widen = 1.0 + 0.6 * _smoothstep((t - 0.75) / 0.15)
        v_st = self.vc + self.B_ant - float(self.F0) - 0.6 * self.M0 - 4.0
        sd = _ellipse_sd(self.u - self.uc, self.v - v_st, 14.0 * widen, _u(r, 5.0, 7.0))
        occ = _soft(sd, e) * st
        self.paint(occ, self.marrow_hu + (self.cortex_hu - self.marrow_hu) * _soft(1.8 - sd, e), LABELS["bone"])
        # scapulae: thin plates posterolaterally in the upper chest, inside the shoulder muscles
        sc = _smoothstep((t - 0.5) / 0.15)
        mid = F + 0.55 * M
        along = _soft(np.minimum(phi - 0.8, 1.4 - phi) * 60.0, e)  # ~60 mm per radian at this depth
        plate = _soft(np.minimum(d - mid + 2.0, mid + 2.0 - d), e) * along * sc
        self.paint(plate, self.cortex_hu * 0.6, LABELS["bone"])

    # vessel trees ------------------------------------------------------------------------------
    def _vessel_trees(self) -> None:
        r = self.rng
        lung_b = self.lung >= 0.5
        if not lung_b.any():
            return
        # attractor points: lung voxels away from the pleura
        size = [max(1, int(round(14.0 / self.px)) | 1), max(1, int(round(14.0 / self.px)) | 1), 3]
        deep = ndi.uniform_filter(lung_b.astype(np.float32), size=size, mode="constant") > 0.8
        segs: list[tuple[np.ndarray, np.ndarray, float]] = []
        airway: list[tuple[np.ndarray, np.ndarray, float]] = []
        fov = self.grid.fov
        for sign in (-1, 1):
            side = deep & (((self.u - self.uc) * sign) > 0)
            idx = np.flatnonzero(side)
            if idx.size < 16:
                continue
            hil, _, vein = self.hila[sign]
            for root, n_pts, r0, kind in ((hil, 240, _u(r, 5.5, 7.0), "artery"), (vein, 190, _u(r, 5.0, 6.5), "vein")):
                pick = np.sort(r.choice(idx, size=min(n_pts, idx.size), replace=False))
                i, j, k = np.unravel_index(pick, lung_b.shape)
                pts = np.stack([
                    (i + r.uniform(0, 1, i.size)) * self.px - fov / 2,
                    (j + r.uniform(0, 1, j.size)) * self.px - fov / 2,
                    self.zc[k] + r.uniform(-0.5, 0.5, k.size) * self.sz,
                ], axis=1)
                tree: list[tuple[np.ndarray, np.ndarray, float]] = []
                _grow_tree(np.asarray(root, float), pts, r0, tree, r)
                segs.extend(tree)
                if kind == "artery":
                    # bronchi run beside the larger arteries
                    ref = r.normal(size=3)
                    for a, b, rad in tree:
                        if rad < 2.2:
                            continue
                        dvec = b - a
                        n = np.cross(dvec, ref)
                        nn = np.linalg.norm(n)
                        if nn < 1e-6:
                            continue
                        off = n / nn * (rad * 1.9 + 1.0)
                        airway.append((a + off, b + off, 0.8 * rad))
        occ_v = np.zeros_like(self.lung)
        small = []
        for a, b, rad in segs:
            if rad < _SMALL_VESSEL_MM:
                small.append((a, b, rad))
                continue
            box = self.segment_box(a, b, rad + 2 * self.px)
            if box is None:
                continue
            o = self.segment_occupancy(a, b, rad, box)
            np.maximum(occ_v[box], o, out=occ_v[box])
        self.small_segments_occupancy(small, occ_v)
        occ_w = np.zeros_like(self.lung)
        occ_l = np.zeros_like(self.lung)
        for a, b, rad in airway:
            wall = 0.25 * rad + 0.6
            box = self.segment_box(a, b, rad + wall + 2 * self.px)
            if box is None:
                continue
            np.maximum(occ_w[box], self.segment_occupancy(a, b, rad + wall, box), out=occ_w[box])
            np.maximum(occ_l[box], self.segment_occupancy(a, b, rad, box), out=occ_l[box])
        in_lung = np.clip(self.lung * 1.5, 0.0, 1.0)
        self.paint(occ_w, 30.0, LABELS["soft_tissue"], weight=in_lung)
        self.paint(occ_l, -1000.0, LABELS["airway"], weight=in_lung)
        self.paint(occ_v, self.blood_hu, LABELS["vessel"], weight=in_lung * (1.0 - occ_l))


def _seg_dist_2d(u, v, p0, p1):
    ab = (p1[0] - p0[0], p1[1] - p0[1])
    L2 = ab[0] ** 2 + ab[1] ** 2
    tt = np.clip(((u - p0[0]) * ab[0] + (v - p0[1]) * ab[1]) / L2, 0.0, 1.0)
    du = u - (p0[0] + tt * ab[0])
    dv = v - (p0[1] + tt * ab[1])
    return np.sqrt(du * du + dv * dv)


def _grow_tree(start: np.ndarray, pts: np.ndarray, radius: float, out: list, rng: np.random.Generator,
               r_min: float = 0.7) -> None:
    """Recursive space-filling tree: step toward the territory's centroid, split it in two along
    its principal axis, and give the children radii by Murray's law (r^3 = r1^3 + r2^3)."""
    n = len(pts)
    c = pts.mean(axis=0)
    if n <= 2 or radius < r_min:
        out.append((start, c, radius))
        for p in pts:
            out.append((c, p, max(radius * 0.7, 0.5)))
        return
    node = start + rng.uniform(0.35, 0.6) * (c - start) + rng.normal(0.0, 2.0, 3)
    out.append((start, node, radius))
    d = pts - c
    _, vecs = np.linalg.eigh(d.T @ d)
    proj = d @ vecs[:, -1]
    order = np.argsort(proj, kind="stable")
    cut = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
    for part in (order[:cut], order[cut:]):
        _grow_tree(node, pts[part], radius * (len(part) / n) ** (1.0 / 3.0), out, rng, r_min)


# --------------------------------------------------------------------------------------------
# resampling and noise


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Linear x2 upsampling of axes 0 and 1 (half-pixel aligned), float32."""
    for ax in (0, 1):
        a = np.moveaxis(a, ax, 0)
        prev = np.concatenate([a[:1], a[:-1]], axis=0)
        nxt = np.concatenate([a[1:], a[-1:]], axis=0)
        out = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=np.float32)
        out[0::2] = 0.75 * a + 0.25 * prev
        out[1::2] = 0.75 * a + 0.25 * nxt
        a = np.moveaxis(out, 0, ax)
    return np.ascontiguousarray(a)


def _ct_noise(rng: np.random.Generator, shape, sigma: float, correlated: bool) -> np.ndarray:
    """Gaussian CT noise with standard deviation ``sigma``; in-plane correlated if asked."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if not correlated:
        n *= np.float32(sigma)
        return n
    for ax in (0, 1):  # [1, 2, 1] / 4 smoothing, std factor sqrt(6)/4 per axis
        m = np.moveaxis(n, ax, 0)
        s = m * np.float32(0.5)
        s[1:] += np.float32(0.25) * m[:-1]
        s[:-1] += np.float32(0.25) * m[1:]
        n = np.moveaxis(s, 0, ax)
    n *= np.float32(sigma / 0.375)
    return np.ascontiguousarray(n)


# --------------------------------------------------------------------------------------------
# public API


def draw_involvement(rng: np.random.Generator, category: str | None = None) -> float:
    """Draw a lung involvement fraction, for ``category`` or a MosMed-like category mix."""
    if category is None:
        category = str(rng.choice(["CT-1", "CT-2", "CT-3", "CT-4"], p=[0.55, 0.27, 0.13, 0.05]))
    if category not in INVOLVEMENT_RANGES:
        raise ValueError(f"category must be one of {sorted(INVOLVEMENT_RANGES)}, got {category!r}")
    lo, hi = INVOLVEMENT_RANGES[category]
    if category == "CT-1":
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return float(rng.uniform(lo, hi))


def lesion_config_for(involvement: float) -> LesionConfig:
    """Lesion parameters that suit a given involvement (small multifocal foci when mild)."""
    if involvement < 0.05:
        return LesionConfig(blob_scale_mm=(30.0, 50.0), consolidation_fraction=(0.0, 0.12), crazy_paving_fraction=(0.0, 0.1))
    if involvement < 0.25:
        return LesionConfig(blob_scale_mm=(40.0, 70.0), consolidation_fraction=(0.02, 0.2), crazy_paving_fraction=(0.0, 0.2))
    return LesionConfig(blob_scale_mm=(55.0, 100.0), consolidation_fraction=(0.08, 0.3), crazy_paving_fraction=(0.05, 0.25))


def generate_phantom(rng: np.random.Generator, *, size: str = "small", covid: bool,
                     involvement: float | None = None, return_labels: bool = True) -> Phantom:
    """Generate one synthetic chest CT.

    Args:
        rng: random source; the phantom is a pure function of its state.
        size: "small" (128 x 128 at about 2.8 mm, 32-40 slices of 8 mm; fast, for tests) or
            "mosmed" (512 x 512 at 0.6-0.8 mm, 32-48 slices of 8 mm, like MosMedData).
        covid: add lesions.
        involvement: target lesion fraction of the lungs (COVID only); drawn when None.
        return_labels: keep the tissue label map (``Phantom.labels``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if involvement is not None:
        if not covid:
            raise ValueError("involvement is only meaningful for COVID phantoms")
        if not 0.0 < involvement < 1.0:
            raise ValueError(f"involvement must be in (0, 1), got {involvement}")
    chest = _Chest(rng, size)
    chest.render()
    g = chest.grid
    hu, lung, labels = chest.hu, chest.lung, chest.labels
    if g.factor == 2:
        hu = _upsample2(hu)
        lung = _upsample2(lung)
        labels = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
    lung_mask = lung >= 0.5
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    if covid:
        if involvement is None:
            involvement = draw_involvement(rng)
        hu, lesion_mask = synthesize_lesions(hu, lung_mask, rng, config=lesion_config_for(involvement),
                                             spacing=g.spacing, coverage=involvement)
    sigma = _u(rng, 15.0, 30.0)
    hu += _ct_noise(rng, hu.shape, sigma, correlated=g.spacing[0] < 1.5)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    n_lung = int(lung_mask.sum())
    true_inv = float(lesion_mask.sum()) / n_lung if n_lung else 0.0
    return Phantom(
        hu=hu.astype(np.int16),
        affine=g.affine(chest.z0_world),
        lung_mask=lung_mask,
        lesion_mask=lesion_mask,
        involvement=true_inv,
        category=category_for(true_inv, covid),
        labels=labels if return_labels else None,
    )


def study_rng(seed: int, number: int) -> np.random.Generator:
    """The random source of study ``number`` of a cohort with ``seed``."""
    return np.random.default_rng([int(seed), int(number), 0x9E3779B9])


def write_cohort(out: Path, *, healthy: int, covid: int, seed: int, size: str = "small",
                 first_id: int = 1, overwrite: bool = False) -> Path:
    """Write a phantom cohort in the MosMedData layout (atomically) and return ``out``.

    Layout: ``studies/CT-0..CT-4/study_NNNN.nii.gz`` (int16 HU), ``masks/study_NNNN_mask.nii.gz``
    (COVID studies, uint8), ``lungs/study_NNNN_lungs.nii.gz`` (every study, uint8) and
    ``cohort.json``. Study numbers start at ``first_id``: healthy studies first, then COVID ones,
    whose categories cycle through :data:`COHORT_CATEGORY_CYCLE` so that a cohort spans them.
    Study ``n`` is generated from ``study_rng(seed, n)`` alone.
    """
    from CovidGANSegLib import progress
    from CovidGANSegLib.atomic import atomic_directory
    from CovidGANSegLib.nifti import save_array

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if healthy < 0 or covid < 0 or healthy + covid < 1:
        raise ValueError(f"need at least one study (healthy={healthy}, covid={covid})")
    if first_id < 0 or first_id + healthy + covid - 1 > 9999:
        raise ValueError(f"study numbers must fit in 0..9999 (first_id={first_id})")
    out = Path(out)
    plan = [(first_id + i, False, None) for i in range(healthy)]
    plan += [(first_id + healthy + i, True, COHORT_CATEGORY_CYCLE[i % len(COHORT_CATEGORY_CYCLE)]) for i in range(covid)]
    records = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for number, is_covid, cat in progress.track(plan, desc="phantoms"):
            rng = study_rng(seed, number)
            inv = draw_involvement(rng, cat) if is_covid else None
            ph = generate_phantom(rng, size=size, covid=is_covid, involvement=inv, return_labels=False)
            sid = f"study_{number:04d}"
            rel = Path("studies") / ph.category / f"{sid}.nii.gz"
            save_array(ph.hu, ph.affine, tmp / rel, dtype=np.int16)
            lungs_rel = Path("lungs") / f"{sid}_lungs.nii.gz"
            save_array(ph.lung_mask, ph.affine, tmp / lungs_rel, dtype=np.uint8)
            rec = {
                "id": sid, "number": number, "category": ph.category, "covid": is_covid,
                "involvement_percent": round(100.0 * ph.involvement, 4),
                "target_involvement_percent": None if inv is None else round(100.0 * inv, 4),
                "lesion_ml": round(ph.lesion_ml, 3), "lung_ml": round(ph.lung_ml, 3),
                "shape": list(ph.hu.shape), "spacing_mm": [round(s, 5) for s in ph.spacing],
                "path": rel.as_posix(), "lungs": lungs_rel.as_posix(), "mask": None,
            }
            if is_covid:
                mask_rel = Path("masks") / f"{sid}_mask.nii.gz"
                save_array(ph.lesion_mask, ph.affine, tmp / mask_rel, dtype=np.uint8)
                rec["mask"] = mask_rel.as_posix()
            records.append(rec)
            log.info("%s: %s, involvement %.2f %%, lungs %.0f mL", sid, ph.category, 100 * ph.involvement, ph.lung_ml)
        for cat in CATEGORIES:
            (tmp / "studies" / cat).mkdir(parents=True, exist_ok=True)
        meta = {
            "generator": "CovidGANSegLib.synth.phantoms",
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed), "size": size, "first_id": int(first_id),
            "healthy": int(healthy), "covid": int(covid),
            "orientation": "LAS", "hu_dtype": "int16",
            "note": "synthetic phantoms, not patient data; lesion masks are for evaluation only",
            "studies": records,
        }
        (tmp / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
