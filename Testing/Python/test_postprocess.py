"""The post-processing rules of ``seg.postprocess`` (numpy only): each rule on a small synthetic case
built to show what it keeps and what it drops, and the rules alone on a real normal CT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
from CovidGANSegLib.seg.postprocess import (DETECTION_RIM_MM, FAINT_COMPONENT_HU, PLAIN, SMALL_DENSE_HU, SMALL_DENSE_ML,
                                            PostProcessing, detection_rim, drop_small_dense, faint_components,
                                            filtered_density, limit_thin_growth, local_contrast, post_process,
                                            rules_alone_segment, slab_partial_volume)


def test_slab_partial_volume_of_the_diaphragm_is_not_lesion():
    """An 8 mm slice cut by the diaphragm's dome: lung voxels right above the liver read as ground glass
    (-450 HU) and the model marks them; they are left out, a lesion two slices higher (-520 HU) is kept."""
    shape = (40, 40, 6)
    hu = np.full(shape, -850.0)
    lung = np.zeros(shape, bool)
    lung[5:35, 5:35, 1:] = True
    hu[~lung] = 50.0  # liver below (slice 0) and chest wall around
    hu[10:30, 10:30, 1] = -450.0  # dome partial volume, the slab just above the liver
    hu[15:25, 15:25, 3] = -520.0  # a lesion within aerated lung (1.8 mL: fainter than step 9's -475 HU)
    detections = (hu == -450.0) | (hu == -520.0)
    spacing = (1.5, 1.5, 8.0)
    dome = np.zeros(shape, bool)
    dome[10:30, 10:30, 1] = True
    assert np.array_equal(slab_partial_volume(hu, lung) & dome, dome)
    kept = post_process(detections, hu, lung, spacing, PostProcessing())
    assert not (kept & dome).any()
    assert kept[17:23, 17:23, 3].all()  # the opening rounds the square's corners
    assert (post_process(detections, hu, lung, spacing, PostProcessing(slab_tissue_hu=None)) & dome).sum() > 0.9 * dome.sum()
    assert not slab_partial_volume(hu, lung, tissue_hu=100.0).any()  # the liver (50 HU) is not denser than 100 HU
    fringe = hu.copy()
    fringe[~lung] = -200.0  # a mix of air and tissue just outside the lung mask is not the dome's soft tissue
    assert not slab_partial_volume(fringe, lung).any()
    # a label map (as read from a file: right lung 1, left lung 2; or float) is the same lung as its bool mask
    labels = lung.astype(np.uint8)
    labels[20:] *= 2
    for as_read in (labels, labels.astype(np.float32)):
        got = slab_partial_volume(hu, as_read)
        assert got.dtype == bool and np.array_equal(got, slab_partial_volume(hu, lung))
        assert np.array_equal(post_process(detections.astype(np.uint8), hu, as_read, spacing, PostProcessing()), kept)


def test_thin_growth_stops_along_a_vessel_but_not_inside_a_lesion():
    """A seed on a 9 mm wide vessel (-300 HU, wide enough to pass the density filter) would grow along
    all of it; the grown component is thin (nothing survives a 5 mm disk opening), so it keeps only
    the seed and 3 mm around it. A seed inside a round 12 mm lesion grows over the whole lesion
    (thick: kept). Without the rule (``min_thick_fraction=None``) the whole vessel is kept."""
    shape = (80, 80, 4)
    spacing = (1.5, 1.5, 8.0)
    hu = np.full(shape, -850.0)
    lung = np.ones(shape, bool)
    u, v = np.mgrid[: shape[0], : shape[1]]
    lesion = np.broadcast_to(((u - 20) ** 2 + (v - 20) ** 2 <= 8 ** 2)[:, :, None], shape)
    vessel = np.zeros(shape, bool)
    vessel[8:76, 55:61] = True  # 68 x 6 voxels (102 x 9 mm) on every slice: about 29 mL
    vessel[40:46, 35:61] = True  # a branch
    hu[lesion] = -500.0
    hu[vessel] = -300.0
    seed_lesion = np.broadcast_to(((u - 20) ** 2 + (v - 20) ** 2 <= 4 ** 2)[:, :, None], shape)
    seed_vessel = vessel & (np.arange(shape[0]) < 20)[:, None, None]
    detections = seed_lesion | seed_vessel
    kept = post_process(detections, hu, lung, spacing, PostProcessing())
    without = post_process(detections, hu, lung, spacing, PostProcessing(min_thick_fraction=None))
    assert without[vessel].mean() > 0.95 and without[lesion].mean() > 0.9  # the opening rounds the rims
    assert np.array_equal(kept & lesion, without & lesion)  # the lesion keeps its growth
    assert kept[seed_vessel].mean() > 0.9  # the vessel keeps its seed ...
    assert not kept[vessel & (np.arange(shape[0]) >= 20 + 3)[:, None, None]].any()  # ... and 3 mm (2 voxels) of growth
    assert not kept[vessel & (np.arange(shape[0]) >= 40)[:, None, None]].any()  # not the branch
    # the function alone: a thick component is returned as it is; a fraction of 0 changes nothing
    grown = without
    assert np.array_equal(limit_thin_growth(seed_lesion, lesion.copy(), lesion, spacing, 0.75, 5.0, 5.0, 3.0), lesion)
    assert np.array_equal(limit_thin_growth(detections, grown, grown, spacing, 0.0, 5.0, 5.0, 3.0), grown)
    # components smaller than the minimum volume are left as they are
    assert np.array_equal(limit_thin_growth(seed_vessel, vessel.copy(), vessel, spacing, 0.75, 5.0, 100.0, 3.0), vessel)
    assert PLAIN.min_thick_fraction is None
    with pytest.raises(ValueError):
        PostProcessing(min_thick_fraction=1.5)
    with pytest.raises(ValueError):
        PostProcessing(thick_mm=-1.0)


def test_local_contrast_drops_gradual_dependent_density_and_keeps_a_focal_lesion():
    """Posterior (dependent) density rising gradually to -600 HU at the pleura: the model fires on its
    densest part and growth takes it down to -750 HU, but it is barely denser than the lung next to
    it (about 90 HU) and is dropped; a focal -500 HU lesion in aerated lung (about 300 HU above its
    surroundings) is kept. Without the rule (``min_contrast_hu=None``) the band stays."""
    shape = (60, 80, 3)
    y = np.arange(shape[1], dtype=float)[None, :, None]
    hu = np.broadcast_to(np.maximum(-600.0 - 5.0 * y, -850.0), shape).copy()  # -600 HU at y = 0, -850 from y = 50
    lung = np.ones(shape, bool)
    u, v = np.mgrid[: shape[0], : shape[1]]
    lesion = ((u - 30) ** 2 + (v - 65) ** 2 <= 6 ** 2)[:, :, None] & lung
    hu[lesion] = -500.0
    detections = lesion | (hu >= -650.0)  # the lesion and the band's densest 10 voxels
    spacing = (1.5, 1.5, 8.0)
    floor = (-750.0, 100.0)  # growth down to -750 HU (the default floor is -725 HU): the whole band
    kept = post_process(detections, hu, lung, spacing, PostProcessing(grow_hu_range=floor))
    without = post_process(detections, hu, lung, spacing, PostProcessing(grow_hu_range=floor, min_contrast_hu=None))
    band = (hu >= -750.0) & ~lesion
    assert without[band].mean() > 0.9 and without[lesion].mean() > 0.95  # the opening rounds the disc's rim
    assert np.array_equal(kept, without & lesion)
    # the rule alone: the band's median is about -675 HU against -765 HU in the 6 mm ring beyond it
    assert np.array_equal(local_contrast(without, hu, lung, spacing, 100.0, 6.0), kept)
    assert np.array_equal(local_contrast(without, hu, lung, spacing, 50.0, 6.0), without)
    # nothing to compare with (no lung outside the mask around it): kept
    assert np.array_equal(local_contrast(lung, hu, lung, spacing, 100.0, 6.0), lung)
    assert PLAIN.min_contrast_hu is None
    with pytest.raises(ValueError):
        PostProcessing(contrast_ring_mm=0.0)


def _slab(shape=(60, 60, 4)):
    """Aerated lung (-850 HU) with a 1-voxel vessel (+40 HU), a 12-voxel disc lesion (-450 HU) and a
    faint rim of the lesion (-650 HU) that the model does not see."""
    hu = np.full(shape, -850.0)
    lung = np.ones(shape, bool)
    hu[5:55, 10, :] = 40.0
    u, v = np.mgrid[: shape[0], : shape[1]]
    rim = (u - 35) ** 2 + (v - 35) ** 2 <= 10 ** 2
    core = (u - 35) ** 2 + (v - 35) ** 2 <= 6 ** 2
    hu[rim] = -650.0
    hu[core] = -450.0
    return hu, lung, core, rim


def test_post_processing_opening_removes_thin_detections_and_growth_reaches_the_lesion_extent():
    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)
    detections = np.zeros(hu.shape, bool)
    detections[:, :, 1:3] = core[:, :, None]  # the model found the core ...
    detections[5:55, 10, :] = True  # ... and fired on the vessel
    plain = post_process(detections, hu, lung, spacing, PLAIN)
    assert np.array_equal(plain, detections)
    opened = post_process(detections, hu, lung, spacing, PostProcessing(grow=False, small_dense_hu=None))  # (the core alone,
    # 3.6 mL at -450 HU, is a small dense component: step 9, tested on its own, would drop it)
    assert not opened[:, 10, :].any()  # the vessel is thinner than the 2.5 mm disk
    assert opened[:, :, 1][core].mean() > 0.9
    grown = post_process(detections, hu, lung, spacing, PostProcessing())
    assert grown[:, :, 0][rim].mean() > 0.9 and grown[:, :, 3][rim].mean() > 0.9  # the whole dense region, all slices
    assert not grown[:, 10, :].any() and not (grown & (hu < -750)).any()
    seeded_only = PostProcessing(faint_component_hu=None)
    assert not post_process(np.zeros_like(detections), hu, lung, spacing, seeded_only).any()  # no seed, no growth
    # GAN agreement: a component is kept only when the GAN removed density there (mean difference above the gate)
    difference = np.zeros(hu.shape, np.float32)
    difference[core] = 200.0
    gated = post_process(detections, hu, lung, spacing, PostProcessing(), difference_hu=difference, gate_hu=40.0)
    assert np.array_equal(gated, grown)
    assert not post_process(detections, hu, lung, spacing, PostProcessing(), difference_hu=difference * 0.1, gate_hu=40.0).any()
    assert np.array_equal(post_process(detections, hu, lung, spacing, PostProcessing(), difference_hu=None, gate_hu=40.0), grown)
    stats = {"count": 100, "median": 0.01, "sigma": 0.005}
    assert PostProcessing(gan_gate_sigmas=4.0).gate_hu(stats, 1400.0) == pytest.approx((0.01 + 4 * 0.005) * 1400.0)
    assert PostProcessing().gate_hu(stats, 1400.0) is None  # off by default (docs/ablation.md, "Mild lesions in real anatomy")
    assert PostProcessing(gan_gate_sigmas=None).gate_hu(stats, 1400.0) is None and PostProcessing().gate_hu(None, 1400.0) is None
    with pytest.raises(ValueError):
        PostProcessing(open_mm=-1.0)


def test_faint_components_join_without_a_seed_dense_ones_do_not():
    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)
    u, v = np.mgrid[: hu.shape[0], : hu.shape[1]]
    dense = (u - 15) ** 2 + (v - 40) ** 2 <= 6 ** 2
    hu[dense] = -300.0  # a dense disc (vessel confluence, partial volume at the chest wall): needs a seed
    lesion = rim  # the faint lesion: core -450 HU, rim -650 HU, mean about -580 HU
    assert hu[lesion].mean() <= FAINT_COMPONENT_HU < hu[dense].mean()
    none = np.zeros(hu.shape, bool)
    unseeded = post_process(none, hu, lung, spacing, PostProcessing())
    assert unseeded[lesion].mean() > 0.9 and not unseeded[dense].any()
    assert not (unseeded & (hu < -750)).any() and not unseeded[:, 10, :].any()
    seeds = np.zeros(hu.shape, bool)
    seeds[:, :, 1:3] = dense[:, :, None]
    seeded = post_process(seeds, hu, lung, spacing, PostProcessing(small_dense_hu=None))  # (3.6 mL: step 9 would drop it)
    assert seeded[dense].mean() > 0.9 and seeded[lesion].mean() > 0.9  # the seeded dense disc and the faint lesion
    assert np.array_equal(faint_components(rules_alone_segment(hu, lung, spacing), hu, FAINT_COMPONENT_HU), unseeded)
    # off: seeded components only; and never without growth (``segment --no-growth``: the detections alone)
    assert not post_process(none, hu, lung, spacing, PostProcessing(faint_component_hu=None)).any()
    assert not post_process(none, hu, lung, spacing, PostProcessing(grow=False)).any()
    assert not post_process(none, hu, lung, spacing, PostProcessing(faint_component_hu=-600.0)).any()  # the level is used
    assert not post_process(none, hu, lung, spacing, PLAIN).any()
    with pytest.raises(ValueError, match="faint_component_hu"):
        PostProcessing(faint_component_hu=float("nan"))


def test_small_dense_components_are_dropped_large_or_faint_ones_kept():
    """Step 9: a seeded dense component under 4 mL (a vessel confluence) goes; a dense one over 4 mL
    and a small faint one stay; the size and the level are both used; off with None and in PLAIN."""
    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)  # 0.008 mL a voxel
    u, v = np.mgrid[: hu.shape[0], : hu.shape[1]]
    small = (u - 12) ** 2 + (v - 22) ** 2 <= 5 ** 2  # 81 pixels x 4 slices: 2.6 mL
    large = (u - 12) ** 2 + (v - 44) ** 2 <= 7 ** 2  # 149 pixels x 4 slices: 4.8 mL
    hu[small] = hu[large] = -300.0
    seeds = np.zeros(hu.shape, bool)
    seeds[:, :, 1:3] = (small | large)[:, :, None]
    small3, large3 = (np.repeat(m[:, :, None], hu.shape[2], axis=2) for m in (small, large))  # (x, y, z)
    assert 0.008 * small3.sum() < SMALL_DENSE_ML < 0.008 * large3.sum() and SMALL_DENSE_HU < -300.0
    out = post_process(seeds, hu, lung, spacing, PostProcessing())
    assert not out[small3].any() and out[large3].mean() > 0.9 and out[np.repeat(rim[:, :, None], 4, axis=2)].mean() > 0.9
    for rule in (PostProcessing(small_dense_hu=None), PostProcessing(small_dense_ml=1.5),
                 PostProcessing(small_dense_hu=-250.0)):  # off; a smaller size; a higher level
        kept = post_process(seeds, hu, lung, spacing, rule)
        assert kept[small3].mean() > 0.8 and np.array_equal(kept & ~small3, out)  # (the opening rounds its edge)
    assert np.array_equal(drop_small_dense(kept, hu, spacing, SMALL_DENSE_ML, SMALL_DENSE_HU), out)
    assert np.array_equal(drop_small_dense(kept, hu, spacing, 0.0, SMALL_DENSE_HU), kept)
    assert PLAIN.small_dense_hu is None
    with pytest.raises(ValueError, match="small_dense_hu"):
        PostProcessing(small_dense_hu=float("nan"))
    with pytest.raises(ValueError, match="small_dense_ml"):
        PostProcessing(small_dense_ml=-1.0)


def test_detection_rim_gives_back_the_edge_the_opening_took_and_nothing_else():
    """Step 10: a lesion with a 2-voxel spur that the segmenter marked. The opening takes the spur and the
    disc's extreme pixels, and the opened growth region does not bring them back; the rim gives back the
    detections within 2.5 mm (two 1 mm pixels) of the final mask, not the spur's far end, not a detection
    that touches the mask only across slices, and not a detached one."""
    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)
    spur = np.zeros(hu.shape[:2], bool)
    spur[45:52, 34:36] = True  # from the lesion's edge (x = 45) 7 voxels outwards
    far = np.zeros(hu.shape[:2], bool)
    far[10:13, 40:42] = True  # a small detection on its own
    hu[spur] = hu[far] = -450.0
    detections = np.zeros(hu.shape, bool)
    detections[:, :, 1:3] = (rim | spur | far)[:, :, None]
    on = post_process(detections, hu, lung, spacing, PostProcessing())
    off = post_process(detections, hu, lung, spacing, PostProcessing(detection_rim_mm=0.0))
    assert DETECTION_RIM_MM == PostProcessing().detection_rim_mm == PostProcessing().open_mm == 2.5
    assert not (off & ~on).any() and not off[:, :, 1][spur].any()  # the opening took the spur
    added = on & ~off
    assert added[:, :, 1][spur].sum() == 4 and added[45:47, 34:36, 1].all()  # two voxels deep, not the far end
    assert added[25, 35, 1] and added[35, 45, 1]  # the disc's extreme pixels
    assert not added[:, :, [0, 3]].any() and not on[:, :, 1][far].any()  # no detections there; the detached one stays out
    assert np.array_equal(post_process(detections, hu, lung, spacing, PostProcessing(detection_rim_mm=1.0)) & ~off,
                          on & ~off & ~(spur[:, :, None] & (np.arange(60)[:, None, None] == 46)))  # one step: one voxel deep
    # the function itself: in-plane steps only, round(reach / finer pixel) of them, at least one
    mask = np.zeros((20, 20, 3), bool)
    mask[5:10, 5:10, 1] = True
    dets = np.zeros_like(mask)
    dets[5:10, 10:16, 1] = True  # a strip from the mask's edge, 6 voxels long
    dets[5:10, 5:10, 2] = True  # right above the mask, another slice
    assert np.array_equal(detection_rim(mask, dets, (1.0, 1.0, 8.0), 2.5), mask | (dets & (np.arange(20)[None, :, None] < 12)
                                                                                   & (np.arange(3) == 1)))
    assert detection_rim(mask, dets, (3.0, 3.0, 8.0), 2.5)[:, 10:, 1].sum() == 5  # coarse pixels: one step
    assert detection_rim(mask, dets, (0.7, 0.7, 8.0), 2.5)[:, 10:, 1].sum() == 20  # fine pixels: four steps
    assert np.array_equal(detection_rim(mask, dets, (1.0, 1.0, 8.0), 0.0), mask)
    assert not detection_rim(np.zeros_like(mask), dets, (1.0, 1.0, 8.0), 2.5).any()  # nothing to attach to
    assert PLAIN.detection_rim_mm == 0.0
    with pytest.raises(ValueError, match="detection_rim_mm"):
        PostProcessing(detection_rim_mm=-1.0)


def test_rules_alone_mark_the_lesion_not_the_vessel_nor_aerated_lung():
    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)
    rules = rules_alone_segment(hu, lung, spacing)
    assert np.array_equal(rules, post_process(lung.copy(), hu, lung, spacing, PostProcessing(detection_rim_mm=0.0)))  # every
    # lung voxel a seed (and no detections' rim: there are no detections to give back)
    assert rules[rim].mean() > 0.9 and not rules[:, 10, :].any()  # the lesion and its faint rim; not the thin vessel
    assert not (rules & (hu < -750)).any()  # nor aerated lung
    assert not rules_alone_segment(hu, np.zeros_like(lung), spacing).any()
    assert not rules_alone_segment(hu, lung, spacing, PostProcessing(hu_range=(-300.0, 100.0))).any()  # the rule given is used
    with pytest.raises(ValueError, match="does not match"):
        rules_alone_segment(hu[:, :, :2], lung, spacing)


def test_rules_alone_on_real_normal_ct_at_8mm_mark_little_of_the_lung(real_ct_dir):
    """Real vessels and partial volume at MosMed's 8 mm slices: the HU threshold marks a third of a normal
    lung; the rules alone (the segmenters' post-processing without a model) stay under 2 % (issue 8's target)."""
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.nifti import load_ct
    from CovidGANSegLib.preprocessing import thick_slices

    ct = thick_slices(load_ct(real_ct_dir / "aorta_report_ct_cropped.nii.gz", min_slices=1), 8.0)
    lung = extract_lung_mask(ct.array, ct.spacing)
    assert lung.sum() > 10000
    rules = rules_alone_segment(ct.array, lung, ct.spacing)
    threshold = hu_threshold_segment(ct.array, lung)
    assert 100.0 * rules.sum() / lung.sum() < 2.0 < 20.0 < 100.0 * threshold.sum() / lung.sum()
    assert not (rules & ~lung).any()


def test_growth_connectivity_decides_whether_an_oblique_vessel_is_followed():
    """A lesion-range structure that crosses the slices obliquely (an in-plane shift at every slice,
    like a vessel through 8 mm slices) touches the lesion only by a corner: 26-connected growth (the
    default) follows it to the top, face-connected growth (``grow_connectivity=6``) stops at the
    lesion; both take the lesion's own extent."""
    hu = np.full((40, 40, 6), -850.0)
    lung = np.ones(hu.shape, bool)
    lesion = np.zeros(hu.shape, bool)
    lesion[5:15, 5:15, 0:2] = True
    vessel = np.zeros(hu.shape, bool)
    for z in range(2, 6):  # 4 x 4 in-plane, one step diagonally per slice from the lesion's corner
        x = 15 + 4 * (z - 2)
        vessel[x:x + 4, x:x + 4, z] = True
    hu[lesion | vessel] = -500.0
    seeds = np.zeros(hu.shape, bool)
    seeds[9:11, 9:11, 0] = True
    spacing = (1.0, 1.0, 8.0)
    faces = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0, density_filter_mm=0.0, grow_connectivity=6))
    corners = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0, density_filter_mm=0.0))
    assert np.array_equal(faces, lesion)
    assert np.array_equal(corners, lesion | vessel)
    with pytest.raises(ValueError):
        PostProcessing(grow_connectivity=8)


def test_density_filter_drops_vessel_seeds_stops_growth_along_vessels_and_bridges_noise_dips():
    """The growth region is thresholded on the density after an in-plane grey opening then closing
    (``density_filter_mm``): a 2 mm vessel from the lesion to a distant dense patch carries raw growth
    there and filtered growth not, and a seed on the vessel goes (``density_filter_seeds``); a thin
    dark dip across faint ground glass cuts the raw region in two, and the seed reaches only its own
    half, the filtered region not."""
    spacing = (1.0, 1.0, 8.0)

    def volume() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        hu = np.full((60, 40, 3), -880.0)
        lesion = np.zeros(hu.shape, bool)
        lesion[5:20, 10:30, :] = True
        hu[lesion] = -650.0  # faint ground glass
        seeds = np.zeros(hu.shape, bool)
        seeds[6:10, 18:22, 1] = True
        return hu, np.ones(hu.shape, bool), lesion, seeds

    hu, lung, lesion, seeds = volume()
    vessel = np.zeros(hu.shape, bool)
    vessel[20:45, 19:21, :] = True  # 2 mm wide, from the lesion to a dense patch further on
    patch = np.zeros(hu.shape, bool)
    patch[45:57, 14:26, :] = True
    hu[vessel] = -300.0
    hu[patch] = -500.0
    raw = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0, density_filter_mm=0.0))
    filtered = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0))
    assert raw[patch].all() and raw[vessel].all() and raw[lesion].all()  # raw growth follows the vessel
    assert np.array_equal(filtered, lesion)
    # the model also fires on the vessel (a 2 x 6 mm detection of lesion-range HU):
    # the filtered density there is healthy lung, so the seed goes unless density_filter_seeds is off
    on_vessel = seeds.copy()
    on_vessel[30:36, 19:21, 1] = True
    assert np.array_equal(post_process(on_vessel, hu, lung, spacing, PostProcessing(open_mm=0.0)), lesion)
    # (seeded components only: with every lung voxel a seed and no seed filter, the vessel joins the
    # lesion and the patch in one faint component; the vessel's seeds alone are a small dense component)
    unfiltered_seeds = post_process(on_vessel, hu, lung, spacing, PostProcessing(open_mm=0.0, density_filter_seeds=False,
                                                                                  faint_component_hu=None, small_dense_hu=None))
    assert np.array_equal(unfiltered_seeds, lesion | (on_vessel & vessel))
    assert not post_process(on_vessel & vessel, hu, lung, spacing, PostProcessing(open_mm=0.0, grow=False)).any()

    hu, lung, lesion, seeds = volume()
    hu[12, 10:30, :] = -790.0  # a 1 mm noise dip across the lesion, below the -750 HU floor of the region
    # (seeded components only: the unseeded half is faint ground glass, which step 8 would add)
    raw = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0, density_filter_mm=0.0, faint_component_hu=None))
    filtered = post_process(seeds, hu, lung, spacing, PostProcessing(open_mm=0.0))
    assert raw[5:12, 10:30].all() and not raw[13:].any() and not (raw & ~lesion).any()
    assert np.array_equal(filtered, lesion)  # the dip itself too (it is above the HU prior's -800 HU)
    density = filtered_density(hu, lung, spacing, 3.0)
    assert density.shape == hu.shape and density.dtype == np.float32
    assert filtered_density(hu, lung, spacing, 0.0) is hu
    with pytest.raises(ValueError):
        PostProcessing(density_filter_mm=-1.0)


def test_filtered_density_in_blocks_equals_the_filter_of_the_whole_lung():
    """The density filter runs over the lung's bounding box a few slices at a time (it is in-plane):
    the result equals the grey opening then closing of the whole volume, and outside the lung it is
    -1024 HU."""
    from scipy import ndimage as ndi

    from CovidGANSegLib.seg.postprocess import _lesion_range_after_filter

    rng = np.random.default_rng(3)
    hu = rng.normal(-780.0, 120.0, (30, 26, 40))
    lung = np.zeros(hu.shape, bool)
    lung[3:27, 4:22, 2:37] = True
    spacing = (1.5, 1.0, 5.0)
    size = (2 * 2 + 1, 2 * 3 + 1, 1)  # 3 mm: 2 voxels of 1.5 mm, 3 of 1 mm
    inside = np.where(lung, hu, -1024.0).astype(np.float32)
    whole = np.where(lung, ndi.grey_closing(ndi.grey_opening(inside, size=size), size=size), -1024.0)
    density = filtered_density(hu, lung, spacing, 3.0, resolution_mm=0.0)
    assert np.allclose(np.where(lung, density, -1024.0), whole) and (density[~lung] == -1024.0).all()
    assert np.array_equal(_lesion_range_after_filter(hu, lung, spacing, 3.0, -750.0, 0.0), lung & (whole >= -750.0))
    assert np.array_equal(_lesion_range_after_filter(hu, lung, spacing, 0.0, -750.0), lung & (hu >= -750.0))
    # with the default 1.5 mm resolution the 1 mm axis is smoothed first, over the lung alone
    sigma = (0.0, np.sqrt(1.5 ** 2 - 1.0) / 2.3548 / 1.0, 0.0)
    smooth = ndi.gaussian_filter(np.where(lung, hu, 0.0), sigma) / np.maximum(ndi.gaussian_filter(lung.astype(float), sigma), 1e-3)
    inside = np.where(lung, smooth, -1024.0).astype(np.float32)
    whole = np.where(lung, ndi.grey_closing(ndi.grey_opening(inside, size=size), size=size), -1024.0)
    density = filtered_density(hu, lung, spacing, 3.0)
    assert np.allclose(np.where(lung, density, -1024.0), whole, atol=0.05) and (density[~lung] == -1024.0).all()


def test_density_filter_judges_fine_pixels_at_its_own_resolution():
    """Pixels finer than ``density_filter_resolution_mm`` are smoothed inside the lung before the
    grey opening: at 0.7 mm a 7 mm square holds 81 pixels, and its minimum over textured
    ground glass (-650 HU with specks of -760 HU, crazy paving at pixel scale) falls below the
    growth floor, so the lesion would not grow; at 1.5 mm and coarser nothing changes. The chest
    wall next to the lung does not bleed into it."""
    spacing = (0.7, 0.7, 8.0)
    hu = np.full((90, 90, 3), -870.0)
    lung = np.zeros(hu.shape, bool)
    lung[5:85, 5:85, :] = True
    hu[~lung] = 40.0  # chest wall
    lesion = np.zeros(hu.shape, bool)
    lesion[20:60, 20:60, :] = True
    specks = (np.indices(hu.shape).sum(axis=0) % 2 == 0) & lesion
    hu[lesion] = -560.0
    hu[specks] = -760.0  # mean -660 HU
    seeds = np.zeros(hu.shape, bool)
    seeds[32:48, 32:48, 1] = True  # 11 mm: survives the 2.5 mm opening
    unsmoothed = PostProcessing(density_filter_resolution_mm=0.0)
    assert filtered_density(hu, lung, spacing, 3.0, resolution_mm=0.0)[lesion].max() <= -760.0
    assert (filtered_density(hu, lung, spacing, 3.0)[25:55, 25:55] >= -725.0).all()
    assert not post_process(seeds, hu, lung, spacing, unsmoothed).any()
    grown = post_process(seeds, hu, lung, spacing, PostProcessing())
    assert grown[25:55, 25:55, 1].all() and not (grown & ~lesion).any()
    # healthy lung beside the chest wall stays healthy lung
    assert (filtered_density(hu, lung, spacing, 3.0)[5:8, 5:85] < -860.0).all()
    # at the resolution itself, and coarser, the filter is the unsmoothed one
    for coarse in ((1.5, 1.5, 8.0), (2.8, 2.8, 8.0)):
        assert np.array_equal(filtered_density(hu, lung, coarse, 3.0), filtered_density(hu, lung, coarse, 3.0, resolution_mm=0.0))
    with pytest.raises(ValueError):
        PostProcessing(density_filter_resolution_mm=-1.0)


def test_gan_gate_uses_the_upper_quartile_of_extensive_components_or_spares_them():
    """Small components (under 5 % of the lung) are judged by their mean difference: one the GAN left
    alone (0 HU) goes, one it restored (mean 100 HU) stays. By default extensive ones are judged by
    their upper quartile: extensive disease the GAN only partly restores (a third of a component of
    40 % of the lung changed by 100 HU: mean 33 HU, under a 40 HU gate) stays, an extensive component
    where it changed only a tenth of the voxels (vessel-like flicker, 11 % of the lung) goes. By the
    mean alone both go; with ``gan_gate_spares_extensive`` both stay."""
    hu = np.full((40, 40, 3), -850.0)
    lung = np.ones(hu.shape, bool)
    big = np.zeros(hu.shape, bool)
    big[2:20, 2:38, :] = True
    flicker = np.zeros(hu.shape, bool)
    flicker[25:37, 5:20, :] = True  # 11 % of the lung
    small = np.zeros(hu.shape, bool)
    small[30:32, 30:32, :] = True  # 0.25 % of the lung
    untouched = np.zeros(hu.shape, bool)
    untouched[30:32, 35:37, :] = True  # 0.25 % of the lung, no GAN difference
    hu[big | flicker | small | untouched] = -500.0
    difference = np.zeros(hu.shape, np.float32)
    difference[2:8, 2:38, :] = 100.0  # a third of the big component
    difference[25:37, 5:7, 0] = 300.0  # a few voxels of the flicker (mean 11 HU, upper quartile 0)
    difference[30, 30, 0:2] = 600.0  # 2 of 12 voxels of the small one: mean 100 HU, upper quartile 0
    rule = PostProcessing(open_mm=0.0, grow=False, density_filter_mm=0.0)
    detections = big | flicker | small | untouched

    def gated(r: PostProcessing) -> np.ndarray:
        return post_process(detections, hu, lung, (1.0, 1.0, 5.0), r, difference_hu=difference, gate_hu=40.0)

    assert np.array_equal(gated(rule), big | small)
    assert np.array_equal(gated(dataclasses.replace(rule, gan_gate_quantile=None)), small)
    assert np.array_equal(gated(dataclasses.replace(rule, gan_gate_spares_extensive=True)), big | flicker | small)
    with pytest.raises(ValueError):
        PostProcessing(gan_gate_quantile=1.5)


@pytest.mark.parametrize("spacing, radius_mm", [((1.0, 1.0, 5.0), 1.0), ((0.7, 0.7, 8.0), 2.5), ((0.7, 0.7, 8.0), 6.0),
                                                ((0.8, 1.3, 5.0), 5.0), ((6.0 / 13, 6.0 / 13, 5.0), 6.0)])
def test_in_plane_morphology_equals_scipy_with_the_disk(spacing, radius_mm):
    """The dilation, erosion and opening by an in-plane elliptic disk, read off a summed-area table
    over a few rectangles, equal scipy's binary morphology with the disk itself (border: background),
    also for anisotropic pixels and for the 13-voxel disk whose (5, 12, 13) boundary points float
    arithmetic misjudged."""
    from scipy import ndimage as ndi

    from CovidGANSegLib.seg.postprocess import _dilate_in_plane, _disk, _erode_in_plane, _open_in_plane

    disk = _disk(spacing, radius_mm)
    rx, ry = disk.shape[0] // 2, disk.shape[1] // 2
    u, v = np.mgrid[-rx:rx + 1, -ry:ry + 1]
    assert np.array_equal(disk[:, :, 0], (u / rx) ** 2 + (v / ry) ** 2 <= 1.0 + 1e-12)  # the ellipse, exactly
    rng = np.random.default_rng(int(10 * radius_mm))
    noise = ndi.gaussian_filter(rng.random((47, 39, 5)), (2.0, 2.0, 0.0))
    for mask in (noise > np.quantile(noise, 0.4), noise > np.quantile(noise, 0.9), np.ones((47, 39, 5), bool),
                 np.zeros((47, 39, 5), bool)):
        assert np.array_equal(_dilate_in_plane(mask, disk), ndi.binary_dilation(mask, structure=disk))
        assert np.array_equal(_erode_in_plane(mask, disk), ndi.binary_erosion(mask, structure=disk))
        assert np.array_equal(_open_in_plane(mask, disk), ndi.binary_opening(mask, structure=disk))


def test_post_processing_in_the_lung_box_equals_the_whole_grid(monkeypatch):
    """post_process works inside the lung's bounding box (padded for the density filter and the slab
    rule): on a CT with a wide margin of body and air around the lung, the mask equals the one
    computed on the whole grid, with both passes (seeded and faint) and with the density filter at
    the lung's border."""
    from CovidGANSegLib.seg import postprocess

    hu, lung, core, rim = _slab()
    spacing = (1.0, 1.0, 8.0)
    rng = np.random.default_rng(5)
    pad = ((25, 17), (9, 30), (3, 2))
    lung = np.pad(lung, pad)
    hu = np.pad(hu, pad, constant_values=40.0)  # soft tissue around the lung (the slab rule's neighbours)
    hu[:10] = -1000.0  # and air outside the body
    hu[lung] += rng.normal(0.0, 30.0, int(lung.sum()))
    core3, rim3 = (np.pad(np.repeat(m[:, :, None], 4, axis=2), pad) for m in (core, rim))  # (x, y, z) of the padded CT
    candidates = core3 | (rng.random(hu.shape) > 0.98)
    cropped = post_process(candidates, hu, lung, spacing, PostProcessing())
    rules = rules_alone_segment(hu, lung, spacing)
    monkeypatch.setattr(postprocess, "_lung_box", lambda lung, spacing, rule: tuple(slice(0, n) for n in lung.shape))
    whole = post_process(candidates, hu, lung, spacing, PostProcessing())
    middle = rim3.copy()
    middle[:, :, [3, 6]] = False  # the end slices of the lung touch tissue: the slab rule's
    assert cropped[middle].mean() > 0.9 and not cropped[rim3 & ~middle].any()  # not trivial
    assert np.array_equal(cropped, whole)
    assert np.array_equal(rules, rules_alone_segment(hu, lung, spacing))
