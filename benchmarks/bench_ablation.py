"""Ablation of the levers of the self-supervised pipeline (issue 8): what each one does to held-out Dice.

One GAN is trained (the plan's), then segmenters are trained under each variant and scored on the
*validation* cohort (independent lesion model, its own seed and study numbers; the held-out test
cohort is never used here, so nothing is chosen on it) and on the real normal CTs (percent of lung
marked as lesion). Variants, each adding one lever to the previous one unless said otherwise:

* ``paper``: the paper's path: pseudo-masks by the paper rule on the GAN's grid, no synthetic
  lesions, probability > 0.5 inside the lung (no post-processing);
* ``+grid``: the segmenter on the finer grid (paper rule mapped there);
* ``+rule``: the refined pseudo-mask rule (regional thresholds, hysteresis, HU prior, thin structures);
* ``+synthetic-half``: half of each end-to-end batch from synthetic lesions in healthy volumes, the
  probability threshold chosen on synthetic lesions in held-out healthy volumes;
* ``synthetic-prior``: synthetic lesions only in phase 2, drawn with the synthesiser's peripheral /
  posterior preference and involvement up to 30 %;
* ``synthetic-only``: synthetic lesions only, no location preference, involvement up to 80 %;
* ``+hu-range``: lesions only where the input is -800..+100 HU;
* ``+opening``: and an in-plane opening (2.5 mm);
* ``+growth``: and growth into connected lesion-range density (the default pipeline);
* ``+gan-gate``: the default pipeline (``segment --gan``): detected components are kept only where
  the GAN removed density (mean difference above median + 4 sigma of G's healthy-lung difference);
* ``gan-gate-voxel``: instead, a voxel-wise gate (difference > 30 HU), tried first;
* ``+gate-quartile``: the gate compares the component's upper quartile of the difference instead
  of its mean (the mean dropped whole lungs of extensive disease);
* ``+no-contrastive``: no contrastive phase 1 (all iterations end-to-end on synthetic pairs);
* ``+bce``: and plain BCE (eq. 5 with beta = 0, no MSE term): the labels are exact, nothing to
  make up for (the default model);
* ``bce-with-contrastive``: instead, plain BCE after the contrastive phase;
* ``bce-coverage-30``: instead, synthetic involvement drawn from 0.1-30 % of the lung (more mild cases).
* ``bce-no-growth``: the ``+bce`` model with its seeds only (no growth into connected lesion-range density);
* ``bce-lr-1e-3``: instead, the ``+bce`` model trained with learning rate 1e-3 instead of 3e-4;
* ``bce-2.5d``: instead, the ``+bce`` model with 2.5D input (``in_channels = 3``: each slice with its
  two neighbours);
* ``+spare-extensive``: the ``+bce`` model, and the gate spares extensive components (over 5 % of the
  lung) instead of judging them by their upper quartile;
* ``+face-growth``: and the growth region is face-connected (6) instead of 26-connected;
* ``face-growth-only``: instead, the ``+bce`` model with face-connected growth and the quartile gate
  (neither of these three rules became the default: across four seeds of the ``+bce`` model they did
  not help consistently; see ``--seg-seed``);
* ``bce-no-gate``: the ``+bce`` model without the GAN-agreement gate (what the GAN adds at inference);
* ``+growth-filter``: the ``+bce`` model, and the growth region is thresholded on the density after an
  in-plane grey opening then closing with a 3 mm half-width square (``PostProcessing.density_filter_mm``;
  every older row grows on the raw density);
* ``+seed-filter``: and the seeds too are kept only where that density is lesion-range
  (``density_filter_seeds``; the previous default pipeline);
* ``seed-filter-no-gate``: the same without the GAN-agreement gate;
* ``+slab-rule``: and lung voxels that share their slice's slab with non-lung tissue are left out
  (``PostProcessing.slab_tissue_hu``). Every row before it runs with ``slab_tissue_hu=None`` and,
  where it gates, with the gate at k = 4 (the default until then);
* ``+local-contrast``: and a final component is kept only when its median HU is at least 100 HU above
  that of the lung within 6 mm around it (``PostProcessing.min_contrast_hu``). Every row before it
  runs with ``min_contrast_hu=None``.
* ``+thin-growth``: and a grown component of at least 5 mL of which less than 75 % survives an
  in-plane opening with a 5 mm disk (a vessel tree) keeps only its seeds and 3 mm around them
  (``PostProcessing.min_thick_fraction``): the default pipeline. Every row before it runs with
  ``min_thick_fraction=None``.

``--mild-cohort N`` also scores every variant on a second validation cohort of N mild (CT-1)
phantoms (independent lesion model, seed + 3, studies 7001..): the main validation cohort has three.

Besides Dice, each segmenter row reports ``auc_dense``: how well its probability alone, before any
post-processing, separates lesion voxels from normal lung of lesion-like density (-750..+100 HU).

``--iterations 1000`` gives the row "1,000 iterations" of docs/ablation.md.

Variants that change the segmenter's configuration (``seg`` overrides) train their own model; with
the plan's segmenter configuration changed, the older rows set it back explicitly.

``--gate-sweep`` adds rows for component gates at fixed HU levels (0 .. 90 HU).

Rows: Dice (all cases, and mild cases under 5 % of lung apart), sensitivity, precision, real-normal
false-positive percent per CT, training seconds. Results are printed and saved to
``benchmarks/results/ablation_<plan>_<date>.json`` (partial results are saved after every variant).

    python benchmarks/bench_ablation.py --plan quick --out /tmp/ablation
    python benchmarks/bench_ablation.py --plan quick --variants paper +synthetic --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from CovidGANSegLib.demo import MILD_PERCENT  # noqa: E402  (the demo report's mild rule)
from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402

VARIANTS = ("paper", "+grid", "+rule", "+synthetic-half", "synthetic-prior", "synthetic-only", "+hu-range", "+opening", "+growth",
            "+gan-gate", "gan-gate-voxel", "+gate-quartile", "+no-contrastive", "+bce", "bce-with-contrastive", "bce-coverage-30",
            "bce-no-growth", "bce-lr-1e-3", "bce-2.5d", "+spare-extensive", "+face-growth", "face-growth-only",
            "bce-no-gate", "+growth-filter", "+seed-filter", "seed-filter-no-gate", "+slab-rule", "+local-contrast",
            "+thin-growth")
#: rule: pseudo-mask rule; fine: segmenter on the fine grid; fraction: synthetic share of phase 2; prior / coverage:
#: synthetic lesion placement and involvement range; post: inference post-processing; gate: GAN gate
_PLAIN = {"hu_range": None, "open_mm": 0.0, "grow": False}
_NEW = {"prior": False, "coverage": (0.002, 0.8)}
#: the post-processing of the rows from +gate-quartile on: extensive components judged by their upper quartile,
#: 26-connected growth on the raw density (the density-filter rows switch the filter on over it)
_QUARTILE = {"gan_gate_spares_extensive": False, "gan_gate_quantile": 0.75, "grow_connectivity": 26, "density_filter_mm": 0.0}
#: growth on the raw density (before the growth density filter became the default)
_RAW = {"density_filter_mm": 0.0}
#: the segmenter's loss schedule before plain BCE became the default: contrastive phase 1 (20 %), eq. 5 with beta = 1 + MSE
_PAPER_LOSS = {"pretrain_fraction": 0.2, "beta": 1.0, "weight_mse": 1.0}
#: plain BCE, no contrastive phase (the +bce model and every row after it)
_BCE = {"pretrain_fraction": 0.0, "beta": 0.0, "weight_mse": 0.0}
SETTINGS = {
    "paper": {"rule": "paper", "fine": False, "fraction": 0.0, "post": _PLAIN, **_NEW, "seg": _PAPER_LOSS},
    "+grid": {"rule": "paper", "fine": True, "fraction": 0.0, "post": _PLAIN, **_NEW, "seg": _PAPER_LOSS},
    "+rule": {"rule": "refined", "fine": True, "fraction": 0.0, "post": _PLAIN, **_NEW, "seg": _PAPER_LOSS},
    "+synthetic-half": {"rule": "refined", "fine": True, "fraction": 0.5, "post": _PLAIN, **_NEW, "seg": _PAPER_LOSS},
    "synthetic-prior": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _PLAIN, "prior": True, "coverage": (0.002, 0.3),
                        "seg": _PAPER_LOSS},
    "synthetic-only": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _PLAIN, **_NEW, "seg": _PAPER_LOSS},
    "+hu-range": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"open_mm": 0.0, "grow": False}, **_NEW, "seg": _PAPER_LOSS},
    "+opening": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"grow": False}, **_NEW, "seg": _PAPER_LOSS},
    "+growth": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"grow_connectivity": 26, **_RAW}, **_NEW, "seg": _PAPER_LOSS},
    "+gan-gate": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"gan_gate_spares_extensive": False, "gan_gate_quantile": None,
                                                                          "grow_connectivity": 26, **_RAW},
                  "gate": "component", **_NEW, "seg": _PAPER_LOSS},
    "gan-gate-voxel": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"grow_connectivity": 26, **_RAW}, "gate": "voxel", **_NEW,
                       "seg": _PAPER_LOSS},
    "+gate-quartile": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW, "seg": _PAPER_LOSS},
    "+no-contrastive": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW,
                        "seg": {**_PAPER_LOSS, "pretrain_fraction": 0.0}},
    "+bce": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW,
             "seg": _BCE},
    "bce-with-contrastive": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW,
                             "seg": {**_PAPER_LOSS, "beta": 0.0, "weight_mse": 0.0}},
    "bce-coverage-30": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", "prior": False,
                        "coverage": (0.001, 0.3), "seg": _BCE},
    # the default model (+bce) with its seeds only: what the growth step adds and costs (mild cases: vessel trees)
    "bce-no-growth": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {**_QUARTILE, "grow": False}, "gate": "component", **_NEW,
                      "seg": _BCE},
    "bce-lr-1e-3": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW,
                    "seg": {**_BCE, "learning_rate": 1e-3}},
    "bce-2.5d": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, "gate": "component", **_NEW,
                 "seg": {**_BCE, "in_channels": 3}},
    "+spare-extensive": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"gan_gate_spares_extensive": True, **_RAW}, "gate": "component",
                         **_NEW, "seg": _BCE},
    "+face-growth": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"gan_gate_spares_extensive": True, "grow_connectivity": 6, **_RAW},
                     "gate": "component", **_NEW, "seg": _BCE},
    "face-growth-only": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {"grow_connectivity": 6, **_RAW}, "gate": "component", **_NEW,
                         "seg": _BCE},
    "bce-no-gate": {"rule": "refined", "fine": True, "fraction": 1.0, "post": _QUARTILE, **_NEW,
                    "seg": _BCE},
    # the +bce model, growth on the filtered density (grey opening then closing, 3 mm), seeds unfiltered
    "+growth-filter": {"rule": "refined", "fine": True, "fraction": 1.0,
                       "post": {**_QUARTILE, "density_filter_mm": 3.0, "density_filter_seeds": False}, "gate": "component",
                       **_NEW, "seg": _BCE},
    # and the seeds too are kept only where the filtered density is lesion-range: the default pipeline
    "+seed-filter": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {**_QUARTILE, "density_filter_mm": 3.0}, "gate": "component",
                     **_NEW, "seg": _BCE},
    "seed-filter-no-gate": {"rule": "refined", "fine": True, "fraction": 1.0, "post": {**_QUARTILE, "density_filter_mm": 3.0}, **_NEW,
                            "seg": _BCE},
    # no gate, slab partial volume left out
    "+slab-rule": {"rule": "refined", "fine": True, "fraction": 1.0,
                   "post": {**_QUARTILE, "density_filter_mm": 3.0, "slab_tissue_hu": -300.0}, **_NEW, "seg": _BCE},
    # and components no denser than the lung around them are dropped
    "+local-contrast": {"rule": "refined", "fine": True, "fraction": 1.0,
                        "post": {**_QUARTILE, "density_filter_mm": 3.0, "slab_tissue_hu": -300.0, "min_contrast_hu": 100.0},
                        **_NEW, "seg": _BCE},
    # the default pipeline: and thin grown components (vessel trees) keep only their seeds' surroundings
    "+thin-growth": {"rule": "refined", "fine": True, "fraction": 1.0,
                     "post": {**_QUARTILE, "density_filter_mm": 3.0, "slab_tissue_hu": -300.0, "min_contrast_hu": 100.0,
                              "min_thick_fraction": 0.75},
                     **_NEW, "seg": _BCE},
}
GATE_LEVELS_HU = (0.0, 15.0, 25.0, 40.0, 60.0, 90.0)
GATE_HU = 30.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (cohorts, runs; reused when it exists)")
    ap.add_argument("--plan", default="quick", choices=["quick", "full"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--arch", default="transunet", choices=["transunet", "unet"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--real-normal", type=Path, default=None, help="folder of real normal CTs (default: shared/data/real_ct)")
    ap.add_argument("--iterations", type=int, default=None, help="segmenter iterations (default: the plan's)")
    ap.add_argument("--seg-seed", type=int, default=None,
                    help="seed of the segmenters' training (default: the plan's; the cohorts and the GAN keep the plan's seed)")
    ap.add_argument("--gate-sweep", action="store_true", help="also score component gates at fixed HU levels on the default model")
    ap.add_argument("--mild-cohort", type=int, default=0, metavar="N",
                    help="also score every variant on a second validation cohort of N mild (CT-1) phantoms (seed + 3, studies 7001..)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from CovidGANSegLib import demo, progress

    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_mode("none")
    plan = demo.QUICK if args.plan == "quick" else demo.FULL
    if args.iterations:
        plan = dataclasses.replace(plan, seg_iterations=args.iterations, seg_iterations_by_model=())
    real_dir = args.real_normal or demo.default_real_normal_dir()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    seed_tag = "" if args.seg_seed is None else f"_seed{args.seg_seed}"
    result_path = ROOT / "benchmarks" / "results" / f"ablation_{args.plan}_{args.arch}{seed_tag}_{stamp}.json"
    result: dict[str, Any] = {
        "plan": dataclasses.asdict(plan), "arch": args.arch, "seg_seed": args.seg_seed, "split": "validation", "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "note": "scored on the validation cohort (independent lesion model); the held-out test cohort is not used here",
        "stages": {}, "variants": {},
    }

    train_dir, val_dir = _cohorts(work, plan, result)
    gan_model = _gan(work, plan, train_dir, result)
    cases = _load_cases(val_dir)
    result["cases"] = len(cases)
    result["mild_cases"] = sum(c["mild"] for c in cases)
    result["variants"]["hu_threshold"] = _score_hu_threshold(cases, real_dir)
    mild_cases = _load_cases(_mild_cohort(work, plan, args.mild_cohort)) if args.mild_cohort else []
    if mild_cases:
        result["mild_cohort_cases"] = len(mild_cases)
        _add_mild_cohort(result["variants"]["hu_threshold"], _score_hu_threshold(mild_cases, None))
    _save(result, result_path)
    for name in args.variants:
        st = SETTINGS[name]
        pm = _pseudo_masks(work, plan, train_dir, gan_model, st["rule"], st["fine"], result)
        t = time.perf_counter()
        model, trained = _train(work, plan, pm, st, args.arch, train_dir, args.seg_seed)
        train_s = time.perf_counter() - t
        row = _score(model, cases, real_dir, gan_model if st.get("gate") else None, st["post"], st.get("gate"))
        if mild_cases:
            _add_mild_cohort(row, _score(model, mild_cases, None, gan_model if st.get("gate") else None, st["post"], st.get("gate")))
        row["train_s"] = round(train_s if trained else logged_seconds(model.parent), 1)
        row["model"] = str(model.parent.name)
        row["settings"] = {**st, "gan_gate_hu": GATE_HU if st.get("gate") else None}
        result["variants"][name] = row
        _save(result, result_path)
        print(_table(result), flush=True)
    if args.gate_sweep:
        st = SETTINGS["+gan-gate"]
        pm = _pseudo_masks(work, plan, train_dir, gan_model, st["rule"], st["fine"], result)
        model, _ = _train(work, plan, pm, st, args.arch, train_dir, args.seg_seed)
        for level in GATE_LEVELS_HU:
            row = _score(model, cases, real_dir, gan_model, st["post"], "component", fixed_gate_hu=level)
            row["settings"] = {**st, "gate_hu": level}
            result["variants"][f"gate {level:g} HU"] = row
            _save(result, result_path)
            print(_table(result), flush=True)
    print(f"saved {result_path}")
    return 0


def _save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def _cohorts(work: Path, plan, result: dict[str, Any]) -> tuple[Path, Path]:
    from CovidGANSegLib.synth.phantoms import write_cohort

    train_dir, val_dir = work / "train", work / "validation"
    t = time.perf_counter()
    if not train_dir.is_dir():
        write_cohort(train_dir, healthy=plan.train_healthy, covid=plan.train_covid, seed=plan.seed, size=plan.phantom_size,
                     lesion_model=plan.lesion_model)
    _validation_cohort(work, plan)
    result["stages"]["phantoms_s"] = round(time.perf_counter() - t, 1)
    return train_dir, val_dir


def _validation_cohort(work: Path, plan) -> Path:
    """The demo's validation cohort (seed + 2, studies 6001..), written once under ``work``."""
    from CovidGANSegLib.synth.phantoms import write_cohort

    val_dir = work / "validation"
    if not val_dir.is_dir():
        write_cohort(val_dir, healthy=0, covid=plan.val_covid, seed=plan.seed + 2, size=plan.phantom_size, first_id=6001,
                     lesion_model=plan.lesion_model)
    return val_dir


def _mild_cohort(work: Path, plan, n: int) -> Path:
    """A second validation cohort of ``n`` mild (CT-1) phantoms: three mild cases cannot choose anything."""
    from CovidGANSegLib.synth.phantoms import write_cohort

    mild_dir = work / f"validation_mild_{n}"
    if not mild_dir.is_dir():
        write_cohort(mild_dir, healthy=0, covid=n, seed=plan.seed + 3, size=plan.phantom_size, first_id=7001,
                     lesion_model=plan.lesion_model, categories=("CT-1",))
    return mild_dir


def _add_mild_cohort(row: dict[str, Any], mild: dict[str, Any]) -> None:
    """The mild cohort's means into ``row`` (``*_mild_cohort``) and its cases under ``per_case_mild_cohort``."""
    for key in ("dice", "sensitivity", "precision", "auc_dense"):
        if key in mild:
            row[f"{key}_mild_cohort"] = mild[key]
    row["per_case_mild_cohort"] = mild["per_case"]


def _gan(work: Path, plan, train_dir: Path, result: dict[str, Any]) -> Path:
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.gan.training import train_gan

    model = work / "runs" / "gan" / "model.pt"
    if not model.is_file():
        t = time.perf_counter()
        train_gan(train_dir, work / "runs" / "gan", config=plan.gan_config, preprocess=PreprocessConfig(grid=plan.grid),
                  iterations=plan.gan_iterations, device="cpu", seed=plan.seed)
        result["stages"]["gan_training_s"] = round(time.perf_counter() - t, 1)
    return model


def _pseudo_masks(work: Path, plan, train_dir: Path, gan_model: Path, rule: str, fine: bool, result: dict[str, Any]) -> Path:
    from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks

    grid = plan.seg_grid if fine else None
    out = work / f"pm_{rule}_{'fine' if fine else 'gan'}"
    if not (out / "index.json").is_file():
        t = time.perf_counter()
        cached = work / "runs" / "gan" / "preprocessed"
        make_pseudo_masks(gan_model, cached if (cached / "index.json").is_file() else train_dir, out, device="cpu", rule=rule, grid=grid,
                          cache=work / "seg_preprocessed", overwrite=True)
        result["stages"][f"pseudo_masks_{out.name}_s"] = round(time.perf_counter() - t, 1)
        index = json.loads((out / "index.json").read_text())
        result["stages"][f"pseudo_masks_{out.name}_fraction_of_lung"] = index["mask_fraction_of_lung"]
    return out


def _train(work: Path, plan, pm: Path, st: dict[str, Any], arch: str, train_dir: Path, seed: int | None = None) -> tuple[Path, bool]:
    """The segmenter of one setting (trained once; variants that differ only at inference share it).

    ``st["seg"]``: overrides of the plan's segmenter configuration (e.g. ``pretrain_fraction``);
    ``st["iterations"]``: another number of iterations. ``seed``: another training seed than the plan's.
    """
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.training import train_segmenter
    from CovidGANSegLib.seg.transunet import get_seg_config

    overrides = st.get("seg", {})
    iterations = st.get("iterations", plan.seg_iterations_of(arch))
    config = dataclasses.replace(get_seg_config(plan.seg_config), **overrides) if overrides else plan.seg_config
    key = (f"{arch}_{st['rule']}_{'fine' if st['fine'] else 'gan'}_syn{st['fraction']:g}"
           f"_cov{st['coverage'][0]:g}-{st['coverage'][1]:g}{'_prior' if st['prior'] else ''}_it{iterations}"
           + "".join(f"_{k}{v:g}" if isinstance(v, (int, float)) else f"_{k}{v}" for k, v in sorted(overrides.items()))
           + ("" if seed is None else f"_seed{seed}"))
    run = work / "runs" / key
    if (run / "model.pt").is_file():
        return run / "model.pt", False
    if run.exists():
        import shutil

        shutil.rmtree(run)
    syn = SyntheticSupervision(fraction=st["fraction"], variants_per_volume=plan.synthetic_variants, coverage=st["coverage"],
                               location_prior=st["prior"])
    return train_segmenter(pm, run, model=arch, config=config, iterations=iterations, device="cpu", seed=plan.seed if seed is None else seed,
                           data=train_dir, synthetic=syn), True


def logged_seconds(run: Path) -> float:
    """Training seconds of an earlier run (sum of its losses.csv ``seconds`` column)."""
    import csv

    with open(run / "losses.csv", newline="") as fh:
        return float(sum(float(r["seconds"] or 0.0) for r in csv.DictReader(fh)))


def _load_cases(val_dir: Path) -> list[dict[str, Any]]:
    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.nifti import load_ct, load_mask

    cases = []
    for study in discover_studies(val_dir, min_slices=1):
        ct = load_ct(study.path)
        lung = extract_lung_mask(ct.array, ct.spacing)
        truth = load_mask(lesion_mask_path(val_dir, study.id), reference=ct)  # evaluation only
        percent = 100.0 * float(truth.sum()) / max(1, int(lung.sum()))
        cases.append({"id": study.id, "ct": ct, "lung": lung, "truth": truth, "percent": percent, "mild": percent < MILD_PERCENT})
    return cases


def _confusion(pred, truth) -> dict[str, float]:
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"dice": dice, "sensitivity": tp / (tp + fn) if tp + fn else float("nan"), "precision": tp / (tp + fp) if tp + fp else float("nan")}


def _dense_auc(probability, case: dict[str, Any]) -> float:
    """How well the segmenter's probability alone (before any post-processing) tells lesion voxels
    from normal lung of lesion-like density: the ROC AUC (Mann-Whitney U) of lesion against
    non-lesion voxels among the lung voxels of -750..+100 HU (vessels, partial volume, dependent
    density: what thresholds and the growth step cannot tell apart). 0.5: no better than chance."""
    import numpy as np
    from scipy.stats import rankdata

    hu = np.asarray(case["ct"].array)
    dense = case["lung"] & (hu >= -750.0) & (hu <= 100.0)
    positive = case["truth"][dense]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(probability, dtype=np.float64)[dense])
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _summarise(per_case: list[dict[str, Any]], cases: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    def mean(key: str, subset: list[int]) -> float:
        vals = [per_case[i][key] for i in subset if not np.isnan(per_case[i][key])]
        return round(float(np.mean(vals)), 4) if vals else float("nan")

    everyone = list(range(len(cases)))
    mild = [i for i, c in enumerate(cases) if c["mild"]]
    return {
        "dice": mean("dice", everyone), "sensitivity": mean("sensitivity", everyone), "precision": mean("precision", everyone),
        "dice_mild": mean("dice", mild), "sensitivity_mild": mean("sensitivity", mild), "precision_mild": mean("precision", mild),
        **({"auc_dense": mean("auc_dense", everyone), "auc_dense_mild": mean("auc_dense", mild)} if "auc_dense" in per_case[0] else {}),
        "per_case": [{"id": c["id"], "percent": round(c["percent"], 3), **{k: round(v, 4) for k, v in pc.items()}} for c, pc in zip(cases, per_case)],
    }


def _real_normal(real_dir: Path | None, predict) -> tuple[list[float] | None, list[float] | None]:
    """Percent of lung marked on each real normal CT: as acquired, and resampled to 8 mm slices."""
    if real_dir is None:
        return None, None
    from CovidGANSegLib.demo import real_normal_volumes
    from CovidGANSegLib.lungmask import extract_lung_mask

    thin: list[float] = []
    thick: list[float] = []
    for _, at_8mm, ct in real_normal_volumes(real_dir):
        lung = extract_lung_mask(ct.array, ct.spacing)
        (thick if at_8mm else thin).append(round(percent_of_lung(predict(ct, lung), lung), 3))
    return thin, thick


def _score_hu_threshold(cases: list[dict[str, Any]], real_dir: Path | None) -> dict[str, Any]:
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment

    per_case = [_confusion(hu_threshold_segment(c["ct"].array, c["lung"]), c["truth"]) for c in cases]
    row = _summarise(per_case, cases)
    row["real_normal_percent"], row["real_normal_8mm_percent"] = _real_normal(real_dir, lambda ct, lung: hu_threshold_segment(ct.array, lung))
    return row


def _score(model_path: Path, cases: list[dict[str, Any]], real_dir: Path | None, gan: Path | None, post: dict[str, Any],
           gate: str | None = None, fixed_gate_hu: float | None = None) -> dict[str, Any]:
    from CovidGANSegLib.seg.inference import gan_gate, load_segmenter, segment_ct
    from CovidGANSegLib.seg.postprocess import PostProcessing

    # rows before +slab-rule predate the slab rule, and their gate ran at k = 4 (the default until then);
    # rows before +local-contrast predate the local contrast rule, rows before +thin-growth the thin-growth limit
    rule = PostProcessing(**{"slab_tissue_hu": None, "min_contrast_hu": None, "min_thick_fraction": None,
                             "gan_gate_sigmas": 4.0 if gate else None, **post})
    model, _ = load_segmenter(model_path, "cpu")
    generator = payload = None
    if gan is not None:
        from CovidGANSegLib.gan.inference import load_generator

        generator, payload = load_generator(gan, "cpu")
    levels: list[float] = []

    def segment(ct, lung):
        """The lesion mask and the segmenter's probability map (before post-processing)."""
        if generator is None:
            result = segment_ct(ct, model, lung_mask=lung, post=rule)
            return result.lesion_mask, result.probability
        ph, level = gan_gate(ct, lung, generator, payload, rule)
        if gate == "voxel":
            result = segment_ct(ct, model, lung_mask=lung, post=rule)
            return result.lesion_mask & (ph.difference_hu > GATE_HU), result.probability
        level = fixed_gate_hu if fixed_gate_hu is not None else level
        levels.append(level)
        result = segment_ct(ct, model, lung_mask=lung, post=rule, difference_hu=ph.difference_hu, gate_hu=level)
        return result.lesion_mask, result.probability

    t = time.perf_counter()
    per_case = []
    for c in cases:
        mask, probability = segment(c["ct"], c["lung"])
        per_case.append({**_confusion(mask, c["truth"]), "auc_dense": _dense_auc(probability, c)})
    row = _summarise(per_case, cases)
    row["segment_s_per_case"] = round((time.perf_counter() - t) / max(1, len(cases)), 2)
    row["real_normal_percent"], row["real_normal_8mm_percent"] = _real_normal(real_dir, lambda ct, lung: segment(ct, lung)[0])
    row["threshold"] = float(getattr(model, "threshold", 0.5))
    if levels:
        row["gate_hu"] = round(float(levels[0]), 1)
    return row


def _table(result: dict[str, Any]) -> str:
    mild_n = result.get("mild_cohort_cases")
    lines = [f"validation cohort: {result.get('cases')} cases ({result.get('mild_cases')} mild < {MILD_PERCENT:g} %)"
             + (f"; mild cohort: {mild_n} CT-1 cases" if mild_n else ""),
             "| variant | Dice | Dice mild | sensitivity | precision | AUC dense (mild) | real-normal FP % | at 8 mm | train s |"
             + (" mild cohort: Dice / precision / AUC dense |" if mild_n else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if mild_n else "")]
    for name, r in result["variants"].items():
        rn, rn8 = r.get("real_normal_percent"), r.get("real_normal_8mm_percent")
        auc = f"{r['auc_dense']:.2f} ({r['auc_dense_mild']:.2f})" if "auc_dense" in r else "-"
        lines.append(f"| {name} | {r['dice']:.3f} | {r['dice_mild']:.3f} | {r['sensitivity']:.3f} | {r['precision']:.3f} | {auc} | "
                     f"{', '.join(f'{v:.1f}' for v in rn) if rn else '-'} | {', '.join(f'{v:.1f}' for v in rn8) if rn8 else '-'} | "
                     f"{r.get('train_s', '-')} |"
                     + (f" {r['dice_mild_cohort']:.3f} / {r['precision_mild_cohort']:.3f} / "
                        f"{format(r['auc_dense_mild_cohort'], '.2f') if 'auc_dense_mild_cohort' in r else '-'} |"
                        if "dice_mild_cohort" in r else ("  |" if mild_n else "")))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
