"""Synthetic-lesion supervision: exact pairs from healthy volumes, and the segmenter trained with them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from CovidGANSegLib import progress
from CovidGANSegLib.checkpoints import load_checkpoint, read_model_card
from CovidGANSegLib.seg import training
from CovidGANSegLib.seg.synthetic import SyntheticSupervision, slab_lesions, synthetic_pairs
from CovidGANSegLib.synth.lesions import LesionConfig

from test_seg_training import make_pseudo_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = (-1000.0, 400.0)


def _healthy(n: int = 3, d: int = 6, h: int = 48, w: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Healthy-looking [0, 1] volumes: parenchyma at -850 HU with noise and a few bright 'vessels'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    lung2d = ((yy - h / 2) ** 2 / (0.4 * h) ** 2 + (xx - w / 2) ** 2 / (0.42 * w) ** 2) <= 1
    hu = np.where(lung2d, -850.0, 40.0) + rng.normal(0, 20, (n, d, h, w))
    hu[:, :, h // 2, w // 4: 3 * w // 4] = 40.0  # a vessel across every slice
    lungs = np.broadcast_to(lung2d, (n, d, h, w)).copy()
    return ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).clip(0, 1).astype(np.float32), lungs


def test_pairs_are_exact_inside_the_lung_and_deterministic():
    healthy, lungs = _healthy()
    plan = SyntheticSupervision(variants_per_volume=3, coverage=(0.01, 0.2), sub_slice_mm=0.0)  # drawn on the model grid
    images, masks, out_lungs, source = synthetic_pairs(healthy, lungs, window=WINDOW, spacing_dhw=(8.0, 2.0, 2.0), plan=plan, seed=4)
    assert images.shape == masks.shape == out_lungs.shape == (9, *healthy.shape[1:])
    assert list(source) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not (masks & ~out_lungs).any()
    changed = np.abs(images - healthy[source]) > 1e-4  # float round trip through HU aside
    # exact labels: every changed voxel is labelled, and the label covers nothing that did not change
    assert not (changed & ~masks).any()
    assert changed[masks].mean() > 0.95
    coverage = masks.sum(axis=(1, 2, 3)) / out_lungs.sum(axis=(1, 2, 3))
    assert (coverage > 0.005).all() and (coverage < 0.3).all()
    # denser than parenchyma where a lesion was drawn
    assert images[masks].mean() > healthy[source][masks].mean() + 0.05
    again = synthetic_pairs(healthy, lungs, window=WINDOW, spacing_dhw=(8.0, 2.0, 2.0), plan=plan, seed=4)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], masks)
    other = synthetic_pairs(healthy, lungs, window=WINDOW, spacing_dhw=(8.0, 2.0, 2.0), plan=plan, seed=5)
    assert not np.array_equal(other[1], masks)


def test_slab_lesions_are_the_slab_mean_of_thin_sub_slice_lesions(monkeypatch):
    """Each slice changes by the mean of its sub-slices' change; the label is where lesions fill at
    least the label fraction of the slab; a lesion filling part of a slab shows fainter than in full."""
    from CovidGANSegLib.seg import synthetic

    healthy, lungs = _healthy(n=1, d=4)

    def fake(image, lung, rng, **kw):  # a square lesion on sub-slices: slab 0 one of four, slab 1 all, slab 2 two
        assert image.shape == (16, 48, 48) and kw["spacing"] == (2.0, 2.0, 2.0)
        out, mask = image.copy(), np.zeros(image.shape, bool)
        mask[[0, 4, 5, 6, 7, 8, 9], 20:28, 20:28] = True
        mask &= lung
        out[mask] += 0.2
        return out, mask

    monkeypatch.setattr(synthetic, "synthesize_lesions", fake)
    image, mask = slab_lesions(healthy[0], lungs[0], np.random.default_rng(0), config=LesionConfig(), window=WINDOW,
                               spacing_dhw=(8.0, 2.0, 2.0), coverage=0.01, samples=4, label_fraction=0.5)
    change = image - healthy[0]
    inside = (slice(20, 28), slice(20, 28))
    assert np.allclose(change[0][inside], 0.05, atol=1e-6) and np.allclose(change[1][inside], 0.2, atol=1e-6)
    assert np.allclose(change[2][inside], 0.1, atol=1e-6) and np.abs(change[3]).max() < 1e-6
    assert not mask[0].any() and mask[1][inside].all() and mask[2][inside].all() and not mask[3].any()
    assert mask.sum() == 2 * 64


def test_slab_pairs_are_fainter_at_the_edges_and_labelled_where_the_slab_is_filled():
    healthy, lungs = _healthy(d=6)
    slab = SyntheticSupervision(variants_per_volume=2, coverage=(0.02, 0.1), sub_slice_mm=2.0)
    images, masks, out_lungs, source = synthetic_pairs(healthy, lungs, window=WINDOW, spacing_dhw=(8.0, 2.0, 2.0), plan=slab, seed=4)
    assert not (masks & ~out_lungs).any()
    changed = np.abs(images - healthy[source]) > 1e-4
    assert changed[masks].mean() > 0.95
    fringe = changed & ~masks  # lesions filling under half a slab: changed, fainter, not labelled
    assert fringe.any()
    delta = images - healthy[source]
    assert np.median(delta[fringe]) < np.median(delta[masks])
    coverage = masks.sum(axis=(1, 2, 3)) / out_lungs.sum(axis=(1, 2, 3))
    assert (coverage > 0.005).all() and (coverage < 0.2).all()


def test_plan_checks():
    with pytest.raises(ValueError):
        SyntheticSupervision(fraction=1.5)
    with pytest.raises(ValueError):
        SyntheticSupervision(coverage=(0.0, 0.2))
    for bad in ({"sub_slice_mm": -1.0}, {"sub_slice_mm": float("nan")}, {"slab_label_fraction": 0.0}, {"slab_label_fraction": 1.5},
                {"validation_variants": 0}):
        with pytest.raises(ValueError):
            SyntheticSupervision(**bad)
    with pytest.raises(ValueError):
        synthetic_pairs(np.zeros((2, 3, 4)), np.zeros((2, 3, 4), bool), window=WINDOW, spacing_dhw=(1, 1, 1))


def _with_healthy(folder, n_healthy: int = 3):
    make_pseudo_masks(folder, h=48, w=48, d=6)
    healthy, lungs = _healthy(n_healthy)
    np.save(folder / "healthy.npy", healthy)
    np.save(folder / "healthy_lungs.npy", lungs)
    index = json.loads((folder / "index.json").read_text())
    index["preprocess"]["grid"] = [48, 48, 6]
    index["preprocess"]["min_slices"] = 6
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def test_training_mixes_synthetic_pairs_and_chooses_threshold_on_them(tmp_path):
    progress.set_mode("none")
    pm = _with_healthy(tmp_path / "pm")
    path = training.train_segmenter(pm, tmp_path / "run", model="unet", config="tiny", iterations=8, device="cpu",
                                    synthetic=SyntheticSupervision(fraction=0.5, variants_per_volume=2))
    payload = load_checkpoint(path, kind="seg")
    meta = payload["metadata"]
    assert meta["synthetic"]["fraction"] == 0.5
    assert meta["n_train_healthy_volumes"] == 2 and meta["n_val_healthy_volumes"] == 1
    assert payload["threshold"] in training.THRESHOLDS and meta["threshold"] == payload["threshold"]
    card = read_model_card(path)
    assert "synthetic lesions" in card["trained_on"] and card["threshold"] == payload["threshold"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "losses.csv")))
    assert rows[-1]["val_dice_synthetic"] != ""


def test_training_without_synthetic_pairs_is_the_paper_path(tmp_path):
    progress.set_mode("none")
    pm = _with_healthy(tmp_path / "pm")
    path = training.train_segmenter(pm, tmp_path / "run", model="unet", config="tiny", iterations=4, device="cpu",
                                    synthetic=SyntheticSupervision(fraction=0.0))
    payload = load_checkpoint(path, kind="seg")
    assert payload["metadata"]["synthetic"] is None and payload["threshold"] == 0.5
    assert "synthetic" not in read_model_card(path)["trained_on"]


def test_folder_without_healthy_volumes_trains_on_pseudo_masks(tmp_path, caplog):
    progress.set_mode("none")
    pm = make_pseudo_masks(tmp_path / "pm")
    path = training.train_segmenter(pm, tmp_path / "run", model="unet", config="tiny", iterations=3, device="cpu")
    assert load_checkpoint(path, kind="seg")["metadata"]["synthetic"] is None
    assert "synthetic-lesion supervision is off" in caplog.text


def test_resume_keeps_the_runs_own_supervision(tmp_path):
    progress.set_mode("none")
    pm = _with_healthy(tmp_path / "pm")
    run = tmp_path / "run"
    training.train_segmenter(pm, run, model="unet", config="tiny", iterations=3, device="cpu", synthetic=SyntheticSupervision(fraction=0.0))
    resumed = training.train_segmenter(pm, run, model="unet", config="tiny", iterations=5, device="cpu", resume=True)
    meta = load_checkpoint(resumed, kind="seg")["metadata"]
    assert meta["synthetic"] is None and meta["iterations"] == 5


def test_a_run_from_before_sub_slice_lesions_resumes_with_lesions_on_the_model_grid(tmp_path):
    progress.set_mode("none")
    pm = _with_healthy(tmp_path / "pm")
    run = tmp_path / "run"
    training.train_segmenter(pm, run, model="unet", config="tiny", iterations=3, device="cpu",
                             synthetic=SyntheticSupervision(variants_per_volume=2, sub_slice_mm=0.0))
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, map_location="cpu", weights_only=False)
    del payload["metadata"]["synthetic"]["sub_slice_mm"]  # as written before the field existed
    torch.save(payload, last)
    resumed = training.train_segmenter(pm, run, model="unet", config="tiny", iterations=5, device="cpu", resume=True)
    meta = load_checkpoint(resumed, kind="seg")["metadata"]
    assert meta["synthetic"]["sub_slice_mm"] == 0.0 and meta["iterations"] == 5
    assert SyntheticSupervision().sub_slice_mm == 2.0  # a new run draws them on sub-slices


def test_validation_volumes_get_at_most_validation_variants_copies(tmp_path, monkeypatch):
    """More training copies leave the validation pairs as they are; a run from before the field resumes with
    as many validation copies as training copies, as it was trained."""
    progress.set_mode("none")
    pm = _with_healthy(tmp_path / "pm")
    drawn = []
    real = training.synthetic_slices
    monkeypatch.setattr(training, "synthetic_slices", lambda data, volumes, plan, *a, **k: drawn.append(plan) or real(data, volumes, plan, *a, **k))
    run = tmp_path / "run"
    training.train_segmenter(pm, run, model="unet", config="tiny", iterations=3, device="cpu",
                             synthetic=SyntheticSupervision(variants_per_volume=3, validation_variants=1, sub_slice_mm=0.0))
    assert [p.variants_per_volume for p in drawn] == [3, 1]
    assert SyntheticSupervision(variants_per_volume=2).for_validation().variants_per_volume == 2  # never more than in training
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, map_location="cpu", weights_only=False)
    del payload["metadata"]["synthetic"]["validation_variants"]  # as written before the field existed
    torch.save(payload, last)
    drawn.clear()
    resumed = training.train_segmenter(pm, run, model="unet", config="tiny", iterations=5, device="cpu", resume=True)
    assert [p.variants_per_volume for p in drawn] == [3, 3]
    assert load_checkpoint(resumed, kind="seg")["metadata"]["synthetic"]["validation_variants"] == 3


def test_loss_band_adds_the_tissue_next_to_the_lung_of_synthetic_pairs_as_negatives(tmp_path):
    """``SegConfig.loss_band_mm``: the pairs' loss region (their ``lungs``) grows by exactly the pixels
    within that in-plane distance of the lung; the labels are unchanged, so the band is all negatives."""
    from scipy import ndimage as ndi

    data = training.load_pseudo_masks(_with_healthy(tmp_path / "pm"))
    plan = SyntheticSupervision(variants_per_volume=1, sub_slice_mm=0.0)
    plain = training.synthetic_slices(data, [0, 1], plan, seed=3)
    banded = training.synthetic_slices(data, [0, 1], plan, seed=3, band_mm=9.0)
    assert torch.equal(plain.images, banded.images) and torch.equal(plain.masks, banded.masks)
    radius_px = 9.0 / training.model_spacing_dhw(data)[1]
    lungs = plain.lungs.numpy()[:, 0]
    expected = np.stack([ndi.distance_transform_edt(~s) <= radius_px for s in lungs])  # (S, H, W)
    assert np.array_equal(banded.lungs.numpy()[:, 0], expected)
    band = expected & ~lungs
    assert band.sum() > 0.2 * lungs.sum() and not banded.masks.numpy()[:, 0][band].any()


def test_loss_band_trains_and_is_checked(tmp_path):
    import dataclasses

    from CovidGANSegLib.seg.transunet import SegConfig, get_seg_config

    progress.set_mode("none")
    with pytest.raises(ValueError, match="loss_band_mm"):
        SegConfig(loss_band_mm=-1.0)
    with pytest.raises(ValueError, match="loss_band_mm"):
        SegConfig(loss_band_mm=5.0, loss_region="all")
    config = dataclasses.replace(get_seg_config("tiny"), loss_band_mm=6.0)
    path = training.train_segmenter(_with_healthy(tmp_path / "pm"), tmp_path / "run", model="unet", config=config, iterations=4,
                                    device="cpu", synthetic=SyntheticSupervision(fraction=1.0, variants_per_volume=1))
    assert load_checkpoint(path, kind="seg")["config"]["loss_band_mm"] == 6.0
