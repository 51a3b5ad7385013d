"""Synthetic-lesion supervision: exactly labelled training pairs from healthy volumes (numpy only).

A healthy volume plus lesions drawn by the *training* lesion model (:mod:`CovidGANSegLib.synth.lesions`,
thresholded fractal Perlin blobs filled with ground glass, consolidation and crazy paving) is a
free, exactly labelled training pair (Yao et al., "Label-free segmentation of COVID-19 lesions in
lung CT", IEEE TMI 2021). The segmenter learns from these pairs that vessels, airway walls and
dependent density -- present, unlabelled, in every healthy volume -- are normal, which is where HU
thresholds and raw GAN differences fail. No real or phantom lesion mask is read: the labels are the
synthesiser's own.

The involvement of each synthetic volume is drawn log-uniformly (MosMed-like: most cases mild), so
that small lesions of a few mL are well represented, up to severe cases. By default the lesions are
placed without the synthesiser's peripheral / posterior preference: with it, a model trained on
phantoms learnt "dense and posterior" and marked the dependent, vessel-rich lower lobes of real
normal CTs; without it, it has to learn what a lesion looks like, not where it tends to be.

The model grid has thick slices (8 mm by default), and a thick-slice CT records the mean of each
slab: a lesion that fills part of a slab shows as a fainter, partial-volume opacity. By default the
lesions are therefore drawn on 2 mm sub-slices and averaged over each slab (:func:`slab_lesions`),
labelled where they fill at least half of it, instead of being sampled once per slice with the full
density of a lesion's centre ("Sub-slice lesions" in docs/ablation.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from CovidGANSegLib.synth.lesions import LesionConfig, synthesize_lesions


@dataclass(frozen=True)
class SyntheticSupervision:
    """Synthetic-lesion supervision of the segmenter: how many pairs, how much lung, how often.

    Attributes:
        fraction: share of each end-to-end training batch drawn from synthetic pairs (the rest
            from the GAN's pseudo-masks of COVID volumes); 0 disables the synthetic pairs.
        variants_per_volume: synthetic copies of each training healthy volume (each with other lesions).
        validation_variants: synthetic copies of each validation healthy volume (they choose the
            checkpoint and the probability threshold), at most ``variants_per_volume``: more training
            copies leave the validation's cost as it is.
        coverage: involvement range (fraction of lung), drawn log-uniformly per copy.
        blob_scale_mm: size range of the noise blobs (smaller -> more, smaller foci).
        location_prior: keep the synthesiser's peripheral / posterior preference.
        sub_slice_mm: lesions drawn on sub-slices at most this thick and averaged over each
            model-grid slice's slab (:func:`slab_lesions`), as a thick-slice CT records them; 0:
            drawn on the model grid itself.
        slab_label_fraction: with sub-slices, a voxel is labelled lesion when lesions fill at
            least this share of its slab.
    """

    fraction: float = 1.0
    variants_per_volume: int = 4
    validation_variants: int = 4
    coverage: tuple[float, float] = (0.002, 0.8)
    blob_scale_mm: tuple[float, float] = (25.0, 70.0)
    location_prior: bool = False
    sub_slice_mm: float = 2.0
    slab_label_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.variants_per_volume < 0:
            raise ValueError(f"variants_per_volume must be >= 0, got {self.variants_per_volume}")
        if self.validation_variants < 1:
            raise ValueError(f"validation_variants must be >= 1, got {self.validation_variants}")
        lo, hi = self.coverage
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"coverage must satisfy 0 < low <= high < 1, got {self.coverage}")
        if not (self.sub_slice_mm >= 0 and np.isfinite(self.sub_slice_mm)):
            raise ValueError(f"sub_slice_mm must be a finite value >= 0 (0: no sub-slices), got {self.sub_slice_mm}")
        if not 0.0 < self.slab_label_fraction <= 1.0:
            raise ValueError(f"slab_label_fraction must be in (0, 1], got {self.slab_label_fraction}")

    def for_validation(self) -> SyntheticSupervision:
        """The same supervision with the validation volumes' number of copies."""
        return dataclasses.replace(self, variants_per_volume=min(self.variants_per_volume, self.validation_variants))


def synthetic_pairs(healthy: np.ndarray, lungs: np.ndarray, *, window: tuple[float, float],
                    spacing_dhw: tuple[float, float, float], plan: SyntheticSupervision = SyntheticSupervision(),
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Healthy model-grid volumes with synthetic lesions, and their exact masks.

    Args:
        healthy: ``(N, D, H, W)`` float32 in [0, 1] (HU scaled by ``window``).
        lungs: ``(N, D, H, W)`` bool lung masks.
        window: the HU window of the [0, 1] scaling.
        spacing_dhw: model-grid voxel size in mm along ``(D, H, W)`` (sets the lesion size).
        plan: how many copies and how much involvement.
        seed: random seed (same seed, same pairs).

    Returns:
        ``(images, masks, lungs, source)``: ``(N * variants, D, H, W)`` float32 / bool / bool and
        the index of the healthy volume each copy comes from.
    """
    healthy = np.asarray(healthy, dtype=np.float32)
    lungs = np.asarray(lungs).astype(bool, copy=False)
    if healthy.ndim != 4 or lungs.shape != healthy.shape:
        raise ValueError(f"healthy {healthy.shape} and lungs {lungs.shape} must be equal (N, D, H, W)")
    n, k = healthy.shape[0], plan.variants_per_volume
    images = np.empty((n * k, *healthy.shape[1:]), dtype=np.float32)
    masks = np.zeros((n * k, *healthy.shape[1:]), dtype=bool)
    out_lungs = np.empty((n * k, *healthy.shape[1:]), dtype=bool)
    source = np.repeat(np.arange(n), k)
    rng = np.random.default_rng([int(seed), 0x5EED])
    lo, hi = np.log(plan.coverage[0]), np.log(plan.coverage[1])
    config = LesionConfig(blob_scale_mm=plan.blob_scale_mm, consolidation_fraction=(0.0, 0.25), crazy_paving_fraction=(0.0, 0.2),
                          prefer_peripheral=plan.location_prior)
    samples = max(1, math.ceil(spacing_dhw[0] / plan.sub_slice_mm - 1e-6)) if plan.sub_slice_mm > 0 else 1
    for row, v in enumerate(source):
        coverage = float(np.exp(rng.uniform(lo, hi)))
        if samples > 1:
            img, mask = slab_lesions(healthy[v], lungs[v], rng, config=config, window=window, spacing_dhw=spacing_dhw,
                                     coverage=coverage, samples=samples, label_fraction=plan.slab_label_fraction)
        else:
            img, mask = synthesize_lesions(healthy[v], lungs[v], rng, config=config, window=window,
                                           spacing=spacing_dhw, coverage=coverage)
        images[row], masks[row], out_lungs[row] = img, mask, lungs[v]
    return images, masks, out_lungs, source


def slab_lesions(healthy: np.ndarray, lung: np.ndarray, rng: np.random.Generator, *, config: LesionConfig,
                 window: tuple[float, float], spacing_dhw: tuple[float, float, float], coverage: float,
                 samples: int, label_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Lesions as a thick-slice CT records them: drawn on ``samples`` sub-slices per slice, averaged.

    A slice of a CT is (about) the mean of its slab, so a lesion that fills part of a slab shows
    as a fainter, partial-volume opacity. The lesions are drawn on a grid ``samples`` times finer
    along the slice axis (each slice's healthy values repeated, so the anatomy stays the slab's),
    their change of the image is averaged over each slab, and the label is the voxels whose slab
    they fill at least ``label_fraction`` of.

    Args:
        healthy: ``(D, H, W)`` model-grid volume in [0, 1] (HU scaled by ``window``).
        lung: ``(D, H, W)`` bool lung mask.
        spacing_dhw: the model grid's voxel size in mm ``(D, H, W)``.

    Returns:
        ``(image, mask)``: ``(D, H, W)`` float32 and bool.
    """
    healthy = np.asarray(healthy, dtype=np.float32)
    lung = np.asarray(lung, dtype=bool)
    d, h, w = healthy.shape
    fine = np.repeat(healthy, samples, axis=0)  # (D * samples, H, W)
    fine_lung = np.repeat(lung, samples, axis=0)
    fine_spacing = (spacing_dhw[0] / samples, spacing_dhw[1], spacing_dhw[2])
    drawn, fine_mask = synthesize_lesions(fine, fine_lung, rng, config=config, window=window, spacing=fine_spacing,
                                          coverage=coverage)
    change = (drawn - fine).reshape(d, samples, h, w).mean(axis=1)  # (D, H, W): the slab's mean change
    filled = fine_mask.reshape(d, samples, h, w).mean(axis=1)  # share of each slab the lesions fill
    image = np.clip(healthy + change, 0.0, 1.0)
    return image, (filled >= label_fraction) & lung
