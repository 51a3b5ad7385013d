"""The refined pseudo-mask rule: regional thresholds, hysteresis, HU prior, vessel suppression; regridding."""

from __future__ import annotations

import numpy as np
import pytest

from CovidGANSegLib.gan.pseudomasks import RefinedRule, RegionalThresholds, refined_masks, regrid, thin_structures

WINDOW = (-1000.0, 400.0)


def _to01(hu: np.ndarray) -> np.ndarray:
    return ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).clip(0, 1).astype(np.float32)


def _scene(seed: int, *, lesion: bool):
    """(D, H, W) HU volume: parenchyma -850 HU, a thin vessel (+40 HU) along every slice, optionally a -400 HU blob."""
    rng = np.random.default_rng(seed)
    d, h, w = 6, 64, 64
    hu = np.full((d, h, w), -850.0) + rng.normal(0, 15, (d, h, w))
    hu[:, 20, 8:56] = 40.0  # vessel, one voxel wide
    lesion_mask = np.zeros((d, h, w), bool)
    if lesion:
        zz, yy, xx = np.mgrid[:d, :h, :w]
        lesion_mask = ((yy - 42) ** 2 + (xx - 32) ** 2 <= 36) & (zz >= 2) & (zz <= 4)
        hu[lesion_mask] = -400.0 + rng.normal(0, 15, lesion_mask.sum())
    lungs = np.ones((d, h, w), bool)
    return hu, lungs, lesion_mask


def _healthy_calibration(rule: RefinedRule):
    """G's behaviour on healthy lung: small differences in parenchyma, large ones on vessels (as on real CT)."""
    images, lungs, diffs = [], [], []
    for seed in range(3):
        hu, lung, _ = _scene(seed, lesion=False)
        rng = np.random.default_rng(100 + seed)
        # healthy dependent density: a smooth gradient from -800 to -300 HU, which G leaves alone
        hu[:, 40:64, :] = np.linspace(-800.0, -300.0, 24)[None, :, None] + rng.normal(0, 15, hu[:, 40:64, :].shape)
        diff = rng.normal(0.0, 0.01, hu.shape).astype(np.float32)
        diff[hu > -200] += 0.25  # G "changes vessels"
        images.append(_to01(hu))
        lungs.append(lung)
        diffs.append(diff)
    images, lungs, diffs = np.stack(images), np.stack(lungs), np.stack(diffs)
    hu = images * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
    return RegionalThresholds(hu[lungs], diffs[lungs], rule)


def test_refined_rule_keeps_the_lesion_and_drops_vessel_and_parenchyma():
    rule = RefinedRule(min_size=3)
    thresholds = _healthy_calibration(rule)
    # vessel-density band needs more difference than the lesion's band
    band = lambda hu: int(np.digitize(hu, thresholds.edges))  # noqa: E731
    assert thresholds.strong[band(40.0)] > thresholds.strong[band(-400.0)] + 0.1
    hu, lungs, truth = _scene(7, lesion=True)
    diff = np.zeros(hu.shape, np.float32)
    diff[truth] = 0.3  # G removed the lesion
    diff[hu > -200] = 0.3  # ... and, as in healthy lungs, changed the vessel
    diff[0, 50:60, 50:60] = 0.3  # and a patch of plain parenchyma (-850 HU: outside the HU prior)
    masks = refined_masks(_to01(hu)[None], diff[None], lungs[None], WINDOW, thresholds, rule)[0]
    dice = 2 * (masks & truth).sum() / (masks.sum() + truth.sum())
    assert dice > 0.9
    assert not masks[:, 20, 8:56].any()  # the vessel
    assert not masks[0, 50:60, 50:60].any()  # parenchyma


def test_hysteresis_keeps_weak_voxels_only_next_to_strong_ones():
    rule = RefinedRule(min_size=1, vessel_radius=0)
    thresholds = _healthy_calibration(rule)
    hu = np.full((3, 32, 32), -450.0)
    lungs = np.ones(hu.shape, bool)
    b = int(np.digitize(-450.0, thresholds.edges))
    strong, weak = thresholds.strong[b], thresholds.weak[b]
    assert weak < strong
    mid = (weak + strong) / 2
    diff = np.zeros(hu.shape, np.float32)
    diff[1, 5:10, 5:10] = mid  # weak region ...
    diff[1, 7, 7] = strong + 0.05  # ... with a strong seed
    diff[1, 20:25, 20:25] = mid  # weak region alone
    masks = refined_masks(_to01(hu)[None], diff[None], lungs[None], WINDOW, thresholds, rule)[0]
    assert masks[1, 5:10, 5:10].all()
    assert not masks[1, 20:25, 20:25].any()


def test_thin_structures_find_vessels_not_lesions():
    hu, _, lesion = _scene(1, lesion=True)
    thin = thin_structures(_to01(hu), 1, 120.0 / 1400.0)
    assert thin[:, 20, 8:56].mean() > 0.95
    assert thin[lesion].mean() < 0.05
    assert not thin_structures(_to01(hu), 0, 0.1).any()


def test_rule_parameter_checks():
    with pytest.raises(ValueError):
        RefinedRule(q_weak=0.999, q_strong=0.99)
    with pytest.raises(ValueError):
        RefinedRule(vessel_radius=-1)
    with pytest.raises(ValueError):
        RefinedRule(hu_range=(100.0, -750.0))


def test_regrid_between_two_grids_of_one_ct():
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.preprocessing import GridMapping

    lung = np.zeros((80, 80, 20), bool)
    lung[10:70, 15:60, 2:18] = True
    coarse = GridMapping.from_lung_mask(lung, (2.5, 2.5, 8.0), PreprocessConfig(grid=(32, 32, 8)))
    fine = GridMapping.from_lung_mask(lung, (2.5, 2.5, 8.0), PreprocessConfig(grid=(64, 64, 16)))
    block = np.zeros(coarse.grid_dhw, np.float32)
    block[2:6, 8:24, 8:24] = 1.0
    on_fine = regrid(block, coarse, fine)
    assert on_fine.shape == fine.grid_dhw
    # the block lands in the same place of the CT: same canonical footprint within a voxel of rounding
    a = coarse.to_canonical(block, order=1) > 0.5
    b = fine.to_canonical(on_fine, order=1) > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
