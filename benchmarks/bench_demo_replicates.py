"""Replicates of the demo: how far one run's lead over the HU threshold is from the expected one.

One demo run is one draw: one training cohort, one set of training draws and one held-out cohort of
10 (quick) or 16 (default) phantoms. ``covidganseg demo --seed S`` draws another replicate (training
cohort and training seed S, held-out cohort S + 1). This script runs replicates, or reads finished
demo folders, and prints for each the three methods' Dice, the runtime, the real-normal check and
each segmenter's case-by-case lead over the HU threshold (mean, 95 % bootstrap interval, Wilcoxon p,
cases won: ``CovidGANSegLib.comparison``), on all held-out cases and on the mild ones (under 5 % of
the lung, as the demo's report counts them: the lesion volume over the pipeline's own lung mask);
then the same comparison over the cases of every replicate pooled. The pooled interval treats the
cases as independent; the spread of the replicates' own leads shows what the training draw adds.

    python benchmarks/bench_demo_replicates.py demo-out /tmp/rep3026 /tmp/rep4026        # finished demos
    python benchmarks/bench_demo_replicates.py --run WORK --seeds 3026 4026 5026 --quick   # run them first (about 6 min each on 2 cores)
    python benchmarks/bench_demo_replicates.py --results benchmarks/results/demo_replicates_A.json B.json  # pool saved runs

``--results`` adds the replicates of earlier result files (their per-case Dice, mild cases and comparisons
as saved; the demo folders need not exist any more) to those of the folders given or run, and the
pooled comparison covers them all; each file's machine is kept in ``sources``.

Saves ``benchmarks/results/demo_replicates_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402

SEGMENTERS = ("transunet", "unet")
REFERENCE = "hu_threshold"


def held_out_folder(demo_dir: Path) -> Path:
    """The demo's held-out cohort (``data/test``, or ``data/validation`` for ``--split validation``)."""
    for split in ("test", "validation"):
        if (demo_dir / "data" / split).is_dir():
            return demo_dir / "data" / split
    raise FileNotFoundError(f"{demo_dir}: no data/test or data/validation folder (not a finished demo?)")


def mild_ids(held_out: Path, per_case: dict) -> set[str]:
    """Held-out cases under ``demo.MILD_PERCENT`` of the lung, as the demo's report counts them (true
    lesion volume over the volume of the pipeline's own lung mask of the held-out CT)."""
    import numpy as np

    from CovidGANSegLib.datasets import discover_studies
    from CovidGANSegLib.demo import mild_case_ids
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.nifti import load_ct

    lungs_ml = {}
    for study in discover_studies(held_out, min_slices=1):
        ct = load_ct(study.path)
        lungs_ml[study.id] = float(extract_lung_mask(ct.array, ct.spacing).sum() * np.prod(ct.spacing) / 1000.0)
    return set(mild_case_ids({"per_case": per_case}, lungs_ml))


def read_replicate(demo_dir: Path) -> dict:
    """A finished demo's per-case Dice, its own case-by-case comparison with the threshold (the
    evaluation's ``summary["paired"]``), mild case ids, seed, runtime and real-normal check."""
    summary = json.loads((demo_dir / "evaluation" / "summary.json").read_text())
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    per_case = {m: summary["per_case"][m] for m in (*SEGMENTERS, REFERENCE)}
    held_out = held_out_folder(demo_dir)
    cohort = json.loads((held_out / "cohort.json").read_text())
    real = {m: max(metrics["models"][m].get("real_normal_8mm_percent_involved") or [float("nan")]) for m in SEGMENTERS}
    offset = 1 if held_out.name == "test" else 2  # demo: held-out cohort seed + 1, validation seed + 2
    return {"folder": str(demo_dir), "held_out_seed": cohort["seed"], "training_seed": cohort["seed"] - offset, "cases": metrics["cases"],
            "runtime_s": metrics["runtime_s"], "dice": {m: metrics["models"][m]["dice"]["mean"] for m in per_case},
            "real_normal_8mm_max_percent": real, "per_case": per_case, "mild": sorted(mild_ids(held_out, per_case)),
            "paired_all": {m: summary["paired"]["methods"][m] for m in SEGMENTERS}}


def compare(per_case: dict, ids: set[str] | None = None) -> dict:
    """Each segmenter against the HU threshold, case by case (optionally on ``ids`` only)."""
    from CovidGANSegLib.comparison import compare_to_reference

    rows = {m: [r for r in per_case[m] if ids is None or r["id"] in ids] for m in per_case}
    if not rows[REFERENCE]:
        return {}
    return compare_to_reference(rows, REFERENCE, "dice")["methods"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demos", nargs="*", type=Path, help="finished demo output folders")
    ap.add_argument("--run", type=Path, default=None, metavar="WORK", help="run the --seeds replicates into WORK/demo-<seed> first")
    ap.add_argument("--seeds", type=int, nargs="+", default=[], help="seeds of the replicates to run (with --run)")
    ap.add_argument("--quick", action="store_true", help="run the quick plan (with --run)")
    ap.add_argument("--results", type=Path, nargs="+", default=[], metavar="FILE",
                    help="saved demo_replicates_*.json files whose replicates join the pool")
    args = ap.parse_args(argv)
    if bool(args.run) != bool(args.seeds):
        ap.error("--run and --seeds go together")
    if not args.demos and not args.run and not args.results:
        ap.error("give finished demo folders, --run WORK --seeds S ..., or --results FILE ...")

    import numpy as np

    from CovidGANSegLib import progress
    from CovidGANSegLib.comparison import describe

    info = machine_info()
    folders = list(args.demos)
    if args.run:
        from CovidGANSegLib.demo import run_demo

        progress.set_mode("none")
        for seed in args.seeds:
            out = args.run / f"demo-{seed}"
            run_demo(out, quick=args.quick, seed=seed)
            folders.append(out)
    replicates, sources = [], [{"folders": [str(f) for f in folders], "machine": info}]
    for path in args.results:
        try:
            saved = json.loads(path.read_text())
            replicates += saved["replicates"]
        except (OSError, ValueError, KeyError) as exc:
            ap.error(f"--results {path}: not a saved result of this script ({exc})")
        sources.append({"file": str(path), "machine": saved.get("machine")})
    for folder in folders:
        rep = read_replicate(folder)
        rep["paired"] = {"all": rep.pop("paired_all"), "mild": compare(rep["per_case"], set(rep["mild"]))}
        replicates.append(rep)
    for rep in replicates:
        folder = rep["folder"]
        dice = " / ".join(f"{rep['dice'][m]:.3f}" for m in (*SEGMENTERS, REFERENCE))
        print(f"{folder} (held-out seed {rep['held_out_seed']}; {rep['cases']} cases, {len(rep['mild'])} mild; "
              f"{rep['runtime_s']:.0f} s): Dice TransUNet / U-Net / threshold {dice}; real normal at 8 mm at most "
              + " / ".join(f"{rep['real_normal_8mm_max_percent'][m]:.2f}" for m in SEGMENTERS) + " %")
        for part, results in rep["paired"].items():
            for m, r in results.items():
                print(f"  {part}: " + describe(r, m, REFERENCE))
    held_out = [r["held_out_seed"] for r in replicates]
    shared = {r["training_seed"] for r in replicates} & set(held_out)
    if shared or len(set(held_out)) < len(held_out):
        print(f"warning: replicates share cohorts (held-out seeds {held_out}; also a training cohort: {sorted(shared)}): "
              "the pooled cases are not independent", file=sys.stderr)
    pooled_cases = {m: [dict(r, id=f"{k}:{r['id']}") for k, rep in enumerate(replicates) for r in rep["per_case"][m]]
                    for m in (*SEGMENTERS, REFERENCE)}
    pooled_mild = {f"{k}:{i}" for k, rep in enumerate(replicates) for i in rep["mild"]}
    pooled = {"all": compare(pooled_cases), "mild": compare(pooled_cases, pooled_mild)}
    leads = {m: [rep["paired"]["all"][m]["mean_difference"] for rep in replicates] for m in SEGMENTERS}
    print(f"\n{len(replicates)} replicates, {len(pooled_cases[REFERENCE])} held-out cases ({len(pooled_mild)} mild), pooled:")
    for m in SEGMENTERS:
        print(f"  mean Dice {m} {np.mean([r['dice'][m] for r in replicates]):.3f}, threshold "
              f"{np.mean([r['dice'][REFERENCE] for r in replicates]):.3f}; the replicates' leads "
              + ", ".join(f"{x:+.3f}" for x in leads[m]))
    for part, results in pooled.items():
        for m, r in results.items():
            print(f"  {part}: " + describe(r, m, REFERENCE))
    out = ROOT / "benchmarks" / "results" / f"demo_replicates_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for rep in replicates:
        rep["per_case"] = {m: [{"id": r["id"], "dice": r["dice"], "truth_ml": r["truth_ml"]} for r in rows]
                           for m, rows in rep["per_case"].items()}
    out.write_text(json.dumps({"machine": info, "sources": sources, "replicates": replicates, "pooled": pooled, "leads": leads},
                              indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
