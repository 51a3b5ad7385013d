"""Lesion synthesiser: coverage, exact masks, HU ranges per lesion type, placement, windowed mode (speed: benchmarks/bench_synthesis.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from CovidGANSegLib.synth.lesions import LesionConfig, synthesize_lesions

SPACING = (8.0, 2.0, 2.0)  # (D, H, W) model grid, axis 1 = y: posterior at low indices
WINDOW = (-1000.0, 400.0)
GGO_ONLY = LesionConfig(consolidation_fraction=(0.0, 0.0), crazy_paving_fraction=(0.0, 0.0))
CONS_ONLY = LesionConfig(consolidation_fraction=(1.0, 1.0), crazy_paving_fraction=(0.0, 0.0))
CP_ONLY = LesionConfig(consolidation_fraction=(0.0, 0.0), crazy_paving_fraction=(1.0, 1.0))


@pytest.fixture(scope="module")
def chest():
    """Two ellipsoidal lungs at -850 HU (noise 20 HU) in +40 HU tissue, with one vessel."""
    d, h, w = 32, 96, 96
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    lung = (((x - 28) / 20) ** 2 + ((y - 48) / 38) ** 2 + ((z - 16) / 13) ** 2 < 1) | (
        ((x - 68) / 20) ** 2 + ((y - 48) / 38) ** 2 + ((z - 16) / 13) ** 2 < 1
    )
    hu = np.where(lung, -850.0, 40.0) + np.random.default_rng(0).normal(0, 20, lung.shape)
    vessel = lung & (np.abs(x - 28) <= 1) & (np.abs(y - 48) <= 1)  # a vertical vessel, 3 x 3 voxels
    hu[vessel] = 40.0
    return hu.astype(np.float32), lung, vessel


def test_coverage_mask_exact_and_inside_lung(chest):
    hu, lung, _ = chest
    out, mask = synthesize_lesions(hu, lung, np.random.default_rng(1), spacing=SPACING, coverage=0.15)
    assert mask.dtype == bool and mask.shape == hu.shape
    assert not (mask & ~lung).any()
    assert abs(mask.sum() / lung.sum() - 0.15) < 0.005
    np.testing.assert_array_equal(out[~mask], hu[~mask])  # nothing outside the mask changed
    assert np.abs(out[mask] - hu[mask]).mean() > 100  # inside it did, substantially
    assert out.dtype == hu.dtype


def test_coverage_drawn_from_config_range(chest):
    hu, lung, _ = chest
    cfg = LesionConfig(coverage=(0.05, 0.1))
    for seed in range(4):
        _, mask = synthesize_lesions(hu, lung, np.random.default_rng(seed), config=cfg, spacing=SPACING)
        assert 0.045 <= mask.sum() / lung.sum() <= 0.105


def test_multifocal_blobs(chest):
    hu, lung, _ = chest
    _, mask = synthesize_lesions(hu, lung, np.random.default_rng(2), spacing=SPACING, coverage=0.1)
    _, n = ndi.label(mask)
    assert n >= 2


@pytest.mark.parametrize("cfg,lo,hi", [(GGO_ONLY, -700, -300), (CONS_ONLY, -100, 50)])
def test_lesion_hu_in_type_range(chest, cfg, lo, hi):
    hu, lung, vessel = chest
    for seed in range(3):
        out, mask = synthesize_lesions(hu, lung, np.random.default_rng(seed), config=cfg, spacing=SPACING, coverage=0.2)
        core = ndi.binary_erosion(mask, iterations=1) & ~ndi.binary_dilation(vessel, iterations=2)
        vals = out[core]
        assert lo - 20 <= np.median(vals) <= hi + 20, (seed, np.median(vals))
        assert np.percentile(vals, 90) <= hi + 40
        assert np.percentile(vals, 10) >= lo - 150  # soft rim blends down toward the parenchyma


def test_crazy_paving_has_bright_reticular_lines(chest):
    hu, lung, _ = chest
    ggo, m1 = synthesize_lesions(hu, lung, np.random.default_rng(5), config=GGO_ONLY, spacing=SPACING, coverage=0.3)
    cp, m2 = synthesize_lesions(hu, lung, np.random.default_rng(5), config=CP_ONLY, spacing=SPACING, coverage=0.3)
    np.testing.assert_array_equal(m1, m2)  # same score field, same blobs
    assert np.percentile(cp[m2], 99) > np.percentile(ggo[m1], 99) + 50
    assert np.median(cp[m2]) < -250  # still a ground-glass background


def test_vessels_show_through_ground_glass(chest):
    hu, lung, vessel = chest
    out, mask = synthesize_lesions(hu, lung, np.random.default_rng(3), config=GGO_ONLY, spacing=SPACING, coverage=1.0)
    assert mask.sum() == lung.sum()
    around = ndi.binary_dilation(vessel, iterations=3) & ~ndi.binary_dilation(vessel, iterations=1) & lung
    assert out[vessel].mean() > out[around].mean() + 50


def _placement(hu, lung, cfg, seeds=range(5)):
    dist = ndi.distance_transform_edt(lung, sampling=SPACING)
    y = np.broadcast_to(np.arange(lung.shape[1])[None, :, None], lung.shape)
    ratios_d, shifts_y = [], []
    for s in seeds:
        _, mask = synthesize_lesions(hu, lung, np.random.default_rng(s), config=cfg, spacing=SPACING, coverage=0.08)
        ratios_d.append(dist[mask].mean() / dist[lung].mean())
        shifts_y.append(y[mask].mean() - y[lung].mean())
    return float(np.mean(ratios_d)), float(np.mean(shifts_y))


def test_peripheral_and_posterior_preference(chest):
    hu, lung, _ = chest
    d_pref, y_pref = _placement(hu, lung, LesionConfig())
    d_off, y_off = _placement(hu, lung, LesionConfig(prefer_peripheral=False))
    assert d_pref < 0.75  # lesions much closer to the pleura than the average lung voxel
    assert y_pref < -3  # and posterior (low y index)
    assert d_pref < d_off - 0.15 and y_pref < y_off - 3
    # posterior_direction +1 flips the preference
    _, y_flip = _placement(hu, lung, LesionConfig(posterior_direction=1))
    assert y_flip > 3


def test_windowed_mode_matches_hu_mode(chest):
    hu, lung, _ = chest
    lo, hi = WINDOW
    x = np.clip((hu - lo) / (hi - lo), 0, 1).astype(np.float32)
    out_w, mask_w = synthesize_lesions(x, lung, np.random.default_rng(7), window=WINDOW, spacing=SPACING, coverage=0.2)
    out_h, mask_h = synthesize_lesions(hu, lung, np.random.default_rng(7), spacing=SPACING, coverage=0.2)
    assert out_w.dtype == np.float32 and out_w.min() >= 0.0 and out_w.max() <= 1.0
    np.testing.assert_array_equal(mask_w, mask_h)
    expect = np.clip((out_h - lo) / (hi - lo), 0, 1)
    assert np.abs(out_w - expect).max() < 1e-3
    assert (out_w[mask_w] > x[mask_w]).mean() > 0.95  # lesions are brighter than the parenchyma


def test_integer_input_and_determinism(chest):
    hu, lung, _ = chest
    hu16 = np.rint(hu).astype(np.int16)
    a, ma = synthesize_lesions(hu16, lung, np.random.default_rng(9), spacing=SPACING)
    b, mb = synthesize_lesions(hu16, lung, np.random.default_rng(9), spacing=SPACING)
    c, mc = synthesize_lesions(hu16, lung, np.random.default_rng(10), spacing=SPACING)
    assert a.dtype == np.int16
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert (ma != mc).any()


def test_degenerate_inputs(chest):
    hu, lung, _ = chest
    out, mask = synthesize_lesions(hu, lung, np.random.default_rng(0), coverage=0.0)
    assert not mask.any() and np.array_equal(out, hu)
    out, mask = synthesize_lesions(hu, np.zeros_like(lung), np.random.default_rng(0), coverage=0.3)
    assert not mask.any() and np.array_equal(out, hu)
    with pytest.raises(ValueError):
        synthesize_lesions(hu, lung[:-1], np.random.default_rng(0))
    with pytest.raises(ValueError):
        synthesize_lesions(hu, lung, np.random.default_rng(0), window=(400.0, -1000.0))
    with pytest.raises(ValueError):
        LesionConfig(coverage=(0.5, 0.2))
    with pytest.raises(ValueError):
        LesionConfig(consolidation_fraction=(0.0, 0.8), crazy_paving_fraction=(0.0, 0.5))


def test_training_model_api_is_stable():
    """The GAN and the segmenters train on this model: its signature and config fields stay put."""
    import dataclasses
    import inspect

    params = inspect.signature(synthesize_lesions).parameters
    assert list(params)[:3] == ["image", "lung_mask", "rng"]
    for name in ("config", "window", "spacing", "coverage"):
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    fields = {f.name for f in dataclasses.fields(LesionConfig)}
    assert {"coverage", "blob_scale_mm", "ggo_hu", "consolidation_hu", "posterior_axis", "posterior_direction"} <= fields


def test_evaluation_model_draws_other_lesions(chest):
    """At equal coverage on the same lungs, the independent evaluation model (synth/eval_lesions)
    puts its lesions elsewhere and in other shapes: the two masks barely overlap."""
    from CovidGANSegLib.synth.eval_lesions import synthesize_eval_lesions

    hu, lung, _ = chest
    spacing_dhw = SPACING
    dices = []
    for seed in range(3):
        _, a = synthesize_lesions(hu, lung, np.random.default_rng(seed), spacing=spacing_dhw, coverage=0.08)
        _, b = synthesize_eval_lesions(hu, lung, np.random.default_rng(seed), spacing=spacing_dhw, coverage=0.08,
                                       slice_axis=0, posterior_axis=1, posterior_direction=-1)
        assert not (b & ~lung).any()
        assert abs(b.sum() / lung.sum() - 0.08) <= 0.008 + 0.5 / (lung.sum() * np.prod(spacing_dhw) / 1000)
        dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.mean(dices) < 0.4
