"""Acquisition effects: motion blur (cardiac, respiratory), in-plane upsampling and CT noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib.synth.chest.canvas import Chest
from CovidGANSegLib.synth.chest.geometry import smoothstep, uniform

#: fraction of low-dose studies, and the noise standard deviation (HU) of standard / low-dose ones
LOW_DOSE_PROBABILITY = 0.3
NOISE_SIGMA_HU = (12.0, 35.0)
LOW_DOSE_SIGMA_HU = (35.0, 60.0)
#: fraction of studies with cardiac / respiratory motion blur
CARDIAC_BLUR_PROBABILITY = 0.6
RESPIRATORY_BLUR_PROBABILITY = 0.5


def draw_noise_sigma(rng: np.random.Generator) -> float:
    """Standard deviation (HU) of a study's CT noise: low-dose studies are much noisier."""
    low = rng.random() < LOW_DOSE_PROBABILITY
    lo, hi = LOW_DOSE_SIGMA_HU if low else NOISE_SIGMA_HU
    return uniform(rng, lo, hi)


def draw_motion_blur(c: Chest) -> None:
    """Blur the anatomy where it moves during the scan: next to the heart in the left lower lung
    (cardiac pulsation smears vessels and the heart border into lesion-like haze) and just above
    the diaphragm (breathing mixes neighbouring slices). The lung occupancy is not changed."""
    r = c.rng
    cardiac = r.random() < CARDIAC_BLUR_PROBABILITY
    sigma_c = uniform(r, 1.5, 4.0)  # mm, in-plane
    reach_c = uniform(r, 25.0, 50.0)  # mm beyond the heart
    resp = r.random() < RESPIRATORY_BLUR_PROBABILITY
    mix_z = uniform(r, 0.12, 0.3)  # weight of each neighbouring slice
    reach_r = uniform(r, 25.0, 50.0)  # mm above the domes
    if cardiac:
        hu_c, hv_c, ha, hb, _, hz0, hz1 = c.heart
        zc = hz0 + 0.45 * (hz1 - hz0)
        box = c.box(hu_c - ha - reach_c, hu_c + ha + reach_c + 30.0, hv_c - ha - reach_c, hv_c + ha + reach_c, hz0 - 10.0, zc + 40.0)
        if box is not None:
            bu, bv, bz = c.coords(box)
            dist = np.sqrt((bu - hu_c) ** 2 + (bv - hv_c) ** 2) - 0.5 * (ha + hb)
            w = (1.0 - smoothstep(dist / reach_c)) * (1.0 - smoothstep((bz - zc) / 40.0)) * (bu > c.uc)
            s = sigma_c / c.px
            blurred = ndi.gaussian_filter(c.hu[box], sigma=(s, s, 0.0), mode="nearest")
            c.hu[box] += w.astype(np.float32) * (blurred - c.hu[box])
    if resp:
        w = 1.0 - smoothstep((c.z - c.z_dia) / reach_r)  # (nx, ny, nz): 1 at and below the domes
        w = w * (c.z > c.z_dia - 30.0)
        blurred = ndi.convolve1d(c.hu, np.array([mix_z, 1.0 - 2.0 * mix_z, mix_z], np.float32), axis=2, mode="nearest")
        c.hu += w.astype(np.float32) * (blurred - c.hu)

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

