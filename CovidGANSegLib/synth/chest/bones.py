"""Bones: spine (vertebral bodies, discs, canal, posterior elements), ribs with costal cartilage,
sternum and scapulae."""

from __future__ import annotations

import numpy as np

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import ellipse_sd, overlap, seg_dist_2d, smoothstep, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS


def draw_spine(c: Chest) -> None:
    """Vertebral bodies with discs, the canal and the posterior elements."""
    r = c.rng
    e = c.edge
    uc = c.uc
    period = uniform(r, 24.0, 28.0)
    phase = uniform(r, 0.0, period)
    disc_h = uniform(r, 4.0, 6.0)
    # distance (mm) from each slice centre to the nearest disc centre
    zz = c.zc.reshape(1, 1, -1)
    dz = ((zz - phase + period / 2) % period) - period / 2
    disc = overlap(np.float32(0.0), disc_h / 2, dz, c.sz)
    mid_vert = np.abs(np.abs(dz) - period / 2) < period * 0.3  # slices through the vertebral middle
    bz = c.box(uc - 60, uc + 60, c.v_back, c.v_vb + c.r_vb + 5)
    if bz is None:
        return
    bu, bv, _ = c.coords(bz)
    dk = disc[:, :, bz[2]]
    mv = mid_vert[:, :, bz[2]]
    sd_vb = ellipse_sd(bu - uc, bv - c.v_vb, c.r_vb * 1.05, c.r_vb * 0.85)
    vb = soft(sd_vb, e)
    bone = c.marrow_hu + (c.cortex_hu - c.marrow_hu) * soft(2.0 - sd_vb, e)
    value = bone * (1 - dk) + 80.0 * dk
    c.paint(vb, value, LABELS["bone"], box=bz)
    # posterior elements: ring around the canal, spinous and transverse processes
    sd_ring = ellipse_sd(bu - uc, bv - c.v_can, c.r_can + 5.5, c.r_can + 5.0)
    ring = soft(sd_ring, e) * (1 - dk)
    pedicle = soft(np.minimum(sd_ring, 12.0 - np.abs(bu - uc)), e) * (bv > c.v_can)
    ring = np.maximum(ring * (bv < c.v_can + 3.0), pedicle * (1 - dk))
    c.paint(ring, c.cortex_hu * 0.8, LABELS["bone"], box=bz)
    canal = soft(ellipse_sd(bu - uc, bv - c.v_can, c.r_can, c.r_can * 0.9), e)
    c.paint(canal, 20.0, LABELS["soft_tissue"], box=bz)
    sp_len = uniform(r, 22.0, 32.0)
    spin_top = c.v_can - c.r_can - 3.0
    spinous = soft(np.minimum(3.0 - np.abs(bu - uc), np.minimum(spin_top - bv, bv - (spin_top - sp_len))), e)
    c.paint(spinous * mv * 0.9, c.cortex_hu * 0.6, LABELS["bone"], box=bz)
    for sign in (-1, 1):
        p0 = (uc + sign * (c.r_can + 3.0), c.v_can + 2.0)
        p1 = (uc + sign * (c.r_can + 20.0), c.v_can - 8.0)
        d = seg_dist_2d(bu, bv, p0, p1)
        tp = soft(3.5 - d, e) * mv
        c.paint(tp, c.cortex_hu * 0.6, LABELS["bone"], box=bz)


def draw_ribs_and_bones(c: Chest) -> None:
    """Ribs (cortex, marrow, costal cartilage), sternum and scapulae."""
    r = c.rng
    e = c.edge
    d = c.depth
    phi = c.phi
    D, R, F, M = c.D, c.R, c.F, c.M
    # rib layer radial band: cortex near the band edges
    inner = d - (D - R)  # 0 at the outer edge of the rib layer, R at the pleura
    band = soft(np.minimum(inner - 0.5, R - 0.5 - inner), e)
    rim = np.clip(1.0 - np.minimum(inner - 0.5, R - 0.5 - inner) / 2.0, 0.0, 1.0)
    spacing = uniform(r, 24.0, 30.0)
    height = uniform(r, 9.0, 11.0)
    drop = uniform(r, 45.0, 75.0)
    z_first = c.H * uniform(r, 0.98, 1.06)  # first rib, posteriorly
    zpost = z_first + drop * (1 - np.cos(phi)) / 2.0 * -1.0  # (nx, ny, 1) height offset of a rib
    rel = zpost - c.z  # rib k is at rel - k*spacing = 0
    k = np.rint(rel / spacing)
    center = zpost - k * spacing
    ov = overlap(center, height / 2, c.z, c.sz)  # (nx, ny, nz)
    # angular extent: ribs 0..6 reach the sternum (cartilage anteriorly), 7..9 shorter, 10..11 lateral
    kk = k
    end = np.where(kk <= 6, np.pi, np.where(kk <= 9, 2.4, 1.6))
    present = (kk >= 0) & (kk <= 11) & (phi > 0.28) & (phi < end - 0.12)
    ov = ov * present
    cart = phi > 2.3
    bone_val = c.marrow_hu + (c.cortex_hu - c.marrow_hu) * rim
    value = np.where(cart, uniform(r, 100.0, 180.0), bone_val)
    occ = band * ov
    c.paint(occ, value, LABELS["bone"])
    c.labels[(occ > 0.5) & cart] = LABELS["cartilage"]
    # sternum
    t = c.t
    st = soft(np.minimum(c.t - 0.22, 1.0 - c.t) * c.H, c.sz)
    widen = 1.0 + 0.6 * smoothstep((t - 0.75) / 0.15)
    v_st = c.vc + c.B_ant - float(c.F0) - 0.6 * c.M0 - 4.0
    sd = ellipse_sd(c.u - c.uc, c.v - v_st, 14.0 * widen, uniform(r, 5.0, 7.0))
    occ = soft(sd, e) * st
    c.paint(occ, c.marrow_hu + (c.cortex_hu - c.marrow_hu) * soft(1.8 - sd, e), LABELS["bone"])
    # scapulae: thin plates posterolaterally in the upper chest, inside the shoulder muscles
    sc = smoothstep((t - 0.5) / 0.15)
    mid = F + 0.55 * M
    along = soft(np.minimum(phi - 0.8, 1.4 - phi) * 60.0, e)  # ~60 mm per radian at this depth
    plate = soft(np.minimum(d - mid + 2.0, mid + 2.0 - d), e) * along * sc
    c.paint(plate, c.cortex_hu * 0.6, LABELS["bone"])

