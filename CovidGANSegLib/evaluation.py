"""Evaluation of lesion segmentations against reference masks: tables, JSON and box plots.

numpy / scipy / nibabel / matplotlib only (no torch). Two entry points:

* ``evaluate_paths(pred, truth, out)``: files, or folders matched by study id
  (``study_0001.nii.gz`` / ``study_0001_lesion.nii.gz`` vs ``study_0001_mask.nii.gz``); each pair
  must share the voxel grid (shape and affine) or an ``InputError`` names both files.
* ``evaluate_methods({"transunet": [...], "unet": [...], "hu_threshold": [...]}, truths, spacings)``
  for in-memory arrays of several methods (the demo).

Both compute, per method: per-volume standard metrics over all voxels (``metrics.volume_metrics``),
the same per axial slice, and - separately labelled, for comparison with the predecessor only -
its slice protocol (needs lung masks). Summaries give mean, sample std and n per metric:
per volume over all cases; per slice over the slices whose reference contains lesion (slices
with an empty reference are counted separately as false-positive slices when the method marks
anything there). JSON values are fractions (0..1), mL and mm; the Markdown table gives percent
like the paper's Table 1. NaN (undefined, see ``metrics``) values are left out of means.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from CovidGANSegLib import comparison, metrics, progress
from CovidGANSegLib.atomic import atomic_files, atomic_path
from CovidGANSegLib.errors import InputError

log = logging.getLogger(__name__)

VOLUME_METRICS = ("dice", "sensitivity", "specificity", "precision", "abs_volume_diff_ml", "hd95_mm")
SLICE_METRICS = ("dice", "sensitivity", "specificity", "precision", "hd95_mm")
PREDECESSOR_METRICS = ("dice", "sensitivity", "specificity", "precision")
PERCENT_METRICS = ("dice", "sensitivity", "specificity", "precision")
LABELS = {"dice": "Dice", "sensitivity": "Sensitivity", "specificity": "Specificity", "precision": "Precision",
          "abs_volume_diff_ml": "Abs. volume difference (mL)", "hd95_mm": "HD95 (mm)"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ID_SUFFIX = re.compile(r"(_mask|_masks|_lesions?|_seg|_segmentation|_pred|_prediction|_probability|_prob|_lungs?|_label|_labels|_gt|_truth)$", re.I)


# --------------------------------------------------------------------------------------------
# files


def study_id(path: str | Path) -> str:
    """Study id of a NIfTI file name: the name without extension and role suffix (``_mask``, ...)."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    while True:
        stripped = _ID_SUFFIX.sub("", name)
        if stripped == name or not stripped:
            return name
        name = stripped


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))


def _index(folder: Path, role: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in _nifti_files(folder):
        sid = study_id(p)
        if sid in files:
            raise InputError(f"two {role} files for study {sid!r}: {files[sid].name} and {p.name}", folder)
        files[sid] = p
    if not files:
        raise InputError(f"no NIfTI {role} files (*.nii, *.nii.gz) in this folder", folder)
    return files


def match_studies(pred: str | Path, truth: str | Path, lungs: str | Path | None = None) -> list[tuple[str, Path, Path, Path | None]]:
    """``(id, prediction, truth, lungs or None)`` for two files or two folders matched by study id."""
    pred, truth = Path(pred), Path(truth)
    lungs = None if lungs is None else Path(lungs)
    for p, role in ((pred, "prediction"), (truth, "reference")) + (((lungs, "lung mask"),) if lungs is not None else ()):
        if not p.exists():
            raise InputError(f"{role} path not found", p)
    if pred.is_file() and truth.is_file():
        if lungs is not None and not lungs.is_file():
            raise InputError("with single files, --lungs must be a file too", lungs)
        return [(study_id(truth), pred, truth, lungs)]
    if not (pred.is_dir() and truth.is_dir()):
        raise InputError("give two files or two folders (prediction and reference)", pred if not pred.is_dir() else truth)
    preds, truths = _index(pred, "prediction"), _index(truth, "reference")
    lung_files = _index(lungs, "lung mask") if lungs is not None else {}
    common = sorted(set(preds) & set(truths))
    if not common:
        raise InputError(f"no study ids in common between the predictions ({sorted(preds)[:3]}...) and the references "
                         f"({sorted(truths)[:3]}...)", pred)
    for sid in sorted(set(truths) - set(preds)):
        log.warning("no prediction for reference study %s: skipped", sid)
    for sid in sorted(set(preds) - set(truths)):
        log.info("no reference for predicted study %s: skipped", sid)
    return [(sid, preds[sid], truths[sid], lung_files.get(sid)) for sid in common]


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(canonical float32 array (x, y, z), canonical affine, the file's own affine)``."""
    from CovidGANSegLib.nifti import read_canonical

    data, canon_affine, affine = read_canonical(path, what="mask")
    if not np.all(np.isfinite(data)):
        raise InputError("contains NaN or infinite values", path)
    return data, canon_affine, affine


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _check_same_grid(a: np.ndarray, a_aff: np.ndarray, a_path: Path, b: np.ndarray, b_aff: np.ndarray, b_path: Path) -> None:
    if a.shape != b.shape:
        raise InputError(f"grid {a.shape} does not match the grid {b.shape} of {b_path} (shape and affine must agree; "
                         "resample the prediction onto the reference grid first)", a_path)
    if not np.allclose(a_aff, b_aff, atol=1e-3):
        a_aff, b_aff = np.asarray(a_aff, dtype=np.float64), np.asarray(b_aff, dtype=np.float64)
        if np.allclose(a_aff[:3, :3], b_aff[:3, :3], atol=1e-3):
            shift = a_aff[:3, 3] - b_aff[:3, 3]
            what = f"its affine is shifted by ({', '.join(f'{v:.4g}' for v in shift)}) mm"
        else:
            what = f"its affine's voxel axes differ (max difference {float(np.abs(a_aff[:3, :3] - b_aff[:3, :3]).max()):.4g} mm)"
        raise InputError(f"same shape {a.shape} as {b_path} but {what} (shape and affine must agree; "
                         "resample the prediction onto the reference grid first)", a_path)


# --------------------------------------------------------------------------------------------
# scoring


def evaluate_case(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *, lung_mask: np.ndarray | None = None,
                  threshold: float = 0.5, with_hd95: bool = True) -> dict[str, Any]:
    """Scores of one case on canonical ``(x, y, z)`` arrays.

    ``prediction`` may be a mask or probabilities: standard metrics use ``prediction >= threshold``
    (a 0/1 mask is unaffected); the predecessor protocol uses the raw values (0.2 x slice max).
    Returns ``{"volume": row, "slices": rows, "predecessor": rows or None}``.
    """
    pred = np.asarray(prediction)
    t = np.asarray(truth) > 0
    if pred.shape != t.shape:
        raise ValueError(f"prediction {pred.shape} and truth {t.shape} differ in shape")
    p = pred >= threshold if pred.dtype != bool else pred
    volume = metrics.volume_metrics(p, t, tuple(spacing), with_hd95=with_hd95)
    slices = metrics.slice_metrics(p, t, tuple(spacing), axis=2, with_hd95=with_hd95)
    pred_rows = None
    if lung_mask is not None:
        pred_rows = metrics.predecessor_slice_protocol(pred.astype(np.float32), t, lung_mask, axis=2)
    return {"volume": volume, "slices": slices, "predecessor": pred_rows}


def _summaries(cases: list[dict[str, Any]]) -> dict[str, Any]:
    volume = {m: metrics.summarise([c["volume"][m] for c in cases]) for m in VOLUME_METRICS}
    lesion_slices = [r for c in cases for r in c["slices"] if r["truth_px"] > 0]
    empty_slices = [r for c in cases for r in c["slices"] if r["truth_px"] == 0]
    per_slice = {m: metrics.summarise([r[m] for r in lesion_slices]) for m in SLICE_METRICS}
    per_slice["lesion_slices"] = len(lesion_slices)
    per_slice["empty_reference_slices"] = len(empty_slices)
    per_slice["false_positive_slices"] = sum(1 for r in empty_slices if r["pred_px"] > 0)
    have_lungs = all(c["predecessor"] is not None for c in cases) and bool(cases)
    if have_lungs:
        rows = [r for c in cases for r in c["predecessor"]]
        predecessor: dict[str, Any] = {m: metrics.summarise([r[m] for r in rows]) for m in PREDECESSOR_METRICS}
        predecessor["scored_slices"] = len(rows)
    else:
        predecessor = {"skipped": "needs lung masks"}
    return {"volume": volume, "per_slice": per_slice, "predecessor_protocol": predecessor}


CONVENTIONS = {
    "volume_metrics": "confusion-matrix metrics over all voxels of each volume; mean and sample std (ddof=1) over cases",
    "per_slice": "the same metrics per axial slice, summarised over slices whose reference contains lesion",
    "empty_masks": "both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 NaN; sensitivity NaN for an empty reference, "
                   "precision NaN for an empty prediction; NaN values are left out of means (n counts the rest)",
    "hd95": "symmetric: max of the two directed 95th percentiles of surface distances, in mm",
    "predecessor_protocol": "FOR COMPARISON ONLY (Shabani et al. 2022): slices with reference > 163 px and > 1 % of the lung, "
                            "prediction binarised at 0.2 x slice maximum",
    "units": "fractions 0..1 for Dice/sensitivity/specificity/precision, mL, mm",
}


def evaluate_methods(predictions: dict[str, Sequence[np.ndarray]], truths: Sequence[np.ndarray], spacings: Sequence[Sequence[float]], *,
                     lungs: Sequence[np.ndarray] | None = None, ids: Sequence[str] | None = None, out: str | Path | None = None,
                     threshold: float = 0.5, with_hd95: bool = True, reference: str | None = None) -> dict[str, Any]:
    """Score several methods on the same cases (in-memory canonical arrays).

    Returns ``{"cases": N, "models": {method: {metric: {"mean", "std", "n"}}}, "per_slice": {...},
    "predecessor_protocol": {...}, "per_case": {method: [rows]}, "conventions": {...}}``; with
    ``reference`` (a method's name, e.g. the HU threshold), also ``"paired"``: every other method's
    per-case Dice difference against it (:func:`comparison.compare_to_reference`). With ``out``, also
    writes the tables, JSON and box plots there (see ``write_reports``).
    """
    if reference is not None and reference not in predictions:
        raise ValueError(f"reference method {reference!r} not among {sorted(predictions)}")
    n = len(truths)
    if n == 0:
        raise ValueError("no cases to evaluate")
    if len(spacings) != n or (lungs is not None and len(lungs) != n) or (ids is not None and len(ids) != n):
        raise ValueError("truths, spacings, lungs and ids must have the same length")
    for name, preds in predictions.items():
        if len(preds) != n:
            raise ValueError(f"method {name!r} has {len(preds)} predictions for {n} cases")
    ids = list(ids) if ids is not None else [f"case_{i:04d}" for i in range(n)]
    results: dict[str, list[dict[str, Any]]] = {}
    steps = [(name, i) for name in predictions for i in range(n)]
    for name, i in progress.track(steps, desc="evaluating"):
        case = evaluate_case(predictions[name][i], truths[i], spacings[i], lung_mask=None if lungs is None else lungs[i],
                             threshold=threshold, with_hd95=with_hd95)
        case["id"] = ids[i]
        results.setdefault(name, []).append(case)
    summary = _assemble(results, n)
    if reference is not None:
        summary["paired"] = comparison.compare_to_reference(summary["per_case"], reference, "dice")
    if out is not None:
        write_reports(summary, results, Path(out))
    return summary


def _assemble(results: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"cases": n, "models": {}, "per_slice": {}, "predecessor_protocol": {}, "per_case": {}}
    for name, cases in results.items():
        s = _summaries(cases)
        summary["models"][name] = s["volume"]
        summary["per_slice"][name] = s["per_slice"]
        summary["predecessor_protocol"][name] = s["predecessor_protocol"]
        summary["per_case"][name] = [{"id": c["id"], **{k: c["volume"][k] for k in (*VOLUME_METRICS, "pred_ml", "truth_ml", "tp", "fp", "fn", "tn")}}
                                     for c in cases]
    summary["conventions"] = CONVENTIONS
    return summary


def evaluate_paths(pred: str | Path, truth: str | Path, out: str | Path, *, lungs: str | Path | None = None, threshold: float = 0.5,
                   method: str = "prediction", with_hd95: bool = True, reference_pred: str | Path | None = None,
                   reference_method: str = "reference") -> dict[str, Any]:
    """Evaluate prediction file(s) against reference mask file(s) and write the reports into ``out``.

    ``pred`` and ``truth`` are two NIfTI files or two folders (matched by study id); ``lungs``
    (optional, same layout) enables the predecessor's slice protocol. ``reference_pred`` (same
    layout as ``pred``, e.g. a HU threshold's masks) is scored too, as ``reference_method``, and
    ``method`` is compared with it case by case (``summary["paired"]``). Returns the summary dict.

    Raises:
        InputError: missing / unreadable files, no common study ids, grids that do not match, or
            the two prediction sets covering different studies.
    """
    sets = {method: Path(pred)}
    if reference_pred is not None:
        if reference_method == method:
            raise InputError(f"the method and the reference method (--method, --compare-method) must differ: both are {method!r}")
        sets[reference_method] = Path(reference_pred)
    results = {name: _score_files(p, truth, lungs, threshold, with_hd95) for name, p in sets.items()}
    if reference_pred is not None:
        ids = {name: {c["id"] for c in cases} for name, cases in results.items()}
        if ids[method] != ids[reference_method]:
            only = sorted(ids[method] ^ ids[reference_method])
            raise InputError(f"the two prediction sets cover different studies ({', '.join(only[:5])}"
                             f"{' ...' if len(only) > 5 else ''} in one only); compare them on the same cases",
                             sets[reference_method])
    if lungs is not None and any(c["predecessor"] is None for c in results[method]):
        missing = [c["id"] for c in results[method] if c["predecessor"] is None]
        log.warning("no lung mask for %s: the predecessor protocol is skipped", ", ".join(missing[:5]))
    summary = _assemble(results, len(results[method]))
    if reference_pred is not None:
        summary["paired"] = comparison.compare_to_reference(summary["per_case"], reference_method, "dice")
    write_reports(summary, results, Path(out))
    return summary


def _score_files(pred: str | Path, truth: str | Path, lungs: str | Path | None, threshold: float, with_hd95: bool) -> list[dict[str, Any]]:
    """:func:`evaluate_case` of every matched (prediction, reference[, lungs]) file pair."""
    cases = []
    for sid, p_path, t_path, l_path in progress.track(match_studies(pred, truth, lungs), desc="evaluating"):
        t_arr, t_aff, t_own = read_volume(t_path)
        p_arr, p_aff, p_own = read_volume(p_path)
        _check_same_grid(p_arr, p_own, p_path, t_arr, t_own, t_path)
        lung = None
        if l_path is not None:
            l_arr, _, l_own = read_volume(l_path)
            _check_same_grid(l_arr, l_own, l_path, t_arr, t_own, t_path)
            lung = l_arr > 0
        case = evaluate_case(p_arr, t_arr > 0, _spacing(t_aff), lung_mask=lung, threshold=threshold, with_hd95=with_hd95)
        case.update(id=sid, prediction=str(p_path), reference=str(t_path))
        cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# reports


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def table1_markdown(stats: dict[str, dict[str, dict[str, Any]]], metrics_order: Sequence[str] = VOLUME_METRICS) -> str:
    """A Markdown table in the form of the paper's Table 1: metric rows, mean / std columns per method.

    Dice, sensitivity, specificity and precision in percent; volume difference in mL; HD95 in mm.
    """
    methods = list(stats)
    header = "| Metric | " + " | ".join(f"{m} mean | {m} std" for m in methods) + " |"
    sep = "|---|" + "---:|---:|" * len(methods)
    lines = [header, sep]
    for metric in metrics_order:
        if not any(metric in stats[m] for m in methods):
            continue
        pct = metric in PERCENT_METRICS
        label = LABELS.get(metric, metric) + (" (%)" if pct else "")
        cells = []
        for m in methods:
            s = stats[m].get(metric, {})
            scale = 100.0 if pct else 1.0
            cells.append(f"{_fmt(s.get('mean'), scale)} | {_fmt(s.get('std'), scale)}")
        n = sorted({stats[m].get(metric, {}).get("n") for m in methods} - {None})
        lines.append(f"| {label}{'' if len(n) <= 1 else ' (n ' + '/'.join(map(str, n)) + ')'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict[str, Any]) -> str:
    parts = [
        f"# Segmentation evaluation ({summary['cases']} cases)\n\n",
        "## Per volume (standard metrics over all voxels; mean and sample std over cases)\n\n",
        table1_markdown(summary["models"]),
        paired_markdown(summary["paired"]) if "paired" in summary else "",
        "\n## Per slice (axial slices whose reference contains lesion)\n\n",
        table1_markdown(summary["per_slice"], SLICE_METRICS),
    ]
    fp = ", ".join(f"{m}: {s['false_positive_slices']} of {s['empty_reference_slices']}" for m, s in summary["per_slice"].items())
    parts.append(f"\nSlices with an empty reference where the method marked lesion: {fp}.\n")
    pp = summary["predecessor_protocol"]
    parts.append("\n## Predecessor's slice protocol - for comparison only, NOT the project's metric\n\n")
    parts.append("Scores only slices whose reference has > 163 pixels and > 1 % of the lung, with the prediction binarised at "
                 "0.2 x the slice maximum (Shabani et al. 2022). It selects easy slices and inflates scores; see the per-volume "
                 "table above for the honest numbers.\n\n")
    if all("skipped" not in s for s in pp.values()):
        parts.append(table1_markdown(pp, PREDECESSOR_METRICS))
        parts.append("\nScored slices: " + ", ".join(f"{m}: {s['scored_slices']}" for m, s in pp.items()) + ".\n")
    else:
        parts.append("Skipped: lung masks were not given.\n")
    parts.append("\n## Conventions\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary["conventions"].items()) + "\n")
    return "".join(parts)


def paired_markdown(paired: dict[str, Any]) -> str:
    """The ``"paired"`` block of a summary as a short Markdown section (one line per method)."""
    ref = paired["reference"]
    lines = [f"\n## Per-case differences against {ref} ({paired['metric']}; mean, 95 % bootstrap interval over cases, "
             "Wilcoxon signed-rank p, cases won)\n"]
    lines += [f"- {comparison.describe(r, name, ref, LABELS.get(paired['metric'], paired['metric']))}" for name, r in paired["methods"].items()]
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_reports(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]], out: Path) -> dict[str, Path]:
    """Write ``per_volume.csv``, ``per_slice.csv``, ``predecessor_protocol.csv``, ``summary.json``,
    ``summary.csv``, ``summary.md`` (Table 1 form) and ``boxplots.png`` into ``out``, as one set: they
    appear together or not at all (``atomic.atomic_files``; ``OutputError`` names the file that
    cannot be written)."""
    vol_rows, slice_rows, pred_rows = [], [], []
    for method, cases in results.items():
        for c in cases:
            vol_rows.append({"method": method, "id": c["id"], **c["volume"]})
            slice_rows += [{"method": method, "id": c["id"], **r} for r in c["slices"]]
            pred_rows += [{"method": method, "id": c["id"], **r} for r in (c["predecessor"] or [])]
    vol_cols = ["method", "id", *VOLUME_METRICS, "pred_ml", "truth_ml", "tp", "fp", "fn", "tn"]
    slice_cols = ["method", "id", "slice", "truth_px", "pred_px", *SLICE_METRICS, "abs_area_diff_mm2", "tp", "fp", "fn", "tn"]
    pred_cols = ["method", "id", "slice", "truth_px", "lung_px", *PREDECESSOR_METRICS]
    summary_rows = []
    for level, block in (("volume", summary["models"]), ("slice", summary["per_slice"]), ("predecessor_protocol", summary["predecessor_protocol"])):
        for method, stats in block.items():
            for metric, s in stats.items():
                if isinstance(s, dict):
                    summary_rows.append({"level": level, "method": method, "metric": metric, "mean": s["mean"], "std": s["std"], "n": s["n"]})
    paths = {
        "per_volume": out / "per_volume.csv",
        "per_slice": out / "per_slice.csv",
        "predecessor_protocol": out / "predecessor_protocol.csv",
        "summary_csv": out / "summary.csv",
        "summary_json": out / "summary.json",
        "summary_md": out / "summary.md",
        "boxplots": out / "boxplots.png",
    }
    with atomic_files(paths) as staged:
        _write_text(staged["per_volume"], _csv_text(vol_rows, vol_cols))
        _write_text(staged["per_slice"], _csv_text(slice_rows, slice_cols))
        _write_text(staged["predecessor_protocol"], _csv_text(pred_rows, pred_cols))
        _write_text(staged["summary_csv"], _csv_text(summary_rows, ["level", "method", "metric", "mean", "std", "n"]))
        _write_text(staged["summary_json"], json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
        _write_text(staged["summary_md"], summary_markdown(summary))
        save_boxplots({m: [c["volume"] for c in cases] for m, cases in results.items()}, staged["boxplots"])
    return paths


def save_boxplots(per_method: dict[str, list[dict[str, Any]]], path: Path,
                  metrics_order: Sequence[str] = ("dice", "sensitivity", "specificity", "precision", "abs_volume_diff_ml", "hd95_mm")) -> Path:
    """Box plots of the per-volume metrics, one panel per metric, one box per method (Agg backend)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in Slicer's process

    cols = min(3, len(metrics_order))
    rows = -(-len(metrics_order) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(metrics_order):]:
        ax.set_axis_off()
    methods = list(per_method)
    for ax, metric in zip(axes, metrics_order):
        data = []
        for m in methods:
            vals = np.asarray([r[metric] for r in per_method[m]], dtype=float)
            vals = vals[np.isfinite(vals)]
            data.append(vals * (100.0 if metric in PERCENT_METRICS else 1.0))
        if any(len(d) for d in data):
            ax.boxplot([d if len(d) else [np.nan] for d in data], tick_labels=methods, showmeans=True)
        ax.set_title(LABELS[metric] + (" (%)" if metric in PERCENT_METRICS else ""), fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
