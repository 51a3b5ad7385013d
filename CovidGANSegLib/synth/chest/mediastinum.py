"""Mediastinum: heart, aorta and great vessels, superior vena cava, oesophagus, trachea, main
bronchi, pulmonary trunk and arteries to the hila. Returns the lungs' exclusion map."""

from __future__ import annotations

import math

import numpy as np

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import ellipse_sd, smoothstep, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS


def draw_mediastinum(c: Chest) -> np.ndarray:
    """Draw the mediastinum; return the occupancy the lungs must exclude (heart, great vessels, spine)."""
    r = c.rng
    u, v, z, t = c.u, c.v, c.z, c.t
    e = c.edge
    uc, H = c.uc, c.H
    excl = np.zeros((c.nx, c.ny, c.nz), np.float32)

    # heart: rotated ellipse sitting on the left dome
    hz0 = c.dome_top_left - uniform(r, 5.0, 15.0)
    hz1 = hz0 + uniform(r, 95.0, 120.0)
    hu_c = uc + uniform(r, 12.0, 28.0)
    ha, hb = uniform(r, 55.0, 70.0), uniform(r, 40.0, 50.0)
    angle = uniform(r, 0.45, 0.85)
    # behind the sternum, in front of the spine: fit the heart into the cavity's depth
    v_front = c.vc + c.B_ant - c.F0 - c.M0 - c.R
    room = v_front - (c.v_vb + c.r_vb) - 10.0
    ext_v = math.hypot(ha * math.sin(angle), hb * math.cos(angle))
    if 2 * ext_v > room:
        ha, hb = ha * room / (2 * ext_v), hb * room / (2 * ext_v)
        ext_v = room / 2
    hv_c = v_front - 5.0 - ext_v
    w = (z - (hz0 + hz1) / 2) / ((hz1 - hz0) / 2)
    prof = np.where(w < 0, np.clip(1 - np.abs(w) ** 3, 0, 1) ** (1 / 3), np.sqrt(np.clip(1 - w * w, 0, 1)))
    heart_box = c.box(hu_c - ha - 10, hu_c + ha + 10, hv_c - ha - 10, hv_c + ha + 10, hz0, hz1)
    fat_layer = uniform(r, 2.0, 7.0)
    c.heart = (hu_c, hv_c, ha, hb, angle, hz0, hz1)
    if heart_box is not None:
        bu, bv, _ = c.coords(heart_box)
        pr = prof[:, :, heart_box[2]]
        sd = ellipse_sd(bu - hu_c, bv - hv_c, ha * pr, hb * pr, angle)
        fat = soft(sd + fat_layer, e) * (pr > 0.05)
        excl[heart_box] = np.maximum(excl[heart_box], soft(sd + fat_layer + 2.0, e) * (pr > 0.05))
        cav = c.cavity[heart_box]
        c.paint(fat * cav, c.fat_hu, LABELS["fat"], box=heart_box)
        c.paint(soft(sd, e) * (pr > 0.05) * cav, c.blood_hu, LABELS["soft_tissue"], box=heart_box)

    # descending aorta (left of the spine), moving anterior to the spine in the abdomen
    r_ao = uniform(r, 10.0, 13.5)
    z_arch = H * uniform(r, 0.72, 0.8)
    abd = smoothstep(-t / 0.4)
    ao_u = uc + (0.6 * c.r_vb + r_ao * 0.9) * (1 - abd) + 3.0 * abd
    ao_v = c.v_vb + 0.5 * c.r_vb + (0.5 * c.r_vb + r_ao) * abd
    c.tube(ao_u, ao_v, r_ao, -1e9, z_arch, c.blood_hu, excl, margin=3.0)
    # ascending aorta, arch, great vessels, SVC
    asc_u, asc_v = uc - uniform(r, 5.0, 15.0), hv_c + uniform(r, 0.0, 15.0)
    r_asc = uniform(r, 13.0, 17.0)
    c.tube(asc_u, asc_v, r_asc, hz1 - 30.0, z_arch, c.blood_hu, excl, margin=3.0)
    desc_top = (float(ao_u[0, 0, -1]), float(ao_v[0, 0, -1]), z_arch)
    r_e = uniform(r, 6.0, 8.5)
    es_u, es_v = uc + uniform(r, 0.0, 8.0), c.v_vb + 0.85 * c.r_vb + r_e + 1.0
    r_tr = uniform(r, 7.5, 10.0)
    tr_u, tr_v = uc + uniform(r, -3.0, 3.0), es_v + r_e * 0.75 + r_tr + 3.0
    # the arch passes anterior and left of the trachea
    arch_mid = (tr_u + r_tr + r_ao + 2.0, tr_v + 0.5 * r_tr, z_arch + 8.0)
    c.segment_paint((asc_u, asc_v, z_arch), arch_mid, r_ao + 1.0, c.blood_hu, excl, 3.0)
    c.segment_paint(arch_mid, desc_top, r_ao + 0.5, c.blood_hu, excl, 3.0)
    for du_, dv_, rr in ((-8.0, -3.0, 6.5), (5.0, -12.0, 5.0), (18.0, -22.0, 5.5)):
        c.tube(asc_u + 10.0 + du_, asc_v + dv_ - 10.0, rr, z_arch, 1e9, c.blood_hu, excl, margin=2.0)
    svc_u, svc_v = asc_u - r_asc - uniform(r, 8.0, 12.0), asc_v - 5.0
    c.tube(svc_u, svc_v, uniform(r, 8.0, 10.5), hz1 - 35.0, 1e9, c.blood_hu, excl, margin=2.0)
    # oesophagus, trachea and main bronchi
    c.tube(es_u, es_v, r_e, -1e9, 1e9, 35.0, excl, margin=2.0, ratio=0.75)
    z_car = H * uniform(r, 0.56, 0.66)
    wall = uniform(r, 1.5, 2.5)
    c.trachea = np.zeros_like(excl)
    c.tube(tr_u, tr_v, r_tr + wall, z_car, 1e9, 60.0, excl, margin=2.0, ratio=0.92, record=c.trachea)
    c.tube(tr_u, tr_v, r_tr, z_car, 1e9, -1000.0, None, ratio=0.92, label=LABELS["airway"])
    # pulmonary trunk and arteries; bronchi to the hila
    pt0 = (hu_c - 5.0, hv_c + 25.0, hz1 - 40.0)
    bif = (uc + 10.0, tr_v + 10.0, z_car - 15.0)
    c.segment_paint(pt0, bif, uniform(r, 12.0, 15.0), c.blood_hu, excl, 3.0)
    c.hila = {}
    for sign in (-1, 1):
        hil = (uc + sign * uniform(r, 48.0, 60.0), c.v_vb + uniform(r, 25.0, 40.0), z_car - uniform(r, 10.0, 30.0))
        c.segment_paint(bif, hil, uniform(r, 9.0, 11.0), c.blood_hu, None, 0.0)
        b_end = (uc + sign * uniform(r, 38.0, 50.0), tr_v - uniform(r, 5.0, 15.0), z_car - uniform(r, 15.0, 40.0))
        r_b = uniform(r, 5.5, 7.0)
        c.segment_paint((tr_u, tr_v, z_car), b_end, r_b + wall, 60.0, None, 0.0, record=c.trachea)
        c.segment_paint((tr_u, tr_v, z_car), b_end, r_b, -1000.0, None, 0.0, label=LABELS["airway"])
        vein = (uc + sign * uniform(r, 30.0, 40.0), hv_c - hb * 0.6, hz0 + uniform(r, 30.0, 50.0))
        c.hila[sign] = (hil, b_end, vein)
    # spine exclusion: vertebral body and canal region
    sp = soft(ellipse_sd(u - uc, v - (c.v_vb - 10.0), c.r_vb + 6.0, c.r_vb + 16.0), e)
    excl = np.maximum(excl, sp)
    return excl
