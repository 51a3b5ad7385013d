"""3D Perlin noise: exactness against a direct implementation, range, smoothness, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from CovidGANSegLib.synth.perlin import _PERLIN_SCALE, fractal_noise_3d, perlin_noise_3d


def _reference_perlin(shape, res, seed):
    """Textbook gradient noise, one voxel at a time (same gradient draw as the library)."""
    rng = np.random.default_rng(seed)
    lattice = [int(np.floor((n - 1) * r / n)) + 2 for n, r in zip(shape, res)]
    g = rng.standard_normal((3, *lattice)).astype(np.float32)
    g /= np.sqrt((g * g).sum(axis=0, keepdims=True))

    def fade(f):
        return 6 * f**5 - 15 * f**4 + 10 * f**3

    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        t = [i * r / n for i, r, n in zip(idx, res, shape)]
        c = [int(np.floor(x)) for x in t]
        f = [x - ci for x, ci in zip(t, c)]
        value = 0.0
        for corner in np.ndindex(2, 2, 2):
            grad = g[(slice(None), *[ci + d for ci, d in zip(c, corner)])]
            dot = sum(grad[a] * (f[a] - corner[a]) for a in range(3))
            w = np.prod([fade(f[a]) if corner[a] else 1 - fade(f[a]) for a in range(3)])
            value += w * dot
        out[idx] = value
    return np.clip(out * _PERLIN_SCALE, -1, 1)


def test_matches_direct_gradient_noise_for_non_multiple_shape():
    shape, res = (7, 9, 5), (2.0, 3.5, 1.3)
    fast = perlin_noise_3d(shape, res, rng=np.random.default_rng(3))
    ref = _reference_perlin(shape, res, 3)
    assert fast.shape == shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, atol=1e-5)


def test_range_and_zero_at_lattice_points():
    n = perlin_noise_3d((16, 32, 24), (2, 4, 3), rng=np.random.default_rng(0))
    assert n.min() >= -1.0 and n.max() <= 1.0
    assert n.std() > 0.1  # not degenerate
    # gradient noise vanishes on the lattice (here every 8 voxels)
    np.testing.assert_allclose(n[::8, ::8, ::8], 0.0, atol=1e-6)


@pytest.mark.parametrize("shape,res", [((32, 64, 64), (2, 4, 4)), ((13, 50, 37), (3, 5, 2.5)), ((1, 40, 40), (1, 3, 3))])
def test_fractal_range_smoothness_and_shape(shape, res):
    n = fractal_noise_3d(shape, res, octaves=4, rng=np.random.default_rng(1))
    assert n.shape == shape and n.dtype == np.float32
    assert np.all(np.isfinite(n))
    assert n.min() >= -1.0 and n.max() <= 1.0
    assert np.isclose(np.abs(n).max(), 1.0)  # normalised
    span = float(n.max() - n.min())
    for axis in range(3):
        if shape[axis] > 1:
            step = np.abs(np.diff(n, axis=axis)).mean()
            assert step < 0.12 * span, (axis, step, span)
    # white noise of the same range would fail the smoothness check
    white = np.random.default_rng(0).uniform(-1, 1, shape)
    assert np.abs(np.diff(white, axis=-1)).mean() > 0.12 * 2


def test_determinism_and_seed_dependence():
    a = fractal_noise_3d((8, 30, 30), (2, 3, 3), rng=np.random.default_rng(42))
    b = fractal_noise_3d((8, 30, 30), (2, 3, 3), rng=np.random.default_rng(42))
    c = fractal_noise_3d((8, 30, 30), (2, 3, 3), rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.05


def test_more_octaves_add_detail():
    rng = np.random.default_rng
    smooth = fractal_noise_3d((16, 64, 64), (1, 2, 2), octaves=1, rng=rng(0))
    rough = fractal_noise_3d((16, 64, 64), (1, 2, 2), octaves=5, persistence=0.7, rng=rng(0))
    def roughness(x):
        return np.abs(np.diff(x, axis=2)).mean() / x.std()
    assert roughness(rough) > 1.5 * roughness(smooth)


def test_argument_checks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        perlin_noise_3d((4, 4), (1, 1, 1), rng=rng)
    with pytest.raises(ValueError):
        perlin_noise_3d((4, 4, 4), (1, 0, 1), rng=rng)
    with pytest.raises(ValueError):
        fractal_noise_3d((4, 4, 4), 1, octaves=0, rng=rng)
    with pytest.raises(ValueError):
        fractal_noise_3d((4, 4, 4), 1, lacunarity=0.5, rng=rng)
