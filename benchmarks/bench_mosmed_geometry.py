"""Does the pipeline hold at MosMedData's geometry? The same validation cohorts at two sizes (issue 8).

The demo's phantoms are 128 x 128 at about 2.8 mm in-plane; MosMedData (and the held-out real
cohort of issue 8) is 512 x 512 at about 0.7 mm, 8 mm slices. The segmenters see both through the
same model grid (128 x 128 x 32), but the lung mask, the HU threshold and the post-processing
(HU prior, opening, density filter, growth, local contrast) run on the CT's own grid, where thin
vessels at 0.7 mm are sharp and dense instead of averaged into 2.8 mm pixels; the scores are
computed on that grid too. This benchmark writes the demo plan's validation cohorts with the same
seeds, study numbers and category plan at ``--sizes`` (``small`` and ``mosmed`` by default; the
anatomy and lesions are drawn anew at each size, so cases are alike, not identical) and scores
each model run as ``segment`` runs it (default post-processing) and the HU threshold:

* ``validation``: the demo plan's validation cohort (seed + 2, studies 6001.., independent lesions);
* ``mild`` (``--mild-cohort N``, default 20): N mild CT-1 phantoms (seed + 3, studies 7001..);
* ``healthy`` (``--healthy N``, default 4): N healthy phantoms (seed + 5, studies 8001..), the
  share of the lung each method marks (specificity).

The held-out test cohort (seed + 1) is never written or read.

    python benchmarks/bench_mosmed_geometry.py --out WORK --model demo-out/runs/transunet/model.pt \\
        --model demo-out/runs/unet/model.pt

Prints a table (with each model's per-case Dice difference against the HU threshold: mean and 95 %
bootstrap interval, ``CovidGANSegLib.comparison``) and saves
``benchmarks/results/mosmed_geometry_<plan>_<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info, save_result  # noqa: E402

from CovidGANSegLib.demo import MILD_PERCENT  # noqa: E402  (the demo report's mild rule)
from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402
HU_THRESHOLD = "hu_threshold"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder for the cohorts (reused when they exist)")
    ap.add_argument("--model", type=Path, action="append", default=[], help="a segmenter checkpoint (model.pt); repeat for more")
    ap.add_argument("--plan", default="quick", choices=["quick", "full"], help="whose validation seeds and sizes (default quick)")
    ap.add_argument("--sizes", nargs="+", default=["small", "mosmed"], choices=["small", "mosmed"])
    ap.add_argument("--mild-cohort", type=int, default=20, metavar="N", help="mild (CT-1) phantoms per size (0: none)")
    ap.add_argument("--healthy", type=int, default=4, metavar="N", help="healthy phantoms per size (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads and phantom workers (default: torch's)")
    args = ap.parse_args(argv)

    import torch

    from CovidGANSegLib import demo, progress
    from CovidGANSegLib.seg.inference import load_segmenter

    progress.set_mode("none")
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.threads or torch.get_num_threads()
    plan = demo.QUICK if args.plan == "quick" else demo.FULL
    models = {}
    for path in args.model:
        model, payload = load_segmenter(path, "cpu")
        name = str(payload.get("arch") or path.parent.name)
        models[name if name not in models else str(path)] = model
    result: dict[str, Any] = {
        "plan": args.plan, "models": {name: str(p) for name, p in zip(models, args.model)}, "machine": machine_info(threads=args.threads),
        "note": "validation cohorts only (independent lesion model); the held-out test cohort is not used", "sizes": {},
    }
    for size in args.sizes:
        cohorts = _cohorts(args.out / size, dataclasses.replace(plan, phantom_size=size), args.mild_cohort, args.healthy, workers)
        result["sizes"][size] = {}
        for name, folder in cohorts.items():
            result["sizes"][size][name] = _score_cohort(folder, models)
            print(f"{size} {name}: {json.dumps(result['sizes'][size][name]['summary'])}", flush=True)
    print(_table(result, list(models) + [HU_THRESHOLD]))
    save_result(f"mosmed_geometry_{args.plan}", result)
    return 0


def _cohorts(work: Path, plan, mild: int, healthy: int, workers: int) -> dict[str, Path]:
    """The cohorts of one size, written once under ``work`` (atomically, by ``write_cohort``)."""
    from CovidGANSegLib.synth.phantoms import write_cohort

    specs = {"validation": dict(healthy=0, covid=plan.val_covid, seed=plan.seed + 2, first_id=6001, lesion_model=plan.lesion_model)}
    if mild:
        specs["mild"] = dict(healthy=0, covid=mild, seed=plan.seed + 3, first_id=7001, lesion_model=plan.lesion_model,
                             categories=("CT-1",))
    if healthy:
        specs["healthy"] = dict(healthy=healthy, covid=0, seed=plan.seed + 5, first_id=8001)
    folders = {"validation": "validation", "mild": f"mild_{mild}", "healthy": f"healthy_{healthy}"}
    out = {}
    for name, spec in specs.items():
        folder = work / folders[name]
        if not folder.is_dir():
            write_cohort(folder, size=plan.phantom_size, workers=workers, **spec)
        out[name] = folder
    return out


def _score_cohort(folder: Path, models: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.metrics import confusion, from_confusion
    from CovidGANSegLib.nifti import load_ct, load_mask
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
    from CovidGANSegLib.seg.inference import segment_ct
    from CovidGANSegLib.seg.postprocess import PostProcessing

    rule = PostProcessing()
    rows = []
    for study in discover_studies(folder, min_slices=1):
        ct = load_ct(study.path)
        mask_path = lesion_mask_path(folder, study.id)
        truth = None if mask_path is None else load_mask(mask_path, reference=ct)  # evaluation only
        lung = extract_lung_mask(ct.array, ct.spacing)
        hu = np.asarray(ct.array)
        row: dict[str, Any] = {"id": study.id, "shape": list(hu.shape), "spacing_mm": [round(float(s), 3) for s in ct.spacing],
                               "lung_ml": round(float(lung.sum()) * float(np.prod(ct.spacing)) / 1000.0, 1)}
        if truth is not None:
            row["percent"] = round(100.0 * float(truth.sum()) / max(1, int((truth | lung).sum())), 3)
        masks = {HU_THRESHOLD: hu_threshold_segment(hu, lung)}
        for name, model in models.items():
            t = time.perf_counter()
            masks[name] = segment_ct(ct, model, lung_mask=lung, post=rule).lesion_mask
            row[f"{name}_s"] = round(time.perf_counter() - t, 2)
        for name, pred in masks.items():
            if truth is None:
                row[f"{name}_percent_of_lung"] = round(percent_of_lung(pred, lung), 3)
            else:
                m = from_confusion(*confusion(pred, truth))
                for key in ("dice", "sensitivity", "precision"):
                    row[f"{name}_{key}"] = round(float(m[key]), 4)
        rows.append(row)
    return {"cases": len(rows), "mild_cases": sum(1 for r in rows if r.get("percent", 100.0) < MILD_PERCENT),
            "summary": _summary(rows, list(masks)), "per_case": rows}


def _summary(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    import numpy as np

    def mean(key: str, subset: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in subset if r.get(key) is not None and np.isfinite(r[key])]
        return round(float(np.mean(vals)), 4) if vals else None

    from CovidGANSegLib.comparison import paired_difference

    lesioned = [r for r in rows if "percent" in r]
    mild = [r for r in lesioned if r["percent"] < MILD_PERCENT]
    out: dict[str, Any] = {}
    for name in methods:
        if lesioned:
            out[name] = {"dice": mean(f"{name}_dice", lesioned), "dice_mild": mean(f"{name}_dice", mild),
                         "sensitivity": mean(f"{name}_sensitivity", lesioned), "precision": mean(f"{name}_precision", lesioned)}
            if name != HU_THRESHOLD:  # case by case against the threshold
                out[name]["dice_minus_hu_threshold"] = paired_difference([r[f"{name}_dice"] for r in lesioned],
                                                                         [r[f"{HU_THRESHOLD}_dice"] for r in lesioned])
        else:
            out[name] = {"percent_of_lung": [r[f"{name}_percent_of_lung"] for r in rows]}
    return out


def _table(result: dict[str, Any], methods: list[str]) -> str:
    head = "| geometry | cohort (cases, mild) | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for size, cohorts in result["sizes"].items():
        for name, r in cohorts.items():
            cells = []
            for m in methods:
                s = r["summary"][m]
                if "percent_of_lung" in s:
                    cells.append(" / ".join(f"{v:.2f}" for v in s["percent_of_lung"]) + " % of lung")
                else:
                    lead = s.get("dice_minus_hu_threshold")
                    cells.append(f"Dice {_f(s['dice'])} (mild {_f(s['dice_mild'])}), precision {_f(s['precision'])}"
                                 + (f"; vs threshold {lead['mean_difference']:+.3f} (95 % CI {lead['ci_low']:+.3f} to {lead['ci_high']:+.3f})"
                                    if lead and lead["ci_low"] is not None else ""))
            lines.append(f"| {size} | {name} ({r['cases']}, {r['mild_cases']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
