"""3D gradient (Perlin) noise and its fractal sum, vectorised with numpy.

Used by the lesion synthesiser (thresholded noise blobs, the "noisy healthy" step of the GAN,
method notes "Perlin augmentation") and by the phantoms (parenchyma texture).

Gradient noise is a sum over the 8 lattice corners of a cell of ``fade weight x (gradient . offset)``.
Both the fade weights and the offsets factor per axis, so one octave is three sparse contractions
of the ``(3, L0, L1, L2)`` gradient lattice, one axis at a time, instead of eight gathers over the
full volume. That makes any output shape possible (the lattice need not divide the shape) and
keeps a 512 x 512 x 40 volume at about 0.1 s per octave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: maximum of 3D Perlin noise with unit gradients is sqrt(3)/2; scale it to roughly [-1, 1]
_PERLIN_SCALE = 2.0 / math.sqrt(3.0)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"shape must have three sizes, got {tuple(shape)}")
    out = tuple(int(s) for s in shape)
    if min(out) < 1:
        raise ValueError(f"shape sizes must be >= 1, got {out}")
    return out  # type: ignore[return-value]


def _check_res(res: Sequence[float] | float) -> tuple[float, float, float]:
    if np.isscalar(res):
        res = (float(res),) * 3  # type: ignore[assignment]
    if len(res) != 3:  # type: ignore[arg-type]
        raise ValueError(f"res must have three values (periods per axis), got {res}")
    out = tuple(float(r) for r in res)  # type: ignore[union-attr]
    if not all(np.isfinite(out)) or min(out) <= 0:
        raise ValueError(f"res values must be positive, got {out}")
    return out  # type: ignore[return-value]


def _axis_weights(n: int, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-axis interpolation data for ``n`` samples over ``r`` lattice periods.

    Returns ``(cell, f, u, L)``: each sample's lattice cell, its offset ``f`` in the cell, the fade
    weight ``u`` of the cell's upper corner, and the number of lattice points ``L``.
    """
    t = np.arange(n, dtype=np.float64) * (r / n)  # sample positions in lattice units, [0, r)
    cell = np.floor(t).astype(np.intp)
    f = t - cell
    u = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)  # quintic fade 6f^5 - 15f^4 + 10f^3
    return cell, f.astype(np.float32), u.astype(np.float32), int(cell.max()) + 2


def _contract(t: np.ndarray, axis: int, cell: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum over the lattice axis ``axis``: ``lo * t[cell] + hi * t[cell + 1]`` (2 nonzeros per row)."""
    shape = [1] * t.ndim
    shape[axis] = cell.size
    return np.take(t, cell, axis=axis) * lo.reshape(shape) + np.take(t, cell + 1, axis=axis) * hi.reshape(shape)


def perlin_noise_3d(shape: Sequence[int], res: Sequence[float] | float, *, rng: np.random.Generator) -> np.ndarray:
    """One octave of 3D gradient (Perlin) noise, float32, roughly in [-1, 1].

    Args:
        shape: output shape (any sizes, not only multiples of ``res``).
        res: number of noise periods (lattice cells) along each axis; may be fractional.
        rng: source of the random gradients (same generator state -> same array).
    """
    shape = _check_shape(shape)
    res = _check_res(res)
    (c0, f0, u0, l0), (c1, f1, u1, l1), (c2, f2, u2, l2) = (_axis_weights(n, r) for n, r in zip(shape, res))
    g = rng.standard_normal((3, l0, l1, l2)).astype(np.float32)
    g /= np.maximum(np.sqrt((g * g).sum(axis=0, keepdims=True)), 1e-6)  # unit gradients
    # noise = sum_c W0 W1 W2 (g . offset), offset_a = f_a - corner_a; the interpolation weights W
    # and the offset-weighted weights D = W * offset factor per axis, so contract one axis at a
    # time (sparse: each sample sees two lattice points per axis). No BLAS: small products
    # are slow with threaded BLAS on busy machines.
    w2 = (1.0 - u2, u2)
    d2 = ((1.0 - u2) * f2, u2 * (f2 - 1.0))
    w1 = (1.0 - u1, u1)
    d1 = ((1.0 - u1) * f1, u1 * (f1 - 1.0))
    gx = _contract(g[0], 2, c2, *w2)  # (L0, L1, n2)
    gy = _contract(g[1], 2, c2, *w2)
    gz = _contract(g[2], 2, c2, *d2)
    tx = _contract(gx, 1, c1, *w1)  # (L0, n1, n2)
    tyz = _contract(gy, 1, c1, *d1) + _contract(gz, 1, c1, *w1)
    # last axis, full size: (1-u) (f tx[c] + tyz[c]) + u ((f-1) tx[c+1] + tyz[c+1])
    col = (-1, 1, 1)
    a = np.take(tx, c0, axis=0)
    a *= f0.reshape(col)
    a += np.take(tyz, c0, axis=0)
    a *= (1.0 - u0).reshape(col)
    b = np.take(tx, c0 + 1, axis=0)
    b *= (f0 - 1.0).reshape(col)
    b += np.take(tyz, c0 + 1, axis=0)
    b *= u0.reshape(col)
    a += b  # (n0, n1, n2)
    a *= np.float32(_PERLIN_SCALE)
    np.clip(a, -1.0, 1.0, out=a)
    return a


def fractal_noise_3d(
    shape: Sequence[int],
    res: Sequence[float] | float,
    *,
    octaves: int = 4,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    rng: np.random.Generator,
    normalize: bool = True,
) -> np.ndarray:
    """Fractal sum of Perlin octaves, float32, normalised so that ``max |noise| = 1``.

    Octave ``k`` has ``res * lacunarity**k`` periods per axis and amplitude ``persistence**k``.
    With ``normalize=False`` the sum is divided by the total amplitude instead (range within
    [-1, 1] but not stretched to it).
    """
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    if not persistence > 0:
        raise ValueError(f"persistence must be > 0, got {persistence}")
    if not lacunarity >= 1:
        raise ValueError(f"lacunarity must be >= 1, got {lacunarity}")
    shape = _check_shape(shape)
    base = np.asarray(_check_res(res))
    out = np.zeros(shape, dtype=np.float32)
    amplitude, total = 1.0, 0.0
    for k in range(octaves):
        freq = base * lacunarity**k
        # no detail finer than ~2 samples per period: it would only alias
        freq = np.minimum(freq, np.maximum(np.asarray(shape) / 2.0, base))
        out += np.float32(amplitude) * perlin_noise_3d(shape, tuple(freq), rng=rng)
        total += amplitude
        amplitude *= persistence
    if normalize:
        peak = float(np.abs(out).max())
        if peak > 0:
            out *= np.float32(1.0 / peak)
    else:
        out *= np.float32(1.0 / total)
    return out
