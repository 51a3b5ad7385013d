"""Acquisition effects applied after the anatomy: in-plane upsampling and CT noise."""

from __future__ import annotations

import numpy as np

def upsample2(a: np.ndarray) -> np.ndarray:
    """Linear x2 upsampling of axes 0 and 1 (half-pixel aligned), float32."""
    for ax in (0, 1):
        a = np.moveaxis(a, ax, 0)
        prev = np.concatenate([a[:1], a[:-1]], axis=0)
        nxt = np.concatenate([a[1:], a[-1:]], axis=0)
        out = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=np.float32)
        out[0::2] = 0.75 * a + 0.25 * prev
        out[1::2] = 0.75 * a + 0.25 * nxt
        a = np.moveaxis(out, 0, ax)
    return np.ascontiguousarray(a)


def ct_noise(rng: np.random.Generator, shape, sigma: float, correlated: bool) -> np.ndarray:
    """Gaussian CT noise with standard deviation ``sigma``; in-plane correlated if asked."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if not correlated:
        n *= np.float32(sigma)
        return n
    for ax in (0, 1):  # [1, 2, 1] / 4 smoothing, std factor sqrt(6)/4 per axis
        m = np.moveaxis(n, ax, 0)
        s = m * np.float32(0.5)
        s[1:] += np.float32(0.25) * m[:-1]
        s[:-1] += np.float32(0.25) * m[1:]
        n = np.moveaxis(s, 0, ax)
    n *= np.float32(sigma / 0.375)
    return np.ascontiguousarray(n)

