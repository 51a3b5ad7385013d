"""The independent evaluation lesion model (``synth/eval_lesions.py``) and phantom anatomy that is
as hard for a plain HU threshold as real CT: masks, coverage, lesion types and sizes, partial
volume, determinism, independence from the training model, and the real-CT calibration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
from CovidGANSegLib.synth import eval_lesions
from CovidGANSegLib.synth.eval_lesions import (
    LESION_TYPES,
    MASK_FRACTION,
    TEXTURES,
    synthesize_eval_lesions,
)
from CovidGANSegLib.synth.phantoms import generate_phantom, study_rng

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def healthy():
    return generate_phantom(np.random.default_rng(21), size="small", covid=False, return_labels=False)


def _tolerance(coverage: float, n_lung: int, spacing) -> float:
    """The module's stated coverage tolerance, as a fraction of the lung."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return max(eval_lesions.COVERAGE_TOLERANCE * coverage, eval_lesions.MIN_TOLERANCE_ML / (n_lung * voxel_ml))


def _run(ph, coverage, seed, **kw):
    return synthesize_eval_lesions(ph.hu.astype(np.float32), ph.lung_mask, np.random.default_rng(seed),
                                   spacing=ph.spacing, coverage=coverage, return_details=True, **kw)


def test_mask_exact_and_inside_lung(healthy):
    ph = healthy
    hu = ph.hu.astype(np.float32)
    out, mask, det = _run(ph, 0.08, 1)
    w = det["w"]
    assert out.dtype == np.float32 and mask.dtype == bool and mask.shape == hu.shape
    np.testing.assert_array_equal(mask, ph.lung_mask & (w >= MASK_FRACTION))  # the documented rule
    assert not (mask & ~ph.lung_mask).any()
    np.testing.assert_array_equal(out[~ph.lung_mask], hu[~ph.lung_mask])  # nothing outside the lung
    np.testing.assert_array_equal(out[w == 0], hu[w == 0])  # nothing where no lesion reaches
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    # the fringe outside the mask is faint, the inside clearly changed
    change = np.abs(out - hu)
    fringe = (w > 0) & ~mask
    assert fringe.any()
    assert np.median(change[mask]) > 50  # faint GGO raises -850 HU parenchyma by only ~100 HU
    assert np.median(change[fringe]) < 0.5 * np.median(change[mask])


@pytest.mark.parametrize("coverage", [0.0003, 0.002, 0.01, 0.03, 0.15, 0.4, 0.8])
def test_coverage_near_target(healthy, coverage):
    ph = healthy
    _, mask, det = _run(ph, coverage, 2)
    n_lung = int(ph.lung_mask.sum())
    reached = mask.sum() / n_lung
    assert reached == pytest.approx(det["coverage"])
    assert abs(reached - coverage) <= _tolerance(coverage, n_lung, ph.spacing)


def test_lesion_types_textures_and_hu_range(healthy):
    ph = healthy
    kinds, textures = set(), set()
    dense = []
    for seed, cov in ((3, 0.004), (4, 0.02), (5, 0.1), (6, 0.3), (7, 0.05)):
        out, mask, det = _run(ph, cov, seed)
        kinds |= {les["kind"] for les in det["lesions"]}
        textures |= {les["texture"] for les in det["lesions"]}
        core = mask & (det["w"] > 0.95)
        dense.append(out[core])
    assert kinds == set(LESION_TYPES)
    assert textures == set(TEXTURES)
    vals = np.concatenate(dense)
    # faint GGO near -750 up to consolidation near +50 (air bronchograms and vessels aside)
    assert np.percentile(vals, 5) < -550 and np.percentile(vals, 98) > -60
    assert np.percentile(vals, 50) > -760


def test_mild_cases_have_lesions_of_a_few_ml(healthy):
    ph = healthy
    voxel_ml = float(np.prod(ph.spacing)) / 1000.0
    lung_ml = ph.lung_mask.sum() * voxel_ml
    for seed in (8, 9):
        coverage = 3.0 / lung_ml  # 3 mL in all, like a mild MosMed CT-1 study
        _, mask, det = _run(ph, coverage, seed)
        assert 0 < mask.sum() * voxel_ml < 5.0
        lab, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(lab.ravel())[1:] * voxel_ml
        assert sizes.max() < 5.0 and sizes.min() < 3.0


def test_peripheral_and_posterior_preference(healthy):
    """Over a few mild cases, lesion voxels lie nearer the pleura and more posterior than the lung's
    average voxel (COVID-19 favours subpleural, dependent lung)."""
    ph = healthy
    dist = ndi.distance_transform_edt(ph.lung_mask, sampling=ph.spacing)
    y = np.broadcast_to(np.arange(ph.hu.shape[1])[None, :, None], ph.hu.shape)
    depth, post = [], []
    for seed in range(10, 16):
        _, mask, _ = _run(ph, 0.03, seed)
        depth.append(dist[mask].mean())
        post.append(y[mask].mean())
    assert np.mean(depth) < 0.9 * dist[ph.lung_mask].mean()
    assert np.mean(post) < y[ph.lung_mask].mean()  # axis 1 runs anterior: posterior is low


@pytest.mark.parametrize("slab_mm", [5.0, 8.0])
def test_partial_volume_across_the_slab(slab_mm):
    """A uniform 'lung' block: lesion edges are partial (0 < w < 1) and most of that comes from the
    slab, since the in-plane voxels (0.7 mm) are much finer than the slices."""
    shape = (160, 160, int(240 / slab_mm))
    lung = np.zeros(shape, bool)
    lung[10:-10, 10:-10, 2:-2] = True
    hu = np.where(lung, -860.0, -1000.0).astype(np.float32)
    spacing = (0.7, 0.7, slab_mm)
    out, mask, det = synthesize_eval_lesions(hu, lung, np.random.default_rng(11), spacing=spacing, coverage=0.05,
                                             return_details=True)
    w = det["w"]
    n_lung = int(lung.sum())
    assert abs(mask.sum() / n_lung - 0.05) <= _tolerance(0.05, n_lung, spacing)
    partial = (w > 0.05) & (w < 0.95)
    assert partial.sum() > 0.1 * (w > 0.05).sum()
    # faint edge voxels exist on both sides of the mask rule
    assert ((w > 0.05) & (w < MASK_FRACTION)).any() and (mask & (w < 0.75)).any()


def test_determinism_and_seed_dependence(healthy):
    ph = healthy
    a = synthesize_eval_lesions(ph.hu, ph.lung_mask, np.random.default_rng(5), spacing=ph.spacing, coverage=0.05)
    b = synthesize_eval_lesions(ph.hu, ph.lung_mask, np.random.default_rng(5), spacing=ph.spacing, coverage=0.05)
    c = synthesize_eval_lesions(ph.hu, ph.lung_mask, np.random.default_rng(6), spacing=ph.spacing, coverage=0.05)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert not np.array_equal(a[1], c[1])
    p1 = generate_phantom(study_rng(4, 2), size="small", covid=True, involvement=0.02, lesion_model="independent")
    p2 = generate_phantom(study_rng(4, 2), size="small", covid=True, involvement=0.02, lesion_model="independent")
    assert p1.hu.tobytes() == p2.hu.tobytes() and p1.lesion_mask.tobytes() == p2.lesion_mask.tobytes()


def test_independent_of_the_training_lesion_model():
    import ast

    tree = ast.parse((ROOT / "CovidGANSegLib" / "synth" / "eval_lesions.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    assert imported and all(m.split(".")[0] in ("__future__", "logging", "math", "collections", "numpy", "scipy")
                            for m in imported), imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    banned = {n for n in names if "perlin" in n.lower() or "fractal" in n.lower()}
    banned |= names & {"synthesize_lesions", "LesionConfig", "lesion_score"}
    assert not banned, banned
    code = ("import sys, CovidGANSegLib.synth.eval_lesions; "
            "bad = [m for m in sys.modules if m.endswith('synth.lesions') or m.endswith('synth.perlin') or m == 'torch']; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_argument_checks(healthy):
    ph = healthy
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(ph.hu, ph.lung_mask, rng, spacing=ph.spacing, coverage=0.0)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(ph.hu, ph.lung_mask, rng, spacing=ph.spacing, coverage=1.0)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(ph.hu, ph.lung_mask[:, :, :-1], rng, spacing=ph.spacing, coverage=0.1)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(ph.hu, ph.lung_mask, rng, spacing=(1.0, 0.0, 8.0), coverage=0.1)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(ph.hu, ph.lung_mask, rng, spacing=ph.spacing, coverage=0.1, posterior_axis=3)
    out, mask = synthesize_eval_lesions(ph.hu, np.zeros(ph.hu.shape, bool), rng, spacing=ph.spacing, coverage=0.1)
    assert not mask.any() and np.array_equal(out, ph.hu.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# the HU threshold on healthy anatomy: phantoms against the real normal CTs


def _block_mean(hu: np.ndarray, factors) -> np.ndarray:
    nx, ny, nz = (s // f * f for s, f in zip(hu.shape, factors))
    h = hu[:nx, :ny, :nz].reshape(nx // factors[0], factors[0], ny // factors[1], factors[1], nz // factors[2], factors[2])
    return h.mean(axis=(1, 3, 5))


def _threshold_fractions(hu: np.ndarray, spacing) -> tuple[float, float]:
    from CovidGANSegLib.lungmask import extract_lung_mask

    lung = extract_lung_mask(hu, spacing)
    n = lung.sum()
    assert n > 0
    band = ((hu >= -750) & (hu <= 0) & lung).sum() / n
    ggo = ((hu >= -750) & (hu < -400) & lung).sum() / n
    return float(band), float(ggo)


def test_hu_threshold_fails_on_healthy_phantoms_as_on_real_ct(real_ct_dir):
    """The fraction of healthy lung that the HU threshold flags (-750..0 HU, and its GGO part
    -750..-400 HU), with the library's own lung mask, on the real normal CTs resampled to a
    phantom-like grid (block means to about 3 mm in-plane and 6-7.5 mm slices; the phantoms are
    about 2.8 mm x 8 mm) and on healthy small phantoms. The phantoms' mean must lie within the
    real CTs' range widened by 0.08 on each side, and every phantom must flag over 15 %."""
    from CovidGANSegLib.nifti import load_ct

    real = []
    for path in sorted(real_ct_dir.glob("*.nii.gz")):
        ct = load_ct(path)
        sp = tuple(float(s) for s in ct.spacing)
        f = (max(1, int(round(3.0 / sp[0]))), max(1, int(round(3.0 / sp[1]))), max(1, int(7.5 / sp[2])))
        hu = _block_mean(np.asarray(ct.array, np.float32), f)
        real.append(_threshold_fractions(hu, tuple(s * k for s, k in zip(sp, f))))
    assert len(real) == 3
    phantoms = []
    for n in range(6):
        ph = generate_phantom(study_rng(1, n), size="small", covid=False, return_labels=False)
        phantoms.append(_threshold_fractions(ph.hu.astype(np.float32), ph.spacing))
    real_a, phan_a = np.array(real), np.array(phantoms)
    for col in (0, 1):
        lo, hi = real_a[:, col].min() - 0.08, real_a[:, col].max() + 0.08
        assert lo <= phan_a[:, col].mean() <= hi, (real_a[:, col], phan_a[:, col])
    assert phan_a[:, 0].min() > 0.15


def test_hu_threshold_precision_is_low_on_mild_independent_phantoms():
    """Mild independent-lesion phantoms (0.2-3 % of lung): the threshold finds most lesion voxels
    but its precision is poor, as on real anatomy."""
    precisions, sensitivities = [], []
    for n, inv in enumerate((0.003, 0.01, 0.025)):
        ph = generate_phantom(study_rng(2, n), size="small", covid=True, involvement=inv,
                              lesion_model="independent", return_labels=False)
        pred = hu_threshold_segment(ph.hu, ph.lung_mask)
        tp = (pred & ph.lesion_mask).sum()
        precisions.append(tp / max(pred.sum(), 1))
        sensitivities.append(tp / ph.lesion_mask.sum())
    assert max(precisions) < 0.2
    assert np.mean(sensitivities) > 0.3


def test_slice_axis_of_model_grid_arrays(healthy):
    """Arrays with the slices on axis 0 give the same lesions as (x, y, z) arrays."""
    ph = healthy
    a_out, a_mask = synthesize_eval_lesions(ph.hu, ph.lung_mask, np.random.default_rng(3), spacing=ph.spacing,
                                            coverage=0.04)
    zxy = np.transpose(ph.hu, (2, 0, 1))
    sp = (ph.spacing[2], ph.spacing[0], ph.spacing[1])
    b_out, b_mask = synthesize_eval_lesions(zxy, np.transpose(ph.lung_mask, (2, 0, 1)), np.random.default_rng(3),
                                            spacing=sp, coverage=0.04, slice_axis=0, posterior_axis=2)
    assert b_mask.shape == zxy.shape
    np.testing.assert_array_equal(np.transpose(b_mask, (1, 2, 0)), a_mask)
    np.testing.assert_allclose(np.transpose(b_out, (1, 2, 0)), a_out, atol=1e-3)
    with pytest.raises(ValueError):
        synthesize_eval_lesions(zxy, b_mask, np.random.default_rng(0), spacing=sp, coverage=0.1, slice_axis=5)
