"""Real anatomy among the segmenters' healthy volumes: leave-one-out over the real normal CTs.

Every real-anatomy figure of the demo comes from segmenters that only ever saw phantom lungs; the
held-out real cohort of issue 8 trains on its own scans instead. This benchmark measures what real
anatomy in training changes. For each real CT held out (a *fold*) and each seed, the quick demo's
TransUNet (``demo.QUICK``: the same 12 healthy + 24 COVID phantoms, synthetic lesions only, the same
iterations and grid) is trained twice: on the phantoms alone, and with the *other* real CTs added as
healthy (CT-0) studies. Both are scored on the held-out CT only: at 8 mm slices with lesions of the
independent evaluation model inserted (``bench_real_lesions.score_real_lesions``), and without lesions
(percent of its lung marked). No lesion mask is read in training; the held-out CT is never trained on.
Beside them, on the same cases, the rules alone (the default post-processing with every lung voxel as
a seed, no segmenter): what the learned part adds where the segmenter has seen real anatomy.

    python benchmarks/bench_real_anatomy.py --out WORK
    python benchmarks/bench_real_anatomy.py --out WORK --folds aorta pulmonary --seeds 2026 1 --draw-seed 77 --draws 4
    python benchmarks/bench_real_anatomy.py --out WORK --iterations 20 --draws 1   # a smoke run

A fold is named by the start of a file name in ``--real-ct`` (``aorta``, ``pulmonary``, ``example``).
Trainings run one after the other with the torch threads given. Prints a table and saves
``benchmarks/results/real_anatomy_<date>.json``; WORK keeps the phantoms, data sets and models (reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402
from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402

DEFAULT_FOLDS = ("aorta", "pulmonary")  # the abdominal crop's sliver of lung scores 0 for every model


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def training_set(work: Path, phantoms: Path, extra_healthy: list[Path], name: str) -> Path:
    """``WORK/data_<name>``: the phantom cohort's studies plus ``extra_healthy`` as CT-0 studies."""
    data = work / f"data_{name}"
    if data.is_dir():
        return data
    partial = work / f".data_{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for category in sorted(p.name for p in (phantoms / "studies").iterdir()):
        (partial / "studies" / category).mkdir(parents=True)
        for f in sorted((phantoms / "studies" / category).glob("*.nii.gz")):
            _link(f, partial / "studies" / category / f.name)
    for p in extra_healthy:
        _link(p, partial / "studies" / "CT-0" / f"real_{p.name}")
    partial.rename(data)
    return data


def _percent(mask, lung) -> float:
    """Share of the lung marked, in percent (3 decimals)."""
    return round(percent_of_lung(mask, lung), 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (phantoms, data sets, models; reused)")
    ap.add_argument("--real-ct", type=Path, default=ROOT.parent / "shared" / "data" / "real_ct", help="folder of real normal CTs")
    ap.add_argument("--folds", nargs="+", default=list(DEFAULT_FOLDS), help="real CTs to hold out, by the start of their file names")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2026, 1], help="training seeds (2026: the quick demo's)")
    ap.add_argument("--iterations", type=int, default=None, help="segmenter iterations (default: the quick demo's)")
    ap.add_argument("--draw-seed", type=int, default=77, help="lesion draws (77: the exploration draw; 2026 reports the demo)")
    ap.add_argument("--draws", type=int, default=4, help="lesion draws per CT and coverage")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from bench_real_lesions import DEFAULT_COVERAGE, RULES_ALONE, mean_metric, score_real_lesions
    from CovidGANSegLib import progress
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.demo import QUICK, real_normal_volumes
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.preprocessing import ensure_preprocessed
    from CovidGANSegLib.seg.inference import load_segmenter, segment_ct
    from CovidGANSegLib.seg.postprocess import PostProcessing, rules_alone_segment
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.training import train_segmenter
    from CovidGANSegLib.synth.phantoms import write_cohort

    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_mode("none")
    info = machine_info()
    real = sorted(p for p in args.real_ct.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    held_out = {}
    for fold in args.folds:
        matches = [p for p in real if p.name.startswith(fold)]
        if len(matches) != 1:
            ap.error(f"--folds {fold}: {len(matches)} CTs in {args.real_ct} start with it (need exactly one)")
        held_out[fold] = matches[0]
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    plan = QUICK
    phantoms = work / "phantoms"
    if not phantoms.is_dir():
        write_cohort(phantoms, healthy=plan.train_healthy, covid=plan.train_covid, seed=plan.seed, size=plan.phantom_size,
                     lesion_model=plan.lesion_model)
    preprocess = PreprocessConfig(grid=tuple(plan.seg_grid))
    synthetic = SyntheticSupervision(fraction=plan.synthetic_fraction, variants_per_volume=plan.synthetic_variants,
                                     coverage=plan.synthetic_coverage)
    iterations = args.iterations or plan.seg_iterations
    post = PostProcessing()

    def model(name: str, extra: list[Path], seed: int) -> Path:
        run = work / "runs" / f"{name}_seed{seed}_it{iterations}"
        if not (run / "model.pt").is_file():
            data = training_set(work, phantoms, extra, name)
            pre = work / f"preprocessed_{name}"
            ensure_preprocessed(data, pre, preprocess)
            shutil.rmtree(run, ignore_errors=True)  # a run cut short starts again
            train_segmenter(pre, run, model="transunet", config=plan.seg_config, iterations=iterations, device="cpu",
                            seed=seed, data=data, synthetic=synthetic)
        return run / "model.pt"

    rows = []
    t0 = time.perf_counter()
    for fold, ct_path in held_out.items():
        one = work / f"real_{fold}"  # the held-out CT alone, for the lesion draws
        if not one.is_dir():
            one.mkdir()
            _link(ct_path, one / ct_path.name)
        at_8mm = next(ct for _, thick, ct in real_normal_volumes(one) if thick)  # the same CT without lesions
        lung = extract_lung_mask(at_8mm.array, at_8mm.spacing)
        arms = {"phantoms": ("phantoms", []), "with_real": (f"with_real_without_{fold}", [p for p in real if p != ct_path])}
        nets = {f"{arm}/{seed}": load_segmenter(model(name, extra, seed), "cpu")[0]
                for seed in args.seeds for arm, (name, extra) in arms.items()}
        # every model of the fold, the HU threshold and the rules alone (every lung voxel a seed, no segmenter:
        # what the learned part adds) on the same lesioned cases, drawn once
        cases, skipped = score_real_lesions(nets, one, post, coverages=DEFAULT_COVERAGE, draws=args.draws, seed=args.draw_seed,
                                            verbose=False, rules_alone=True)

        def summary(method: str, normal_mask) -> dict:
            return {**{k: mean_metric(cases, method, k) for k in ("dice", "precision", "sensitivity")},
                    "cases": len(cases), "skipped": skipped, "normal_percent_of_lung_8mm": _percent(normal_mask, lung)}

        rules = summary(RULES_ALONE, rules_alone_segment(at_8mm.array, lung, at_8mm.spacing, post))
        for seed in args.seeds:
            row = {"fold": fold, "held_out": ct_path.name, "seed": seed, RULES_ALONE: rules}
            for arm in arms:
                key = f"{arm}/{seed}"
                row[arm] = summary(key, segment_ct(at_8mm, nets[key], lung_mask=lung, post=post).lesion_mask)
            row["hu_threshold_dice"] = mean_metric(cases, "hu_threshold", "dice")  # the same cases for every model
            rows.append(row)
            print(f"{fold} seed {seed}: Dice {row['phantoms']['dice']:.3f} -> {row['with_real']['dice']:.3f}", flush=True)

    print(f"\nreal anatomy in training, leave-one-out ({iterations} iterations; lesion draw seed {args.draw_seed})")
    print("| real CT held out | seed | cases | Dice: phantoms only / + the other real CTs / rules alone | precision | "
          "sensitivity | its lung marked at 8 mm, % | HU threshold Dice |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        arms = (r["phantoms"], r["with_real"], r[RULES_ALONE])

        def cells(key: str, fmt: str = ".3f") -> str:
            return " / ".join(f"{a[key]:{fmt}}" for a in arms)

        print(f"| {r['held_out']} | {r['seed']} | {arms[0]['cases']} | {cells('dice')} | {cells('precision')} | "
              f"{cells('sensitivity')} | {cells('normal_percent_of_lung_8mm', '.2f')} | {r['hu_threshold_dice']:.3f} |")
    for arm in ("phantoms", "with_real"):
        gains = [r[arm]["dice"] - r[RULES_ALONE]["dice"] for r in rows]
        print(f"{arm}: Dice minus the rules alone's {sum(gains) / len(gains):+.3f} ({sum(g > 0 for g in gains)} of {len(gains)} above)")
    gains = [r["with_real"]["dice"] - r["phantoms"]["dice"] for r in rows]
    print(f"mean Dice change with real anatomy: {sum(gains) / len(gains):+.3f} ({sum(g > 0 for g in gains)} of {len(gains)} up)")
    out = ROOT / "benchmarks" / "results" / f"real_anatomy_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "args": {**vars(args), "out": str(args.out), "real_ct": str(args.real_ct)},
                               "plan": dataclasses.asdict(plan), "iterations": iterations, "seconds": time.perf_counter() - t0,
                               "rows": rows}, indent=1, default=str) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
