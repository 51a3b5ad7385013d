"""Each lever of the default pipeline taken out one at a time, on the held-out cases of
finished demos: the README's ablation table (issue 8, deliverable 4).

The levers were chosen one by one on validation cohorts (docs/ablation.md); this script chooses
nothing. It loads each demo's two segmenters, computes each model's probability once per case, and
scores the default post-processing (``PostProcessing()``), every variant that leaves one rule out
(or puts back the value it replaced), and the rules alone (every lung voxel a seed, no segmenter:
what the segmenter itself adds) on:

* the demo's held-out phantoms (independent lesion model; Dice, sensitivity, precision per case; the
  mild cases, under ``demo.MILD_PERCENT`` of the lung as the demo's report counts them, apart);
* the real normal CTs of ``--real-ct``, as acquired and at 8 mm slices (percent of the lung marked);
* with ``--real-lesions``, the reporting draw of ``bench_real_lesions.py`` (mild lesions of the
  independent model inserted into the real CTs at 8 mm: seed 2026, 0.3 / 1 / 3 % of the lung, two
  draws each).

Cases of several demos (replicates: ``covidganseg demo --seed S``) are pooled. The "default" row
must reproduce each demo's own held-out Dice case by case: the script checks it and prints the
largest difference. The lung mask closed over 16 mm along z (the inference default before the
2026-12-05 round) changes the model's crop, so that row runs the segmenter again. The rule rows keep
the trained models; levers of training (synthetic-lesion supervision, the segmenter's grid, the
loss, sub-slice lesions) need retraining: ``--retrain WORK`` retrains the TransUNet of each demo
without each of them (every demo's trainings first, two at a time across the demos, one torch
thread each, as the demo trains it) and scores it with the default post-processing. The first
demo's is also retrained unchanged, a control whose weights are compared with the demo's tensor for
tensor (``control_reproduced``; the quick demo's came back exactly, so a retrained row differs from the
default row by its lever alone). Each run's
training seconds are saved (``training_seconds``: its loop, from its losses.csv). The
post-processing seconds are the mean per case and model on this machine (the segmenter's forward
pass, the same for every row, is reported apart).

    python benchmarks/bench_levers_held_out.py demo-out                    # one demo
    python benchmarks/bench_levers_held_out.py demo-out rep3026 rep4026 --real-lesions --retrain /tmp/levers
    python benchmarks/bench_levers_held_out.py --tables benchmarks/results/levers_held_out_<date>.json   # print again

``--rows TEXT ...`` scores only the rule rows whose name contains one of the texts (and the default
row), e.g. ``--rows 'the segmenter'`` for the rules-alone row. ``--training-rows TEXT ...`` retrains only the levers
of training whose name contains one of the texts (and the control).

``--max-threshold T`` scores each segmenter at the lower of its own probability threshold and T
(``threshold_used`` in the result): for models trained before training chose among
``seg.training.THRESHOLDS`` alone (0.3 or 0.4 since the round of 2026-12-05 midday), ``0.4`` gives
the threshold they would get now wherever their own Dice on the synthetic pairs at 0.4 is at
least that at 0.3 (check it; this script does not retrain).

Saves ``benchmarks/results/levers_held_out_<date>.json`` (every case's figures per row and model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_lesions import RULES_ALONE  # noqa: E402
from machine import describe, machine_info, save_result  # noqa: E402
from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402

SEGMENTERS = ("transunet", "unet")
DEFAULT_ROW = "the default pipeline"
LUNG_16MM = "lung_16mm"

#: row name -> PostProcessing overrides ("plain": PLAIN; LUNG_16MM: the default rules on the 16 mm lung mask;
#: RULES_ALONE: the default rules with every lung voxel as a seed, no segmenter)
VARIANTS: dict[str, Any] = {
    DEFAULT_ROW: {},
    "without the HU prior (-800..+100 HU)": {"hu_range": None},
    "without the 2.5 mm opening": {"open_mm": 0.0},
    "without growth into connected lesion-range density": {"grow": False},
    "without the density filter (seeds and growth on the raw density)": {"density_filter_mm": 0.0},
    "without the slab rule": {"slab_tissue_hu": None},
    "slab rule's tissue level -300 HU (before: -100)": {"slab_tissue_hu": -300.0},
    "without the local contrast rule": {"min_contrast_hu": None},
    "without the thin-growth limit": {"min_thick_fraction": None},
    "growth floor -750 HU (before: -725)": {"grow_hu_range": (-750.0, 100.0)},
    "without faint components joining unseeded (mean <= -525 HU)": {"faint_component_hu": None},
    "faint level -550 HU (before: -525; the default until 2026-12-06 afternoon)": {"faint_component_hu": -550.0},
    "without small dense components dropped (under 4 mL, mean above -475 HU)": {"small_dense_hu": None},
    "without the detections' rim (within 2.5 mm of a final component)": {"detection_rim_mm": 0.0},
    "lung mask closed over 16 mm along z (before: 24)": LUNG_16MM,
    "the segmenter (every lung voxel a seed: the rules alone)": RULES_ALONE,
    "none of these rules (p > threshold in the lung)": "plain",
}

#: row name -> how the TransUNet is retrained without that lever of training (``--retrain``): synthetic
#: supervision overrides, segmenter configuration overrides, labels from the GAN's pseudo-masks folder
#: (needed by the contrastive phase too), the segmenter's grid
TRAINING_VARIANTS: dict[str, dict[str, Any]] = {
    "trained on synthetic lesions drawn at the slice's own thickness (before: 2 mm sub-slices averaged)":
        {"synthetic": {"sub_slice_mm": 0.0}},
    "trained on the GAN's pseudo-masks instead of synthetic lesions (the paper's labels)":
        {"synthetic": {"fraction": 0.0}, "pseudo_masks": True},
    "trained with the paper's loss (contrastive phase 1, eq. 5 with beta 1, MSE)":
        {"seg": {"pretrain_fraction": 0.2, "beta": 1.0, "weight_mse": 1.0}, "pseudo_masks": True},
    "trained on the GAN's 64 x 64 x 16 grid (before: 128 x 128 x 32)": {"grid": (64, 64, 16)},
    # the quick plan's segmenters: 500 iterations until the round of 2026-12-07 late morning, 1,000 since; the first
    # row is the lever taken out of a demo of today, the second the check of it on demos trained before
    "trained for 500 iterations (the quick plan before 2026-12-07 late morning)": {"seg": {"iterations": 500}},
    "trained for 1,000 iterations (the demo's plan: 500)": {"seg": {"iterations": 1000}},
}
CONTROL = "retrained as the demo trained it (control)"


def rules(names: Iterable[str]) -> dict[str, Any]:
    """Row name -> ``PostProcessing`` for ``names`` of :data:`VARIANTS` (the 16 mm row and the rules
    alone: the default rules; the lung mask, or the seeds, are the row's)."""
    from CovidGANSegLib.seg.postprocess import PLAIN, PostProcessing

    out = {}
    for name in names:
        spec = VARIANTS[name]
        if spec == "plain":
            out[name] = PLAIN
        elif spec in (LUNG_16MM, RULES_ALONE):
            out[name] = PostProcessing()
        else:
            out[name] = dataclasses.replace(PostProcessing(), **spec)
    return out


def score(mask, truth) -> dict[str, float]:
    from CovidGANSegLib.metrics import confusion, from_confusion

    tp, fp, fn, tn = confusion(mask, truth)
    return {**from_confusion(tp, fp, fn, tn), "tp": tp, "fp": fp, "fn": fn}


class CaseScorer:
    """Each CT through every model once (once more on the 16 mm lung mask when that row is asked
    for), then through each row's post-processing (the rules-alone row once per CT: it reads no model)."""

    def __init__(self, models: dict[str, Any], rows: Iterable[str] = tuple(VARIANTS)) -> None:
        self.models = models
        self.rules = rules(rows)
        self.post_seconds: dict[str, list[float]] = {name: [] for name in self.rules}
        self.forward_seconds: list[float] = []

    def masks(self, ct) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """``({row: {model: lesion mask}}, {"default" / LUNG_16MM: lung mask})`` for one CT."""
        import numpy as np

        from CovidGANSegLib.lungmask import TRAINING_Z_CLOSING_MM, extract_lung_mask
        from CovidGANSegLib.seg.inference import segment_ct
        from CovidGANSegLib.seg.postprocess import PLAIN, post_process, rules_alone_segment

        hu = np.asarray(ct.array)
        spacing = tuple(ct.spacing)
        lungs = {"default": extract_lung_mask(ct.array, ct.spacing)}
        if any(VARIANTS[row] == LUNG_16MM for row in self.rules):
            lungs[LUNG_16MM] = extract_lung_mask(ct.array, ct.spacing, z_closing_mm=TRAINING_Z_CLOSING_MM)
        out: dict[str, dict[str, Any]] = {name: {} for name in self.rules}
        with_model = [row for row in self.rules if VARIANTS[row] != RULES_ALONE]
        for row in self.rules:
            if VARIANTS[row] == RULES_ALONE:  # no model: one mask, in every model's column
                t = time.perf_counter()
                alone = rules_alone_segment(hu, lungs["default"], spacing, self.rules[row])
                self.post_seconds[row].append(time.perf_counter() - t)
                out[row] = {model_name: alone for model_name in self.models}
        for model_name, model in self.models.items():
            candidates = {}
            for key, lung in lungs.items():
                t = time.perf_counter()
                res = segment_ct(ct, model, lung_mask=lung, post=PLAIN)
                self.forward_seconds.append(time.perf_counter() - t)
                candidates[key] = res.probability > res.threshold
            for row in with_model:
                key = LUNG_16MM if VARIANTS[row] == LUNG_16MM else "default"
                t = time.perf_counter()
                out[row][model_name] = post_process(candidates[key], hu, lungs[key], spacing, self.rules[row])
                self.post_seconds[row].append(time.perf_counter() - t)
        return out, lungs


def held_out_rows(demo: Path, scorer: CaseScorer) -> list[dict]:
    """Per held-out case: truth and lung volume, mild or not, each row's scores per model, the HU threshold's."""
    import numpy as np

    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path
    from CovidGANSegLib.demo import is_mild
    from CovidGANSegLib.nifti import load_ct, load_mask
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
    from bench_demo_replicates import held_out_folder

    folder = held_out_folder(demo)
    rows = []
    for study in discover_studies(folder, min_slices=1):
        ct = load_ct(study.path)
        truth = load_mask(lesion_mask_path(folder, study.id), reference=ct)  # evaluation only
        masks, lungs = scorer.masks(ct)
        ml = float(np.prod(ct.spacing)) / 1000.0
        lung_ml = float(lungs["default"].sum()) * ml
        row = {"demo": str(demo), "id": study.id, "truth_ml": float(truth.sum()) * ml, "lung_ml": lung_ml,
               "hu_threshold": score(hu_threshold_segment(ct.array, lungs["default"]), truth),
               "rows": {name: {m: score(masks[name][m], truth) for m in masks[name]} for name in masks}}
        row["mild"] = is_mild(row["truth_ml"], lung_ml)
        rows.append(row)
        print(f"{demo.name} {study.id}: {row['truth_ml']:.0f} mL" + (" (mild)" if row["mild"] else "") + ", Dice "
              + ", ".join(f"{m} {s['dice']:.3f}" for m, s in row["rows"][next(iter(masks))].items()), flush=True)
    return rows


def own_dice_difference(demo: Path, rows: list[dict]) -> float:
    """Largest difference between the default row's Dice and the demo's own held-out Dice (0: reproduced)."""
    summary = json.loads((demo / "evaluation" / "summary.json").read_text())
    own = {m: {r["id"]: r["dice"] for r in summary["per_case"][m]} for m in SEGMENTERS}
    return max(abs(r["rows"][DEFAULT_ROW][m]["dice"] - own[m][r["id"]]) for r in rows for m in SEGMENTERS)


def real_normal_rows(real_dir: Path, scorer: CaseScorer, demo: Path) -> list[dict]:
    """Per real normal CT (as acquired and at 8 mm): percent of the lung each row marks, per model."""
    from CovidGANSegLib.demo import real_normal_volumes

    rows = []
    for name, at_8mm, ct in real_normal_volumes(real_dir):
        masks, lungs = scorer.masks(ct)
        percent = {}
        for row in masks:
            lung = lungs[LUNG_16MM if VARIANTS[row] == LUNG_16MM else "default"]
            percent[row] = {m: percent_of_lung(masks[row][m], lung) for m in masks[row]}
        rows.append({"demo": str(demo), "ct": name, "at_8mm": at_8mm, "key": f"{name}{'_8mm' if at_8mm else ''}", "percent": percent})
    return rows


def real_lesion_rows(real_dir: Path, scorer: CaseScorer, demo: Path) -> list[dict]:
    """The reporting draw of ``bench_real_lesions.py``: each row's scores per model and case."""
    import numpy as np

    from bench_real_lesions import DEFAULT_COVERAGE, MIN_LESION_ML, lesioned_real_cts

    rows = []
    for case, _, ct, truth in lesioned_real_cts(real_dir, DEFAULT_COVERAGE, 2, 2026, 8.0, 0.0):
        if truth.sum() * np.prod(ct.spacing) / 1000.0 < MIN_LESION_ML:
            continue
        masks, _ = scorer.masks(ct)
        rows.append({"demo": str(demo), "case": case, "rows": {name: {m: score(masks[name][m], truth) for m in masks[name]}
                                                               for name in masks}})
    return rows


def retraining_jobs(demo: Path, work: Path, names: list[str]) -> tuple[dict[str, tuple[Any, dict[str, Any]]], dict[str, Path]]:
    """The trainings of the demo's TransUNet under each of ``names`` (:data:`TRAINING_VARIANTS` or
    :data:`CONTROL`) with the demo's data, seed and settings otherwise (a row's ``seg`` fields win, its
    ``iterations`` too): ``({job name: (function, keyword arguments)}, {row name: model.pt})``; models
    already in ``work`` get no job (the script can be resumed), nor does a row that changes nothing the
    demo trained with (e.g. 1,000 iterations on a demo that trained 1,000): its model is the demo's own."""
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.preprocessing import ensure_preprocessed
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.training import train_segmenter

    card, synthetic, config = demo_training(demo)
    seed = json.loads((demo / "data" / "train" / "cohort.json").read_text())["seed"]  # the demo trains with its plan's seed
    grid = tuple(card["preprocess"]["grid"])
    jobs, models = {}, {}
    for i, name in enumerate(names):
        spec = TRAINING_VARIANTS.get(name, {})
        seg = spec.get("seg", {})
        g = tuple(spec.get("grid", grid))
        if name != CONTROL and g == grid and not spec.get("pseudo_masks") and seg.get("iterations", card["iterations"]) == card["iterations"] \
                and all(getattr(config, k) == v for k, v in seg.items() if k != "iterations") \
                and all(synthetic.get(k) == v for k, v in spec.get("synthetic", {}).items()):
            models[name] = demo / "runs" / "transunet" / "model.pt"  # the row is the demo's own training
            continue
        run = work / demo.name / f"variant-{i}"
        models[name] = run / "model.pt"
        if models[name].is_file():
            continue
        data = ensure_preprocessed(demo / "data" / "train", work / demo.name / f"seg_preprocessed-{'x'.join(map(str, g))}",
                                   PreprocessConfig(grid=g)).folder
        jobs[f"{demo.name}: {name}"] = (train_segmenter, dict(
            pseudo_masks=demo / "pseudo_masks" if spec.get("pseudo_masks") else data, run_dir=run, model="transunet",
            config=dataclasses.replace(config, **seg), iterations=seg.get("iterations", card["iterations"]), device="cpu",
            seed=seed, data=demo / "data" / "train", synthetic=SyntheticSupervision(**{**synthetic, **spec.get("synthetic", {})})))
    return jobs, models


def demo_training(demo: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """How a finished demo trained its segmenters: its TransUNet's model card, the synthetic-supervision
    fields (``SyntheticSupervision`` keyword arguments) and the segmenter configuration."""
    from CovidGANSegLib.checkpoints import read_model_card
    from CovidGANSegLib.seg.transunet import get_seg_config

    card = read_model_card(demo / "runs" / "transunet" / "model.pt")
    synthetic = {k: tuple(v) if isinstance(v, list) else v for k, v in card["synthetic"].items()}
    return card, synthetic, get_seg_config(card["config_name"])


def train_in_pairs(jobs: dict[str, tuple[Any, dict[str, Any]]], label: str = "") -> None:
    """Run ``{name: (function, keyword arguments)}`` two at a time, one torch thread each (as the demo
    trains its segmenters), and print each pair's wall time."""
    from CovidGANSegLib.cpu_jobs import run_side_by_side

    pending = list(jobs)
    for k in range(0, len(pending), 2):
        batch = {name: jobs[name] for name in pending[k:k + 2]}
        t = time.perf_counter()
        run_side_by_side(batch, threads=1)
        print(f"{label}trained {' and '.join(batch)} side by side in {time.perf_counter() - t:.0f} s", flush=True)


def same_weights(a: Path, b: Path) -> bool:
    """True when two segmenter checkpoints hold the same weights, tensor for tensor."""
    import torch

    from CovidGANSegLib.seg.inference import load_segmenter

    sa, sb = (load_segmenter(p, "cpu")[0].state_dict() for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def mean(values: Iterable[float]) -> float:
    import numpy as np

    v = [x for x in values if x == x]  # NaN (no prediction: precision) left out
    return float(np.mean(v)) if v else float("nan")


def table(held: list[dict], normal: list[dict], lesions: list[dict], post_seconds: dict[str, list[float]], model: str,
          row_names: list[str]) -> tuple[str, dict]:
    """A markdown table of ``row_names`` for ``model`` (a training row's model is the one retrained
    without that lever, under the default post-processing) and its numbers."""
    n_mild = sum(r["mild"] for r in held)
    from CovidGANSegLib.comparison import paired_difference

    header = (f"| row ({model}) | Dice, all ({len(held)}) | default - row, case by case (95 % interval) | Dice, mild ({n_mild}) | sensitivity | precision | "
              "real normal at 8 mm, max % of lung | real normal as acquired, max % |"
              + (f" mild lesions in real anatomy, Dice ({len(lesions)}) |" if lesions else "") + " post-processing s per case |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    numbers = {}
    for row in row_names:
        s = [r["rows"][row][model] for r in held]
        d = {"dice": mean(x["dice"] for x in s), "dice_mild": mean(x["dice"] for x, r in zip(s, held) if r["mild"]),
             "sensitivity": mean(x["sensitivity"] for x in s), "precision": mean(x["precision"] for x in s),
             "real_normal_8mm_max": max(r["percent"][row][model] for r in normal if r["at_8mm"]),
             "real_normal_max": max(r["percent"][row][model] for r in normal if not r["at_8mm"]),
             "real_lesions_dice": mean(r["rows"][row][model]["dice"] for r in lesions) if lesions else None,
             "post_seconds": mean(post_seconds[row]) if row in post_seconds else None,
             "default_minus_row": paired_difference([r["rows"][DEFAULT_ROW][model]["dice"] for r in held], [x["dice"] for x in s])}
        numbers[row] = d
        p = d["default_minus_row"]
        effect = "-" if row == DEFAULT_ROW else f"{p['mean_difference']:+.3f} ({p['ci_low']:+.3f}..{p['ci_high']:+.3f})"
        lines.append(f"| {row} | {d['dice']:.3f} | {effect} | {d['dice_mild']:.3f} | {d['sensitivity']:.3f} | {d['precision']:.3f} | "
                     f"{d['real_normal_8mm_max']:.2f} | {d['real_normal_max']:.2f} |"
                     + (f" {d['real_lesions_dice']:.3f} |" if lesions else "")
                     + (f" {d['post_seconds']:.2f} |" if row in post_seconds else " - (retrained; the default rules) |"))
    t = [r["hu_threshold"] for r in held]
    p = paired_difference([r["rows"][DEFAULT_ROW][model]["dice"] for r in held], [x["dice"] for x in t])
    lines.append(f"| HU threshold (-750..0 HU in the lung) | {mean(x['dice'] for x in t):.3f} | "
                 f"{p['mean_difference']:+.3f} ({p['ci_low']:+.3f}..{p['ci_high']:+.3f}) | "
                 f"{mean(x['dice'] for x, r in zip(t, held) if r['mild']):.3f} | {mean(x['sensitivity'] for x in t):.3f} | "
                 f"{mean(x['precision'] for x in t):.3f} | - | - |" + (" - |" if lesions else "") + " - |")
    return "\n".join(lines), numbers


def merge(into: list[dict], extra: list[dict], key: str) -> None:
    """Add the rows of ``extra`` (the retrained models' records) to the records of ``into`` with the same demo and ``key``."""
    by = {(r["demo"], r[key]): r for r in extra}
    for r in into:
        other = by[(r["demo"], r[key])]
        for name, scores in other.get("rows", other.get("percent", {})).items():
            r["rows" if "rows" in r else "percent"].setdefault(name, {}).update(scores)


def print_tables(result: dict[str, Any]) -> None:
    """The tables of a saved result, from its per-case records (the post-processing seconds from its tables)."""
    for model in SEGMENTERS:
        saved = result["tables"][model]
        post = {row: [saved[row]["post_seconds"]] for row in VARIANTS if row in saved}
        names = [row for row in (*VARIANTS, *TRAINING_VARIANTS) if row in saved]
        print("\n" + table(result["held_out"], result["real_normal"], result["real_lesions"], post, model, names)[0])


def as_training_rows(records: list[dict], field: str) -> list[dict]:
    """Records scored with ``{variant: retrained model}`` under the default row, turned into records
    whose row is the training variant and whose model is the TransUNet."""
    for r in records:
        default = r[field].pop(DEFAULT_ROW)
        r[field].update({variant: {"transunet": value} for variant, value in default.items()})
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demos", nargs="*", type=Path, help="finished demo output folders (their runs/transunet, runs/unet)")
    ap.add_argument("--real-ct", type=Path, default=ROOT.parent / "shared" / "data" / "real_ct", help="folder of real normal CTs")
    ap.add_argument("--real-lesions", action="store_true", help="also score the real-lesion reporting draw (16 cases per demo)")
    ap.add_argument("--retrain", type=Path, default=None, metavar="WORK",
                    help="also retrain each demo's TransUNet without each lever of training, in WORK (resumable), and score it; "
                         "the first demo's is also retrained unchanged, as a control")
    ap.add_argument("--training-rows", nargs="+", default=None, metavar="TEXT",
                    help="with --retrain: only the levers of training whose name contains one of these texts (and the control)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for scoring")
    ap.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                    help="score only the rule rows whose name contains one of these texts (and the default row)")
    ap.add_argument("--max-threshold", type=float, default=None, metavar="T",
                    help="score each segmenter at min(its own threshold, T) (models trained before the thresholds of training "
                         "were limited)")
    ap.add_argument("--tables", type=Path, default=None, metavar="RESULT",
                    help="only print the tables of a saved result (benchmarks/results/levers_held_out_*.json) again")
    args = ap.parse_args(argv)
    if args.tables is not None:
        print_tables(json.loads(args.tables.read_text()))
        return 0
    if not args.demos:
        ap.error("give finished demo folders (or --tables RESULT)")
    selected = [name for name in VARIANTS if name == DEFAULT_ROW or args.rows is None or any(text in name for text in args.rows)]
    if len(selected) == 1 and args.rows is not None:
        ap.error(f"--rows: no rule row's name contains any of {args.rows}; the rows: {[n for n in VARIANTS if n != DEFAULT_ROW]}")
    training_rows = [name for name in TRAINING_VARIANTS if args.training_rows is None or any(text in name for text in args.training_rows)]
    if not training_rows:
        ap.error(f"--training-rows: no lever of training's name contains any of {args.training_rows}; the levers: {list(TRAINING_VARIANTS)}")
    if args.max_threshold is not None and not 0.0 < args.max_threshold < 1.0:
        ap.error(f"--max-threshold must be a probability in (0, 1), got {args.max_threshold}")

    import torch

    from bench_ablation import logged_seconds
    from CovidGANSegLib import progress
    from CovidGANSegLib.seg.inference import load_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_mode("none")
    info = machine_info()
    print(describe(info))
    t0 = time.perf_counter()
    held, normal, lesions, checks, controls, seconds = [], [], [], {}, {}, {}
    thresholds: dict[str, dict[str, list[float]]] = {}
    post_seconds: dict[str, list[float]] = {name: [] for name in selected}
    forward: list[float] = []
    retrained_paths: dict[str, dict[str, Path]] = {}
    if args.retrain is not None:  # every demo's retrainings first, two at a time across the demos
        jobs: dict[str, tuple[Any, dict[str, Any]]] = {}
        for k, demo in enumerate(args.demos):
            demo_jobs, retrained_paths[str(demo)] = retraining_jobs(demo, args.retrain, training_rows + ([CONTROL] if k == 0 else []))
            jobs.update(demo_jobs)
        train_in_pairs(jobs)
    for k, demo in enumerate(args.demos):
        models = {m: load_segmenter(demo / "runs" / m / "model.pt", "cpu")[0] for m in SEGMENTERS}
        thresholds[str(demo)] = {}
        for m, model in models.items():
            own = float(model.threshold)
            if args.max_threshold is not None:
                model.threshold = min(own, args.max_threshold)
            thresholds[str(demo)][m] = [own, float(model.threshold)]
        print(f"{demo}: thresholds (own, used): {thresholds[str(demo)]}", flush=True)
        scorer = CaseScorer(models, rows=selected)
        rows = held_out_rows(demo, scorer)
        checks[str(demo)] = own_dice_difference(demo, rows)
        normal_rows = real_normal_rows(args.real_ct, scorer, demo)
        lesion_rows = real_lesion_rows(args.real_ct, scorer, demo) if args.real_lesions else []
        for name in selected:
            post_seconds[name] += scorer.post_seconds[name]
        forward += scorer.forward_seconds
        print(f"{demo}: the default row against the demo's own held-out Dice, largest difference {checks[str(demo)]:.2e}", flush=True)
        if args.retrain is not None:
            paths = dict(retrained_paths[str(demo)])
            seconds[str(demo)] = {name: logged_seconds(path.parent) for name, path in paths.items()}
            if k == 0:
                same = same_weights(paths.pop(CONTROL), demo / "runs" / "transunet" / "model.pt")
                controls[str(demo)] = same
                print(f"{demo}: the control retraining {'reproduces' if same else 'does NOT reproduce'} the demo's TransUNet weight for weight",
                      flush=True)
            retrained = CaseScorer({name: load_segmenter(path, "cpu")[0] for name, path in paths.items()}, rows=(DEFAULT_ROW,))
            merge(rows, as_training_rows(held_out_rows(demo, retrained), "rows"), "id")
            merge(normal_rows, as_training_rows(real_normal_rows(args.real_ct, retrained, demo), "percent"), "key")
            if args.real_lesions:
                merge(lesion_rows, as_training_rows(real_lesion_rows(args.real_ct, retrained, demo), "rows"), "case")
        held += rows
        normal += normal_rows
        lesions += lesion_rows
    result: dict[str, Any] = {"machine": info, "demos": [str(d) for d in args.demos], "default_row_check": checks,
                              "control_reproduced": controls, "training_seconds": seconds, "forward_seconds_mean": mean(forward),
                              "max_threshold": args.max_threshold, "threshold_used": thresholds,
                              "variants": {k: v if isinstance(v, str) else {a: list(b) if isinstance(b, tuple) else b for a, b in v.items()}
                                           for k, v in VARIANTS.items()},
                              "training_variants": {n: TRAINING_VARIANTS[n] for n in training_rows} if args.retrain is not None else {},
                              "tables": {},
                              "held_out": held, "real_normal": normal, "real_lesions": lesions}
    for model in SEGMENTERS:
        names = selected + (training_rows if args.retrain is not None and model == "transunet" else [])
        text, numbers = table(held, normal, lesions, post_seconds, model, names)
        print("\n" + text)
        result["tables"][model] = numbers
    result["seconds"] = time.perf_counter() - t0
    print(f"\nthe segmenter's forward pass (probability on the CT's grid): {mean(forward):.2f} s per case and model; "
          f"{result['seconds']:.0f} s in all")
    save_result("levers_held_out", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
