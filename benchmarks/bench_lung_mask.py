"""How much the lung mask costs lesion Dice: ours against the phantoms' true lungs (issue 8).

Every method keeps lesions inside the lung mask (``lungmask.extract_lung_mask``), so lesion voxels
it leaves out are lost to the HU threshold and to the segmenters alike. The phantoms carry their
true lungs (``lungs/`` of a cohort: the anatomical lungs with vessels, airways and lesions), which
measures that loss directly. Cohorts, validation only (the independent lesion model; the held-out
test cohort is never read), written by ``bench_ablation.py``'s own functions, so that its WORK folder
can be shared:

* ``validation``: the demo plan's validation cohort (seed + 2, studies 6001..);
* ``validation_mild_N`` (``--mild-cohort N``): N mild CT-1 phantoms (seed + 3, studies 7001..).

Per cohort: the lung Dice of our mask against the true lungs, the share of lesion voxels outside
our mask (all cases, and cases under 5 % involvement) with their median HU, the HU threshold's
Dice with our mask and with the true lungs (``lung | true lungs``), and, with ``--model`` (a
segmenter checkpoint), the same model's Dice run as ``segment`` runs it with our mask and with the
true lungs in its place (default post-processing; only the lung mask differs). Also the seconds per CT of ``extract_lung_mask``.

    python benchmarks/bench_lung_mask.py --out WORK --mild-cohort 20 --model demo-out/runs/transunet/model.pt

Prints a table and saves ``benchmarks/results/lung_mask_<plan>_<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info, save_result  # noqa: E402

from CovidGANSegLib.demo import MILD_PERCENT  # noqa: E402  (the demo report's mild rule)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder for the cohorts (reused when they exist)")
    ap.add_argument("--plan", default="quick", choices=["quick", "full"])
    ap.add_argument("--mild-cohort", type=int, default=0, metavar="N", help="also a cohort of N mild (CT-1) phantoms")
    ap.add_argument("--model", type=Path, default=None, help="a segmenter checkpoint (model.pt) to score with both lung masks")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)

    from bench_ablation import _mild_cohort, _validation_cohort
    from CovidGANSegLib import demo, progress

    progress.set_mode("none")
    plan = demo.QUICK if args.plan == "quick" else demo.FULL
    model = None
    if args.model is not None:
        import torch

        from CovidGANSegLib.seg.inference import load_segmenter

        if args.threads:
            torch.set_num_threads(args.threads)
        model, _ = load_segmenter(args.model, "cpu")
    info = machine_info()
    cohorts = {"validation": _validation_cohort(args.out, plan)}
    if args.mild_cohort:
        cohorts[f"mild_{args.mild_cohort}"] = _mild_cohort(args.out, plan, args.mild_cohort)
    result: dict[str, Any] = {
        "plan": args.plan, "model": None if args.model is None else str(args.model), "machine": info,
        "note": "validation cohorts (independent lesion model); the held-out test cohort is not used", "cohorts": {},
    }
    for name, folder in cohorts.items():
        result["cohorts"][name] = _score_cohort(folder, model)
    print(_table(result))
    save_result(f"lung_mask_{args.plan}", result)
    return 0


def _dice(pred, truth) -> float:
    from CovidGANSegLib.metrics import confusion, from_confusion

    return from_confusion(*confusion(pred, truth))["dice"]


def _score_cohort(folder: Path, model) -> dict[str, Any]:
    import numpy as np

    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.nifti import load_ct, load_mask
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment

    rows = []
    seconds = []
    for study in discover_studies(folder, min_slices=1):
        ct = load_ct(study.path)
        truth = load_mask(lesion_mask_path(folder, study.id), reference=ct)  # evaluation only
        true_lung = load_mask(folder / "lungs" / f"{study.id}_lungs.nii.gz", reference=ct)
        t = time.perf_counter()
        lung = extract_lung_mask(ct.array, ct.spacing)
        seconds.append(time.perf_counter() - t)
        full = lung | true_lung  # our mask never removes a lesion the true lungs keep
        hu = np.asarray(ct.array)
        outside = truth & ~lung
        row = {
            "id": study.id, "percent": round(100.0 * float(truth.sum()) / max(1, int(true_lung.sum())), 3),
            "lung_dice": round(_dice(lung, true_lung), 4),
            "lesion_outside_share": round(float(outside.sum()) / max(1, int(truth.sum())), 4),
            "lesion_voxels": int(truth.sum()), "lesion_outside_voxels": int(outside.sum()),
            "outside_median_hu": round(float(np.median(hu[outside])), 1) if outside.any() else None,
            "hu_threshold_dice": round(_dice(hu_threshold_segment(hu, lung), truth), 4),
            "hu_threshold_dice_true_lung": round(_dice(hu_threshold_segment(hu, full), truth), 4),
        }
        if model is not None:
            row["model_dice"], row["model_dice_true_lung"] = _model_dice(model, ct, lung, full, truth)
        rows.append(row)

    def mean(key: str, subset: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in subset if r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    def pooled_outside(subset: list[dict[str, Any]]) -> float | None:
        n = sum(r["lesion_voxels"] for r in subset)
        return round(sum(r["lesion_outside_voxels"] for r in subset) / n, 4) if n else None

    mild = [r for r in rows if r["percent"] < MILD_PERCENT]
    keys = ["lung_dice", "hu_threshold_dice", "hu_threshold_dice_true_lung"]
    if model is not None:
        keys += ["model_dice", "model_dice_true_lung"]
    return {
        "cases": len(rows), "mild_cases": len(mild),
        **{k: mean(k, rows) for k in keys}, **{f"{k}_mild": mean(k, mild) for k in keys if k != "lung_dice"},
        "lesion_outside_share": pooled_outside(rows), "lesion_outside_share_mild": pooled_outside(mild),
        "lung_mask_s_per_ct": round(float(np.mean(seconds)), 2) if seconds else None, "per_case": rows,
    }


def _model_dice(model, ct, lung, full, truth) -> tuple[float, float]:
    """The segmenter's Dice run as ``segment`` runs it (default post-processing) with our lung mask,
    and with the true lungs in its place (its crop box then follows the true lungs too)."""
    from CovidGANSegLib.seg.inference import segment_ct
    from CovidGANSegLib.seg.postprocess import PostProcessing

    rule = PostProcessing()
    ours = segment_ct(ct, model, lung_mask=lung, post=rule).lesion_mask
    true = segment_ct(ct, model, lung_mask=full, post=rule).lesion_mask
    return round(_dice(ours, truth), 4), round(_dice(true, truth), 4)


def _table(result: dict[str, Any]) -> str:
    model = result["model"] is not None
    head = ("| cohort | cases (mild) | lung Dice | lesion voxels outside our mask: all / mild | their median HU | "
            "HU threshold Dice: our mask / true lungs (mild) |" + (" model Dice: our mask / true lungs (mild) |" if model else "")
            + " lung mask s per CT |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in result["cohorts"].items():
        hu = [c["outside_median_hu"] for c in r["per_case"] if c["outside_median_hu"] is not None]
        med = f"{sorted(hu)[len(hu) // 2]:.0f}" if hu else "-"
        line = (f"| {name} | {r['cases']} ({r['mild_cases']}) | {r['lung_dice']:.3f} | {_pct(r['lesion_outside_share'])} / "
                f"{_pct(r['lesion_outside_share_mild'])} | {med} | {r['hu_threshold_dice']:.3f} / {r['hu_threshold_dice_true_lung']:.3f} "
                f"({_f(r['hu_threshold_dice_mild'])} / {_f(r['hu_threshold_dice_true_lung_mild'])}) |")
        if model:
            line += (f" {r['model_dice']:.3f} / {r['model_dice_true_lung']:.3f} ({_f(r['model_dice_mild'])} / "
                     f"{_f(r['model_dice_true_lung_mild'])}) |")
        lines.append(line + f" {r['lung_mask_s_per_ct']} |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
