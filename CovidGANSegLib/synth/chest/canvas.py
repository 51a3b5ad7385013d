"""The rendering surface of one chest: the anatomy grid, the HU / label / lung arrays, and the
painting primitives (blend with partial-volume occupancy, vertical tubes, capsules).

Coordinates: file order ``(x, y, z)``, ``u`` toward the patient's left, ``v`` anterior, ``z``
superior (mm, 0 at the lung base). Organ modules (:mod:`body`, :mod:`bones`, :mod:`abdomen`,
:mod:`mediastinum`, :mod:`lungs`, :mod:`vessels`) draw onto a :class:`Chest`.
"""

from __future__ import annotations

import math

import numpy as np

from CovidGANSegLib.synth.chest.geometry import draw_grid, ellipse_sd, soft, uniform
from CovidGANSegLib.synth.chest.labels import LABELS

class Chest:
    """Renders one chest on the anatomy grid (file order (x, y, z), u = patient left, v = anterior)."""

    def __init__(self, rng: np.random.Generator, size: str) -> None:
        self.rng = rng
        r = rng
        # ---- body and grid
        self.A0 = uniform(r, 135.0, 170.0)  # body half width (mm)
        self.grid = draw_grid(r, size, 2 * self.A0 * 1.05)
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
        self.H = uniform(r, min(235.0, room - 15.0), min(290.0, room))  # lung height base -> apex
        below = uniform(r, 24.0, extent - self.H - 16.0)
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
        """The (u, v, z) coordinate arrays (mm) of an index box."""
        return self.u[box[0]], self.v[:, box[1]], self.z[:, :, box[2]]

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
        sd = ellipse_sd(bu - cu_b, bv - cv_b, radius, radius * ratio)
        occ = soft(sd, self.edge) * zocc
        if excl is not None:
            excl[box] = np.maximum(excl[box], soft(sd + margin, self.edge) * zocc)
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
            o = soft(radius - d, self.edge)
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
                o = soft(rr - np.sqrt(du * du + dv * dv + dz * dz), self.edge)
                acc = o if acc is None else acc + o
            acc *= np.float32(0.5)
            keep = valid & (acc > 0)
            flat = (I * ny + J) * nz + K
            total += np.bincount(flat[keep], weights=acc[keep], minlength=occ.size).astype(np.float32)
        np.maximum(occ, np.minimum(total.reshape(occ.shape), 1.0), out=occ)

    def segment_box(self, p0, p1, ext):
        """Index box around the segment p0-p1 with a margin ``ext`` (mm)."""
        return self.box(min(p0[0], p1[0]) - ext, max(p0[0], p1[0]) + ext, min(p0[1], p1[1]) - ext,
                        max(p0[1], p1[1]) + ext, min(p0[2], p1[2]) - ext, max(p0[2], p1[2]) + ext)

    def segment_paint(self, p0, p1, radius, value, excl, margin, *, label=None, record=None):
        """Paint a capsule p0-p1 (mm) of ``radius``; optionally widen the exclusion map."""
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

