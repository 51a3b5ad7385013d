"""The end-to-end demo on the embedded default: the synthetic phantom cohort, offline, on CPU.

Steps (each logged with progress): generate a training cohort (healthy CT-0 and COVID CT-1..4;
its lesion masks are never read) and a held-out COVID cohort whose masks are used only for
evaluation; train the 3D GAN; make pseudo-masks; train TransUNet and the U-Net baseline on the
pseudo-masks and on synthetic lesions in the healthy volumes (on a CPU side by side, each with its
share of torch's threads: :mod:`CovidGANSegLib.cpu_jobs`; segmenters that learn from synthetic
lesions alone, as ``small`` does, train from the preprocessed cohort beside the GAN instead of
after it); segment the held-out studies on their
own grid; score TransUNet, U-Net and the HU-threshold baseline against the held-out masks; run every
model on real normal chest CTs (specificity check, when the folder is there); write ``report.md``
and ``metrics.json``.

Evaluation is not circular: the COVID phantoms (training and held-out) get their lesions from the
*independent* lesion model (:mod:`synth.eval_lesions`), while everything the models train on that
carries a label (the GAN's reconstruction step, the segmenters' synthetic pairs) comes from the
Perlin training lesion model (:mod:`synth.lesions`). Development choices are made on a separate
validation cohort (``split="validation"``: other seed, other study numbers); the held-out test
cohort (``split="test"``, the default) chooses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CovidGANSegLib import progress
from CovidGANSegLib.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and method choices of one demo run. ``quick`` fits in 10 minutes on 2 CPU cores.

    Attributes:
        grid: the GAN's model grid (x, y, z).
        seg_grid: the segmenters' model grid (finer in-plane: mild lesions vanish at 64); None:
            the GAN's.
        lesion_model: lesion model of the COVID phantoms (training and held-out); "independent"
            keeps the evaluation apart from the Perlin model the training labels come from.
        pseudo_rule: "refined" or "paper" (``gan.pseudomasks``).
        synthetic_fraction: share of each segmenter batch from synthetic lesions in healthy
            volumes (0: the paper's pseudo-masks alone).
        val_covid: size of the validation cohort (``split="validation"``).
        seg_iterations_by_model: ``(model, iterations)`` for a segmenter that trains for other than
            ``seg_iterations`` (a plan's ``[segmenter.unet] iterations``).
    """

    train_healthy: int
    train_covid: int
    test_covid: int
    phantom_size: str
    grid: tuple[int, int, int]
    gan_config: str
    gan_iterations: int
    seg_config: str
    seg_iterations: int
    seed: int = 2026
    seg_grid: tuple[int, int, int] | None = None
    lesion_model: str = "independent"
    pseudo_rule: str = "refined"
    synthetic_fraction: float = 1.0
    synthetic_variants: int = 4
    synthetic_coverage: tuple[float, float] = (0.002, 0.8)
    val_covid: int = 10
    seg_iterations_by_model: tuple[tuple[str, int], ...] = ()

    def seg_iterations_of(self, model: str) -> int:
        """The training iterations of segmenter ``model``."""
        return dict(self.seg_iterations_by_model).get(model, self.seg_iterations)


#: the TransUNet's 1,000 iterations: each of six seeds gained on the validation sets over 500; the U-Net's
#: 500: four of six gained with 1,000, one lost (docs/ablation.md, "The segmenters trained for 1,000
#: iterations in the quick plan" and "The U-Net's 1,000 iterations")
QUICK = DemoPlan(train_healthy=12, train_covid=24, test_covid=10, phantom_size="small", grid=(64, 64, 16), seg_grid=(128, 128, 32),
                 gan_config="quick", gan_iterations=400, seg_config="small", seg_iterations=1000,
                 seg_iterations_by_model=(("unet", 500),))
FULL = DemoPlan(train_healthy=24, train_covid=36, test_covid=16, phantom_size="small", grid=(64, 64, 16), seg_grid=(128, 128, 32),
                gan_config="quick", gan_iterations=1500, seg_config="small", seg_iterations=1500, val_covid=16)

#: the two segmenters, the rules alone (the post-processing with every lung voxel a seed: what the
#: segmenters' seeds add is measured against it) and the HU threshold (the reference, last)
METHODS = ("transunet", "unet", "rules_alone", "hu_threshold")
SEGMENTERS = METHODS[:2]
SPLITS = ("test", "validation")


def default_real_normal_dir() -> Path | None:
    """``shared/data/real_ct`` beside the project checkout, when it is there (real normal CTs)."""
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct"
    return candidate if candidate.is_dir() and any(candidate.glob("*.nii*")) else None


def run_demo(out: str | Path, *, quick: bool = False, device: str = "cpu", overwrite: bool = False,
             plan: DemoPlan | None = None, split: str = "test", real_normal: str | Path | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """Run the whole pipeline into ``out`` (written atomically) and return the ``metrics.json`` content.

    ``split``: score on the held-out ``test`` cohort or on the ``validation`` cohort (for
    development choices). ``real_normal``: a folder of real normal chest CTs (NIfTI, HU) for the
    specificity check (default :func:`default_real_normal_dir`; skipped when there is none).
    ``seed``: replaces the plan's seed (a replicate: other phantoms, other training draws; the
    held-out cohort is drawn with ``seed + 1``, the validation cohort with ``seed + 2``: replicates
    need seeds at least 3 apart, or one's training cohort is another's held-out one).
    """
    from CovidGANSegLib.atomic import atomic_directory

    plan = plan or (QUICK if quick else FULL)
    if seed is not None:
        plan = dataclasses.replace(plan, seed=seed)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    real_dir = Path(real_normal) if real_normal is not None else default_real_normal_dir()
    out = Path(out)
    start = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as work:
        metrics = _run(work, plan, device, start, split, real_dir)
    log.info("demo finished in %.0f s: %s", metrics["runtime_s"], out)
    return metrics


def _run(work: Path, plan: DemoPlan, device: str, start: float, split: str, real_dir: Path | None) -> dict[str, Any]:
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.cpu_jobs import threads_per_job
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.synth.phantoms import write_cohort

    import torch

    train_dir, test_dir = work / "data" / "train", work / "data" / split
    cpu_threads = torch.get_num_threads()  # the CPU share torch was given: phantom processes, segmenter split
    progress.report(0.0, "generating the phantom cohorts")
    with progress.scope(0.0, 0.03):
        # Training cohort: its lesion masks exist on disk (MosMed layout) but no training code reads them.
        write_cohort(train_dir, healthy=plan.train_healthy, covid=plan.train_covid, seed=plan.seed, size=plan.phantom_size,
                     lesion_model=plan.lesion_model, workers=cpu_threads)
    with progress.scope(0.03, 0.05):
        # Held-out cohort (test: seed + 1, studies 5001..; validation: seed + 2, studies 6001..): its masks
        # are used only by the evaluation below.
        n_eval = plan.test_covid if split == "test" else plan.val_covid
        offset, first = (1, 5001) if split == "test" else (2, 6001)
        write_cohort(test_dir, healthy=0, covid=n_eval, seed=plan.seed + offset, size=plan.phantom_size, first_id=first,
                     lesion_model=plan.lesion_model, workers=cpu_threads)
    timings = {"phantoms_s": time.perf_counter() - start}

    preprocess = PreprocessConfig(grid=plan.grid)
    seg_kw = dict(config=plan.seg_config, device=device, seed=plan.seed, data=train_dir,
                  synthetic=SyntheticSupervision(fraction=plan.synthetic_fraction, variants_per_volume=plan.synthetic_variants,
                                                 coverage=plan.synthetic_coverage))
    gan_kw = dict(train_dir=train_dir, work=work, plan=plan, preprocess=preprocess, device=device)
    names = ("transunet", "unet")
    threads = threads_per_job(device, 1 + len(names), cpu_threads) if _segmenters_need_no_gan(plan) else 0
    if threads:
        # The segmenters learn from synthetic lesions in the healthy volumes alone, so they need neither
        # the GAN nor its pseudo-masks: all three train at once, one share of the cores each (cpu_jobs).
        # A segmenter trained from the preprocessed data set equals one trained from the pseudo-masks
        # folder made of it (same synthetic pairs, same random draws).
        t = time.perf_counter()
        progress.report(0.05, "preparing the segmenters' grid")
        seg_data = _seg_preprocessed(work, train_dir, preprocess, plan)
        jobs = {"gan": (_gan_and_pseudo_masks, gan_kw),
                **{name: (_timed_training, dict(seg_kw, pseudo_masks=seg_data, run_dir=work / "runs" / name, model=name,
                                                iterations=plan.seg_iterations_of(name))) for name in names}}
        done = _side_by_side(jobs, threads, (0.08, 0.85), f"the 3D GAN, {' and '.join(names)}")
        gan_model, pseudo = done["gan"]["gan_model"], done["gan"]["pseudo_masks"]
        timings.update(gan_training_s=done["gan"]["gan_training_s"], pseudo_masks_s=done["gan"]["pseudo_masks_s"])
        seg_models = _segmenter_results(done, names, timings)
        timings["gan_and_segmenters_side_by_side_s"] = time.perf_counter() - t
    else:
        progress.report(0.05, "training the 3D GAN")
        with progress.scope(0.05, 0.45):
            gan = _gan_and_pseudo_masks(**gan_kw)
        gan_model, pseudo = gan["gan_model"], gan["pseudo_masks"]
        timings.update(gan_training_s=gan["gan_training_s"], pseudo_masks_s=gan["pseudo_masks_s"])
        jobs = {name: dict(seg_kw, pseudo_masks=pseudo, run_dir=work / "runs" / name, model=name, iterations=plan.seg_iterations_of(name))
                for name in names}
        threads = threads_per_job(device, len(jobs), cpu_threads)
        if threads:
            # side by side, one share of the cores each: faster on small CPUs (cpu_jobs), same models as
            # training them one after the other with that many threads
            t = time.perf_counter()
            done = _side_by_side({name: (_timed_training, kw) for name, kw in jobs.items()}, threads, (0.45, 0.85), " and ".join(jobs))
            seg_models = _segmenter_results(done, names, timings)
            timings["segmenters_side_by_side_s"] = time.perf_counter() - t
        else:
            seg_models = {}
            for i, (name, kw) in enumerate(jobs.items()):
                progress.report(0.45 + 0.2 * i, f"training {name} on the pseudo-masks")
                with progress.scope(0.45 + 0.2 * i, 0.65 + 0.2 * i):
                    seg_models[name], timings[f"{name}_training_s"] = _timed_training(**kw)

    t = time.perf_counter()
    progress.report(0.85, "segmenting the held-out studies")
    from CovidGANSegLib.seg.postprocess import PostProcessing

    # the segmenters run as `segment` does; the GAN takes part only if the default post-processing gates with it
    gate_model = gan_model if PostProcessing().gan_gate_sigmas is not None else None
    with progress.scope(0.85, 0.95):
        cases = _segment_held_out(test_dir, seg_models, work / "predictions", device, gate_model)
    timings["segmentation_s"] = time.perf_counter() - t

    progress.report(0.95, "evaluating")
    from CovidGANSegLib.evaluation import evaluate_methods

    with progress.scope(0.95, 0.99):
        summary = evaluate_methods({m: cases["predictions"][m] for m in METHODS}, cases["truths"], cases["spacings"],
                                   lungs=cases["lungs"], ids=cases["ids"], out=work / "evaluation", reference=METHODS[-1])
    summary["lung_ml_by_case"] = {i: float(lung.sum()) * float(sp[0] * sp[1] * sp[2]) / 1000.0
                                  for i, lung, sp in zip(cases["ids"], cases["lungs"], cases["spacings"])}
    _save_examples(cases, work / "figures" / "held_out_examples.png")
    real = _real_normal_check(real_dir, seg_models, device, gate_model) if real_dir is not None else None
    runtime = time.perf_counter() - start
    metrics = {
        "cases": summary["cases"],
        "models": {m: {k: {"mean": summary["models"][m][k]["mean"], "std": summary["models"][m][k]["std"]}
                       for k in ("dice", "sensitivity", "specificity")} for m in METHODS},
        "runtime_s": round(runtime, 1),
    }
    if real is not None:
        for m in METHODS:
            metrics["models"][m]["real_normal_percent_involved"] = real["percent"][m]
            metrics["models"][m]["real_normal_8mm_percent_involved"] = real["percent_8mm"][m]
        metrics["real_normal_cases"] = real["cases"]
        metrics["real_normal_8mm_cases"] = real["cases_8mm"]
    timings["real_normal_s"] = real["seconds"] if real is not None else 0.0
    _write_json(work / "metrics.json", metrics)
    _write_report(work, plan, device, summary, timings, runtime, split, real)
    progress.report(1.0, "demo done")
    return metrics


def _side_by_side(jobs: dict[str, tuple[Any, dict[str, Any]]], threads: int, span: tuple[float, float], what: str) -> dict[str, Any]:
    """``cpu_jobs.run_side_by_side(jobs)``, ``threads`` torch threads each, reported as training ``what``
    within the progress ``span``."""
    from CovidGANSegLib.cpu_jobs import run_side_by_side

    progress.report(span[0], f"training {what} side by side ({threads} torch thread{'s' if threads > 1 else ''} each)")
    with progress.scope(*span):
        return run_side_by_side(jobs, threads=threads)


def _segmenter_results(done: dict[str, Any], names: tuple[str, ...], timings: dict[str, float]) -> dict[str, Path]:
    """The model paths of the segmenter jobs in ``done`` (``_timed_training`` results); their seconds go
    into ``timings`` as ``<name>_training_s``."""
    timings.update({f"{name}_training_s": done[name][1] for name in names})
    return {name: done[name][0] for name in names}


def _segmenters_need_no_gan(plan: DemoPlan) -> bool:
    """True when the plan's segmenters learn from synthetic lesions alone: they can train while the GAN does."""
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision
    from CovidGANSegLib.seg.training import needs_pseudo_masks
    from CovidGANSegLib.seg.transunet import get_seg_config

    synthetic = SyntheticSupervision(fraction=plan.synthetic_fraction, variants_per_volume=plan.synthetic_variants)
    return not needs_pseudo_masks(get_seg_config(plan.seg_config), synthetic)


def _seg_preprocessed(work: Path, train_dir: Path, preprocess: Any, plan: DemoPlan) -> Path:
    """The training cohort on the segmenters' grid, in the cache folder that ``make_pseudo_masks`` reuses."""
    from CovidGANSegLib.preprocessing import ensure_preprocessed

    folder = work / "runs" / f"seg_preprocessed-{'x'.join(str(g) for g in plan.seg_grid)}"
    ensure_preprocessed(train_dir, folder, dataclasses.replace(preprocess, grid=tuple(plan.seg_grid)))
    return folder


def _gan_and_pseudo_masks(*, train_dir: Path, work: Path, plan: DemoPlan, preprocess: Any, device: str) -> dict[str, Any]:
    """Train the GAN on the training cohort and make its pseudo-masks on the segmenters' grid (module
    level: run in a job process too); returns the paths and the seconds of each."""
    from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks
    from CovidGANSegLib.gan.training import train_gan

    t = time.perf_counter()
    with progress.scope(0.0, 0.88):
        gan_model = train_gan(train_dir, work / "runs" / "gan", config=plan.gan_config, preprocess=preprocess,
                              iterations=plan.gan_iterations, device=device, seed=plan.seed)
    gan_s = time.perf_counter() - t
    t = time.perf_counter()
    progress.report(0.88, "making pseudo-masks")
    cached = work / "runs" / "gan" / "preprocessed"
    with progress.scope(0.88, 1.0):
        pseudo = make_pseudo_masks(gan_model, cached if (cached / "index.json").is_file() else train_dir, work / "pseudo_masks",
                                   device=device, rule=plan.pseudo_rule, grid=plan.seg_grid, cache=work / "runs" / "seg_preprocessed")
    return {"gan_model": gan_model, "pseudo_masks": pseudo, "gan_training_s": gan_s, "pseudo_masks_s": time.perf_counter() - t}


def _timed_training(**kwargs: Any) -> tuple[Path, float]:
    """``train_segmenter(**kwargs)`` and its seconds (module level: run in a job process too)."""
    from CovidGANSegLib.seg.training import train_segmenter

    t = time.perf_counter()
    path = train_segmenter(**kwargs)
    return path, time.perf_counter() - t


def _segment_held_out(test_dir: Path, seg_models: dict[str, Path], pred_dir: Path, device: str, gan_model: Path | None = None) -> dict[str, Any]:
    """Segment every held-out study with each method on its own grid (as ``segment`` does, gated by ``gan_model``
    when one is given); load the reference masks."""
    from CovidGANSegLib.datasets import discover_studies, lesion_mask_path
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.nifti import load_ct, load_mask, save_like
    from CovidGANSegLib.preprocessing import preprocess_ct
    from CovidGANSegLib.seg.inference import gan_gate, load_segmenter, segment_ct

    models = {name: load_segmenter(path, device=device)[0] for name, path in seg_models.items()}
    generator, gan_payload = _load_gan(gan_model, device)
    configs = {m.preprocess_config for m in models.values()}
    if len(configs) != 1:
        raise ValueError("the two segmenters were trained with different preprocessing")
    preprocess = configs.pop()
    cases: dict[str, Any] = {"ids": [], "truths": [], "spacings": [], "lungs": [], "images": [],
                             "predictions": {m: [] for m in METHODS}}
    for study in progress.track(discover_studies(test_dir, min_slices=1), desc="segmenting held-out studies"):
        ct = load_ct(study.path)
        lung = extract_lung_mask(ct.array, ct.spacing)
        pv = preprocess_ct(ct, preprocess, lung_mask=lung)
        ph, gate = gan_gate(ct, lung, generator, gan_payload) if generator is not None else (None, None)
        diff = None if ph is None else ph.difference_hu
        preds = {name: segment_ct(ct, model, preprocess, lung_mask=lung, preprocessed=pv, difference_hu=diff, gate_hu=gate).lesion_mask
                 for name, model in models.items()}
        preds.update(_without_a_model(ct, lung))
        for name, mask in preds.items():
            save_like(mask.astype("uint8"), ct, pred_dir / name / f"{study.id}.nii.gz", dtype="uint8")
            cases["predictions"][name].append(mask)
        mask_path = lesion_mask_path(test_dir, study.id)  # evaluation only
        if mask_path is None:
            raise FileNotFoundError(f"{test_dir}: no lesion mask for held-out study {study.id}")
        cases["truths"].append(load_mask(mask_path, reference=ct))
        cases["ids"].append(study.id)
        cases["spacings"].append(ct.spacing)
        cases["lungs"].append(lung)
        cases["images"].append(ct.array)
    return cases


def _without_a_model(ct: Any, lung: Any) -> dict[str, Any]:
    """The masks of the two methods that read no model on one CT: the rules alone and the HU threshold."""
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
    from CovidGANSegLib.seg.postprocess import rules_alone_segment

    return {"rules_alone": rules_alone_segment(ct.array, lung, ct.spacing), "hu_threshold": hu_threshold_segment(ct.array, lung)}


def _load_gan(gan_model: Path | None, device: str) -> tuple[Any, dict[str, Any]]:
    if gan_model is None:
        return None, {}
    from CovidGANSegLib.gan.inference import load_generator

    return load_generator(gan_model, device)


def real_normal_volumes(real_dir: str | Path) -> Iterator[tuple[str, bool, Any]]:
    """The real normal CTs of ``real_dir`` (NIfTI, HU), each as acquired and resampled to 8 mm thick
    slices (MosMed's geometry, :func:`preprocessing.thick_slices`; skipped for CTs already that
    thick): ``(name, at_8mm, CTVolume)``, files in name order."""
    from CovidGANSegLib.nifti import load_ct
    from CovidGANSegLib.preprocessing import thick_slices

    for path in sorted(p for p in Path(real_dir).iterdir() if p.name.endswith((".nii", ".nii.gz"))):
        ct = load_ct(path, min_slices=1)
        name = path.name.split(".nii")[0]
        yield name, False, ct
        thick = thick_slices(ct, 8.0)
        if thick is not None:
            yield name, True, thick


def _real_normal_check(real_dir: Path, seg_models: dict[str, Path], device: str, gan_model: Path | None = None) -> dict[str, Any]:
    """Percent of lung each method marks as lesion on every real normal CT of ``real_dir`` (should be ~0),
    as acquired and resampled to 8 mm thick slices (MosMed's geometry: vessels and the diaphragm in
    partial volume look denser, which is where thresholds and phantom-trained models fail)."""
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.quantify import percent_of_lung
    from CovidGANSegLib.seg.inference import gan_gate, load_segmenter, segment_ct

    t = time.perf_counter()
    models = {name: load_segmenter(path, device=device)[0] for name, path in seg_models.items()}
    generator, gan_payload = _load_gan(gan_model, device)
    result: dict[str, Any] = {"cases": [], "percent": {m: [] for m in METHODS}, "cases_8mm": [], "percent_8mm": {m: [] for m in METHODS},
                              "folder": str(real_dir)}

    def percent_marked(ct) -> dict[str, float]:
        lung = extract_lung_mask(ct.array, ct.spacing)
        ph, gate = gan_gate(ct, lung, generator, gan_payload) if generator is not None else (None, None)
        diff = None if ph is None else ph.difference_hu
        preds = {name: segment_ct(ct, model, lung_mask=lung, difference_hu=diff, gate_hu=gate).lesion_mask for name, model in models.items()}
        preds.update(_without_a_model(ct, lung))
        return {m: round(percent_of_lung(preds[m], lung), 3) for m in METHODS}

    for name, at_8mm, volume in progress.track(real_normal_volumes(real_dir), desc="real normal CTs"):
        key = "_8mm" if at_8mm else ""
        result["cases" + key].append(name)
        for m, v in percent_marked(volume).items():
            result["percent" + key][m].append(v)
    result["seconds"] = time.perf_counter() - t
    log.info("real normal CTs, percent of lung marked as lesion: %s; at 8 mm slices: %s", result["percent"], result["percent_8mm"])
    return result


def _save_examples(cases: dict[str, Any], path: Path, n: int = 3) -> None:
    """A few held-out axial slices: reference (yellow) and each method's lesion outline."""
    import numpy as np
    from matplotlib.figure import Figure

    colours = {"truth": "yellow", "transunet": "red", "unet": "cyan", "rules_alone": "orange", "hu_threshold": "magenta"}
    order = np.argsort([-t.sum() for t in cases["truths"]])[: min(n, len(cases["truths"]))]
    fig = Figure(figsize=(4 * len(METHODS), 4 * len(order)), layout="constrained")
    axes = fig.subplots(len(order), len(METHODS), squeeze=False)
    for row, idx in enumerate(order):
        truth = cases["truths"][idx]
        z = int(np.argmax(truth.sum(axis=(0, 1))))
        image = np.clip((cases["images"][idx][:, :, z] + 1000.0) / 1400.0, 0, 1)
        for col, method in enumerate(METHODS):
            ax = axes[row][col]
            ax.imshow(np.rot90(image), cmap="gray", vmin=0, vmax=1)
            ax.contour(np.rot90(truth[:, :, z]).astype(float), levels=[0.5], colors=colours["truth"], linewidths=1.0)
            pred = cases["predictions"][method][idx][:, :, z]
            if pred.any():
                ax.contour(np.rot90(pred).astype(float), levels=[0.5], colors=colours[method], linewidths=1.0)
            ax.set_title(f"{cases['ids'][idx]} z={z}: {method} ({colours[method]}) vs truth (yellow)", fontsize=8)
            ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _write_report(work: Path, plan: DemoPlan, device: str, summary: dict[str, Any], timings: dict[str, float], runtime: float,
                  split: str = "test", real: dict[str, Any] | None = None) -> None:
    from CovidGANSegLib.evaluation import table1_markdown

    models = summary["models"]
    dice = {m: models[m]["dice"]["mean"] for m in METHODS}
    beats = dice["transunet"] > dice["hu_threshold"]
    verdict = (f"TransUNet (Dice {dice['transunet']:.3f}) {'beats' if beats else 'does NOT beat'} the HU-threshold baseline "
               f"(Dice {dice['hu_threshold']:.3f}); U-Net baseline Dice {dice['unet']:.3f}. The rules alone (the "
               f"post-processing with every lung voxel a seed, no model) score {dice['rules_alone']:.3f}: the TransUNet's "
               f"seeds add {dice['transunet'] - dice['rules_alone']:+.3f}.")
    figures = [("GAN loss curves", "runs/gan/loss_curves.png"), ("Pseudo-mask severity box plot (paper Fig. 4)", "pseudo_masks/severity_boxplot.png"),
               ("TransUNet loss curves", "runs/transunet/loss_curves.png"), ("U-Net loss curves", "runs/unet/loss_curves.png"),
               ("Per-volume metrics of the held-out studies", "evaluation/boxplots.png"),
               ("Held-out examples (truth yellow; TransUNet red, U-Net cyan, rules alone orange, HU threshold magenta)", "figures/held_out_examples.png")]
    lines = [
        "# CovidGANSeg demo report\n",
        "Synthetic phantom cohort, self-supervised pipeline (3D GAN -> pseudo-masks -> segmenters). "
        "The segmenters never saw a lesion mask; held-out masks are used only to score. "
        "Models trained here are demonstration models, not for clinical use.\n",
        f"- Plan: {json.dumps(dataclasses.asdict(plan))}",
        f"- Device: {device}; machine: {platform.machine()}, {platform.system()}, {_cpu_count()} CPU cores",
        f"- Runtime: {runtime:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")\n",
        f"**Result:** {verdict}\n",
        _paired_text(summary),
        f"## {'Held-out test' if split == 'test' else 'Validation'} studies ({summary['cases']}, lesions from the independent "
        "lesion model), standard per-volume metrics (mean +- std, scored on each input's own grid)\n",
        table1_markdown(models),
        "\n" + _mild_table(summary),
        "\n" + _real_normal_table(real),
        "\nFull tables (per slice, the predecessor's protocol for comparison only, CSV, JSON): `evaluation/`.\n",
        "## Figures\n",
    ]
    lines += [f"### {title}\n\n![{title}]({rel})\n" for title, rel in figures if (work / rel).is_file()]
    with atomic_path(work / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


#: a held-out case is "mild" below this lesion share of the lung (MosMed CT-1 is mostly far below)
MILD_PERCENT = 5.0


def is_mild(truth_ml: float, lung_ml: float) -> bool:
    """True when a true lesion volume is under :data:`MILD_PERCENT` of the lung volume (both in mL)."""
    return 100.0 * truth_ml / max(lung_ml, 1e-9) < MILD_PERCENT


def mild_case_ids(summary: dict[str, Any], lungs_ml: dict[str, float] | None = None) -> list[str]:
    """Ids of the cases whose true lesion volume is under :data:`MILD_PERCENT` of the lung (needs ``lung_ml`` per case)."""
    rows = summary["per_case"][METHODS[-1]]
    return [r["id"] for r in rows if lungs_ml and r["id"] in lungs_ml and is_mild(r["truth_ml"], lungs_ml[r["id"]])]


def _mild_table(summary: dict[str, Any]) -> str:
    import numpy as np

    lungs_ml = summary.get("lung_ml_by_case")
    mild = set(mild_case_ids(summary, lungs_ml))
    if not mild:
        return "No mild case (< 5 % of lung) among these studies.\n"
    lines = [f"Mild cases only (< {MILD_PERCENT:g} % of lung involved, n = {len(mild)}): mean Dice / sensitivity / precision\n",
             "| method | Dice | sensitivity | precision |", "|---|---|---|---|"]
    for m in METHODS:
        rows = [r for r in summary["per_case"][m] if r["id"] in mild]
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "sensitivity", "precision")}
        lines.append(f"| {m} | {mean['dice']:.3f} | {mean['sensitivity']:.3f} | {mean['precision']:.3f} |")
    return "\n".join(lines) + "\n"


def _paired_text(summary: dict[str, Any]) -> str:
    """Per-case Dice differences, all cases and mild ones (mean, 95 % bootstrap interval, Wilcoxon p;
    :mod:`CovidGANSegLib.comparison`): every other method against the HU threshold, and each segmenter
    against the rules alone (what its seeds add to the post-processing)."""
    from CovidGANSegLib.comparison import compare_to_reference, describe

    mild = set(mild_case_ids(summary, summary.get("lung_ml_by_case")))
    subsets = [("all cases", None)] + ([(f"mild cases (< {MILD_PERCENT:g} % of lung)", mild)] if len(mild) >= 2 else [])
    comparisons = (("Case by case against the HU threshold (a mean lead is a finding only where its 95 % interval excludes 0; "
                    "over a few cases the interval is wide):", METHODS[-1], METHODS[:-1]),
                   ("Case by case against the rules alone (what each segmenter's seeds add to the same post-processing):",
                    "rules_alone", SEGMENTERS))
    lines: list[str] = []
    for title, ref, methods in comparisons:
        lines += [title, ""]
        for label, ids in subsets:
            per_case = {m: [r for r in summary["per_case"][m] if ids is None or r["id"] in ids] for m in (*methods, ref)}
            lines += [f"- {label}: {describe(r, name, ref)}" for name, r in compare_to_reference(per_case, ref, "dice")["methods"].items()]
        lines.append("")
    return "\n".join(lines)


def _real_normal_table(real: dict[str, Any] | None) -> str:
    if real is None:
        return "Real normal CT check not run (no folder of real normal CTs given or found).\n"
    lines = ["Real normal chest CTs (no lesion): percent of lung marked as lesion (target < 2 %), as acquired "
             "and resampled to 8 mm thick slices (MosMed's geometry)\n"]
    cols = [(c, "") for c in real["cases"]] + [(c, "_8mm") for c in real.get("cases_8mm", [])]
    lines.append("| method | " + " | ".join(f"{c}{' (8 mm)' if k else ''}" for c, k in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for m in METHODS:
        values = list(real["percent"][m]) + list(real.get("percent_8mm", {}).get(m, []))
        lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
