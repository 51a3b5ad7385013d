"""A segmenter setting against the default, over several training seeds, on the validation sets.

How the rounds of docs/ablation.md choose a lever of the segmenter's training: each variant (a
``SegConfig`` change, e.g. ``in_channels=3`` for 2.5D input; its ``iterations``, when given, is the
number of training iterations; fields of ``SyntheticSupervision``, e.g. ``variants_per_volume``,
change the synthetic-lesion supervision) and the default are trained like the
quick demo's segmenters (``train_segmenter`` on a demo's preprocessed training cohort, synthetic-
lesion supervision as the demo sets it, two at a time, one torch thread each) for every seed and
model, and scored as ``segment`` scores them (the library's post-processing) on:

* the plan's validation cohort and a mild cohort (MosMed CT-1, 20 phantoms) of the independent lesion
  model, and 4 healthy validation phantoms (``bench_mosmed_geometry``'s cohorts, written once);
* the real-lesion validation draw (``bench_real_lesions.lesioned_real_cts``: the real CTs at 8 mm with
  lesions of the independent model at 0.3 / 1 / 3 % of the lung, ``--draw-seed 77``, four draws);
* the real normal CTs, as acquired and at 8 mm slices (percent of the lung marked).

Beside the models, two methods without learning: the HU threshold, and the rules alone (the default
post-processing with every lung voxel as a seed: what the segmenter's seeds add is the difference).

The criterion is the mean Dice of the first three sets (validation, mild, real lesions); the table
gives each variant's change against the default seed by seed. The held-out cohorts of the demos are
never read. Trained models are kept in ``WORK`` (a later call with more seeds or variants trains only
what is missing).

    python benchmarks/bench_seg_variants.py demo-out WORK --variant 2.5d '{"in_channels": 3}' --seeds 2026 1 2 3

Saves ``benchmarks/results/seg_variants_<date>.json`` (every case's figure per model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_lesions import RULES_ALONE  # noqa: E402
from machine import describe, machine_info, save_result  # noqa: E402
from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402

SEGMENTERS = ("transunet", "unet")
DEFAULT = "default"
CRITERION_SETS = ("validation", "mild", "real_lesions")
_MODELS: dict[str, Any] = {}  # a scoring worker's segmenters


def split_change(change: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A variant's JSON object -> (``SegConfig`` fields, ``SyntheticSupervision`` fields; lists as tuples)."""
    import dataclasses

    from CovidGANSegLib.seg.synthetic import SyntheticSupervision

    names = {f.name for f in dataclasses.fields(SyntheticSupervision)}
    synthetic = {k: tuple(v) if isinstance(v, list) else v for k, v in change.items() if k in names}
    return {k: v for k, v in change.items() if k not in names}, synthetic


def train_all(demo: Path, work: Path, variants: dict[str, dict], seeds: list[int], models: tuple[str, ...],
              iterations: int | None) -> dict[str, Path]:
    """``{"variant/model/seed": model.pt}``, trained two at a time where missing."""
    import dataclasses

    from bench_levers_held_out import demo_training, train_in_pairs
    from CovidGANSegLib.checkpoints import read_model_card
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.training import train_segmenter

    card, synthetic_fields, base = demo_training(demo)
    grid = "x".join(str(v) for v in card["preprocess"]["grid"])
    data = demo / "runs" / f"seg_preprocessed-{grid}"
    if not (data / "config.json").is_file():
        raise SystemExit(f"{data}: not the demo's preprocessed training cohort")
    # each model's iterations in the demo (the quick plan's U-Net trains for fewer than its TransUNet)
    trained_for = {m: read_model_card(demo / "runs" / m / "model.pt").get("iterations", card["iterations"]) for m in models}
    paths, jobs = {}, {}
    for name, change in variants.items():
        seg_change, synthetic_change = split_change(change)
        synthetic = SyntheticSupervision(**{**synthetic_fields, **synthetic_change})
        for model in models:
            for seed in seeds:
                key = f"{name}/{model}/{seed}"
                paths[key] = work / "runs" / f"{name}-{model}-seed{seed}" / "model.pt"
                if not paths[key].is_file():
                    jobs[key] = (train_segmenter, dict(
                        pseudo_masks=data, run_dir=paths[key].parent, model=model, config=dataclasses.replace(base, **seg_change),
                        iterations=change.get("iterations") or iterations or trained_for[model], device="cpu", seed=seed,
                        data=demo / "data" / "train", synthetic=synthetic))
    train_in_pairs(jobs)
    return paths


def validation_cases(work: Path, plan: Any, draw_seed: int, real_ct: Path) -> list[tuple[str, str, str, str]]:
    """``(set, case, file, lesion mask file or "")`` for every validation case; the real-lesion draw is
    written once as .npz (CT and truth in one file)."""
    import numpy as np

    from bench_mosmed_geometry import _cohorts
    from bench_real_lesions import DEFAULT_COVERAGE, MIN_LESION_ML, lesioned_real_cts
    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path

    cases = []
    for name, folder in _cohorts(work / "cohorts", plan, 20, 4, 1).items():
        for study in discover_studies(folder, min_slices=1):
            mask = lesion_mask_path(folder, study.id)
            cases.append((name, study.id, str(study.path), "" if mask is None else str(mask)))
    draw = work / f"real_lesions_seed{draw_seed}"
    if not (draw / "complete").is_file():
        draw.mkdir(parents=True, exist_ok=True)
        for i, (case, _, ct, truth) in enumerate(lesioned_real_cts(real_ct, DEFAULT_COVERAGE, 4, draw_seed)):
            if truth.sum() * np.prod(ct.spacing) / 1000.0 >= MIN_LESION_ML:
                np.savez_compressed(draw / f"{i:02d}.npz", hu=ct.array, affine=ct.affine, truth=truth, case=case)
        (draw / "complete").touch()
    cases += [("real_lesions", str(np.load(f)["case"]), str(f), "") for f in sorted(draw.glob("*.npz"))]
    for path in sorted(p for p in real_ct.iterdir() if p.name.endswith((".nii", ".nii.gz"))):
        cases += [("normal_own", path.name, str(path), ""), ("normal_8mm", path.name, str(path), "")]
    return cases


def _load_models(paths: dict[str, str]) -> None:
    import torch

    from CovidGANSegLib import progress
    from CovidGANSegLib.seg.inference import load_segmenter

    torch.set_num_threads(1)
    progress.set_mode("none")
    _MODELS.update({key: load_segmenter(path, "cpu")[0] for key, path in paths.items()})


def score_case(case: tuple[str, str, str, str]) -> tuple[str, str, dict[str, float]]:
    """Dice (sets with lesions) or percent of the lung marked (normal sets) of every loaded model and
    of the HU threshold on one case."""
    import numpy as np

    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.metrics import confusion, from_confusion
    from CovidGANSegLib.nifti import CTVolume, load_ct, load_mask
    from CovidGANSegLib.preprocessing import thick_slices
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
    from CovidGANSegLib.seg.inference import segment_ct
    from CovidGANSegLib.seg.postprocess import rules_alone_segment

    name, case_id, file, mask = case
    truth = None
    if name == "real_lesions":
        z = np.load(file)
        ct, truth = CTVolume.from_array(z["hu"], z["affine"], file), z["truth"]
    else:
        ct = load_ct(file, min_slices=1)
        if name == "normal_8mm":
            ct = thick_slices(ct, 8.0) or ct
        elif name in ("validation", "mild"):  # every COVID phantom has its lesion mask
            truth = load_mask(mask, reference=ct)
    lung = extract_lung_mask(ct.array, ct.spacing)
    masks = {key: segment_ct(ct, model, lung_mask=lung).lesion_mask for key, model in _MODELS.items()}
    masks["hu_threshold"] = hu_threshold_segment(ct.array, lung)
    masks[RULES_ALONE] = rules_alone_segment(ct.array, lung, ct.spacing)  # no segmenter
    if truth is None:
        return name, case_id, {k: percent_of_lung(m, lung) for k, m in masks.items()}
    return name, case_id, {k: from_confusion(*confusion(m, truth))["dice"] for k, m in masks.items()}


def summarise(rows: list[tuple[str, str, dict[str, float]]], keys: list[str]) -> dict[str, dict[str, float]]:
    """Per model: the mean of each set, the criterion, and the largest percent marked on healthy / normal sets."""
    import numpy as np

    out = {}
    for key in keys:
        by_set: dict[str, list[float]] = {}
        for name, _, values in rows:
            by_set.setdefault(name, []).append(values[key])
        s = {f"{name}_mean": float(np.mean(v)) for name, v in by_set.items()}
        s.update({f"{name}_max": float(np.max(v)) for name, v in by_set.items() if name in ("healthy", "normal_own", "normal_8mm")})
        s["criterion"] = float(np.mean([s[f"{name}_mean"] for name in CRITERION_SETS]))
        out[key] = s
    return out


def print_tables(result: dict[str, Any]) -> None:
    s = result["summary"]
    for model in result["models"]:
        print(f"\n{model}: criterion (validation / mild / real lesions); change against {DEFAULT}; healthy and real normal at 8 mm, max %")
        for name in result["variants"]:
            for seed in result["seeds"]:
                r = s[f"{name}/{model}/{seed}"]
                line = (f"  {name:12s} seed {seed:<5d} {r['criterion']:.4f} ({r['validation_mean']:.3f} / {r['mild_mean']:.3f} / "
                        f"{r['real_lesions_mean']:.3f})  healthy {r['healthy_max']:.2f}  8 mm {r['normal_8mm_max']:.2f}")
                if name != DEFAULT:
                    line += f"  change {r['criterion'] - s[f'{DEFAULT}/{model}/{seed}']['criterion']:+.4f}"
                print(line)
            if name != DEFAULT:
                changes = [s[f"{name}/{model}/{seed}"]["criterion"] - s[f"{DEFAULT}/{model}/{seed}"]["criterion"] for seed in result["seeds"]]
                print(f"  {name}: mean change {sum(changes) / len(changes):+.4f} over {len(changes)} seeds, "
                      f"{sum(c > 0 for c in changes)} up")
    for key, label in (("hu_threshold", "HU threshold"), (RULES_ALONE, "the rules alone (every lung voxel a seed, no segmenter)")):
        t = s[key]
        print(f"\n{label}: criterion {t['criterion']:.4f} ({t['validation_mean']:.3f} / {t['mild_mean']:.3f} / {t['real_lesions_mean']:.3f})"
              f"  healthy {t['healthy_max']:.2f}  8 mm {t['normal_8mm_max']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, nargs="?", help="a finished demo's output folder (its training data and plan)")
    ap.add_argument("work", type=Path, nargs="?", help="folder for the trained models and the validation cases")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                    help='a SegConfig or SyntheticSupervision change, e.g. 2.5d \'{"in_channels": 3}\' (repeatable; an '
                         '"iterations" field replaces --iterations for that variant)')
    ap.add_argument("--seeds", type=int, nargs="+", default=[2026, 1, 2, 3])
    ap.add_argument("--models", nargs="+", choices=SEGMENTERS, default=list(SEGMENTERS))
    ap.add_argument("--plan", choices=("quick", "full"), default="quick", help="the demo's plan (its validation cohort's size)")
    ap.add_argument("--iterations", type=int, default=None, help="default: the demo's (a variant's own \"iterations\" field wins)")
    ap.add_argument("--draw-seed", type=int, default=77, help="the real-lesion validation draw's seed")
    ap.add_argument("--real-ct", type=Path, default=ROOT.parent / "shared" / "data" / "real_ct", help="folder of real normal CTs")
    ap.add_argument("--tables", type=Path, default=None, help="print the tables of a saved result and stop")
    args = ap.parse_args(argv)
    if args.tables is not None:
        print_tables(json.loads(args.tables.read_text()))
        return 0
    if args.demo is None or args.work is None:
        ap.error("give a demo folder and a work folder (or --tables)")
    import dataclasses
    import multiprocessing

    from bench_ablation import logged_seconds
    from CovidGANSegLib import demo as demo_module
    from CovidGANSegLib import progress

    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.transunet import SEG_CONFIGS

    progress.set_mode("none")
    variants = {DEFAULT: {}}
    for name, change in args.variant:
        if name == DEFAULT:
            ap.error(f"{DEFAULT!r} is the unchanged configuration's name")
        try:
            variants[name] = json.loads(change)
            seg_change, synthetic_change = split_change(variants[name])
            dataclasses.replace(SEG_CONFIGS["small"], **seg_change)  # unknown fields and bad values fail here
            SyntheticSupervision(**synthetic_change)
        except (ValueError, TypeError, AttributeError) as exc:
            ap.error(f"--variant {name}: {change!r} is not a JSON object of SegConfig / SyntheticSupervision fields ({exc})")
    cohort_json = args.demo / "data" / "train" / "cohort.json"
    if not cohort_json.is_file():
        ap.error(f"{args.demo}: not a finished demo's output folder (no {cohort_json})")
    seed = json.loads(cohort_json.read_text())["seed"]  # the demo's plan seed: its cohorts' seeds
    plan = dataclasses.replace(demo_module.QUICK if args.plan == "quick" else demo_module.FULL, seed=seed)
    info = machine_info()
    print(describe(info))
    t0 = time.perf_counter()
    paths = train_all(args.demo, args.work, variants, args.seeds, tuple(args.models), args.iterations)
    cases = validation_cases(args.work, plan, args.draw_seed, args.real_ct)
    with multiprocessing.get_context("spawn").Pool(2, initializer=_load_models, initargs=({k: str(p) for k, p in paths.items()},)) as pool:
        rows = list(pool.imap(score_case, cases))
    result = {"machine": info, "demo": str(args.demo), "variants": variants, "seeds": args.seeds, "models": args.models,
              "draw_seed": args.draw_seed, "cases": rows, "summary": summarise(rows, [*paths, "hu_threshold", RULES_ALONE]),
              "training_seconds": {k: logged_seconds(p.parent) for k, p in paths.items()}, "seconds": time.perf_counter() - t0}
    print_tables(result)
    save_result("seg_variants", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
