"""Lungs: the lung shape (apices, diaphragm, mediastinal band) and the parenchyma."""

from __future__ import annotations

import numpy as np

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import smoothstep, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS
from CovidGANSegLib.synth.perlin import fractal_noise_3d


def draw_lung_shape(c: Chest) -> None:
    """Lung apices and the mediastinal band; the lungs are finished by :func:`finish_lungs`."""
    r = c.rng
    u, v, z, t = c.u, c.v, c.z, c.t
    e = c.edge
    uc = c.uc
    # apex: per side ellipsoidal cap above t_tap, centred posteriorly
    t_tap = uniform(r, 0.55, 0.68)
    z_top = np.zeros((c.nx, c.ny, 1), np.float32)
    for sign in (-1, 1):
        cu, cv = uc + sign * uniform(r, 42.0, 55.0), c.v_vb + uniform(r, 15.0, 35.0)
        q = ((u - cu) / uniform(r, 75.0, 95.0)) ** 2 + ((v - cv) / uniform(r, 110.0, 140.0)) ** 2
        zs = c.H * (t_tap + (1.0 - t_tap) * np.clip(1.0 - q ** 0.75, 0.0, 1.0))
        side = (u - uc) * sign > 0
        z_top = np.where(side, zs, z_top)
    c.z_top = z_top
    apex = np.clip((z_top - z) / c.sz + 0.5, 0.0, 1.0)
    # mediastinal exclusion: central band (anterior junction thin, posterior wider), superior
    # mediastinum wider; organs add their own exclusions in _mediastinum()
    v_rel = np.clip((v - c.v_vb) / 140.0, 0.0, 1.0)
    hw = 20.0 - 13.0 * v_rel + 10.0 * smoothstep((t - 0.6) / 0.25) * (1 - 0.5 * v_rel)
    band = soft(hw - np.abs(u - uc), e)
    c.lung_geom = (apex, band)


def finish_lungs(c: Chest, exclusion: np.ndarray, airways: np.ndarray) -> None:
    """The lung occupancy (cavity above the domes, minus mediastinum and central airways) and
    its parenchyma: level, dependent gradient, texture, and in some studies dependent subpleural
    density."""
    apex, band = c.lung_geom
    above = np.clip((c.z - c.z_top) / 25.0, 0.0, 1.0) * smoothstep((c.t - 0.6) / 0.2)
    c.paint(c.cavity * above * (1.0 - np.maximum(band, exclusion)), c.muscle_hu - 10.0, LABELS["muscle"])
    occ = c.cavity * c.above_dia * apex * (1.0 - np.maximum(band, exclusion)) * (1.0 - airways)
    c.lung = occ.astype(np.float32)
    r = c.rng
    # parenchyma: level + dependent gradient + low-frequency texture
    box = lung_box(c)
    if box is None:
        return
    v = c.coords(box)[1]
    lo = c.v_vb - 10.0
    hi = c.vc + c.B_ant - 20.0
    post = np.clip((hi - v) / (hi - lo), 0.0, 1.0) ** 2
    shape = c.hu[box].shape
    res = tuple(max(n * s / 60.0, 1.0) for n, s in zip(shape, (c.px, c.px, c.sz)))
    tex = fractal_noise_3d(shape, res, octaves=3, persistence=0.6, rng=r)
    value = c.lung_hu + c.lung_gradient * post + uniform(r, 8.0, 15.0) * tex
    c.paint(c.lung[box], value, LABELS["lung"], box=box)
    draw_dependent_density(c)


def draw_dependent_density(c: Chest) -> None:
    """Faint dependent (posterior subpleural) density in some studies: gravity-dependent
    hypoventilation / atelectasis, up to about +280 HU over the parenchyma at the posterior pleura,
    fading over a few mm. Normal anatomy, never part of a lesion mask; a plain HU threshold takes it for GGO."""
    r = c.rng
    present = r.random() < DEPENDENT_DENSITY_PROBABILITY
    amp = uniform(r, 100.0, 280.0)
    d0 = uniform(r, 3.0, 7.0)
    waves = [(uniform(r, 0.0, 2 * np.pi), uniform(r, 30.0, 80.0)) for _ in range(2)]
    if not present:
        return
    lung_b = c.lung >= 0.5
    if not lung_b.any():
        return
    # distance (mm) above the posterior-most lung voxel of each (x, z) column
    first = np.argmax(lung_b, axis=1).astype(np.float32)  # (nx, nz): axis 1 runs anterior
    j = np.arange(c.ny, dtype=np.float32).reshape(1, -1, 1)
    depth = (j - first[:, None, :]) * np.float32(c.px)
    # patchy along x and z, strongest at the bases
    u, z = c.u[:, :, 0], c.zc.reshape(1, -1)
    patch = np.ones_like(first)
    for phase, lam in waves:
        patch = patch * (0.65 + 0.35 * np.cos(2 * np.pi * (u / lam + z / (1.7 * lam)) + phase))
    base = np.clip(1.0 - 0.8 * c.t[0], 0.2, 1.0)  # (1, nz)
    inc = np.float32(amp) * np.exp(-np.maximum(depth, 0.0) / np.float32(d0)) * (patch * base)[:, None, :]
    c.hu += inc * c.lung


#: fraction of studies with dependent subpleural density (not a lesion)
DEPENDENT_DENSITY_PROBABILITY = 0.4


def lung_box(c: Chest):
    """Index box of the lung occupancy, or None when there is no lung."""
    idx = np.nonzero(c.lung.max(axis=2) > 0)
    ks = np.nonzero(c.lung.max(axis=(0, 1)) > 0)[0]
    if len(idx[0]) == 0:
        return None
    return (slice(idx[0].min(), idx[0].max() + 1), slice(idx[1].min(), idx[1].max() + 1), slice(ks[0], ks[-1] + 1))

