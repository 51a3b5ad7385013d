"""Lung mask extraction from a chest CT in HU with scipy / scikit-image only (no model download).

The algorithm works on a grid of about 2 mm in-plane (block means of the CT, which also
anti-alias) for speed; at full resolution only the boundary blocks are re-thresholded.

1. Voxels outside the scanner's field of view (constant padding such as -1024 / -2048 / -3024 HU)
   are flagged and never taken for lung.
2. Outside air, per slice: low-density regions (below ``lung_hu``) touching the image border or
   the padding that are mostly below ``outside_hu``. Lungs cut by a partial field of view touch
   the border too, but parenchyma (about -850 HU with vessels) is not air, so they are kept.
3. Body, per slice: the regions that are not outside air, at least 30 % of the largest (this drops
   the CT table and its foam).
4. Lung candidates: 3D low-density components inside the body whose HU histogram looks like
   parenchyma: median below -600 HU (-450 HU for large, diseased lungs), mode above
   ``air_hu`` + 25 HU, under 25 % pure air, and thick (not a partial-volume rim). This rejects
   the trachea, stomach and bowel gas (mostly pure air) and partial-volume rims.
5. Airways: large pure-air structures inside the candidates (trachea, main bronchi, which connect
   the lungs) are removed with a 1-voxel rim; intrapulmonary bronchi come back with the hole
   filling because the lung surrounds them, the main bronchi in the hila do not.
6. Lungs: the two largest remaining components (both lungs; one when they touch at the midline or
   only one is in the field of view) plus any other at least a fifth of the largest.
7. Lesions: the lungs grow in-plane (up to ``grow_mm``) into adjacent voxels below ``grow_hu``
   (ground glass), minus thin rims (an opening removes the partial-volume layer at the pleura);
   each lung is closed with a 3D ball of ``closing_mm`` and along z over ``z_closing_mm`` (dense
   lesions with lung above and below; 24 mm at inference, 16 mm for the training volumes),
   restricted to the body and to voxels below 200 HU; holes are filled slice by slice. Vessels and
   consolidation at the pleura (about -100..+50 HU) thus stay inside the mask, while the heart and
   mediastinum (wider than the ball) stay outside.
   Inside the thoracic cavity (per slice, the convex hull of the bones, minus a midline mediastinal
   band) ground glass grows up to twice ``grow_mm``, and dense tissue (< 120 HU) within ``wall_mm``
   of the chest wall grows (up to ``dense_grow_mm``) from thick ground glass in the lung (dense
   lesions have a ground-glass halo; a healthy lung meets the chest wall sharply, so nothing grows).
   Limitation: extensive consolidation lining the chest wall over many slices (MosMed CT-3/CT-4)
   is still only partly recovered (about 65-85 % of lesion voxels kept on severe phantoms).

Arrays are canonical ``(x, y, z)`` with z the slice axis (see ``nifti.CTVolume``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib.components import IN_PLANE_4, components_touching

log = logging.getLogger(__name__)

#: length in mm of the closing along z for the training volumes' lung masks (two 8 mm slices each way)
TRAINING_Z_CLOSING_MM = 16.0
#: length in mm of the closing along z at inference (three 8 mm slices each way: a dense lesion with
#: aerated lung above and below stays in the mask over one more slice). Trained with the 16 mm masks
#: and given these, every model measured gained on every validation set; trained with these too, the
#: models swung by seed (docs/ablation.md, "A longer closing along z, again").
INFERENCE_Z_CLOSING_MM = 24.0

#: 3D 6-connectivity
_S6 = ndi.generate_binary_structure(3, 1)


def extract_lung_mask(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    work_spacing_mm: float = 2.0,
    lung_hu: float = -400.0,
    air_hu: float = -950.0,
    outside_hu: float = -900.0,
    grow_hu: float = -250.0,
    grow_mm: float = 20.0,
    closing_mm: float = 10.0,
    z_closing_mm: float = INFERENCE_Z_CLOSING_MM,
    min_lung_ml: float = 3.0,
    dense_grow_mm: float = 25.0,
    wall_mm: float = 20.0,
) -> np.ndarray:
    """Lung mask of a CT in HU, canonical ``(x, y, z)`` (z = slices).

    Args:
        hu: 3D CT in Hounsfield units (any real dtype).
        spacing: voxel size in mm along the array axes.
        work_spacing_mm: in-plane voxel size of the working grid (the mask is computed there and
            refined at full resolution at its boundary).
        lung_hu: voxels below this are low density (lung, airway, gas); the lung boundary.
        air_hu: below this (after smoothing) a voxel is pure air (airways, gas).
        outside_hu: border-touching low-density regions mostly below this are outside air.
        grow_hu, grow_mm: the lungs grow (in-plane, at most ``grow_mm``) into adjacent voxels below
            ``grow_hu`` (ground-glass opacities).
        closing_mm: radius of the 3D ball closing that keeps peripheral lesions inside the mask.
        z_closing_mm: length of an extra closing along z (lesions with lung above and below): the
            inference mask by default; :data:`TRAINING_Z_CLOSING_MM` for the training volumes.
        min_lung_ml: components smaller than this are never lungs.

    Returns:
        bool array of ``hu``'s shape; empty when no lung is found.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {hu.shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    if work_spacing_mm <= 0 or closing_mm < 0 or min_lung_ml < 0 or not air_hu < lung_hu:
        raise ValueError("work_spacing_mm must be > 0, closing_mm and min_lung_ml >= 0, air_hu < lung_hu")
    sx, sy, sz = (float(s) for s in spacing)
    fx = max(1, int(round(work_spacing_mm / sx)))
    fy = max(1, int(round(work_spacing_mm / sy)))
    wspacing = (sx * fx, sy * fy, sz)
    voxel_ml = wspacing[0] * wspacing[1] * wspacing[2] / 1000.0

    # 1. working grid: block mean (anti-aliasing) and out-of-FOV padding
    mean_w, max_w = _block_mean_max(hu, fx, fy)
    if fx == 1 and fy == 1:  # no averaging happened: look at a 3 x 3 neighbourhood for padding
        max_w = ndi.maximum_filter(max_w, size=(3, 3, 1))
    fov_out = max_w < -1010.0  # constant padding at or below -1024 (real air is noisy, about -1000)
    s = ndi.gaussian_filter(mean_w, sigma=(0.6, 0.6, 0.0), mode="nearest")
    del mean_w, max_w
    low = s < lung_hu

    # 2. outside air, per slice
    outside = _outside_air(low | fov_out, (s < outside_hu) | fov_out, fov_out)
    # 3. body, per slice
    body = _body(outside | fov_out)
    cand = low & body & ~fov_out
    if not cand.any():
        return np.zeros(hu.shape, dtype=bool)

    # 4. plausible lung components
    lab, n = ndi.label(cand, _S6)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    plausible = _plausible_components(lab, n, s, air_hu, voxel_ml, min_lung_ml)
    lungs = np.isin(lab, plausible) if len(plausible) else np.zeros_like(cand)
    del lab
    if not lungs.any():
        log.debug("no plausible lung component")
        return np.zeros(hu.shape, dtype=bool)

    # 5. airways: large pure-air structures inside the lungs, with a 1-voxel rim
    airway = _airways(lungs, s < air_hu, voxel_ml)
    lungs &= ~airway

    # 6. keep the lungs
    lab, n = ndi.label(lungs, _S6)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")
    largest = counts[order[0]]
    keep = [int(i) + 1 for rank, i in enumerate(order)
            if counts[i] * voxel_ml >= min_lung_ml and (rank < 2 or counts[i] >= 0.2 * largest)]
    if not keep:
        return np.zeros(hu.shape, dtype=bool)

    # 7. grow into ground glass, close each lung (ball in mm) inside the body, then fill holes per
    # slice, all inside the lungs' padded bounding box. Airways enclosed by parenchyma come back
    # with the filling; the main bronchi in the hila (enclosed only after the closing) do not.
    lungs = np.isin(lab, keep)
    del lab
    steps = max(1, int(round(grow_mm / min(wspacing[0], wspacing[1])))) if grow_mm > 0 else 0
    dense_steps = max(1, int(round(dense_grow_mm / min(wspacing[0], wspacing[1])))) if dense_grow_mm > 0 else 0
    kz = max(1, int(round(z_closing_mm / wspacing[2]))) if z_closing_mm > 0 else 0
    pad = [steps + int(math.ceil(closing_mm / w)) + 2 for w in wspacing[:2]]
    pad.append(max(kz, int(math.ceil(closing_mm / wspacing[2]))) + 1)
    box = _padded_box(lungs, pad)
    inner = _finish_lungs(lungs[box], s[box], (body & ~fov_out)[box], airway[box], wspacing, steps, kz,
                          grow_hu, closing_mm, dense_steps, wall_mm, 4.0)
    mask = np.zeros_like(cand)
    mask[box] = inner
    log.debug("lung mask: %d component(s), %.0f mL", len(keep), mask.sum() * voxel_ml)

    # 8. back to full resolution
    if fx == 1 and fy == 1:
        return mask
    return _refine_full_resolution(mask, low, hu, fx, fy, lung_hu)


def _padded_box(mask: np.ndarray, pad: list[int]) -> tuple[slice, slice, slice]:
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, mask.shape))


def _finish_lungs(lungs: np.ndarray, s: np.ndarray, body: np.ndarray, airway: np.ndarray,
                  wspacing: tuple[float, float, float], grow_steps: int, kz: int, grow_hu: float,
                  closing_mm: float, dense_steps: int = 0, wall_mm: float = 30.0,
                  open_mm: float = 4.0) -> np.ndarray:
    """Ground-glass growth, per-lung ball closing, z closing and per-slice hole filling."""
    allowed = body & (s < 200.0)  # no bone / bright contrast added by the closing
    cavity, d_wall, midline = _thoracic_cavity(s, body, wspacing)
    if grow_steps > 0:  # ground glass (up to about -300 HU) next to the aerated lung belongs to it
        far = 2 * grow_steps if cavity.any() else grow_steps
        near = ndi.binary_dilation(lungs, structure=IN_PLANE_4, iterations=grow_steps)
        ggo_ok = (s < grow_hu) & allowed & ~airway & (near | cavity)  # further only inside the rib cage
        grown = ndi.binary_dilation(lungs, structure=IN_PLANE_4, iterations=far, mask=ggo_ok) & ~lungs
        # thin partial-volume rims around the lungs are not ground glass: open the growth
        lungs = lungs | ndi.binary_opening(grown, structure=IN_PLANE_4)
    if cavity.any() and dense_steps > 0:
        # consolidation lining the chest wall: dense (< 120 HU), non-bone tissue inside the rib cage
        # within wall_mm of it, connected in-plane to the lung; thin layers (pleura, intercostal
        # muscle between the ribs) are removed by an opening with a disc of ``open_mm``.
        dense_ok = cavity & (d_wall <= wall_mm) & (s < 120.0) & (s >= grow_hu) & allowed & ~airway
        # seeds: thick ground glass in the lung (a healthy lung meets the chest wall sharply; dense
        # lesions come with a ground-glass halo)
        seeds = ndi.binary_opening(lungs & (s > -700.0), structure=_disc(2))
        grown = ndi.binary_dilation(seeds, structure=IN_PLANE_4, iterations=dense_steps, mask=dense_ok | seeds) & ~lungs
        r = max(1, int(round(open_mm / min(wspacing[0], wspacing[1]))))
        grown = ndi.binary_opening(grown, structure=_disc(r))
        lungs = lungs | components_touching(lungs, grown | lungs, connectivity=6) & grown
    lab, n = ndi.label(lungs, _S6)
    closed = np.zeros_like(lungs)
    for label, obj in enumerate(ndi.find_objects(lab), start=1):
        if obj is not None:
            closed |= _closing_in_box(lab == label, obj, wspacing, closing_mm)
    del lab
    if kz > 0:  # lesions limited in z: lung above and below at the same place
        st = np.ones((1, 1, 2 * kz + 1), dtype=bool)
        padded = np.pad(lungs | closed, ((0, 0), (0, 0), (kz, kz)))
        closed |= ndi.binary_closing(padded, structure=st)[:, :, kz:-kz]
    closed &= allowed
    # holes that straddle the midline are the mediastinum enclosed where the lungs meet (anterior and
    # posterior junction lines), not lung
    mask = _fill_holes_2d(lungs, midline)
    mask |= _fill_holes_2d(closed | lungs, midline) & ~airway
    mask &= body
    return components_touching(lungs, mask, connectivity=6)


def _disc(r: int) -> np.ndarray:
    """In-plane disc of radius ``r`` voxels as a 3D (x, y, 1) structuring element."""
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx ** 2 + yy ** 2 <= r * r + r)[:, :, None]


def _thoracic_cavity(s: np.ndarray, body: np.ndarray, wspacing: tuple[float, float, float],
                     bone_hu: float = 200.0, mediastinum_mm: float = 35.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice, the convex hull of the bones (ribs, spine, sternum), the in-plane distance (mm)
    of each voxel inside it to the hull's border (the chest wall) and the midline: the x index of
    the hull's centre (of the body's where there is no hull; NaN where there is neither)."""
    from skimage.morphology import convex_hull_image

    bone = (s >= bone_hu) & body
    cavity = np.zeros_like(bone)
    for z in range(s.shape[2]):
        b = bone[:, :, z]
        if b.sum() >= 10:
            try:
                cavity[:, :, z] = convex_hull_image(b)
            except Exception:  # degenerate (collinear) point sets
                pass
    d_wall = ndi.distance_transform_edt(cavity, sampling=(wspacing[0], wspacing[1], 1e6))
    # the mediastinum (sternum to spine, between the lungs) lines the hull too: drop a midline band
    x = (np.arange(s.shape[0]) * wspacing[0])[:, None]
    midline = np.full(s.shape[2], np.nan)
    for z in range(s.shape[2]):
        c = cavity[:, :, z]
        if c.any():
            midline[z] = np.nonzero(c)[0].mean()
            c &= np.abs(x - midline[z] * wspacing[0]) > mediastinum_mm
        elif body[:, :, z].any():
            midline[z] = np.nonzero(body[:, :, z])[0].mean()
    return cavity & body & ~bone, d_wall, midline


def _fill_holes_2d(mask: np.ndarray, midline: np.ndarray | None = None) -> np.ndarray:
    """Per-slice hole filling: background regions not touching the slice border become mask.

    With ``midline`` (per-slice x index, NaN: none), holes with voxels on both sides of it stay
    background: where the two lungs meet in front of and behind the mediastinum, the mediastinum
    is such a hole.
    """
    lab, n = ndi.label(~mask, IN_PLANE_4)
    edge = np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel()])
    open_ = np.zeros(n + 1, dtype=bool)
    open_[edge] = True
    open_[0] = True
    if midline is not None and n:
        x = np.arange(mask.shape[0], dtype=float)[:, None, None]
        xm = np.broadcast_to(np.asarray(midline, dtype=float)[None, None, :], mask.shape)
        has_mid = ~np.isnan(xm)
        left = np.bincount(lab[has_mid & (x < xm)].ravel(), minlength=n + 1) > 0
        right = np.bincount(lab[has_mid & (x > xm)].ravel(), minlength=n + 1) > 0
        open_ |= left & right
    return mask | ~open_[lab]


def _block_mean_max(hu: np.ndarray, fx: int, fy: int) -> tuple[np.ndarray, np.ndarray]:
    """In-plane block mean (HU clipped at -1024) and block maximum (raw), float32."""
    nx, ny, nz = hu.shape
    bx, by = -(-nx // fx), -(-ny // fy)
    if fx == 1 and fy == 1:
        raw = hu.astype(np.float32, copy=False)
        return np.maximum(raw, np.float32(-1024.0)), raw
    px, py = bx * fx - nx, by * fy - ny
    src = hu if (px == 0 and py == 0) else np.pad(hu, ((0, px), (0, py), (0, 0)), mode="edge")
    blocks = src.reshape(bx, fx, by, fy, nz)
    mx = blocks.max(axis=(1, 3)).astype(np.float32)
    mean = np.zeros((bx, by, nz), dtype=np.float32)
    for i in range(fx):  # accumulate without a full-size float copy
        for j in range(fy):
            mean += np.maximum(blocks[:, i, :, j, :], -1024.0, dtype=np.float32)
    mean /= fx * fy
    return mean, mx


def _outside_air(low: np.ndarray, pure_air: np.ndarray, fov_out: np.ndarray) -> np.ndarray:
    """Per-slice low-density regions touching the border / FOV padding that are mostly pure air."""
    lab, n = ndi.label(low, IN_PLANE_4)
    if n == 0:
        return np.zeros_like(low)
    edge = np.zeros(low.shape, dtype=bool)
    edge[[0, -1], :, :] = True
    edge[:, [0, -1], :] = True
    touches = np.bincount(lab[(edge & low) | fov_out], minlength=n + 1) > 0
    size = np.bincount(lab.ravel(), minlength=n + 1)
    air = np.bincount(lab[pure_air], minlength=n + 1)
    is_out = touches & (air > 0.5 * size)
    is_out[0] = False
    return is_out[lab]


def _body(outside: np.ndarray) -> np.ndarray:
    """Per slice, the regions not outside that are at least 30 % of the largest (drops the table)."""
    lab, n = ndi.label(~outside, IN_PLANE_4)
    if n == 0:
        return np.zeros_like(outside)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    objects = ndi.find_objects(lab)
    largest = np.zeros(outside.shape[2], dtype=np.int64)
    for i, box in enumerate(objects, start=1):
        z = box[2].start
        largest[z] = max(largest[z], counts[i])
    keep = np.zeros(n + 1, dtype=bool)
    for i, box in enumerate(objects, start=1):
        keep[i] = counts[i] >= 0.3 * largest[box[2].start]
    return keep[lab]


def _plausible_components(lab: np.ndarray, n: int, s: np.ndarray, air_hu: float,
                          voxel_ml: float, min_ml: float) -> list[int]:
    """Labels whose HU histogram looks like lung parenchyma."""
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    big = [i for i in range(1, n + 1) if counts[i] * voxel_ml >= min_ml]
    if not big:
        return []
    eroded = ndi.binary_erosion(lab > 0, structure=IN_PLANE_4, border_value=1)
    eroded_counts = np.bincount(lab[eroded], minlength=n + 1)
    objects = ndi.find_objects(lab)
    edges = np.arange(-1030.0, -380.0, 20.0)
    out = []
    for i in big:
        box = objects[i - 1]
        values = s[box][lab[box] == i]
        median = float(np.median(values))
        air_fraction = float(np.mean(values < air_hu))
        hist, _ = np.histogram(values, bins=edges)
        mode = float(edges[int(hist.argmax())] + 10.0)
        thick = eroded_counts[i] >= 0.3 * counts[i]  # not a thin partial-volume rim
        dense_ok = median < -600.0 or (median < -450.0 and counts[i] * voxel_ml >= 100.0)  # diseased lungs
        ok = dense_ok and mode > air_hu + 25.0 and air_fraction < 0.25 and thick
        log.debug("component %d: %.1f mL median %.0f mode %.0f air %.2f core %.2f -> %s", i, counts[i] * voxel_ml,
                  median, mode, air_fraction, eroded_counts[i] / counts[i], "lung" if ok else "rejected")
        if ok:
            out.append(i)
    return out


def _airways(lungs: np.ndarray, air: np.ndarray, voxel_ml: float, *, min_ml: float = 1.0) -> np.ndarray:
    """Large pure-air structures inside ``lungs`` (trachea, main bronchi) with a 1-voxel rim."""
    lab, n = ndi.label(lungs & air, _S6)
    if n == 0:
        return np.zeros_like(lungs)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    big = np.flatnonzero(counts * voxel_ml >= min_ml)
    big = big[big > 0]
    if len(big) == 0:
        return np.zeros_like(lungs)
    return ndi.binary_dilation(np.isin(lab, big), structure=IN_PLANE_4, iterations=1)


def _closing_in_box(comp: np.ndarray, box: tuple[slice, ...], spacing: tuple[float, float, float],
                    radius_mm: float) -> np.ndarray:
    """Ball closing (radius in mm, anisotropic voxels) of ``comp`` inside its box.

    The box is padded with background beyond the image border too, so a lung cut by the field of
    view is closed as if the image went on with background (no filling of concavities that open
    onto the border).
    """
    if radius_mm <= 0:
        return comp
    sl = tuple(slice(b.start, b.stop) for b in box)
    pad = [int(math.ceil(radius_mm / w)) + 1 for w in spacing]
    sub = np.pad(comp[sl], [(p, p) for p in pad])
    dilated = ndi.distance_transform_edt(~sub, sampling=spacing) <= radius_mm
    closed_sub = ndi.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    inner = tuple(slice(p, p + (b.stop - b.start)) for p, b in zip(pad, box))
    closed = np.zeros_like(comp)
    closed[sl] = closed_sub[inner]
    return closed


def _refine_full_resolution(mask_w: np.ndarray, low_w: np.ndarray, hu: np.ndarray, fx: int, fy: int,
                            lung_hu: float) -> np.ndarray:
    """Upsample a working-grid mask; boundary blocks of parenchyma are re-thresholded at full res."""
    nx, ny, _ = hu.shape
    core = ndi.binary_erosion(mask_w, structure=IN_PLANE_4, border_value=1)
    band = mask_w & ~core
    sure = core | (band & ~low_w)  # interior, or filled-in dense blocks (lesions) at the boundary
    check = band & low_w  # parenchyma blocks at the boundary: keep their low-density voxels

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, fx, axis=0), fy, axis=1)[:nx, :ny]

    full = up(sure)
    full |= up(check) & (hu < lung_hu)
    return full
