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

The rule above is ``rule="paper"``. The default ``rule="refined"`` keeps the same difference map
but asks more of a voxel before calling it infection, because on real anatomy G's difference in
healthy lung has a heavy tail on vessels (99th percentile ~365 HU, median ~6 HU):

* **regional statistics**: the threshold depends on the voxel's own HU. For each HU band of the
  input (parenchyma, faint density, vessel-like density, ...) the healthy volumes' differences in
  that band give a high quantile (``q_strong``, default 99.9 %) and a lower one (``q_weak``, 99 %);
* **hysteresis**: voxels above the weak threshold are kept only when their 26-connected component
  holds a voxel above the strong one;
* **HU prior**: lesions are denser than aerated parenchyma and not denser than soft tissue:
  ``hu_range`` (-750 .. +100 HU) on the input;
* **thin bright structures**: vessels and airway walls are thinner than lesions. A voxel whose
  in-plane white top-hat (the image minus its grey opening with a disk of ``vessel_radius``
  voxels, scikit-image) exceeds ``vessel_contrast_hu`` sits on a structure narrower than the disk
  and is removed. (Hessian vesselness, scikit-image ``sato``, was tried first: its response
  inside noisy lesions and its calibration against healthy lungs were too fragile.)

``grid``: pseudo-masks may be written on a finer grid than the GAN's (e.g. 128 x 128 in-plane for a
GAN at 64 x 64): G runs on its own grid, its difference is mapped through the input's canonical
grid onto the finer one, and the images (and the healthy volumes, for synthetic-lesion supervision
of the segmenter) are preprocessed there directly.

Output folder (written atomically; see docs/INTERFACES.md): ``difference.npy`` (Nc, D, H, W)
float32, ``pseudo_masks.npy`` bool, ``images.npy`` float32 (the COVID inputs), ``lungs.npy`` bool,
``healthy.npy`` / ``healthy_lungs.npy`` (the healthy volumes on the same grid; may hold 0 volumes),
``severity.json``, ``severity_boxplot.png``, ``index.json``. Lesion masks are never read.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib import progress
from CovidGANSegLib.atomic import atomic_directory
from CovidGANSegLib.checkpoints import sha256_file
from CovidGANSegLib.components import components_touching
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.gan.inference import load_generator, preprocess_config_of, run_generator
from CovidGANSegLib.gan.training import difference_stats

log = logging.getLogger(__name__)

FORMAT = "covidganseg-pseudomasks"
FORMAT_VERSION = 2
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


#: HU bands of the input over which the refined rule gathers G's healthy-lung differences
REGION_EDGES_HU = (-900.0, -800.0, -700.0, -550.0, -400.0, -200.0)
RULES = ("paper", "refined")


@dataclass(frozen=True)
class RefinedRule:
    """Parameters of the ``refined`` pseudo-mask rule (module docstring).

    Attributes:
        q_strong, q_weak: quantiles of G's healthy-lung difference, per HU band, for the strong
            and weak hysteresis thresholds.
        floor: minimum threshold (window units), as in the paper rule.
        hu_range: HU prior: lesions lie in this range on the input.
        vessel_radius: radius (model-grid voxels) of the in-plane opening disk; 0 disables the
            suppression of thin bright structures.
        vessel_contrast_hu: top-hat contrast above which a voxel counts as a thin structure.
        min_size: connected components smaller than this (voxels) are removed.
    """

    q_strong: float = 0.999
    q_weak: float = 0.99
    floor: float = DEFAULT_FLOOR
    hu_range: tuple[float, float] = (-750.0, 100.0)
    vessel_radius: int = 1
    vessel_contrast_hu: float = 120.0
    min_size: int = DEFAULT_MIN_SIZE

    def __post_init__(self) -> None:
        if not 0.5 <= self.q_weak <= self.q_strong < 1.0:
            raise ValueError(f"need 0.5 <= q_weak <= q_strong < 1, got {self.q_weak}, {self.q_strong}")
        if not self.hu_range[0] < self.hu_range[1]:
            raise ValueError(f"hu_range must be (low, high) with low < high, got {self.hu_range}")
        if self.vessel_radius < 0 or self.vessel_contrast_hu <= 0:
            raise ValueError(f"vessel_radius must be >= 0 and vessel_contrast_hu > 0, got {self.vessel_radius}, {self.vessel_contrast_hu}")


def thin_structures(image: np.ndarray, radius: int, contrast: float) -> np.ndarray:
    """Voxels of a ``(D, H, W)`` [0, 1] image on bright in-plane structures narrower than a disk of ``radius``.

    White top-hat per slice: ``image - opening(image, disk(radius)) > contrast`` (window units).
    """
    from skimage.morphology import disk, white_tophat

    out = np.zeros(image.shape, dtype=bool)
    if radius <= 0:
        return out
    footprint = disk(int(radius))
    for k, sl in enumerate(np.asarray(image, dtype=np.float32)):
        if sl.any():
            out[k] = white_tophat(sl, footprint) > contrast
    return out


class RegionalThresholds:
    """Per-HU-band quantiles of G's difference in healthy lung (the refined rule's thresholds)."""

    def __init__(self, healthy_hu: np.ndarray, healthy_diff: np.ndarray, rule: RefinedRule) -> None:
        hu = np.asarray(healthy_hu, dtype=np.float32).ravel()
        diff = np.asarray(healthy_diff, dtype=np.float32).ravel()
        self.edges = np.asarray(REGION_EDGES_HU, dtype=np.float32)
        band = np.digitize(hu, self.edges)
        n_bands = len(self.edges) + 1
        overall = (np.quantile(diff, [rule.q_strong, rule.q_weak]) if diff.size else np.zeros(2)).astype(np.float64)
        self.strong = np.empty(n_bands)
        self.weak = np.empty(n_bands)
        self.count = np.bincount(band, minlength=n_bands)
        for b in range(n_bands):
            v = diff[band == b]
            # too few healthy voxels in a band: the overall quantiles
            qs, qw = np.quantile(v, [rule.q_strong, rule.q_weak]) if v.size >= 200 else overall
            self.strong[b] = max(rule.floor, float(qs))
            self.weak[b] = max(0.5 * rule.floor, min(float(qw), self.strong[b]))

    def maps(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Strong and weak threshold maps (window units) for an HU array."""
        band = np.digitize(hu, self.edges)
        return self.strong[band].astype(np.float32), self.weak[band].astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"edges_hu": self.edges.tolist(), "strong": self.strong.tolist(), "weak": self.weak.tolist(),
                "healthy_voxels": self.count.tolist()}


def refined_masks(images: np.ndarray, difference: np.ndarray, lungs: np.ndarray, window: tuple[float, float],
                  thresholds: RegionalThresholds, rule: RefinedRule) -> np.ndarray:
    """Pseudo-masks ``(N, D, H, W)`` by the refined rule (module docstring)."""
    lo, hi = window
    masks = np.zeros(images.shape, dtype=bool)
    for i in range(len(images)):
        hu = images[i] * np.float32(hi - lo) + np.float32(lo)
        strong, weak = thresholds.maps(hu)
        candidate = lungs[i] & (hu >= rule.hu_range[0]) & (hu <= rule.hu_range[1])
        candidate &= ~thin_structures(images[i], rule.vessel_radius, rule.vessel_contrast_hu / (hi - lo))
        weak_mask = candidate & (difference[i] > weak)
        masks[i] = remove_small_components(components_touching(weak_mask & (difference[i] > strong), weak_mask), rule.min_size)
    return masks


def regrid(model: np.ndarray, source: Any, target: Any) -> np.ndarray:
    """Map a ``(D, H, W)`` array from one model grid to another of the same CT (through the canonical grid)."""
    canonical = source.to_canonical(np.asarray(model, dtype=np.float32), order=1)
    return target.crop_to_model(canonical[target.crop_slices], order=1)


def make_pseudo_masks(checkpoint: str | Path, data: str | Path, out: str | Path, *, device: str = "auto", threshold: float | None = None,
                      k: float = DEFAULT_K, floor: float = DEFAULT_FLOOR, min_size: int = DEFAULT_MIN_SIZE, overwrite: bool = False,
                      cache: str | Path | None = None, batch: int = 1, rule: str = "refined", refined: RefinedRule | None = None,
                      grid: tuple[int, int, int] | None = None) -> Path:
    """Difference maps, pseudo-masks and severity groups of every COVID volume of DATA.

    Args:
        checkpoint: the GAN (``model.pt``).
        data: raw dataset folder or preprocessed folder (preprocessed with the checkpoint's own
            PreprocessConfig; a preprocessed folder made with another one is refused).
        out: output folder (written atomically).
        device: ``auto``, ``cpu`` or ``cuda``.
        threshold: fixed binarisation threshold in window units (``paper`` rule only); default:
            the rule in the module docstring.
        k, floor, min_size: parameters of the ``paper`` rule.
        overwrite: replace an existing non-empty ``out``.
        cache: where to keep the preprocessed data of a raw DATA folder (default: a temporary
            folder, removed afterwards).
        batch: volumes per forward pass.
        rule: ``refined`` (default) or ``paper`` (module docstring).
        refined: parameters of the refined rule.
        grid: output grid ``(x, y, z)`` (default: the GAN's); needs the raw data (a preprocessed
            DATA folder is followed to the raw data it was made from).

    Returns:
        ``out``.
    """
    import dataclasses

    from CovidGANSegLib.preprocessing import GridMapping, ensure_preprocessed

    checkpoint, data, out = Path(checkpoint), Path(data), Path(out)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if threshold is not None and not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if k < 0 or floor < 0 or min_size < 0:
        raise ValueError("k, floor and min_size must be >= 0")
    refined = refined or RefinedRule(floor=floor, min_size=min_size)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty (choose another or use --overwrite)")
    progress.report(0.0, "loading model")
    generator, payload = load_generator(checkpoint, device)
    pp = preprocess_config_of(payload)
    pp_out = pp if grid is None else dataclasses.replace(pp, grid=tuple(int(g) for g in grid))
    with tempfile.TemporaryDirectory(prefix="covidganseg-pre-") as tmp_cache:
        progress.report(0.02, "preparing data")
        ds = ensure_preprocessed(data, Path(cache) if cache is not None else Path(tmp_cache) / "preprocessed", pp)
        ds_out = ds
        if pp_out != pp:
            raw = data
            if (data / "index.json").is_file():  # a preprocessed folder: go back to its raw data
                raw = Path(json.loads((data / "index.json").read_text()).get("source", ""))
                if not raw.is_dir():
                    raise InputError(f"--grid needs the raw data, and the preprocessed folder's source {raw} is not there", data)
            out_cache = (Path(cache).parent / f"{Path(cache).name}-{'x'.join(map(str, pp_out.grid))}" if cache is not None
                         else Path(tmp_cache) / "preprocessed-out")
            ds_out = ensure_preprocessed(raw, out_cache, pp_out)
    ds_config = getattr(ds, "config", pp)
    if ds_config != pp:
        raise InputError(f"preprocessed with another configuration ({ds_config}) than the GAN was trained with ({pp}); "
                         "pass the raw dataset or preprocess it with the checkpoint's configuration", data)
    if len(ds.covid) == 0:
        raise InputError("no COVID (CT-1..CT-4) volumes to make pseudo-masks for", data)

    def on_out_grid(subset: str, diff: np.ndarray) -> np.ndarray:
        """The GAN-grid differences of one subset on the output grid (same record order)."""
        if ds_out is ds:
            return diff
        src = {r["id"]: GridMapping.from_dict(r["mapping"]) for r in ds.records_of(subset)}
        res = np.empty(getattr(ds_out, subset).shape, dtype=np.float32)
        for r in ds_out.records_of(subset):
            i_src = next(x["index"] for x in ds.records_of(subset) if x["id"] == r["id"])
            res[r["index"]] = regrid(diff[i_src], src[r["id"]], GridMapping.from_dict(r["mapping"]))
        return res

    # G's noise level in lesion-free lung (healthy volumes through the same G)
    diff_h = None
    if len(ds.healthy):
        progress.report(0.05, f"calibrating on {len(ds.healthy)} healthy volumes")
        gen_h = run_generator(generator, ds.healthy, ds.healthy_lungs, batch=batch)
        diff_h = ds.healthy - gen_h
        stats = difference_stats(diff_h[ds.healthy_lungs.astype(bool)])
        stats_source = f"{len(ds.healthy)} healthy volumes of {data}"
        del gen_h
    else:
        stats = payload.get("metadata", {}).get("healthy_difference")
        stats_source = "the checkpoint (training healthy volumes)" if stats else "none (floor only)"
        if not stats:
            log.warning("no healthy volumes in %s and no calibration in the checkpoint: pseudo-mask threshold = floor %.3g", data, floor)
    if rule == "refined" and diff_h is None:
        log.warning("no healthy volumes in %s: the refined rule needs them; falling back on the paper rule", data)
        rule = "paper"

    # eq. 3 for every COVID volume
    n = len(ds.covid)
    difference = np.empty(ds.covid.shape, dtype=np.float32)
    for s in progress.track(range(0, n, batch), total=(n + batch - 1) // batch, desc="difference maps", start=0.1, end=0.7):
        gen = run_generator(generator, ds.covid[s:s + batch], ds.covid_lungs[s:s + batch], batch=batch)
        difference[s:s + batch] = ds.covid[s:s + batch] - gen  # (B, D, H, W), eq. 3
    difference = on_out_grid("covid", difference)
    images = np.ascontiguousarray(ds_out.covid, dtype=np.float32)
    lungs = ds_out.covid_lungs.astype(bool)
    progress.report(0.75, "binarising pseudo-masks")
    window = pp.hu_window
    if rule == "paper":
        if threshold is not None:
            t, rule_text = float(threshold), "fixed threshold (given)"
        else:
            t = threshold_from_stats(stats, k=k, floor=floor)
            rule_text = f"max(floor={floor:g}, median_h + k * sigma_h) with k={k:g} (robust statistics of G's difference in healthy lung)"
        log.info("pseudo-mask threshold %.4f window units (%.0f HU): %s", t, t * (window[1] - window[0]), rule_text)
        masks = binarise(difference, lungs, t, min_size=min_size)
        threshold_meta: dict[str, Any] = {"value": t, "value_hu": t * (window[1] - window[0]), "rule": rule_text, "k": k, "floor": floor,
                                          "min_size": min_size}
    else:
        healthy_out, healthy_lungs_out = ds_out.healthy, ds_out.healthy_lungs.astype(bool)
        diff_h_out = on_out_grid("healthy", diff_h)
        hu_h = healthy_out * np.float32(window[1] - window[0]) + np.float32(window[0])
        regional = RegionalThresholds(hu_h[healthy_lungs_out], diff_h_out[healthy_lungs_out], refined)
        masks = refined_masks(images, difference, lungs, window, regional, refined)
        rule_text = ("refined: per-HU-band quantiles of G's healthy-lung difference with hysteresis, HU prior, "
                     "suppression of thin bright structures (gan/pseudomasks.py)")
        threshold_meta = {"rule": rule_text, "parameters": dataclasses.asdict(refined), "regional": regional.to_dict()}
        log.info("refined pseudo-mask rule: strong thresholds per HU band %s HU",
                 [round(v * (window[1] - window[0])) for v in regional.strong])
    threshold_meta.update(healthy_difference=stats, healthy_difference_source=stats_source)
    sev = severity(difference, lungs)

    records = _covid_records(ds_out)
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "gan_config": payload.get("config", {}).get("name"),
        "preprocess": pp_out.to_dict(),
        "gan_preprocess": pp.to_dict(),
        "data": str(data),
        "shape": list(images.shape),
        "n_healthy": int(len(ds_out.healthy)),
        "difference_units": f"window units: HU / {window[1] - window[0]:g} (window {list(window)})",
        "rule": rule,
        "threshold": threshold_meta,
        "mask_fraction_of_lung": float(masks.sum() / max(1, lungs.sum())),
        "records": records,
        "files": {"difference": "difference.npy", "pseudo_masks": "pseudo_masks.npy", "images": "images.npy", "lungs": "lungs.npy",
                  "healthy": "healthy.npy", "healthy_lungs": "healthy_lungs.npy", "severity": "severity.json",
                  "boxplot": "severity_boxplot.png"},
    }
    progress.report(0.9, "writing")
    from CovidGANSegLib.gan.figures import save_severity_boxplot

    with atomic_directory(out, overwrite=overwrite) as tmp:
        np.save(tmp / "difference.npy", difference)
        np.save(tmp / "pseudo_masks.npy", masks)
        np.save(tmp / "images.npy", images)
        np.save(tmp / "lungs.npy", lungs)
        np.save(tmp / "healthy.npy", np.ascontiguousarray(ds_out.healthy, dtype=np.float32))
        np.save(tmp / "healthy_lungs.npy", ds_out.healthy_lungs.astype(bool))
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
