"""The end-to-end demo with a tiny plan: outputs, the metrics.json shape, masks only for evaluation."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from CovidGANSegLib import cpu_jobs, datasets, demo
from conftest import REAL_CT_DIR

TINY_PLAN = demo.DemoPlan(train_healthy=3, train_covid=4, test_covid=2, phantom_size="small", grid=(32, 32, 8), seg_grid=(48, 48, 8),
                          gan_config="tiny", gan_iterations=6, seg_config="tiny", seg_iterations=8, seed=7, val_covid=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one_after_the_other", "segmenters_side_by_side", "gan_beside_the_segmenters"])
def test_demo_tiny_plan(tmp_path, monkeypatch, one_torch_thread, mode):
    plan = TINY_PLAN  # the tiny segmenters have a contrastive phase on the pseudo-masks: they wait for the GAN
    if mode != "one_after_the_other":  # as on a 2-core CPU: job processes, one thread each
        monkeypatch.setattr(cpu_jobs, "threads_per_job", lambda device, jobs, threads: 1)
    if mode == "gan_beside_the_segmenters":  # segmenters on synthetic lesions alone, as `small`: no need to wait
        config = tmp_path / "tiny_synthetic_only.json"
        config.write_text(json.dumps({"base": "tiny", "pretrain_fraction": 0.0}))
        plan = dataclasses.replace(TINY_PLAN, seg_config=str(config))
    assert demo._segmenters_need_no_gan(plan) == (mode == "gan_beside_the_segmenters")
    mask_lookups = []
    real_lookup = datasets.lesion_mask_path

    def recording_lookup(root, study_id):
        mask_lookups.append((str(root), study_id))
        return real_lookup(root, study_id)

    monkeypatch.setattr(datasets, "lesion_mask_path", recording_lookup)
    out = tmp_path / "demo"
    real = REAL_CT_DIR if REAL_CT_DIR.is_dir() else None
    metrics = demo.run_demo(out, plan=plan, real_normal=real)

    # metrics.json has exactly the documented shape (+ the real-normal check when the real CTs are there)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics) == {"cases", "models", "runtime_s"} | ({"real_normal_cases", "real_normal_8mm_cases"} if real else set())
    assert metrics["cases"] == 2
    assert set(metrics["models"]) == {"transunet", "unet", "rules_alone", "hu_threshold"}
    for stats in metrics["models"].values():
        assert set(stats) == {"dice", "sensitivity", "specificity"} | (
            {"real_normal_percent_involved", "real_normal_8mm_percent_involved"} if real else set())
        for key, s in stats.items():
            if key == "real_normal_percent_involved":
                assert len(s) == len(metrics["real_normal_cases"]) == 3 and all(0.0 <= v <= 100.0 for v in s)
                continue
            if key == "real_normal_8mm_percent_involved":  # every real CT has thin slices: all three get an 8 mm version
                assert len(s) == len(metrics["real_normal_8mm_cases"]) == 3 and all(0.0 <= v <= 100.0 for v in s)
                continue
            assert set(s) == {"mean", "std"}
            assert 0.0 <= s["mean"] <= 1.0
    if real:
        # the HU threshold marks vessels and partial volume of normal lungs (a real, known failure)
        assert min(metrics["models"]["hu_threshold"]["real_normal_percent_involved"]) > 5.0
        # at 8 mm the partial volume of vessels makes it worse
        hu = metrics["models"]["hu_threshold"]
        assert min(b - a for a, b in zip(hu["real_normal_percent_involved"], hu["real_normal_8mm_percent_involved"])) > 0.0
        # the rules alone (no model) mark far less of a normal lung than the threshold, on every CT and slice thickness
        rules = metrics["models"]["rules_alone"]
        for key in ("real_normal_percent_involved", "real_normal_8mm_percent_involved"):
            assert all(r < 0.25 * t for r, t in zip(rules[key], hu[key]))
    assert metrics["runtime_s"] > 0

    # lesion masks are looked up only for the held-out studies, never for the training cohort (the
    # job processes cannot be watched this way: the run one after the other checks their code)
    assert mask_lookups and all("test" in root and sid >= "study_5001" for root, sid in mask_lookups)

    report = (out / "report.md").read_text()
    assert "HU-threshold baseline" in report and "transunet" in report and "Held-out examples" in report
    assert "Mild cases" in report or "No mild case" in report
    assert ("Real normal chest CTs" in report) == bool(real)
    assert ("(8 mm)" in report) == bool(real)
    cohort = json.loads((out / "data" / "test" / "cohort.json").read_text())
    assert cohort.get("lesion_model") == "independent"
    assert json.loads((out / "data" / "train" / "cohort.json").read_text()).get("lesion_model") == "independent"
    assert (out / "evaluation" / "summary.json").is_file()
    # each segmenter's lead over the threshold is reported case by case, with its interval
    paired = json.loads((out / "evaluation" / "summary.json").read_text())["paired"]
    assert paired["reference"] == "hu_threshold" and set(paired["methods"]) == {"transunet", "unet", "rules_alone"}
    assert all(r["n"] == 2 for r in paired["methods"].values())
    assert "Case by case against the HU threshold" in report and "transunet - hu_threshold: Dice" in report
    # what the segmenters' seeds add to the same post-processing, case by case
    assert "Case by case against the rules alone" in report and "unet - rules_alone: Dice" in report
    assert "The rules alone (the post-processing with every lung voxel a seed, no model) score" in report

    # predictions are on each held-out study's own grid (same shape and affine as the input)
    for method in demo.METHODS:
        preds = sorted((out / "predictions" / method).glob("*.nii.gz"))
        assert len(preds) == 2
        for p in preds:
            study = next((out / "data" / "test" / "studies").rglob(p.name))
            a, b = nib.load(p), nib.load(study)
            assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert not list(tmp_path.glob(".*partial*"))
    assert (out / "pseudo_masks" / "pseudo_masks.npy").is_file() and (out / "runs" / "gan" / "model.pt").is_file()
    runtime = next(line for line in report.splitlines() if line.startswith("- Runtime:"))
    assert ("gan_and_segmenters_side_by_side_s" in runtime) == (mode == "gan_beside_the_segmenters")
    assert ("segmenters_side_by_side_s" in runtime.replace("gan_and_segmenters", "")) == (mode == "segmenters_side_by_side")
    if mode == "gan_beside_the_segmenters":
        # trained from the preprocessed cohort while the GAN trained, the segmenter equals the one trained
        # afterwards from the GAN's pseudo-masks folder (the paper's path), weight for weight
        from CovidGANSegLib.checkpoints import load_checkpoint
        from CovidGANSegLib.seg.synthetic import SyntheticSupervision

        again, _ = demo._timed_training(pseudo_masks=out / "pseudo_masks", run_dir=tmp_path / "again", model="transunet",
                                        config=plan.seg_config, iterations=plan.seg_iterations, device="cpu", seed=plan.seed,
                                        synthetic=SyntheticSupervision(fraction=plan.synthetic_fraction,
                                                                       variants_per_volume=plan.synthetic_variants,
                                                                       coverage=plan.synthetic_coverage))
        a, b = load_checkpoint(again, kind="seg"), load_checkpoint(out / "runs" / "transunet" / "model.pt", kind="seg")
        assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["threshold"] == b["threshold"]


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        demo.run_demo(tmp_path, plan=TINY_PLAN)
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_demo_seed_gives_a_replicate_of_the_plan(tmp_path, monkeypatch):
    from CovidGANSegLib import cli

    plans = []

    def fake_run(work, plan, device, start, split, real_dir):
        plans.append(plan)
        return {"cases": 0, "models": {}, "runtime_s": 0.0}

    monkeypatch.setattr(demo, "_run", fake_run)
    demo.run_demo(tmp_path / "a", plan=TINY_PLAN, seed=3026)
    assert cli.main(["--progress", "none", "demo", "--out", str(tmp_path / "b"), "--quick", "--seed", "11"]) == 0
    assert cli.main(["--progress", "none", "demo", "--out", str(tmp_path / "c"), "--quick"]) == 0
    # only the seed changes (training cohort and training draws S, held-out cohort S + 1); the default stays 2026
    assert plans == [dataclasses.replace(TINY_PLAN, seed=3026), dataclasses.replace(demo.QUICK, seed=11), demo.QUICK]
    assert demo.QUICK.seed == 2026
