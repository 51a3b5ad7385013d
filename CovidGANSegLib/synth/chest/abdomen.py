"""Diaphragm domes and the upper abdominal organs beneath them (liver, spleen, stomach, kidneys)."""

from __future__ import annotations

import numpy as np

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import ellipse_sd, smoothstep, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS


def diaphragm(c: Chest) -> np.ndarray:
    """Dome height z (mm) over the plane, (nx, ny, 1): lungs lie above it."""
    r = c.rng
    H = c.H
    top_r = H * uniform(r, 0.17, 0.26)
    top_l = top_r - uniform(r, 5.0, 25.0)
    v_d = c.v_vb + uniform(r, 55.0, 80.0)
    heights = []
    for sign, top in ((-1, top_r), (1, top_l)):
        u_d = c.uc + sign * uniform(r, 45.0, 65.0)
        # the dome falls to z = -(0..10) mm at the postero-lateral costophrenic recess
        corner_u, corner_v = c.uc + sign * c.A0 * 0.92, c.v_back + 30.0
        dist2 = (corner_u - u_d) ** 2 + (corner_v - v_d) ** 2
        k = (top + uniform(r, 0.0, 10.0)) / dist2
        heights.append(np.maximum(top - k * ((c.u - u_d) ** 2 + (c.v - v_d) ** 2), -15.0))
    w = smoothstep((c.u - c.uc) / 40.0 + 0.5)
    c.dome_top_left = top_l
    c.dome_v = v_d
    return ((1 - w) * heights[0] + w * heights[1]).astype(np.float32)


def draw_abdomen(c: Chest) -> None:
    """Diaphragm domes, then liver, spleen, stomach (with gas) and kidneys below them."""
    r = c.rng
    c.z_dia = diaphragm(c)
    below = np.clip((c.z_dia - c.z) / c.sz + 0.5, 0.0, 1.0)  # fraction of slab below dome
    c.above_dia = 1.0 - below
    abd = c.cavity * below
    e = c.edge
    u, v, z = c.u, c.v, c.z
    # default abdominal content: bowel / fat mixture
    c.paint(abd, 15.0, LABELS["organ"], weight=0.6)
    # liver: right side and anterior left lobe
    liver_edge = c.uc + 10.0 + 0.45 * (v - c.v_vb - 50.0)
    liver = soft(liver_edge - u, 6.0) * abd
    c.paint(liver, uniform(r, 50.0, 65.0), LABELS["organ"])
    # spleen (left posterolateral) and stomach (left anterior, gas anteriorly)
    sp = soft(ellipse_sd(u - (c.uc + 0.55 * c.A0), v - (c.v_vb + 15), 30.0, 45.0, 0.6), e) * abd
    c.paint(sp, uniform(r, 40.0, 50.0), LABELS["organ"])
    su, sv = c.uc + 0.3 * c.A0, c.v_vb + uniform(r, 70.0, 95.0)
    st = soft(ellipse_sd(u - su, v - sv, 45.0, 35.0), e) * abd
    c.paint(st, uniform(r, 5.0, 25.0), LABELS["organ"])
    gas = st * soft(v - (sv + uniform(r, 5.0, 25.0)), e)
    c.paint(gas, -1000.0, LABELS["air"])
    # kidneys at the lowest levels
    for sign in (-1, 1):
        kid = soft(ellipse_sd(u - (c.uc + sign * 60.0), v - (c.v_vb + 5.0), 28.0, 22.0, 0.5 * sign), e)
        kz = soft(np.minimum(-45.0 - z, z + 160.0), c.sz)
        c.paint(kid * kz * c.cavity, 30.0, LABELS["organ"])

