"""Pseudo-masks and infection-severity groups (paper eq. 3 and section 4.3).

For every COVID training volume on the model grid:

* difference map ``M = I_C - G(I_C)`` (eq. 3), window units ([0, 1] = the HU window's width);
* binarised pseudo-mask, inside the lung mask, with the rule::

      threshold = max(floor, median_h + k * sigma_h)          (unless --threshold is given)
      mask      = (M > threshold) & lung, minus connected components (26-connectivity)
                  smaller than min_size voxels

  where ``median_h`` and ``sigma_h = 1.4826 * MAD`` are robust statistics of M in the (lesion-free)
  lungs of the *healthy* volumes of DATA passed through the same G: G's own noise level. When DATA
  has no healthy volume, the statistics recorded at the end of training (``model.pt`` metadata)
  are used. Defaults ``floor = 0.05`` (70 HU with the paper's 1400 HU window: well below the
  contrast of ground glass over parenchyma, ~150-550 HU) and ``k = 5`` are fixed a priori, not
  tuned on phantoms.
* severity (section 4.3): the sum of each slice's difference map inside the lung (positive part:
  negative differences mean G added density, not infection), over the slices that contain lung;
  their quartiles; the ``high`` group (sum > Q3) and the ``low`` group (Q1 <= sum <= median) as
  ``[volume_index, slice_index]`` pairs -- the positive / negative sets of the contrastive loss.

Output folder (written atomically; see docs/INTERFACES.md): ``difference.npy`` (Nc, D, H, W)
float32, ``pseudo_masks.npy`` bool, ``images.npy`` float32 (the COVID inputs), ``lungs.npy`` bool,
``severity.json``, ``severity_boxplot.png``, ``index.json``. Lesion masks are never read.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib import progress
from CovidGANSegLib.atomic import atomic_directory
from CovidGANSegLib.checkpoints import sha256_file
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.gan.inference import load_generator, preprocess_config_of, run_generator
from CovidGANSegLib.gan.training import difference_stats

log = logging.getLogger(__name__)

FORMAT = "covidganseg-pseudomasks"
FORMAT_VERSION = 1
DEFAULT_FLOOR = 0.05
DEFAULT_K = 5.0
DEFAULT_MIN_SIZE = 5


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 26-connected components of a 3D bool mask smaller than ``min_size`` voxels."""
    if min_size <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def binarise(difference: np.ndarray, lungs: np.ndarray, threshold: float, *, min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Pseudo-masks ``(N, D, H, W)``: difference above ``threshold`` inside the lungs, small components removed."""
    masks = (difference > threshold) & lungs.astype(bool)
    for i in range(len(masks)):
        masks[i] = remove_small_components(masks[i], min_size)
    return masks


def threshold_from_stats(stats: dict[str, float] | None, *, k: float = DEFAULT_K, floor: float = DEFAULT_FLOOR) -> float:
    """``max(floor, median + k * sigma)`` of G's difference in healthy lung (``floor`` alone without stats)."""
    if not stats or not stats.get("count"):
        return float(floor)
    return float(max(floor, stats["median"] + k * stats["sigma"]))


def severity(difference: np.ndarray, lungs: np.ndarray) -> dict[str, Any]:
    """Per-slice sums of the (positive) difference in the lungs, quartiles and the high / low groups.

    Slices (axis 1 of ``(N, D, H, W)``) without lung are excluded from the quartiles and groups.
    """
    lungs = lungs.astype(bool)
    pos = np.where(lungs, np.maximum(difference, 0.0), 0.0)
    sums = pos.sum(axis=(2, 3), dtype=np.float64)  # (N, D)
    valid = lungs.any(axis=(2, 3))  # (N, D)
    values = sums[valid]
    if values.size == 0:
        raise InputError("no COVID slice contains lung: cannot compute severity groups")
    q1, med, q3 = (float(q) for q in np.percentile(values, [25, 50, 75]))
    high = np.argwhere(valid & (sums > q3))
    low = np.argwhere(valid & (sums >= q1) & (sums <= med))
    return {
        "units": "sum over a slice's lung voxels of max(difference, 0), difference in window units (HU / window width)",
        "per_slice_sums": [[round(float(v), 6) for v in row] for row in sums],
        "slice_has_lung": valid.tolist(),
        "quartiles": {"min": float(values.min()), "q1": q1, "median": med, "q3": q3, "max": float(values.max()), "n_slices": int(values.size)},
        "high": high.tolist(),
        "low": low.tolist(),
        "rule": "high: sum > Q3; low: Q1 <= sum <= median (paper section 4.3); slices without lung excluded",
    }


def make_pseudo_masks(checkpoint: str | Path, data: str | Path, out: str | Path, *, device: str = "auto", threshold: float | None = None,
                      k: float = DEFAULT_K, floor: float = DEFAULT_FLOOR, min_size: int = DEFAULT_MIN_SIZE, overwrite: bool = False,
                      cache: str | Path | None = None, batch: int = 1) -> Path:
    """Difference maps, pseudo-masks and severity groups of every COVID volume of DATA.

    Args:
        checkpoint: the GAN (``model.pt``).
        data: raw dataset folder or preprocessed folder (preprocessed with the checkpoint's own
            PreprocessConfig; a preprocessed folder made with another one is refused).
        out: output folder (written atomically).
        device: ``auto``, ``cpu`` or ``cuda``.
        threshold: fixed binarisation threshold in window units; default: the rule in the module
            docstring.
        k, floor, min_size: parameters of that rule.
        overwrite: replace an existing non-empty ``out``.
        cache: where to keep the preprocessed data of a raw DATA folder (default: a temporary
            folder, removed afterwards).
        batch: volumes per forward pass.

    Returns:
        ``out``.
    """
    from CovidGANSegLib.preprocessing import ensure_preprocessed

    checkpoint, data, out = Path(checkpoint), Path(data), Path(out)
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if k < 0 or floor < 0 or min_size < 0:
        raise ValueError("k, floor and min_size must be >= 0")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty (choose another or use --overwrite)")
    progress.report(0.0, "loading model")
    generator, payload = load_generator(checkpoint, device)
    pp = preprocess_config_of(payload)
    with tempfile.TemporaryDirectory(prefix="covidganseg-pre-") as tmp_cache:
        progress.report(0.02, "preparing data")
        ds = ensure_preprocessed(data, Path(cache) if cache is not None else Path(tmp_cache) / "preprocessed", pp)
    ds_config = getattr(ds, "config", pp)
    if ds_config != pp:
        raise InputError(f"preprocessed with another configuration ({ds_config}) than the GAN was trained with ({pp}); "
                         "pass the raw dataset or preprocess it with the checkpoint's configuration", data)
    if len(ds.covid) == 0:
        raise InputError("no COVID (CT-1..CT-4) volumes to make pseudo-masks for", data)

    # G's noise level in lesion-free lung (healthy volumes through the same G)
    if len(ds.healthy):
        progress.report(0.05, f"calibrating on {len(ds.healthy)} healthy volumes")
        gen_h = run_generator(generator, ds.healthy, ds.healthy_lungs, batch=batch)
        lung_h = ds.healthy_lungs.astype(bool)
        stats = difference_stats((ds.healthy - gen_h)[lung_h])
        stats_source = f"{len(ds.healthy)} healthy volumes of {data}"
        del gen_h
    else:
        stats = payload.get("metadata", {}).get("healthy_difference")
        stats_source = "the checkpoint (training healthy volumes)" if stats else "none (floor only)"
        if not stats:
            log.warning("no healthy volumes in %s and no calibration in the checkpoint: pseudo-mask threshold = floor %.3g", data, floor)
    if threshold is not None:
        t, rule = float(threshold), "fixed threshold (given)"
    else:
        t = threshold_from_stats(stats, k=k, floor=floor)
        rule = f"max(floor={floor:g}, median_h + k * sigma_h) with k={k:g} (robust statistics of G's difference in healthy lung)"
    log.info("pseudo-mask threshold %.4f window units (%.0f HU): %s", t, t * (pp.hu_window[1] - pp.hu_window[0]), rule)

    # eq. 3 for every COVID volume
    n = len(ds.covid)
    difference = np.empty(ds.covid.shape, dtype=np.float32)
    for s in progress.track(range(0, n, batch), total=(n + batch - 1) // batch, desc="difference maps", start=0.1, end=0.8):
        gen = run_generator(generator, ds.covid[s:s + batch], ds.covid_lungs[s:s + batch], batch=batch)
        difference[s:s + batch] = ds.covid[s:s + batch] - gen  # (B, D, H, W), eq. 3
    lungs = ds.covid_lungs.astype(bool)
    progress.report(0.85, "binarising pseudo-masks")
    masks = binarise(difference, lungs, t, min_size=min_size)
    sev = severity(difference, lungs)

    records = _covid_records(ds)
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "gan_config": payload.get("config", {}).get("name"),
        "preprocess": pp.to_dict(),
        "data": str(data),
        "shape": list(ds.covid.shape),
        "difference_units": f"window units: HU / {pp.hu_window[1] - pp.hu_window[0]:g} (window {list(pp.hu_window)})",
        "threshold": {"value": t, "value_hu": t * (pp.hu_window[1] - pp.hu_window[0]), "rule": rule, "k": k, "floor": floor,
                      "min_size": min_size, "healthy_difference": stats, "healthy_difference_source": stats_source},
        "mask_fraction_of_lung": float(masks.sum() / max(1, lungs.sum())),
        "records": records,
        "files": {"difference": "difference.npy", "pseudo_masks": "pseudo_masks.npy", "images": "images.npy", "lungs": "lungs.npy",
                  "severity": "severity.json", "boxplot": "severity_boxplot.png"},
    }
    progress.report(0.9, "writing")
    from CovidGANSegLib.gan.figures import save_severity_boxplot

    with atomic_directory(out, overwrite=overwrite) as tmp:
        np.save(tmp / "difference.npy", difference)
        np.save(tmp / "pseudo_masks.npy", masks)
        np.save(tmp / "images.npy", np.ascontiguousarray(ds.covid, dtype=np.float32))
        np.save(tmp / "lungs.npy", lungs)
        (tmp / "severity.json").write_text(json.dumps(sev) + "\n")
        sums = np.array(sev["per_slice_sums"], dtype=float)[np.array(sev["slice_has_lung"], dtype=bool)]
        save_severity_boxplot(sums, sev["quartiles"], tmp / "severity_boxplot.png")
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    progress.report(1.0, "pseudo-masks done")
    log.info("wrote pseudo-masks of %d volumes to %s (%.1f %% of lung voxels marked)", n, out, 100 * index["mask_fraction_of_lung"])
    return out


def _covid_records(ds) -> list[dict[str, Any]]:
    """The preprocessed dataset's records of its COVID volumes, in the order of ``ds.covid``."""
    return [{k: r[k] for k in ("id", "category", "index", "path", "mapping", "original_shape", "original_affine") if k in r}
            for r in ds.records_of("covid")]
