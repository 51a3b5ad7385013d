"""The end-to-end demo with a tiny plan: outputs, the metrics.json shape, masks only for evaluation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from CovidGANSegLib import datasets, demo

TINY_PLAN = demo.DemoPlan(train_healthy=3, train_covid=4, test_covid=2, phantom_size="small", grid=(32, 32, 8),
                          gan_config="tiny", gan_iterations=6, seg_config="tiny", seg_iterations=8, seed=7)


@pytest.mark.slow
def test_demo_tiny_plan(tmp_path, monkeypatch, one_torch_thread):
    mask_lookups = []
    real_lookup = datasets.lesion_mask_path

    def recording_lookup(root, study_id):
        mask_lookups.append((str(root), study_id))
        return real_lookup(root, study_id)

    monkeypatch.setattr(datasets, "lesion_mask_path", recording_lookup)
    out = tmp_path / "demo"
    metrics = demo.run_demo(out, plan=TINY_PLAN)

    # metrics.json has exactly the documented shape
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics) == {"cases", "models", "runtime_s"}
    assert metrics["cases"] == 2
    assert set(metrics["models"]) == {"transunet", "unet", "hu_threshold"}
    for stats in metrics["models"].values():
        assert set(stats) == {"dice", "sensitivity", "specificity"}
        for s in stats.values():
            assert set(s) == {"mean", "std"}
            assert 0.0 <= s["mean"] <= 1.0
    assert metrics["runtime_s"] > 0

    # lesion masks are looked up only for the held-out studies, never for the training cohort
    assert mask_lookups and all("test" in root and sid >= "study_5001" for root, sid in mask_lookups)

    report = (out / "report.md").read_text()
    assert "HU-threshold baseline" in report and "transunet" in report and "Held-out examples" in report
    assert (out / "evaluation" / "summary.json").is_file()

    # predictions are on each held-out study's own grid (same shape and affine as the input)
    for method in ("transunet", "unet", "hu_threshold"):
        preds = sorted((out / "predictions" / method).glob("*.nii.gz"))
        assert len(preds) == 2
        for p in preds:
            study = next((out / "data" / "test" / "studies").rglob(p.name))
            a, b = nib.load(p), nib.load(study)
            assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert not list(tmp_path.glob(".*partial*"))


def test_demo_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        demo.run_demo(tmp_path, plan=TINY_PLAN)
    assert (tmp_path / "keep.txt").read_text() == "x"
