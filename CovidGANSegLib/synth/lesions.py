"""Synthetic COVID-19 lesions from thresholded fractal Perlin noise (numpy only).

The GAN's "noisy healthy" step (paper, Algorithm 1 step 2c; method notes "Perlin augmentation",
stronger 3D variant) and the COVID phantoms both call :func:`synthesize_lesions`:

1. a lesion *score* = fractal Perlin noise + a peripheral term (near the lung boundary) + a
   posterior term (dependent lung), evaluated inside the lung mask;
2. the score is thresholded at the quantile that covers the drawn fraction of the lung, which
   gives multifocal blobs restricted to the lung;
3. the blobs are filled with ground glass (GGO, -700..-300 HU, a partial blend with the underlying
   parenchyma so vessels still show through faintly), consolidation (-100..+50 HU, nearly opaque)
   and crazy paving (GGO plus a reticular pattern of thin brighter septal lines), with
   intralesional texture and a soft (partial-volume) rim.

The returned mask is exact: it is the set of voxels where lesion intensity was applied, each with
at least the rim's minimum weight (``LesionConfig.min_weight``) of the full lesion change; no voxel
outside the mask is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib.synth.perlin import fractal_noise_3d, perlin_noise_3d

Range = tuple[float, float]


def _check_range(name: str, value: Range, lo: float | None = None, hi: float | None = None) -> None:
    if len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    if lo is not None and value[0] < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value[1] > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


@dataclass(frozen=True)
class LesionConfig:
    """Parameters of :func:`synthesize_lesions`. Ranges ``(low, high)`` are drawn uniformly per call.

    Attributes:
        coverage: fraction of the lung mask covered by lesions.
        blob_scale_mm: size of one period of the base noise octave (larger -> fewer, bigger blobs).
        octaves, persistence, lacunarity: fractal noise parameters (:func:`fractal_noise_3d`).
        edge_softness: width of the partial-volume rim, in units of the score's standard deviation.
        min_weight: lesion weight at the very edge of the mask (the rim ramps from it to 1).
        ggo_hu, consolidation_hu: HU of the lesion types where they are fully developed.
        ggo_opacity, consolidation_opacity: blend factor with the underlying tissue (1 = opaque;
            below 1 vessels show through).
        consolidation_fraction, crazy_paving_fraction: fraction of the lesion volume of each type
            (the rest is plain ground glass).
        crazy_paving_line_hu: HU added on the reticular (septal) lines of crazy paving.
        crazy_paving_cell_mm: size of the reticular cells.
        texture_hu: amplitude of the intralesional density texture.
        prefer_peripheral: weight placement towards the lung boundary and the posterior lung.
        peripheral_bias, peripheral_depth_mm: strength of the peripheral term, and the depth from
            the lung boundary over which it falls from 1 to 0.
        posterior_bias: strength of the posterior (dependent) term.
        posterior_axis, posterior_direction: the image axis pointing antero-posteriorly and the
            direction (-1: posterior at low indices, true for axis 1 of canonical RAS ``(x, y, z)``
            arrays and of model-grid ``(D, H, W)`` arrays; +1: posterior at high indices).
    """

    coverage: Range = (0.02, 0.25)
    blob_scale_mm: Range = (35.0, 80.0)
    octaves: int = 4
    persistence: float = 0.5
    lacunarity: float = 2.0
    edge_softness: float = 0.25
    min_weight: float = 0.15
    ggo_hu: Range = (-700.0, -300.0)
    consolidation_hu: Range = (-100.0, 50.0)
    ggo_opacity: Range = (0.65, 0.85)
    consolidation_opacity: Range = (0.92, 1.0)
    consolidation_fraction: Range = (0.0, 0.3)
    crazy_paving_fraction: Range = (0.0, 0.3)
    crazy_paving_line_hu: Range = (120.0, 260.0)
    crazy_paving_cell_mm: Range = (6.0, 12.0)
    texture_hu: float = 70.0
    prefer_peripheral: bool = True
    peripheral_bias: float = 0.8
    peripheral_depth_mm: float = 30.0
    posterior_bias: float = 0.35
    posterior_axis: int = 1
    posterior_direction: int = -1

    def __post_init__(self) -> None:
        _check_range("coverage", self.coverage, 0.0, 1.0)
        _check_range("blob_scale_mm", self.blob_scale_mm, 1e-3)
        _check_range("ggo_hu", self.ggo_hu)
        _check_range("consolidation_hu", self.consolidation_hu)
        _check_range("ggo_opacity", self.ggo_opacity, 1e-3, 1.0)
        _check_range("consolidation_opacity", self.consolidation_opacity, 1e-3, 1.0)
        _check_range("consolidation_fraction", self.consolidation_fraction, 0.0, 1.0)
        _check_range("crazy_paving_fraction", self.crazy_paving_fraction, 0.0, 1.0)
        _check_range("crazy_paving_line_hu", self.crazy_paving_line_hu)
        _check_range("crazy_paving_cell_mm", self.crazy_paving_cell_mm, 1e-3)
        if self.consolidation_fraction[1] + self.crazy_paving_fraction[1] > 1.0:
            raise ValueError("consolidation_fraction and crazy_paving_fraction may not add up to more than 1")
        if self.octaves < 1:
            raise ValueError(f"octaves must be >= 1, got {self.octaves}")
        if not 0.0 < self.min_weight <= 1.0:
            raise ValueError(f"min_weight must be in (0, 1], got {self.min_weight}")
        if self.edge_softness < 0:
            raise ValueError(f"edge_softness must be >= 0, got {self.edge_softness}")
        if self.posterior_axis not in (0, 1, 2) or self.posterior_direction not in (-1, 1):
            raise ValueError("posterior_axis must be 0, 1 or 2 and posterior_direction -1 or +1")
        if self.peripheral_depth_mm <= 0:
            raise ValueError(f"peripheral_depth_mm must be > 0, got {self.peripheral_depth_mm}")


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(r[0]) if r[0] == r[1] else float(rng.uniform(r[0], r[1]))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _quantile_threshold(values: np.ndarray, keep_fraction: float) -> float:
    """Threshold t such that ``values >= t`` holds for about ``keep_fraction`` of the values."""
    n = values.size
    k = int(round(keep_fraction * n))
    if k <= 0:
        return float("inf")
    if k >= n:
        return float("-inf")
    return float(np.partition(values, n - k)[n - k])


def _res_for(shape: Sequence[int], spacing: Sequence[float], period_mm: float) -> tuple[float, float, float]:
    """Noise periods per axis for a period of ``period_mm`` (at least one period per axis)."""
    return tuple(max(n * s / period_mm, 1.0) for n, s in zip(shape, spacing))  # type: ignore[return-value]


def lesion_score(
    shape: Sequence[int],
    lung: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    config: LesionConfig,
) -> np.ndarray:
    """Lesion score field (float32, ``shape``): fractal noise + peripheral + posterior terms."""
    scale = _uniform(rng, config.blob_scale_mm)
    score = fractal_noise_3d(shape, _res_for(shape, spacing, scale), octaves=config.octaves,
                             persistence=config.persistence, lacunarity=config.lacunarity, rng=rng)
    if not config.prefer_peripheral:
        return score
    if config.peripheral_bias:
        # box-filtered lung mask ~ 0.5 at the boundary, 1 deeper than peripheral_depth_mm
        size = [max(1, int(round(2 * config.peripheral_depth_mm / s)) | 1) for s in spacing]
        inner = ndi.uniform_filter(lung.astype(np.float32), size=size, mode="constant")
        periph = np.clip(2.0 * (1.0 - inner), 0.0, 1.0)
        score += np.float32(config.peripheral_bias) * periph
    if config.posterior_bias:
        ax = config.posterior_axis
        n = shape[ax]
        pos = np.linspace(0.0, 1.0, n, dtype=np.float32) if n > 1 else np.zeros(1, np.float32)
        if config.posterior_direction < 0:
            pos = pos[::-1]
        view = [1, 1, 1]
        view[ax] = n
        score += np.float32(config.posterior_bias) * pos.reshape(view)
    return score


def synthesize_lesions(
    image: np.ndarray,
    lung_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    config: LesionConfig = LesionConfig(),
    window: tuple[float, float] | None = None,
    spacing: Sequence[float] | None = None,
    coverage: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add synthetic COVID-19 lesions inside ``lung_mask``.

    Args:
        image: 3D CT, in HU when ``window`` is None, else scaled to [0, 1] by that HU window.
            Any axis order (tell ``config.posterior_axis`` where posterior is).
        lung_mask: bool array of the same shape; lesions never leave it.
        rng: random source (same state -> same output).
        config: lesion parameters.
        window: HU window ``(low, high)`` of a [0, 1] image; the output stays in [0, 1].
        spacing: voxel size in mm along the image axes (default 1 mm); sets the blob size.
        coverage: fraction of the lung to cover; drawn from ``config.coverage`` when None.

    Returns:
        ``(image_with_lesions, lesion_mask)``: same shape, dtype and scale as ``image``; the bool
        mask is exactly the voxels where lesion intensity was applied (a subset of ``lung_mask``).
    """
    image = np.asarray(image)
    lung = np.asarray(lung_mask, dtype=bool)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image.shape}")
    if lung.shape != image.shape:
        raise ValueError(f"lung_mask shape {lung.shape} does not match image shape {image.shape}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")
    if window is not None and not window[0] < window[1]:
        raise ValueError(f"window must be (low, high) with low < high, got {window}")
    if coverage is None:
        coverage = _uniform(rng, config.coverage)
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")

    out = image.copy()
    mask = np.zeros(image.shape, dtype=bool)
    if coverage == 0.0 or not lung.any():
        return out, mask

    # work inside the lung's bounding box only
    idx = [np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    lung_b = lung[box]
    shape = lung_b.shape
    if window is None:
        hu = image[box].astype(np.float32)
    else:
        lo, hi = float(window[0]), float(window[1])
        hu = image[box].astype(np.float32) * np.float32(hi - lo) + np.float32(lo)

    # 1-2: score field, thresholded at the quantile that gives the requested coverage
    score = lesion_score(shape, lung_b, spacing, rng, config)
    s_lung = score[lung_b]
    t = _quantile_threshold(s_lung, coverage)
    sel = s_lung >= t  # lesion voxels among the lung voxels
    if not sel.any():
        return out, mask
    sigma = float(s_lung.std()) or 1.0
    s_les = s_lung[sel]
    depth = (s_les - np.float32(t)) / np.float32(max(config.edge_softness * sigma, 1e-6))
    weight = config.min_weight + (1.0 - config.min_weight) * _smoothstep(depth)  # partial-volume rim
    core = _smoothstep((s_les - np.float32(t)) / np.float32(2.0 * sigma))  # 0 at the rim .. 1 deep inside

    base = hu[lung_b][sel]
    lung_hu = hu[lung_b]
    ref = float(np.median(lung_hu[:: max(1, lung_hu.size // 20000)]))  # parenchyma level

    # 3: lesion types from a slowly varying type field (consolidation favoured in lesion cores)
    coords = tuple(c[sel] for c in np.nonzero(lung_b))
    type_field = perlin_noise_3d(shape, _res_for(shape, spacing, _uniform(rng, (50.0, 100.0))), rng=rng)
    tf = type_field[coords] + 0.5 * core
    f_cons = _uniform(rng, config.consolidation_fraction)
    f_cp = _uniform(rng, config.crazy_paving_fraction)
    band = np.float32(0.08)
    w_cons = np.zeros(s_les.shape, np.float32)
    w_cp = np.zeros(s_les.shape, np.float32)
    if f_cons > 0:
        tc = _quantile_threshold(tf, f_cons)
        w_cons = _smoothstep((tf - np.float32(tc)) / band + 0.5)
    if f_cp > 0:
        tp = _quantile_threshold(-tf, f_cp)
        w_cp = _smoothstep((-tf - np.float32(tp)) / band + 0.5) * (1.0 - w_cons)

    texture = fractal_noise_3d(shape, _res_for(shape, spacing, 15.0), octaves=2, rng=rng)[coords]
    g_lo, g_hi = config.ggo_hu
    c_lo, c_hi = config.consolidation_hu
    g0 = _uniform(rng, (g_lo, g_lo + 0.6 * (g_hi - g_lo)))
    c0 = _uniform(rng, (c_lo, c_lo + 0.5 * (c_hi - c_lo)))
    e_ggo = np.clip(g0 + _uniform(rng, (0.0, 0.4)) * (g_hi - g_lo) * core + config.texture_hu * texture, g_lo, g_hi)
    e_cons = np.clip(c0 + 0.5 * (c_hi - c_lo) * core + 0.5 * config.texture_hu * texture, c_lo, c_hi)
    m_ggo = _uniform(rng, config.ggo_opacity)
    m_cons = _uniform(rng, config.consolidation_opacity)
    level = e_ggo * (1.0 - w_cons) + e_cons * w_cons  # HU where the lesion is fully developed
    opacity = m_ggo * (1.0 - w_cons) + m_cons * w_cons
    # convex blend with the underlying tissue, calibrated so parenchyma at `ref` becomes `level`
    change = level - (1.0 - opacity) * ref - opacity * base
    if f_cp > 0:
        cell = _uniform(rng, config.crazy_paving_cell_mm)
        cell_spacing = [max(cell, 2.0 * s) for s in spacing]
        res = tuple(max(n * s / c, 1.0) for n, s, c in zip(shape, spacing, cell_spacing))
        ridge = perlin_noise_3d(shape, res, rng=rng)[coords]
        lines = np.exp(-(ridge / np.float32(0.12)) ** 2)  # thin sheets where the noise crosses 0
        change += _uniform(rng, config.crazy_paving_line_hu) * lines * w_cp
    new = base + weight.astype(np.float32) * change.astype(np.float32)

    # write back
    lung_idx = np.flatnonzero(lung_b.ravel())[sel]
    hu_box = hu.ravel()
    hu_box[lung_idx] = new
    mask_box = np.zeros(shape, dtype=bool)
    mask_box.ravel()[lung_idx] = True
    hu = hu_box.reshape(shape)
    if window is None:
        res_img = hu
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            res_img = np.clip(np.rint(hu), info.min, info.max)
    else:
        res_img = np.clip((hu - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    out[box] = res_img.astype(image.dtype, copy=False)
    mask[box] = mask_box
    return out, mask
