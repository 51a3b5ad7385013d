"""Pulmonary vessel trees (arteries and veins, Murray's law) and the bronchi beside the arteries."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import uniform
from CovidGANSegLib.synth.chest.labels import LABELS

#: vessels thinner than this (radius, mm) are rendered in batches
SMALL_VESSEL_MM = 2.0
#: terminal branches per tree (each lung has one arterial and one venous tree)
N_ARTERY_TIPS, N_VEIN_TIPS = 380, 300
#: radius range (mm) of the terminal twigs: sub-voxel at the periphery
TIP_RADIUS_MM = (0.3, 0.55)


def draw_vessel_trees(c: Chest) -> None:
    """Arterial and venous trees of each lung from the hila, bronchi beside the larger arteries."""
    r = c.rng
    lung_b = c.lung >= 0.5
    if not lung_b.any():
        return
    # attractor points: lung voxels a few mm or more below the pleura (vessels reach the periphery)
    size = [max(1, int(round(10.0 / c.px)) | 1), max(1, int(round(10.0 / c.px)) | 1), 3]
    deep = ndi.uniform_filter(lung_b.astype(np.float32), size=size, mode="constant") > 0.7
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    airway: list[tuple[np.ndarray, np.ndarray, float]] = []
    fov = c.grid.fov
    for sign in (-1, 1):
        side = deep & (((c.u - c.uc) * sign) > 0)
        idx = np.flatnonzero(side)
        if idx.size < 16:
            continue
        hil, _, vein = c.hila[sign]
        for root, n_pts, r0, kind in ((hil, N_ARTERY_TIPS, uniform(r, 5.5, 7.0), "artery"), (vein, N_VEIN_TIPS, uniform(r, 5.0, 6.5), "vein")):
            pick = np.sort(r.choice(idx, size=min(n_pts, idx.size), replace=False))
            i, j, k = np.unravel_index(pick, lung_b.shape)
            pts = np.stack([
                (i + r.uniform(0, 1, i.size)) * c.px - fov / 2,
                (j + r.uniform(0, 1, j.size)) * c.px - fov / 2,
                c.zc[k] + r.uniform(-0.5, 0.5, k.size) * c.sz,
            ], axis=1)
            tree: list[tuple[np.ndarray, np.ndarray, float]] = []
            grow_tree(np.asarray(root, float), pts, r0, tree, r)
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
    occ_v = np.zeros_like(c.lung)
    small = []
    for a, b, rad in segs:
        if rad < SMALL_VESSEL_MM:
            small.append((a, b, rad))
            continue
        box = c.segment_box(a, b, rad + 2 * c.px)
        if box is None:
            continue
        o = c.segment_occupancy(a, b, rad, box)
        np.maximum(occ_v[box], o, out=occ_v[box])
    c.small_segments_occupancy(small, occ_v)
    occ_w = np.zeros_like(c.lung)
    occ_l = np.zeros_like(c.lung)
    for a, b, rad in airway:
        wall = 0.25 * rad + 0.6
        box = c.segment_box(a, b, rad + wall + 2 * c.px)
        if box is None:
            continue
        np.maximum(occ_w[box], c.segment_occupancy(a, b, rad + wall, box), out=occ_w[box])
        np.maximum(occ_l[box], c.segment_occupancy(a, b, rad, box), out=occ_l[box])
    in_lung = np.clip(c.lung * 1.5, 0.0, 1.0)
    c.paint(occ_w, 30.0, LABELS["soft_tissue"], weight=in_lung)
    c.paint(occ_l, -1000.0, LABELS["airway"], weight=in_lung)
    c.paint(occ_v, c.blood_hu, LABELS["vessel"], weight=in_lung * (1.0 - occ_l))



def grow_tree(start: np.ndarray, pts: np.ndarray, radius: float, out: list, rng: np.random.Generator,
               r_min: float = 0.6) -> None:
    """Recursive space-filling tree: step toward the territory's centroid, split it in two along
    its principal axis, and give the children radii by Murray's law (r^3 = r1^3 + r2^3). The
    last branches to the attractor points are twigs of :data:`TIP_RADIUS_MM`."""
    n = len(pts)
    c = pts.mean(axis=0)
    if n <= 2 or radius < r_min:
        out.append((start, c, radius))
        tips = rng.uniform(TIP_RADIUS_MM[0], TIP_RADIUS_MM[1], len(pts))
        for p, rt in zip(pts, tips):
            out.append((c, p, float(min(radius * 0.7, rt))))
        return
    node = start + rng.uniform(0.35, 0.6) * (c - start) + rng.normal(0.0, 2.0, 3)
    out.append((start, node, radius))
    d = pts - c
    _, vecs = np.linalg.eigh(d.T @ d)
    proj = d @ vecs[:, -1]
    order = np.argsort(proj, kind="stable")
    cut = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
    for part in (order[:cut], order[cut:]):
        grow_tree(node, pts[part], radius * (len(part) / n) ** (1.0 / 3.0), out, rng, r_min)

