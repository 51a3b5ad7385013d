"""Post-processing of a segmenter's detections on the CT's own grid, and the rules alone.

numpy / scipy only (no torch): :func:`post_process` turns a canonical bool mask of above-threshold
voxels (``seg.inference.segment_ct``: the segmenter's probability mapped back onto the CT's grid)
into the lesion mask by the rules of :class:`PostProcessing`, in this order:

0. **Slab partial volume** (``slab_tissue_hu``, -100 HU): a lung voxel whose neighbour in the
   previous or next slice is non-lung tissue denser than that shares its (thick) slab with the
   diaphragm's dome, the apex or the heart and reads as ground glass; it is left out of the lung
   for everything below (:func:`slab_partial_volume`). On the real normal CTs at 8 mm these were
   single-slice sheets of 4-19 mL at the lung's ends.
   -100 HU counts soft tissue only, not the -300..-100 HU fringe just outside the lung mask ("The
   slab rule's tissue level" in docs/ablation.md: chosen on validation data).
1. **HU prior**: lesion voxels lie in ``hu_range`` (-800 .. +100 HU) on the input and inside the
   lung mask computed (or given) there. The faintest ground glass is about -750 HU and
   consolidation at most about +50 HU; aerated lung at the pleura (partial volume) and
   contrast-enhanced vessels fall outside.
2. **Opening**: an in-plane binary opening with a disk of ``open_mm`` removes detections thinner
   than the disk: the rims along the pleura and the vessel walls that were most of the false
   positives of phantom-trained models on real normal CTs; lesions of a few mL are wider.
3. **GAN agreement** (off by default: ``gan_gate_sigmas`` None; ``segment --gan-gate K``): a detected
   component is kept only when the GAN removed density there, i.e. when its mean difference
   (input minus pseudo-healthy, eq. 3) exceeds ``median + gan_gate_sigmas * sigma`` of G's own
   difference in healthy lung (robust statistics stored in the GAN checkpoint at the end of its
   training; the paper rule's family, with k = 4). On real normal CTs it removes the dense
   posterior vessel clusters that phantom-trained segmenters take for disease. An *extensive*
   component (over ``gan_gate_extensive``, 5 % of the lung) is judged by the upper quartile of its
   difference instead (``gan_gate_quantile``): a CPU-trained GAN restores extensive disease only
   in part, and the mean (26-38 HU against a 41 HU gate) dropped whole lungs of it. Sparing
   extensive components altogether (``gan_gate_spares_extensive``) rescued one severe validation
   case of one model but changed nothing for three other seeds, and for two of five models it kept
   false detections on 13-16 % of a real normal lung at 8 mm slices: not the default. (k = 4, the quartile
   and the 5 % were set on the validation cohort after seeing the real-normal figures too; 2-10 %
   gave the same results there: see docs/ablation.md, which says so.) It was the default until real CTs
   with inserted lesions of the independent model (``benchmarks/bench_real_lesions.py``) showed
   that on real anatomy the phantom-trained GAN barely changes mild lesions (mean difference
   mostly 5-25 HU against a 40 HU gate) while it changes vessels by 50-300 HU: the gate kept vessels and
   dropped lesions, and Dice there fell to the HU threshold's (docs/ablation.md, "Mild lesions in real anatomy").
4. **Density filter** (``density_filter_mm``, 3 mm): the CT's density inside the lung passes an
   in-plane grey opening, then a closing, with a 7 x 7 mm square (:func:`filtered_density`): bright
   structures narrower than that (vessels and their partial-volume halos, septal lines) fall to
   the density around them, dark noise dips inside broad faint ground glass are filled. Seeds
   (``density_filter_seeds``) are kept only where this density is lesion-range too (at least
   ``grow_hu_range[0]``): the segmenters' detections on vessels around the hila of real normal
   CTs go, lesions are broad and stay. Pixels finer than ``density_filter_resolution_mm`` (1.5 mm,
   e.g. MosMed's 0.7 mm) are first smoothed inside the lung to about that resolution, the finest the
   filter was chosen on.
5. **Growth**: the model's detections are seeds; the connected regions of lesion-range density
   (``grow_hu_range``, of the filtered density; opened the same way, so that vessels do not
   bridge) that touch a seed join the mask. On phantoms at 8 mm slices the raw density's region
   held a third of healthy lung, connected along the vessel tree; the filtered one stops there.
   Regions are 26-connected (``grow_connectivity``); face connectivity (6) stops growth along
   vessels that cross thick slices obliquely and helped the mild cases a little, but lost extent
   in severe ones (on four seeds of the default model, -0.04 to +0.01 Dice on the validation
   cohort): not the default. The segmenter finds *where* there is disease; the density tells how
   far it reaches (seen on phantoms: the models find the cores of large lesions and miss their
   faint extent). The floor of the region (and of the seeds' filtered density), -725 HU, was
   -750 HU until a sweep over seven models (docs/ablation.md, "The `train` command like the demo, and the
   post-processing checked again"): -725 HU raised the validation criterion for five of them and
   the default plan's validation cohort for all six checked, mild cases most, and marks less of
   real normal lungs; -700 and -775 HU were worse.
6. **Thin growth** (``min_thick_fraction``, 0.75; ``thick_mm``, 5 mm; components of at least
   ``thin_growth_min_ml``, 5 mL): a grown component of which less than 75 % survives an in-plane
   opening with a disk of 5 mm is mostly thin: the growth followed vessels (and their partial
   volume at thick slices) out of the seeds through a whole vessel tree. Such a component keeps only
   its seeds and the lesion-range density within ``thin_growth_reach_mm`` (3 mm, in-plane) of them
   (:func:`limit_thin_growth`). Lesions are thick and keep their growth. The local contrast rule
   (7.) judges each grown component whole before this limit (a component it drops must not come
   back as its denser seeds) and what is left after it. On the phantom validation cohorts the
   vessel trees grown out of one seed near a hilum were 100-500 mL (the largest false detections
   of mild cases); the limit raised the mean Dice of five models on all three phantom validation
   cohorts (mild cases most) and left real anatomy level (docs/ablation.md, "Thin growth").
7. **Local contrast** (``min_contrast_hu``, 100 HU, over a ring of ``contrast_ring_mm``, 6 mm): a
   final component is kept only when its median HU exceeds the median HU of the lung around it (an
   in-plane ring out to 6 mm, lung voxels outside the mask, the adjacent voxel left out as partial
   volume) by at least that much (:func:`local_contrast`). A lesion is denser than the lung around
   it; gravity-dependent density in the posterior lung and partial volume along the pleura and the
   diaphragm rise gradually and match the lung next to them. On real normal CTs at 8 mm those were
   the largest remaining false detections (up to 17 mL, median about -620 HU, 50-100 HU above the
   lung within 6 mm); on real CTs with inserted mild lesions and on the three phantom validation
   cohorts, five models gained on average (docs/ablation.md, "Local contrast").

8. **Faint components without a seed** (``faint_component_hu``, -525 HU; with growth only): every
   component of the rules alone (the steps above with every lung voxel a seed,
   :func:`rules_alone_segment`) whose mean HU is at most this joins the mask, seeded or not. Such a
   component is broad (it passed the density filter), denser than the lung around it (local
   contrast) and not dense: ground glass, the first sign of mild disease. The components the rules
   find and the segmenter leaves unseeded are mostly denser ones (vessel confluences, partial
   volume at the chest wall; median about -360 HU on the real CTs), while the true lesions it
   misses there are faint ones (median about -490 HU): the segmenter, trained on phantoms, is least
   sure of faint ground glass in real anatomy. On seven models it raised every validation set
   (phantom validation, mild phantoms, real CTs with inserted mild lesions) and left the real normal
   CTs as they were (docs/ablation.md, "Faint components without a seed"). Adopted at -550 HU; raised
   to -525 HU once step 9 took the small dense false components a higher level let in: all six
   models rose on validation (docs/ablation.md, "The faint level raised").
9. **Small dense components** (``small_dense_ml``, 4 mL; ``small_dense_hu``, -475 HU): a final
   component under 4 mL whose mean HU is above -475 is dropped (:func:`drop_small_dense`). On the
   validation sets the false components that pass every rule above are small and dense (median
   -370..-460 HU, 0.8-2.1 mL over six models; on real anatomy vessels and partial volume denser than
   ground glass), the true ones larger and fainter (median -507..-539 HU, 3.7-5.7 mL);
   on mild lesions inserted in real CTs the rule takes 68 % of the false volume and 4 % of the true
   one. On six models every one gained on the validation criterion
   (+0.011 on average; mild lesions in real anatomy +0.026, mild phantoms +0.006, the validation
   phantoms level), and the real normal CTs lost their largest false detections
   (docs/ablation.md, "Small dense components"). A small solid nodule goes with them: this tool
   measures ground glass and consolidation, not nodules.
10. **The detections' rim** (``detection_rim_mm``, 2.5 mm, the opening's radius): the segmenter's own
    detections in lesion-range density (``grow_hu_range``, of the raw CT) next to a final component join
    it, within 2.5 mm in-plane of it, reached through detections (:func:`detection_rim`). The opening
    (step 2) rounds the detections' edges off, and the growth region is opened too, so the edge of a
    lesion the segmenter marked was lost; only detections touching what every rule above kept come back,
    so no component the rules dropped returns. On six models every one gained on each validation set
    (phantom validation, mild phantoms, real CTs with inserted mild lesions; criterion 0.3787 -> 0.3826),
    the real normal CTs at 8 mm marked at most 0.22 % of a lung (0.20 % before); on the held-out cases of
    eight quick demos afterwards +0.005 on the phantoms and +0.003 on mild lesions in real anatomy
    (docs/ablation.md, "The detections' rim"). The same rim around the rules alone (every lung voxel a
    detection) lowers them: what joins is the segmenter's own edge, and :func:`rules_alone_segment`, which
    has no detections, has no rim.

The density filter helped each of five retrained models on the validation cohorts (all cases and
mild cases) and on the real normal CTs; on a fresh cohort checked afterwards the mild cases gained
again for every model while all cases stayed level on average (docs/ablation.md, "Density filter").

How the work is done (the masks are the same as the plain implementation's): inside the lung's
bounding box, padded for the density filter and the slab rule (:func:`_lung_box`); in-plane
morphology with a disk (openings, the local contrast rule's rings) as unions or intersections over
the disk's rectangles, read off one summed-area table (:func:`_rectangle_counts`); the slab rule,
the filtered density and the growth region's components once for both passes, the segmenter's seeds
and step 8's every lung voxel (:class:`_Scene`). On a 512 x 512 x 40 CT this took the post-processing
from 8.7 s to 2.3 s on a first-generation EPYC (docs/ablation.md, "The post-processing made fast").

:func:`rules_alone_segment` runs the same rules with every lung voxel as a seed: a baseline without
a model that every demo scores beside the segmenters ("What the segmenter adds to the rules" in
docs/ablation.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: lesion voxels are at least this dense on the input CT (HU prior at inference; None disables it)
LESION_HU_FLOOR = -800.0
#: non-lung tissue denser than this above or below a lung voxel puts it in the slab rule (step 0)
SLAB_TISSUE_HU = -100.0
#: the density filter (step 4) judges the CT at no finer in-plane resolution than this (mm)
DENSITY_FILTER_RESOLUTION_MM = 1.5
#: components of the rules alone at most this dense (mean HU) join the mask without a seed (step 8)
FAINT_COMPONENT_HU = -525.0
#: final components smaller than this (mL) and denser than ``SMALL_DENSE_HU`` (mean) are dropped (step 9)
SMALL_DENSE_ML = 4.0
SMALL_DENSE_HU = -475.0
#: in-plane reach (mm) of the detections that join a final component at its edge (step 10)
DETECTION_RIM_MM = 2.5


@dataclass(frozen=True)
class PostProcessing:
    """Post-processing of the thresholded probabilities on the input grid (module docstring).

    Attributes:
        hu_range: HU range of lesion voxels (None: no HU prior).
        open_mm: radius of the in-plane opening disk in mm (0: no opening).
        grow: grow the detections into connected lesion-range density.
        grow_hu_range: HU range of the region the detections may grow into.
        grow_connectivity: 6 (faces) or 26 (faces, edges, corners): connectivity of that region.
        density_filter_mm: half-width in mm of the in-plane square of the grey opening then
            closing of the CT's density (:func:`filtered_density`; 0: the raw density). The growth
            region is thresholded on the filtered density.
        density_filter_seeds: seeds are also kept only where the filtered density is at least
            ``grow_hu_range[0]`` (no effect when ``density_filter_mm`` is 0).
        density_filter_resolution_mm: the density filter sees the CT at no finer in-plane
            resolution than this: finer pixels are first smoothed inside the lung
            (:func:`filtered_density`; 0: never).
        gan_gate_sigmas: k of the GAN-agreement gate (None: no gate even with a difference map).
        gan_gate_spares_extensive: keep extensive components (more than ``gan_gate_extensive`` of
            the lung) whatever their GAN difference.
        gan_gate_quantile: when extensive components are not spared, the gate compares this
            quantile of their GAN difference instead of the mean (None: the mean for every component).
        gan_gate_extensive: the share of the lung above which a component is extensive.
        slab_tissue_hu: lung voxels whose neighbour in the previous or next slice is outside the
            lung and denser than this are left out (:func:`slab_partial_volume`; None: kept).
        min_contrast_hu: a final component is kept only when its median HU exceeds the median
            HU of the lung around it by this much (:func:`local_contrast`; None: no such check).
        contrast_ring_mm: in-plane reach of the ring of lung that ``min_contrast_hu`` compares with.
        min_thick_fraction: a grown component (at least ``thin_growth_min_ml``) of which less than
            this share survives an in-plane opening with a disk of ``thick_mm`` keeps only its seeds
            and the growth within ``thin_growth_reach_mm`` of them (:func:`limit_thin_growth`; None:
            no such limit).
        thick_mm: radius of that opening's disk in mm.
        thin_growth_min_ml: smaller grown components are left as they are.
        thin_growth_reach_mm: in-plane reach of the growth a thin component keeps around its seeds.
        faint_component_hu: with ``grow``, every component of the rules alone (this rule, every lung
            voxel a seed) whose mean HU is at most this joins the mask without a seed (None: only
            seeded components; step 8 of the module docstring).
        small_dense_ml: final components smaller than this (mL) ...
        small_dense_hu: ... whose mean HU exceeds this are dropped (None: kept; step 9 of the module
            docstring, :func:`drop_small_dense`).
        detection_rim_mm: the segmenter's detections in lesion-range density within this in-plane reach
            of a final component (reached through detections) join it (0: none; step 10 of the module
            docstring, :func:`detection_rim`).
    """

    hu_range: tuple[float, float] | None = (LESION_HU_FLOOR, 100.0)
    open_mm: float = 2.5
    grow: bool = True
    grow_hu_range: tuple[float, float] = (-725.0, 100.0)
    grow_connectivity: int = 26
    density_filter_mm: float = 3.0
    density_filter_seeds: bool = True
    density_filter_resolution_mm: float = DENSITY_FILTER_RESOLUTION_MM
    gan_gate_sigmas: float | None = None
    gan_gate_spares_extensive: bool = False
    gan_gate_quantile: float | None = 0.75
    gan_gate_extensive: float = 0.05
    slab_tissue_hu: float | None = SLAB_TISSUE_HU
    min_contrast_hu: float | None = 100.0
    contrast_ring_mm: float = 6.0
    min_thick_fraction: float | None = 0.75
    thick_mm: float = 5.0
    thin_growth_min_ml: float = 5.0
    thin_growth_reach_mm: float = 3.0
    faint_component_hu: float | None = FAINT_COMPONENT_HU
    small_dense_ml: float = SMALL_DENSE_ML
    small_dense_hu: float | None = SMALL_DENSE_HU
    detection_rim_mm: float = DETECTION_RIM_MM

    def gate_hu(self, healthy_difference: dict[str, float] | None, window_width: float) -> float | None:
        """The gate in HU from G's healthy-lung difference statistics (window units), or None."""
        if self.gan_gate_sigmas is None or not healthy_difference or not healthy_difference.get("count"):
            return None
        return float((healthy_difference["median"] + self.gan_gate_sigmas * healthy_difference["sigma"]) * window_width)

    def __post_init__(self) -> None:
        if self.hu_range is not None and not self.hu_range[0] < self.hu_range[1]:
            raise ValueError(f"hu_range must be (low, high) with low < high, got {self.hu_range}")
        if self.open_mm < 0:
            raise ValueError(f"open_mm must be >= 0, got {self.open_mm}")
        if not self.grow_hu_range[0] < self.grow_hu_range[1]:
            raise ValueError(f"grow_hu_range must be (low, high) with low < high, got {self.grow_hu_range}")
        if not (self.density_filter_mm >= 0 and np.isfinite(self.density_filter_mm)):
            raise ValueError(f"density_filter_mm must be a finite value >= 0, got {self.density_filter_mm}")
        if not (self.density_filter_resolution_mm >= 0 and np.isfinite(self.density_filter_resolution_mm)):
            raise ValueError(f"density_filter_resolution_mm must be a finite value >= 0, got {self.density_filter_resolution_mm}")
        if self.grow_connectivity not in (6, 26):
            raise ValueError(f"grow_connectivity must be 6 or 26, got {self.grow_connectivity}")
        if self.gan_gate_quantile is not None and not 0.0 <= self.gan_gate_quantile <= 1.0:
            raise ValueError(f"gan_gate_quantile must be in [0, 1] or None, got {self.gan_gate_quantile}")
        if self.gan_gate_sigmas is not None and not (self.gan_gate_sigmas >= 0 and np.isfinite(self.gan_gate_sigmas)):
            raise ValueError(f"gan_gate_sigmas must be a finite value >= 0 or None, got {self.gan_gate_sigmas}")
        if self.slab_tissue_hu is not None and not np.isfinite(self.slab_tissue_hu):
            raise ValueError(f"slab_tissue_hu must be finite or None, got {self.slab_tissue_hu}")
        if self.min_contrast_hu is not None and not np.isfinite(self.min_contrast_hu):
            raise ValueError(f"min_contrast_hu must be finite or None, got {self.min_contrast_hu}")
        if not (self.contrast_ring_mm > 0 and np.isfinite(self.contrast_ring_mm)):
            raise ValueError(f"contrast_ring_mm must be a finite value > 0, got {self.contrast_ring_mm}")
        if self.min_thick_fraction is not None and not 0.0 <= self.min_thick_fraction <= 1.0:
            raise ValueError(f"min_thick_fraction must be in [0, 1] or None, got {self.min_thick_fraction}")
        for name in ("thick_mm", "thin_growth_min_ml", "thin_growth_reach_mm"):
            value = getattr(self, name)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite value >= 0, got {value}")
        if self.faint_component_hu is not None and not np.isfinite(self.faint_component_hu):
            raise ValueError(f"faint_component_hu must be finite or None, got {self.faint_component_hu}")
        if not (self.small_dense_ml >= 0 and np.isfinite(self.small_dense_ml)):
            raise ValueError(f"small_dense_ml must be a finite value >= 0, got {self.small_dense_ml}")
        if self.small_dense_hu is not None and not np.isfinite(self.small_dense_hu):
            raise ValueError(f"small_dense_hu must be finite or None, got {self.small_dense_hu}")
        if not (self.detection_rim_mm >= 0 and np.isfinite(self.detection_rim_mm)):
            raise ValueError(f"detection_rim_mm must be a finite value >= 0, got {self.detection_rim_mm}")
        if not 0.0 <= self.gan_gate_extensive <= 1.0:
            raise ValueError(f"gan_gate_extensive must be in [0, 1], got {self.gan_gate_extensive}")


#: the paper's plain rule: probability above the threshold inside the lung, nothing else
PLAIN = PostProcessing(hu_range=None, open_mm=0.0, grow=False, density_filter_mm=0.0, slab_tissue_hu=None,
                       min_contrast_hu=None, min_thick_fraction=None, faint_component_hu=None, small_dense_hu=None,
                       detection_rim_mm=0.0)


def _disk(spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """In-plane elliptic disk of ``radius_mm`` (at least one voxel) as a 3D ``(x, y, 1)`` structure:
    offsets ``(u, v)`` with ``(u / rx)**2 + (v / ry)**2 <= 1``, tested in integers (exact)."""
    rx, ry = (max(1, int(round(radius_mm / s))) for s in spacing[:2])
    u, v = np.mgrid[-rx:rx + 1, -ry:ry + 1]
    return ((u * ry) ** 2 + (v * rx) ** 2 <= (rx * ry) ** 2)[:, :, None]  # (2 rx + 1, 2 ry + 1, 1)


def _rectangles(disk: np.ndarray) -> list[tuple[int, int]]:
    """Half-widths ``(a, b)`` of the rectangles ``[-a, a] x [-b, b]`` whose union is ``disk`` (an
    in-plane structure of :func:`_disk`: symmetric, its half-height never growing away from the centre)."""
    rx = disk.shape[0] // 2
    rects: list[tuple[int, int]] = []
    for a in range(rx, -1, -1):  # widest first: half-heights grow towards the centre
        b = int(np.count_nonzero(disk[rx + a, :, 0])) // 2
        if not rects or b > rects[-1][1]:
            rects.append((a, b))
    return rects


def _rectangle_counts(mask: np.ndarray, disk: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """For each rectangle of :func:`_rectangles`, ``(count, area)``: the number of ``mask`` voxels in the
    rectangle centred on each voxel (in-plane; outside the array counts as empty) and the rectangle's
    area, read off one summed-area table of the zero-padded mask (four lookups per rectangle, whatever
    its size: several times faster than ``ndi.binary_dilation`` / ``binary_erosion`` with the disk)."""
    rx, ry = disk.shape[0] // 2, disk.shape[1] // 2
    nx, ny = mask.shape[:2]
    table = np.zeros((nx + 2 * rx + 1, ny + 2 * ry + 1) + mask.shape[2:], dtype=np.int32)  # (x, y, z), padded
    table[rx + 1:rx + 1 + nx, ry + 1:ry + 1 + ny] = mask
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    for a, b in _rectangles(disk):
        hx, lx = slice(rx + a + 1, rx + a + 1 + nx), slice(rx - a, rx - a + nx)
        hy, ly = slice(ry + b + 1, ry + b + 1 + ny), slice(ry - b, ry - b + ny)
        count = table[hx, hy] - table[lx, hy]
        count -= table[hx, ly]
        count += table[lx, ly]
        yield count, (2 * a + 1) * (2 * b + 1)


def _dilate_in_plane(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """``ndi.binary_dilation(mask, structure=disk)`` for an in-plane disk of :func:`_disk`: the union of
    the dilations by its rectangles."""
    out = np.zeros(mask.shape, dtype=bool)
    for count, _ in _rectangle_counts(mask, disk):
        out |= count > 0
    return out


def _erode_in_plane(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """``ndi.binary_erosion(mask, structure=disk)`` for an in-plane disk of :func:`_disk` (outside the
    array counts as background): the intersection of the erosions by its rectangles."""
    out = np.array(mask, dtype=bool)
    for count, area in _rectangle_counts(mask, disk):
        out &= count == area
    return out


def _open_in_plane(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, structure=disk)`` for an in-plane disk of :func:`_disk`."""
    return _dilate_in_plane(_erode_in_plane(mask, disk), disk)


def _padded_in_plane(box: tuple[slice, slice, slice], disk: np.ndarray) -> tuple[slice, slice, slice]:
    """``box`` (from ``ndi.find_objects``) grown in-plane by the half-width of ``disk`` plus one voxel,
    so that a dilation or opening with ``disk`` inside it does not meet the box border."""
    bx, by, bz = box
    rx, ry = disk.shape[0] // 2 + 1, disk.shape[1] // 2 + 1
    return slice(max(0, bx.start - rx), bx.stop + rx), slice(max(0, by.start - ry), by.stop + ry), bz


def _opening(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """In-plane binary opening of a canonical ``(x, y, z)`` mask with an elliptic disk of ``radius_mm``."""
    if radius_mm <= 0 or not mask.any():
        return mask
    return _open_in_plane(mask, _disk(spacing, radius_mm))


def local_contrast(mask: np.ndarray, hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                   min_contrast_hu: float, ring_mm: float, *, min_ring_voxels: int = 5) -> np.ndarray:
    """Keep the 26-connected components of ``mask`` whose median HU exceeds the median HU of the
    lung around them by at least ``min_contrast_hu``.

    The lung around a component is an in-plane ring: lung voxels outside ``mask`` within
    ``ring_mm`` of the component, without the directly adjacent voxels (the lesion's own partial
    volume). A component with fewer than ``min_ring_voxels`` such voxels (the whole lung diseased
    around it) is kept: there is nothing to compare with.
    """
    from scipy import ndimage as ndi

    from CovidGANSegLib.components import IN_PLANE_4

    if not mask.any():
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    disk = _disk(spacing, ring_mm)
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        sl = _padded_in_plane(box, disk)
        comp = lab[sl] == i
        ring = _dilate_in_plane(comp, disk) & ~ndi.binary_dilation(comp, structure=IN_PLANE_4)
        ring &= lung[sl] & ~mask[sl]
        if int(ring.sum()) < min_ring_voxels:
            continue
        h = hu[sl]
        keep[i] = float(np.median(h[comp])) - float(np.median(h[ring])) >= min_contrast_hu
    return keep[lab]


def limit_thin_growth(seeds: np.ndarray, grown: np.ndarray, region: np.ndarray, spacing: tuple[float, float, float],
                      min_thick_fraction: float, thick_mm: float, min_ml: float, reach_mm: float) -> np.ndarray:
    """Components of ``grown`` (``seeds`` plus the ``region`` they grew into) that are mostly thin keep
    only their seeds and the region within ``reach_mm`` (in-plane, geodesic inside ``region``) of them.

    A 26-connected component of at least ``min_ml`` is thin when less than ``min_thick_fraction`` of
    its voxels survive an in-plane opening with a disk of ``thick_mm`` (a vessel tree; a lesion is
    thick). Smaller and thick components are returned as they are.
    """
    from scipy import ndimage as ndi

    if not grown.any():
        return grown
    lab, n = ndi.label(grown, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    disk = _disk(spacing, thick_mm)
    thin = np.zeros(n + 1, dtype=bool)
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None or sizes[i] * voxel_ml < min_ml:
            continue
        sl = _padded_in_plane(box, disk)
        comp = lab[sl] == i
        thick = _open_in_plane(comp, disk)  # in-plane; the padding keeps the box border out of it
        thin[i] = int(thick.sum()) < min_thick_fraction * sizes[i]
    if not thin.any():
        return grown
    in_thin = thin[lab]
    steps = int(round(reach_mm / min(spacing[0], spacing[1]))) if reach_mm > 0 else 0
    kept = seeds & in_thin
    if steps > 0 and kept.any():
        plane = np.zeros((3, 3, 3), dtype=bool)
        plane[:, :, 1] = True  # in-plane 8-connected steps
        kept = ndi.binary_dilation(kept, structure=plane, iterations=steps, mask=region & in_thin)
    return (grown & ~in_thin) | kept


def post_process(candidates: np.ndarray, hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                 rule: PostProcessing, *, difference_hu: np.ndarray | None = None, gate_hu: float | None = None) -> np.ndarray:
    """Apply :class:`PostProcessing` to a canonical bool mask of above-threshold voxels.

    Order: slab rule, lung and HU prior, opening, GAN gate, density filter of the seeds, growth
    (the local contrast rule on the grown components, then thin ones limited to their seeds'
    surroundings), local contrast, then, with growth, the faint components of the rules alone, the
    small dense components dropped, and last the detections' rim (module docstring). ``difference_hu`` (the GAN's difference map on
    the same grid) and ``gate_hu`` switch on the GAN-agreement gate: components whose mean
    difference is at most ``gate_hu`` are dropped; extensive ones are kept
    (``rule.gan_gate_spares_extensive``) or judged by the ``rule.gan_gate_quantile`` of their
    difference. ``candidates`` and ``lung`` may be label maps (any nonzero value counts): taken as bool.
    """
    candidates, lung = np.asarray(candidates, dtype=bool), np.asarray(lung, dtype=bool)  # no copy when bool
    box = _lung_box(lung, spacing, rule)
    if box is None:  # no lung: nothing to mark
        return np.zeros(np.shape(lung), dtype=bool)
    crop = tuple(b.stop - b.start for b in box) != np.shape(lung)
    if crop:  # every rule reads lung voxels only (and the filter's padding around them): work in the lung's box
        out = np.zeros(np.shape(lung), dtype=bool)
        out[box] = post_process(candidates[box], hu[box], lung[box], spacing, rule,
                                difference_hu=None if difference_hu is None else difference_hu[box], gate_hu=gate_hu)
        return out
    scene = _Scene(hu, lung, spacing, rule)
    seeds = _seeded_rules(candidates & scene.lung, scene, difference_hu, gate_hu)
    if rule.grow and rule.faint_component_hu is not None:  # step 8: the rules alone's faint components
        every = _seeded_rules(scene.lung.copy(), scene, difference_hu, gate_hu)
        seeds |= faint_components(every, scene.hu, rule.faint_component_hu)
    if rule.small_dense_hu is not None:  # step 9
        seeds = drop_small_dense(seeds, scene.hu, spacing, rule.small_dense_ml, rule.small_dense_hu)
    if rule.detection_rim_mm > 0:  # step 10
        low, high = rule.grow_hu_range
        detections = candidates & scene.lung & (scene.hu >= low) & (scene.hu <= high)
        seeds = detection_rim(seeds, detections, spacing, rule.detection_rim_mm)
    return seeds


class _Scene:
    """What the rules read of one CT, computed once for both passes of :func:`post_process` (the
    segmenter's seeds and, for step 8, every lung voxel a seed): the lung without the slab rule's
    voxels (step 0), the filtered density's lesion range (step 4) and the growth region with its
    components (step 5). The last two are computed on first use."""

    def __init__(self, hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], rule: PostProcessing):
        self.hu, self.spacing, self.rule = hu, spacing, rule
        self.lung = lung & ~slab_partial_volume(hu, lung, rule.slab_tissue_hu) if rule.slab_tissue_hu is not None else lung

    @cached_property
    def dense(self) -> np.ndarray:
        """Lung voxels whose filtered density is at least the growth floor (step 4)."""
        r = self.rule
        return _lesion_range_after_filter(self.hu, self.lung, self.spacing, r.density_filter_mm, r.grow_hu_range[0],
                                          r.density_filter_resolution_mm)

    @cached_property
    def region(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The growth region (step 5), its component labels and their number."""
        from CovidGANSegLib.components import label_components

        r, hu = self.rule, self.hu
        region = self.dense & (hu <= r.grow_hu_range[1])
        if r.hu_range is not None:  # the filter's closing may bridge a dip; the voxels themselves keep the HU prior
            region &= hu >= r.hu_range[0]
        region = _opening(region, self.spacing, r.open_mm)
        return (region,) + label_components(region, r.grow_connectivity)


def _seeded_rules(seeds: np.ndarray, scene: _Scene, difference_hu: np.ndarray | None, gate_hu: float | None) -> np.ndarray:
    """Steps 1-7 of the module docstring on ``seeds`` (lung voxels of ``scene``)."""
    from scipy import ndimage as ndi

    rule, hu, lung, spacing = scene.rule, scene.hu, scene.lung, scene.spacing
    if rule.hu_range is not None:
        seeds &= (hu >= rule.hu_range[0]) & (hu <= rule.hu_range[1])
    seeds = _opening(seeds, spacing, rule.open_mm)
    if difference_hu is not None and gate_hu is not None and seeds.any():
        lab, n = ndi.label(seeds, structure=np.ones((3, 3, 3), dtype=bool))
        difference = np.asarray(difference_hu, dtype=np.float32)
        stats = np.asarray(ndi.mean(difference, lab, index=np.arange(1, n + 1)), dtype=np.float64)  # per component
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        extensive = np.nonzero(sizes > rule.gan_gate_extensive * max(1, int(lung.sum())))[0]
        if rule.gan_gate_spares_extensive:
            stats[extensive] = np.inf
        elif rule.gan_gate_quantile is not None:
            boxes = ndi.find_objects(lab)
            for i in extensive:
                box = boxes[i]
                stats[i] = np.quantile(difference[box][lab[box] == i + 1], rule.gan_gate_quantile)
        keep = np.concatenate([[False], stats > gate_hu])
        seeds = keep[lab]
    filter_seeds = rule.density_filter_seeds and rule.density_filter_mm > 0
    if seeds.any() and (rule.grow or filter_seeds):
        if filter_seeds:
            seeds &= scene.dense
        if rule.grow and seeds.any():
            from CovidGANSegLib.components import labelled_components_touching

            region, lab, n = scene.region
            grown = seeds | labelled_components_touching(seeds, lab, n)  # (labels are 0 outside the region)
            if rule.min_thick_fraction is not None:
                if rule.min_contrast_hu is not None:
                    # judge the grown components whole first: limiting one that fails the local contrast
                    # rule to its (denser) seeds must not bring it back
                    grown = local_contrast(grown, hu, lung, spacing, rule.min_contrast_hu, rule.contrast_ring_mm)
                    seeds = seeds & grown
                grown = limit_thin_growth(seeds, grown, region, spacing, rule.min_thick_fraction, rule.thick_mm,
                                          rule.thin_growth_min_ml, rule.thin_growth_reach_mm)
            seeds = grown
    if rule.min_contrast_hu is not None:
        seeds = local_contrast(seeds, hu, lung, spacing, rule.min_contrast_hu, rule.contrast_ring_mm)
    return seeds


def _lung_box(lung: np.ndarray, spacing: tuple[float, float, float],
              rule: PostProcessing) -> tuple[slice, slice, slice] | None:
    """The lung's bounding box, padded by one slice along z (the slab rule's neighbours) and in-plane
    by the density filter's own padding plus one voxel (:func:`_filtered_blocks` pads the box it
    filters by the square's full width; the same padding keeps its border handling unchanged), or
    None when there is no lung. Every other rule reads lung voxels only, and what lies outside the
    lung is False for them, so post-processing inside this box gives the same mask as on the whole grid."""
    from scipy import ndimage as ndi

    found = ndi.find_objects(np.asarray(lung, dtype=np.uint8))
    if not found or found[0] is None:
        return None
    pads = tuple(2 * max(1, int(round(rule.density_filter_mm / float(s)))) + 2 for s in spacing[:2]) + (1,)
    return tuple(slice(max(0, b.start - k), min(n, b.stop + k)) for b, k, n in zip(found[0], pads, np.shape(lung)))


def _component_means(mask: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 26-connected components of ``mask`` (labels, 0 outside) and the mean HU of each (index i - 1)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return lab, np.asarray(ndi.mean(np.asarray(hu, dtype=np.float64), lab, index=np.arange(1, n + 1)))


def faint_components(mask: np.ndarray, hu: np.ndarray, max_mean_hu: float) -> np.ndarray:
    """The 26-connected components of ``mask`` whose mean HU is at most ``max_mean_hu``."""
    if not mask.any():
        return mask
    lab, mean = _component_means(mask, hu)
    return np.concatenate([[False], mean <= max_mean_hu])[lab]


def drop_small_dense(mask: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float], max_ml: float,
                     max_mean_hu: float) -> np.ndarray:
    """``mask`` without its 26-connected components that are smaller than ``max_ml`` and whose mean HU
    exceeds ``max_mean_hu`` (step 9 of the module docstring)."""
    if not mask.any() or max_ml <= 0:
        return mask
    lab, mean = _component_means(mask, hu)
    ml = np.bincount(lab.ravel(), minlength=mean.size + 1)[1:] * (float(np.prod(spacing)) / 1000.0)
    return np.concatenate([[False], ~((ml < max_ml) & (mean > max_mean_hu))])[lab]


def detection_rim(mask: np.ndarray, detections: np.ndarray, spacing: tuple[float, float, float],
                  reach_mm: float) -> np.ndarray:
    """``mask`` plus the ``detections`` within ``reach_mm`` in-plane of it, reached through detections
    (step 10 of the module docstring): a geodesic in-plane dilation of ``mask`` inside ``mask |
    detections``, one pixel (4-connected) a step, ``round(reach_mm / pixel)`` steps (at least one) for the
    finer in-plane spacing. Detections not connected to ``mask`` that way stay out."""
    from scipy import ndimage as ndi

    from CovidGANSegLib.components import IN_PLANE_4

    allowed = detections & ~mask
    if reach_mm <= 0 or not mask.any() or not allowed.any():
        return mask
    steps = max(1, int(round(reach_mm / float(min(spacing[:2])))))
    return ndi.binary_dilation(mask, structure=IN_PLANE_4, iterations=steps, mask=mask | allowed)


def slab_partial_volume(hu: np.ndarray, lung: np.ndarray, tissue_hu: float = SLAB_TISSUE_HU) -> np.ndarray:
    """Lung voxels of a canonical ``(x, y, z)`` CT directly above or below (previous or next slice)
    a non-lung voxel denser than ``tissue_hu``: where the diaphragm's dome, the apex or the heart
    cuts through a thick slice, the lung voxel shares its slab with soft tissue and reads as ground
    glass (on real normal CTs at 8 mm, single-slice sheets of several mL at the lung's ends).
    ``lung`` may be a label map read from a file (any nonzero value is lung): it is taken as bool."""
    lung = np.asarray(lung, dtype=bool)  # ~ of an integer label map is bitwise, not the complement
    tissue = ~lung & (hu > tissue_hu)
    near = np.zeros_like(tissue)
    near[:, :, 1:] |= tissue[:, :, :-1]
    near[:, :, :-1] |= tissue[:, :, 1:]
    return lung & near


def filtered_density(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], half_width_mm: float,
                     resolution_mm: float = DENSITY_FILTER_RESOLUTION_MM) -> np.ndarray:
    """The density seeds and growth are judged on: ``hu`` inside the lung (-1024 HU outside) after
    an in-plane grey opening then closing with a square of half-width ``half_width_mm`` (an
    alternating sequential filter), computed in the lung's bounding box; -1024 HU outside the lung;
    ``hu`` itself when ``half_width_mm`` is 0.

    The opening removes bright structures narrower than the square (vessels and their
    partial-volume halos, septal lines: the bridges along which growth from one seed flooded the
    vessel tree), the closing then fills dark noise dips inside broad faint ground glass.

    Pixels finer than ``resolution_mm`` are first brought to about that resolution: the lung's
    density is smoothed in-plane with a Gaussian of FWHM ``sqrt(resolution_mm**2 - pixel**2)``,
    normalised over the lung alone (no chest wall bleeds in). Without it the opening's minimum over
    the many pixels of a 7 mm square at 0.7 mm picks the darkest specks of textured ground glass, and
    lesions the filter keeps at 1.5-3 mm fall below the growth floor at MosMed's 0.7 mm
    (docs/ablation.md, "MosMedData's geometry"). Pixels of ``resolution_mm`` or coarser: unchanged.
    """
    if half_width_mm <= 0 or not lung.any():
        return hu
    out = np.full(hu.shape, -1024.0, dtype=np.float32)
    for box, density in _filtered_blocks(hu, lung, spacing, half_width_mm, resolution_mm):
        out[box] = np.where(lung[box], density, np.float32(-1024.0))
    return out


def _lesion_range_after_filter(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], half_width_mm: float,
                               floor_hu: float, resolution_mm: float = DENSITY_FILTER_RESOLUTION_MM) -> np.ndarray:
    """``lung & (filtered_density(...) >= floor_hu)`` without a full-size float copy of the CT."""
    if half_width_mm <= 0 or not lung.any():
        return lung & (hu >= floor_hu)
    out = np.zeros(hu.shape, dtype=bool)
    for box, density in _filtered_blocks(hu, lung, spacing, half_width_mm, resolution_mm):
        out[box] = density >= floor_hu
    return out & lung


def _smoothing_sigma(spacing: tuple[float, float, float], resolution_mm: float) -> tuple[float, float, float]:
    """In-plane Gaussian sigmas (voxels) that bring pixels of ``spacing`` to about ``resolution_mm``
    (FWHM = sqrt(resolution**2 - pixel**2); 0 for pixels of that size or coarser)."""
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0))
    return tuple(math.sqrt(max(0.0, resolution_mm ** 2 - float(s) ** 2)) / fwhm / float(s) for s in spacing[:2]) + (0.0,)


def _filtered_blocks(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], half_width_mm: float,
                     resolution_mm: float = DENSITY_FILTER_RESOLUTION_MM,
                     slices_per_block: int = 16) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """Yield ``(box, filtered density)`` over the lung's bounding box, a few slices at a time (the
    filter and the smoothing are in-plane, so blocks along z are independent; this bounds the float32
    temporaries)."""
    from scipy import ndimage as ndi

    size = tuple(2 * max(1, int(round(half_width_mm / s))) + 1 for s in spacing[:2]) + (1,)
    sigma = _smoothing_sigma(spacing, resolution_mm)
    (bx, by, bz), = ndi.find_objects(lung.astype(np.uint8))
    bx, by = (slice(max(0, b.start - k), min(n, b.stop + k)) for b, k, n in zip((bx, by), size, lung.shape))
    for z0 in range(bz.start, bz.stop, slices_per_block):
        box = (bx, by, slice(z0, min(bz.stop, z0 + slices_per_block)))
        inside = np.where(lung[box], hu[box], -1024.0).astype(np.float32)  # (x, y, z) block of the lung's box
        if max(sigma) > 0:
            weight = ndi.gaussian_filter(lung[box].astype(np.float32), sigma)
            smooth = ndi.gaussian_filter(np.where(lung[box], inside, np.float32(0.0)), sigma)
            inside = np.where(lung[box], smooth / np.maximum(weight, np.float32(1e-3)), inside)  # float32 throughout
        yield box, ndi.grey_closing(ndi.grey_opening(inside, size=size), size=size)


def rules_alone_segment(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float],
                        post: PostProcessing | None = None) -> np.ndarray:
    """The post-processing with every lung voxel as a seed and no segmenter: a baseline without learning.

    What ``seg.inference.segment_ct`` would return if the segmenter marked the whole lung, without the
    detections' rim (step 10, which gives back a segmenter's detections): the rules alone decide (slab rule,
    HU prior, opening, density filter, growth, thin-growth limit, local contrast, small dense components dropped).
    Scored beside the segmenters (the demo's ``rules_alone``), it measures what the learned seeds
    add ("What the segmenter adds to the rules" in docs/ablation.md). ``hu`` and ``lung`` are
    canonical ``(x, y, z)`` arrays of one CT, ``spacing`` its voxel size in mm.
    """
    lung = np.asarray(lung, dtype=bool)
    hu = np.asarray(hu)
    if hu.shape != lung.shape:
        raise ValueError(f"lung mask {lung.shape} does not match the CT grid {hu.shape}")
    rule = post if post is not None else PostProcessing()
    # step 8 adds the rules alone's own faint components: already in their mask; step 10 gives back
    # detections, and there are none
    return post_process(lung.copy(), hu, lung, tuple(spacing),
                        dataclasses.replace(rule, faint_component_hu=None, detection_rim_mm=0.0))
