"""Patient build and the body outline: per-study parameters, the table, skin, subcutaneous fat and
muscles of the chest wall, the thoracic / abdominal cavity."""

from __future__ import annotations

import numpy as np

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import smooth_curve, smoothstep, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS


def draw_parameters(c: Chest) -> None:
    """Draw the patient's build, tissue HU and body-centred angle / radius maps."""
    r = c.rng
    c.uc = uniform(r, -8.0, 8.0)
    c.vc = uniform(r, -25.0, 0.0)
    c.B_ant = c.A0 * uniform(r, 0.66, 0.78)
    c.B_post = c.B_ant * uniform(r, 0.9, 1.0)
    c.p_exp = uniform(r, 2.2, 2.8)
    c.width_curve = smooth_curve(r, 0.04)
    c.harm = [(uniform(r, 0.0, 0.025), int(k), uniform(r, 0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    c.F0 = uniform(r, 4.0, 18.0)  # subcutaneous fat (mm)
    c.M0 = uniform(r, 5.0, 9.0)  # muscle layer (mm)
    c.M_pect = uniform(r, 6.0, 14.0)
    c.M_para = uniform(r, 30.0, 40.0)
    c.M_shoulder = uniform(r, 10.0, 20.0)
    c.R = uniform(r, 8.0, 10.0)  # rib layer (mm)
    c.fat_hu = uniform(r, -110.0, -85.0)
    c.muscle_hu = uniform(r, 38.0, 55.0)
    c.blood_hu = uniform(r, 35.0, 50.0)
    c.lung_hu = uniform(r, -870.0, -815.0)  # inspiration level varies between studies
    c.lung_gradient = uniform(r, 50.0, 120.0)  # dependent (posterior) density rise, HU
    c.cortex_hu = uniform(r, 700.0, 1000.0)
    c.marrow_hu = uniform(r, 160.0, 300.0)
    # spine (per patient)
    c.r_vb = uniform(r, 15.0, 20.0)
    c.r_can = uniform(r, 7.0, 9.0)
    # angles and radial geometry of the body (2D: body centre is fixed over z)
    du = c.u - c.uc
    dv = c.v - c.vc
    c.theta = np.arctan2(dv, du).astype(np.float32)  # (nx, ny, 1): +pi/2 anterior
    c.rad = np.sqrt(du * du + dv * dv).astype(np.float32)
    c.phi = np.arctan2(np.abs(du), -dv).astype(np.float32)  # 0 posterior midline .. pi anterior
    # posterior body surface and wall depth at the midline
    c.v_back = c.vc - c.B_post
    c.D_post = c.F0 * 0.8 + c.M0 + c.M_para + c.R
    c.v_vb = c.v_back + c.D_post + 0.3 * c.r_vb  # vertebral body centre
    c.v_can = c.v_vb - 0.85 * c.r_vb - c.r_can - 1.5



def body_radius(c: Chest) -> np.ndarray:
    """Body boundary radius along each ray, (nx, ny, nz)."""
    t = c.t
    widen = 1.0 + c.width_curve(t) + 0.07 * smoothstep((t - 0.85) / 0.3) - 0.03 * smoothstep(-t / 0.3)
    A = (c.A0 * widen).astype(np.float32)
    B = np.where(c.theta > 0, np.float32(c.B_ant), np.float32(c.B_post)).astype(np.float32)
    cos_t = np.abs(np.cos(c.theta))
    s = np.abs(np.sin(c.theta))
    p = c.p_exp
    # superellipse radius along the ray: ((|c|/A)^p + (|s|/B)^p)^(-1/p)
    term_s = (s / B) ** p  # (nx, ny, 1)
    term_c = (cos_t ** p) / (A ** p)  # (nx, ny, nz)
    rb = (term_c + term_s) ** np.float32(-1.0 / p)
    rb *= _harmonics(c, c.theta)
    # flat back on the table
    rb = np.where(c.theta < 0, np.minimum(rb, (c.B_post / np.maximum(s, 1e-3)).astype(np.float32)), rb)
    return rb.astype(np.float32)


def _harmonics(c: Chest, theta):
    """Smooth angular irregularity of the body outline (a multiplier near 1)."""
    mult = np.ones_like(theta)
    post = np.clip(-np.sin(theta), 0.0, 1.0) ** 2
    for amp, k, ph in c.harm:
        mult = mult + amp * (1.0 - 0.9 * post) * np.cos(k * theta + ph)
    return mult


def draw_table(c: Chest) -> None:
    """The patient table under the back: a dense shell with an air core."""
    c.v_table = c.v_back - uniform(c.rng, 1.0, 6.0)
    u = c.u
    top = c.v_table + 0.0005 * (u - c.uc) ** 2  # slightly curved, in mm
    thick = uniform(c.rng, 30.0, 45.0)
    dv = top - c.v  # > 0 below the table top
    occ_out = soft(np.minimum(dv, thick - dv), c.edge)
    occ_in = soft(np.minimum(dv - 2.5, thick - 2.5 - dv), c.edge)
    c.paint(occ_out, uniform(c.rng, 150.0, 300.0), LABELS["table"])
    c.paint(occ_in, -920.0, LABELS["table"])


def draw_body_wall(c: Chest) -> None:
    """Skin, subcutaneous fat, chest-wall muscles and the thoracic / abdominal cavity."""
    r = c.rng
    rb = body_radius(c)
    c.depth = rb - c.rad  # (nx, ny, nz) radial depth below the skin, mm
    t = c.t
    phi = c.phi
    lateral = np.abs(np.cos(c.theta))
    fat_mod = 1.0 + 0.4 * lateral + 0.2 * (phi < 1.0) + 0.12 * np.cos(3 * c.theta + r.uniform(0, 6))
    F = (c.F0 * fat_mod * (1.0 + 0.5 * np.clip(-t, 0, 1))).astype(np.float32)
    pect = np.exp(-(((phi - 2.25) / 0.45) ** 2)) * smoothstep((t - 0.35) / 0.3)
    para = np.exp(-((phi / 0.4) ** 2))
    shoulder = np.exp(-(((phi - 1.0) / 0.35) ** 2)) * smoothstep((t - 0.45) / 0.3)
    M = (c.M0 + c.M_pect * pect + c.M_para * para + c.M_shoulder * shoulder).astype(np.float32)
    c.F, c.M = F, M
    c.D = F + M + c.R  # wall depth to the pleura
    d = c.depth
    e = c.edge
    body = soft(d, e)
    c.paint(body, 25.0, LABELS["soft_tissue"])  # skin
    c.paint(soft(d - 2.0, e), c.fat_hu, LABELS["fat"])
    c.paint(soft(d - F, e), c.muscle_hu, LABELS["muscle"])
    # a fat plane between the superficial and deep muscles
    plane = soft(np.minimum(d - F - 0.55 * M, F + 0.55 * M + 2.0 - d), e) * (M > 14)
    c.paint(plane, c.fat_hu + 20.0, LABELS["fat"], weight=0.8)
    c.cavity = soft(d - c.D, e)  # thoracic / abdominal cavity
    c.paint(c.cavity, c.fat_hu + 10.0, LABELS["fat"])  # mediastinal / abdominal fat
