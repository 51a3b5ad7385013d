"""Evaluation on files and folders: matching by study id, grid checks, tables, JSON, box plots, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from CovidGANSegLib import cli, evaluation
from CovidGANSegLib.errors import InputError

AFFINE = np.diag([-0.8, 0.8, 5.0, 1.0])  # LAS-like


pytestmark = pytest.mark.usefixtures("no_progress_bars")


def _save(a: np.ndarray, path: Path, affine: np.ndarray = AFFINE, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(a.astype(dtype), affine), str(path))
    return path


def _case(seed: int):
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40, 6), bool)
    truth[10:30, 12:28, 1:5] = True
    pred = truth.copy()
    pred[10:30, 12:16, 1:5] = False  # misses a part
    pred[int(rng.integers(0, 5)), 0:3, 0] = True  # a false positive
    lung = np.zeros_like(truth)
    lung[2:38, 2:38, :] = True
    return pred, truth, lung


def test_study_id():
    assert evaluation.study_id("study_0001_mask.nii.gz") == "study_0001"
    assert evaluation.study_id("a/b/study_0001.nii") == "study_0001"
    assert evaluation.study_id("study_0001_lesion.nii.gz") == "study_0001"
    assert evaluation.study_id("study_0001_lungs.nii.gz") == "study_0001"
    assert evaluation.study_id("case7_pred_mask.nii.gz") == "case7"


def test_evaluate_two_files_matches_metrics(tmp_path):
    pred, truth, lung = _case(0)
    p = _save(pred, tmp_path / "study_0001.nii.gz")
    t = _save(truth, tmp_path / "study_0001_mask.nii.gz")
    l = _save(lung, tmp_path / "study_0001_lungs.nii.gz")
    s = evaluation.evaluate_paths(p, t, tmp_path / "out", lungs=l)
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    assert s["cases"] == 1
    assert s["models"]["prediction"]["dice"]["mean"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s["models"]["prediction"]["sensitivity"]["mean"] == pytest.approx(tp / (tp + fn))
    assert s["models"]["prediction"]["abs_volume_diff_ml"]["mean"] == pytest.approx(abs(fp - fn) * 0.8 * 0.8 * 5 / 1000)
    assert s["predecessor_protocol"]["prediction"]["scored_slices"] == 4
    for name in ("per_volume.csv", "per_slice.csv", "predecessor_protocol.csv", "summary.csv", "summary.json", "summary.md", "boxplots.png"):
        assert (tmp_path / "out" / name).is_file(), name
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| Dice (%) |" in md and "for comparison only" in md
    json.loads((tmp_path / "out" / "summary.json").read_text())  # valid JSON (no NaN)
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_slice.csv")))
    assert len(rows) == 6


def test_evaluate_folders_by_study_id_and_orientation(tmp_path):
    preds, truths = tmp_path / "pred", tmp_path / "masks"
    for i in (1, 2, 3):
        pred, truth, _ = _case(i)
        _save(truth, truths / f"study_000{i}_mask.nii.gz")
        if i == 3:
            continue  # no prediction for study 3: skipped with a warning
        _save(pred, preds / f"study_000{i}_lesion.nii.gz")
    _save(np.zeros((40, 40, 6)), preds / "study_0099.nii.gz")  # no reference: skipped
    s = evaluation.evaluate_paths(preds, truths, tmp_path / "out", method="transunet")
    assert s["cases"] == 2 and s["predecessor_protocol"]["transunet"] == {"skipped": "needs lung masks"}
    ids = [r["id"] for r in s["per_case"]["transunet"]]
    assert ids == ["study_0001", "study_0002"]


def test_grid_mismatch_is_a_clear_error(tmp_path):
    pred, truth, _ = _case(0)
    p = _save(pred, tmp_path / "p.nii.gz", affine=np.diag([-0.8, 0.8, 2.5, 1.0]))
    t = _save(truth, tmp_path / "t.nii.gz")
    with pytest.raises(InputError, match="affine's voxel axes differ"):
        evaluation.evaluate_paths(p, t, tmp_path / "out")
    p2 = _save(pred[:, :, :5], tmp_path / "p2.nii.gz")
    with pytest.raises(InputError, match="does not match the grid"):
        evaluation.evaluate_paths(p2, t, tmp_path / "out")
    with pytest.raises(InputError, match="no study ids in common"):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        _save(pred, tmp_path / "a" / "study_0001.nii.gz")
        _save(truth, tmp_path / "b" / "study_0002_mask.nii.gz")
        evaluation.evaluate_paths(tmp_path / "a", tmp_path / "b", tmp_path / "out")
    with pytest.raises(InputError, match="not found"):
        evaluation.evaluate_paths(tmp_path / "missing.nii.gz", t, tmp_path / "out")


def test_probability_predictions_and_empty_cases(tmp_path):
    truth = np.zeros((20, 20, 4), bool)
    prob = np.zeros((20, 20, 4), np.float32)
    prob[5:8, 5:8, 1] = 0.4  # below 0.5: not lesion
    p = _save(prob, tmp_path / "study_0001.nii.gz", dtype=np.float32)
    t = _save(truth, tmp_path / "study_0001_mask.nii.gz")
    s = evaluation.evaluate_paths(p, t, tmp_path / "out")
    m = s["models"]["prediction"]
    assert m["dice"]["mean"] == 1.0 and m["hd95_mm"]["mean"] == 0.0
    assert m["sensitivity"] == {"mean": None, "std": None, "n": 0}
    s2 = evaluation.evaluate_paths(p, t, tmp_path / "out2", threshold=0.3)
    assert s2["models"]["prediction"]["dice"]["mean"] == 0.0 and s2["models"]["prediction"]["hd95_mm"]["n"] == 0


def test_evaluate_methods_in_memory(tmp_path):
    cases = [_case(i) for i in range(3)]
    truths = [c[1] for c in cases]
    preds = {"transunet": [c[0] for c in cases], "unet": [c[1] for c in cases], "hu_threshold": [np.zeros_like(c[1]) for c in cases]}
    s = evaluation.evaluate_methods(preds, truths, [(0.8, 0.8, 5.0)] * 3, lungs=[c[2] for c in cases], out=tmp_path / "ev")
    assert s["cases"] == 3 and set(s["models"]) == {"transunet", "unet", "hu_threshold"}
    assert s["models"]["unet"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 3}
    assert s["models"]["hu_threshold"]["dice"]["mean"] == 0.0
    assert math.isfinite(s["models"]["transunet"]["specificity"]["std"])
    assert (tmp_path / "ev" / "boxplots.png").is_file()
    table = evaluation.table1_markdown(s["models"])
    assert table.splitlines()[0].startswith("| Metric | transunet mean | transunet std | unet mean")
    with pytest.raises(ValueError):
        evaluation.evaluate_methods({"a": truths[:2]}, truths, [(1, 1, 1)] * 3)
    assert "paired" not in s


def test_evaluate_methods_compares_each_method_with_a_reference_case_by_case(tmp_path):
    cases = [_case(i) for i in range(3)]
    truths = [c[1] for c in cases]
    preds = {"transunet": [c[1] for c in cases], "hu_threshold": [c[0] for c in cases]}
    s = evaluation.evaluate_methods(preds, truths, [(0.8, 0.8, 5.0)] * 3, out=tmp_path / "ev", reference="hu_threshold")
    r = s["paired"]["methods"]["transunet"]
    ref = [row["dice"] for row in s["per_case"]["hu_threshold"]]
    assert r["n"] == 3 and r["mean_difference"] == pytest.approx(1.0 - float(np.mean(ref)))
    assert r["ci_low"] <= r["mean_difference"] <= r["ci_high"] and set(s["paired"]["methods"]) == {"transunet"}
    md = (tmp_path / "ev" / "summary.md").read_text()
    assert "Per-case differences against hu_threshold" in md and "transunet - hu_threshold: Dice +" in md
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["paired"]["reference"] == "hu_threshold"
    with pytest.raises(ValueError, match="reference"):
        evaluation.evaluate_methods(preds, truths, [(0.8, 0.8, 5.0)] * 3, reference="unet")


def test_cli_evaluate(tmp_path, capsys):
    pred, truth, _ = _case(0)
    p = _save(pred, tmp_path / "study_0001.nii.gz")
    t = _save(truth, tmp_path / "study_0001_mask.nii.gz")
    assert cli.main(["--progress", "none", "evaluate", "--pred", str(p), "--truth", str(t), "--out", str(tmp_path / "o")]) == 0
    assert "| Dice (%) |" in capsys.readouterr().out
    bad = _save(pred[:, :, :4], tmp_path / "bad.nii.gz")
    assert cli.main(["--progress", "none", "evaluate", "--pred", str(bad), "--truth", str(t), "--out", str(tmp_path / "o2")]) == 2
    assert "does not match the grid" in capsys.readouterr().err


def test_cli_evaluate_compares_two_prediction_folders_case_by_case(tmp_path, capsys):
    for i in range(4):
        pred, truth, _ = _case(i)
        _save(truth, tmp_path / "truth" / f"study_{i:04d}_mask.nii.gz")
        _save(truth, tmp_path / "model" / f"study_{i:04d}.nii.gz")  # perfect
        _save(pred, tmp_path / "threshold" / f"study_{i:04d}.nii.gz")  # misses a part, one false voxel
    base = ["--progress", "none", "evaluate", "--pred", str(tmp_path / "model"), "--method", "transunet", "--truth", str(tmp_path / "truth"),
            "--no-hd95"]
    args = base + ["--compare", str(tmp_path / "threshold"), "--compare-method", "hu_threshold"]
    assert cli.main(args + ["--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "transunet mean" in out and "hu_threshold mean" in out and "transunet - hu_threshold: Dice +" in out and "wins 4 of 4" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    paired = summary["paired"]["methods"]["transunet"]
    threshold_dice = [r["dice"] for r in summary["per_case"]["hu_threshold"]]
    assert paired["n"] == 4 and paired["mean_difference"] == pytest.approx(1.0 - float(np.mean(threshold_dice)))
    assert "Per-case differences against hu_threshold" in (tmp_path / "o" / "summary.md").read_text()
    rows = list(csv.DictReader((tmp_path / "o" / "per_volume.csv").open()))
    assert sorted({r["method"] for r in rows}) == ["hu_threshold", "transunet"] and len(rows) == 8

    # the two sets must cover the same studies, and the names must differ
    (tmp_path / "threshold" / "study_0003.nii.gz").unlink()
    assert cli.main(args + ["--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "cover different studies" in err and "study_0003" in err and not (tmp_path / "o2").exists()
    assert cli.main(base + ["--compare", str(tmp_path / "model"), "--compare-method", "transunet", "--out", str(tmp_path / "o3")]) == 2
    assert "must differ" in capsys.readouterr().err


def test_gui_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import CovidGANSegLib.metrics, CovidGANSegLib.quantify, CovidGANSegLib.evaluation, CovidGANSegLib.seg.hu_threshold; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
