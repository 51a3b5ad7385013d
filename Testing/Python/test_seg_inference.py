"""`segment`: output geometry equals the input's for any grid, checkpoint errors, reports, HU baseline
(the post-processing rules themselves: test_postprocess.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from CovidGANSegLib.checkpoints import save_checkpoint, write_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError
from CovidGANSegLib.nifti import CTVolume
from CovidGANSegLib.seg.hu_threshold import hu_threshold_classes, hu_threshold_segment
from CovidGANSegLib.seg.inference import chose_threshold_among_old_range, load_segmenter, segment_ct, segment_file
from CovidGANSegLib.seg.postprocess import PLAIN, PostProcessing
from CovidGANSegLib.seg.transunet import SEG_CONFIGS, TransUNet

PP = PreprocessConfig(grid=(32, 32, 8), min_slices=1)


pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(scope="module")
def phantom():
    from CovidGANSegLib.synth.phantoms import generate_phantom

    return generate_phantom(np.random.default_rng(1), size="small", covid=True)  # CT-1, 128 x 128 x 34 LAS


def _write(hu: np.ndarray, affine: np.ndarray, path: Path, axcodes: tuple[str, str, str] | None = None, dtype=np.int16) -> Path:
    img = nib.Nifti1Image(hu.astype(dtype), affine)
    if axcodes is not None:
        img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(axcodes)))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def _seg_checkpoint(path: Path, *, bias: float | None = None, seed: int = 0, pp: PreprocessConfig = PP, threshold: float = 0.5,
                    metadata: dict | None = None) -> Path:
    torch.manual_seed(seed)
    cfg = SEG_CONFIGS["tiny"]
    model = TransUNet(cfg)
    if bias is not None:  # constant output: probability sigmoid(bias) everywhere in the crop
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(bias)
    save_checkpoint(path, kind="seg", arch="transunet", config=cfg.to_dict(), metadata={"demo": True, **(metadata or {})},
                    preprocess=pp.to_dict(), model=model.state_dict(), threshold=threshold)
    write_model_card(path, name="test", kind="seg", arch="transunet", config_name="tiny", config=cfg.to_dict(),
                     trained_on="nothing (random weights)", demo=True)
    return path


@pytest.mark.parametrize("axcodes, slices", [(None, 34), (("R", "A", "S"), 34), (("L", "P", "S"), 21), (("S", "P", "L"), 27)])
def test_output_grid_equals_input_for_odd_geometries(phantom, tmp_path, axcodes, slices):
    hu = phantom.hu[:, :, :slices]
    ct_path = _write(hu, phantom.affine, tmp_path / "ct.nii.gz", axcodes)
    ckpt = _seg_checkpoint(tmp_path / "seg.pt", bias=10.0)  # p ~ 1 everywhere in the crop box
    out, lungs, report = tmp_path / "lesion.nii.gz", tmp_path / "lungs.nii.gz", tmp_path / "report.json"
    rep = segment_file(ct_path, seg=ckpt, output=out, lungs=lungs, report=report, device="cpu")
    src = nib.load(str(ct_path))
    for p in (out, lungs):
        img = nib.load(str(p))
        assert img.shape == src.shape
        assert np.allclose(img.affine, src.affine, atol=1e-5)
        assert img.get_data_dtype() == np.uint8
    lesion, lung = np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(lungs)).dataobj)
    # the crop box holds the lungs plus a margin, so "lesion everywhere" is the lung mask where the input is
    # lesion-dense (post-processing: HU range, opening, growth)
    assert lung.sum() > 1000 and lesion.any() and not (lesion & ~lung).any()
    hu = np.asarray(src.dataobj)
    assert ((hu[lesion > 0] >= -800) & (hu[lesion > 0] <= 100)).all()
    on_disk = json.loads(report.read_text())
    assert on_disk["percent_involved"] == pytest.approx(100.0 * lesion.sum() / lung.sum(), rel=1e-4)
    assert on_disk["lung_ml"] == pytest.approx(lung.sum() * np.prod(src.header.get_zooms()[:3]) / 1000, rel=1e-5)
    assert rep["demo_models"] is True


def test_segment_warns_of_a_threshold_an_earlier_version_chose_above_0_4(phantom, tmp_path, caplog):
    """Training chose among 0.3-0.9 before; a checkpoint with such a choice still segments at its own threshold
    but says how to follow today's (docs/ablation.md, "The segmenters' threshold: 0.3 or 0.4")."""
    chosen = {"threshold_val_dice_synthetic": 0.41}
    old = _seg_checkpoint(tmp_path / "old.pt", seed=3, threshold=0.6, metadata=chosen)
    ct_path = _write(phantom.hu, phantom.affine, tmp_path / "ct.nii.gz")
    with caplog.at_level(logging.WARNING, logger="CovidGANSegLib.seg.inference"):
        rep = segment_file(ct_path, seg=old, output=tmp_path / "a.nii.gz", device="cpu")
    assert rep["threshold"] == pytest.approx(0.6)  # the checkpoint's own, unchanged
    assert "old.pt" in caplog.text and "--threshold 0.4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="CovidGANSegLib.seg.inference"):
        segment_file(ct_path, seg=old, output=tmp_path / "b.nii.gz", device="cpu", threshold=0.4)
    assert "--threshold" not in caplog.text  # the user chose

    def payload(t: float, meta: dict) -> dict:
        return {"threshold": t, "metadata": meta}

    assert chose_threshold_among_old_range(payload(0.5, chosen))  # as three of the demo models of 2026-12-05 chose
    # today's choices and the plain 0.5 of a model without synthetic validation pairs are not flagged
    assert not chose_threshold_among_old_range(payload(0.4, chosen))
    assert not chose_threshold_among_old_range(payload(0.3, chosen))
    assert not chose_threshold_among_old_range(payload(0.5, {"threshold_val_dice_synthetic": None}))
    assert not chose_threshold_among_old_range(payload(0.5, {}))


def test_same_result_in_any_orientation(phantom, tmp_path):
    """A random (non-constant) model: the same CT stored LAS and SPL gives the same physical mask."""
    ckpt = _seg_checkpoint(tmp_path / "seg.pt", seed=3)
    masks = []
    for codes in (("L", "A", "S"), ("S", "P", "L")):
        ct_path = _write(phantom.hu, phantom.affine, tmp_path / f"ct_{''.join(codes)}.nii.gz", codes)
        out = tmp_path / f"lesion_{''.join(codes)}.nii.gz"
        segment_file(ct_path, seg=ckpt, output=out, device="cpu", threshold=0.5)
        masks.append(np.asarray(nib.as_closest_canonical(nib.load(str(out))).dataobj))
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


def test_segment_ct_in_memory(phantom, tmp_path):
    model, payload = load_segmenter(_seg_checkpoint(tmp_path / "seg.pt", bias=-10.0), "cpu")
    ct = CTVolume.from_array(phantom.hu, phantom.affine)
    res = segment_ct(ct, model)
    assert res.probability.shape == ct.shape and res.lesion_mask.shape == ct.shape
    assert not res.lesion_mask.any() and res.lung_mask.any()
    assert res.probability_model.shape == PP.grid_dhw
    with pytest.raises(ValueError):
        segment_ct(ct, model, threshold=1.5)


def test_plain_rule_is_probability_in_the_lung(phantom, tmp_path):
    model, _ = load_segmenter(_seg_checkpoint(tmp_path / "seg.pt", bias=10.0), "cpu")
    ct = CTVolume.from_array(phantom.hu, phantom.affine)
    plain = segment_ct(ct, model, post=PLAIN)
    assert np.array_equal(plain.lesion_mask, plain.lung_mask)
    ranged = segment_ct(ct, model, post=PostProcessing(open_mm=0.0, grow=False, density_filter_mm=0.0, slab_tissue_hu=None)).lesion_mask
    assert np.array_equal(ranged, plain.lung_mask & (ct.array >= -800) & (ct.array <= 100))


def test_checkpoint_errors_write_nothing(phantom, tmp_path):
    ct_path = _write(phantom.hu, phantom.affine, tmp_path / "ct.nii.gz")
    out = tmp_path / "lesion.nii.gz"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        segment_file(ct_path, seg=corrupt, output=out, device="cpu")
    good = _seg_checkpoint(tmp_path / "seg.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        segment_file(ct_path, seg=truncated, output=out, device="cpu")
    foreign = tmp_path / "gan.pt"
    save_checkpoint(foreign, kind="gan", arch="dense-unet-gan-3d", config={}, model={})
    with pytest.raises(CheckpointError, match="'gan' checkpoint"):
        segment_file(ct_path, seg=foreign, output=out, device="cpu")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a CovidGANSeg checkpoint"):
        segment_file(ct_path, seg=tmp_path / "plain.pt", output=out, device="cpu")
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, kind="seg", arch="transunet", config=SEG_CONFIGS["small"].to_dict(), preprocess=PP.to_dict(),
                    model=TransUNet(SEG_CONFIGS["tiny"]).state_dict())
    with pytest.raises(CheckpointError, match="do not match"):
        segment_file(ct_path, seg=wrong, output=out, device="cpu")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers


def test_output_name_and_input_errors(phantom, tmp_path):
    ct_path = _write(phantom.hu, phantom.affine, tmp_path / "ct.nii.gz")
    ckpt = _seg_checkpoint(tmp_path / "seg.pt")
    with pytest.raises(InputError, match="NIfTI"):
        segment_file(ct_path, seg=ckpt, output=tmp_path / "lesion.png", device="cpu")
    with pytest.raises(InputError, match="overwrite the input"):
        segment_file(ct_path, seg=ckpt, output=ct_path, device="cpu")
    with pytest.raises(InputError, match="--gan"):
        segment_file(ct_path, seg=ckpt, output=tmp_path / "l.nii.gz", pseudo_healthy=tmp_path / "ph.nii.gz", device="cpu")
    scaled = _write(np.clip((phantom.hu + 1000) / 1400, 0, 1), phantom.affine, tmp_path / "scaled.nii.gz", dtype=np.float32)
    with pytest.raises(InputError, match="Hounsfield"):
        segment_file(scaled, seg=ckpt, output=tmp_path / "l.nii.gz", device="cpu")
    assert not (tmp_path / "l.nii.gz").exists()


def test_gan_outputs_and_preprocess_mismatch(phantom, tmp_path):
    from CovidGANSegLib.gan import GAN_ARCH
    from CovidGANSegLib.gan.networks import GAN_CONFIGS, DenseUNetGenerator3D

    gcfg = GAN_CONFIGS["tiny"]
    torch.manual_seed(0)
    gen = DenseUNetGenerator3D(gcfg)
    gan = tmp_path / "gan.pt"
    save_checkpoint(gan, kind="gan", arch=GAN_ARCH, config=gcfg.to_dict(), preprocess=PP.to_dict(), generator=gen.state_dict())
    ct_path = _write(phantom.hu, phantom.affine, tmp_path / "ct.nii.gz", ("R", "P", "S"))
    ckpt = _seg_checkpoint(tmp_path / "seg.pt")
    out, ph, diff = tmp_path / "lesion.nii.gz", tmp_path / "ph.nii.gz", tmp_path / "diff.nii.gz"
    segment_file(ct_path, seg=ckpt, gan=gan, output=out, pseudo_healthy=ph, difference=diff, device="cpu")
    src = nib.load(str(ct_path))
    for p in (out, ph, diff):
        img = nib.load(str(p))
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-5)
    assert np.allclose(np.asarray(src.dataobj, np.float32) - np.asarray(nib.load(str(ph)).dataobj, np.float32),
                       np.asarray(nib.load(str(diff)).dataobj, np.float32))
    # a segmenter on a finer grid than the GAN's is fine (the GAN's outputs go back to the CT grid) ...
    finer = _seg_checkpoint(tmp_path / "seg64.pt", pp=dataclasses.replace(PP, grid=(64, 64, 8)))
    out3, diff3 = tmp_path / "lesion3.nii.gz", tmp_path / "diff3.nii.gz"
    segment_file(ct_path, seg=finer, gan=gan, output=out3, difference=diff3, device="cpu")
    assert np.array_equal(np.asarray(nib.load(str(diff3)).dataobj), np.asarray(nib.load(str(diff)).dataobj))
    # ... another HU window is not
    other = _seg_checkpoint(tmp_path / "segw.pt", pp=dataclasses.replace(PP, hu_window=(-1200.0, 600.0)))
    out2 = tmp_path / "lesion2.nii.gz"
    with pytest.raises(CheckpointError, match="different preprocessing"):
        segment_file(ct_path, seg=other, gan=gan, output=out2, device="cpu")
    assert not out2.exists()


def test_hu_threshold_baseline():
    hu = np.array([-1000, -951, -750, -751, -600, -400, -401, -100, 0, 1, 300], dtype=np.float32).reshape(-1, 1, 1)
    lung = np.ones_like(hu, dtype=bool)
    lung[-1] = False
    expected = np.array([0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0], bool).reshape(-1, 1, 1)
    assert np.array_equal(hu_threshold_segment(hu, lung), expected)
    classes = hu_threshold_classes(hu, lung).ravel().tolist()
    assert classes == [0, 0, 1, 0, 1, 2, 1, 2, 2, 0, 0]
    lung[:] = False
    assert not hu_threshold_segment(hu, lung).any()
    with pytest.raises(ValueError):
        hu_threshold_segment(hu, lung[:3])


@pytest.mark.slow
def test_end_to_end_cli_phantoms_gan_pseudomasks_trainseg_segment_evaluate(tmp_path, capsys):
    """phantoms -> GAN (tiny) -> pseudo-masks -> train-seg (both models) -> segment -> evaluate, via the CLI."""
    from CovidGANSegLib import cli
    from CovidGANSegLib.synth.phantoms import write_cohort

    cohort = write_cohort(tmp_path / "cohort", healthy=2, covid=3, seed=11, size="small")
    run = lambda *a: cli.main(["--progress", "none", *map(str, a)])  # noqa: E731
    assert run("train-gan", "--data", cohort, "--out", tmp_path / "gan", "--config", "tiny", "--iterations", 2, "--device", "cpu",
               "--grid", 32, 32, 8) == 0
    assert run("pseudo-masks", "--checkpoint", tmp_path / "gan" / "model.pt", "--data", tmp_path / "gan" / "preprocessed",
               "--out", tmp_path / "pm", "--device", "cpu") == 0
    for arch in ("transunet", "unet"):
        assert run("train-seg", "--data", cohort, "--pseudo-masks", tmp_path / "pm", "--out", tmp_path / arch, "--model", arch,
                   "--config", "tiny", "--iterations", 6, "--device", "cpu") == 0
        card = json.loads((tmp_path / arch / "model.pt.json").read_text())
        assert card["demo"] is True and card["arch"] == arch
    study = sorted((cohort / "studies" / "CT-1").glob("*.nii.gz"))[0]
    sid = study.name.split(".")[0]
    pred = tmp_path / "pred" / f"{sid}.nii.gz"
    assert run("segment", "--input", study, "--gan", tmp_path / "gan" / "model.pt", "--seg", tmp_path / "transunet" / "model.pt",
               "--output", pred, "--lungs", tmp_path / "lungs" / f"{sid}_lungs.nii.gz", "--pseudo-healthy", tmp_path / "ph.nii.gz",
               "--difference", tmp_path / "diff.nii.gz", "--report", tmp_path / "report.json", "--device", "auto") == 0
    src = nib.load(str(study))
    for p in (pred, tmp_path / "ph.nii.gz", tmp_path / "diff.nii.gz"):
        img = nib.load(str(p))
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-5)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["mosmed_category"] in ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4") and rep["lung_ml"] > 500
    assert rep["post_processing"]["grow"] is True
    assert rep["lung_mask"] == {"source": "computed", "z_closing_mm": 24.0}  # the inference mask, said in the report
    # --no-growth: the detections alone, a subset of the grown mask, said in the report
    seeds = tmp_path / "seeds.nii.gz"
    assert run("segment", "--input", study, "--gan", tmp_path / "gan" / "model.pt", "--seg", tmp_path / "transunet" / "model.pt",
               "--output", seeds, "--report", tmp_path / "seeds.json", "--no-growth", "--device", "cpu") == 0
    assert json.loads((tmp_path / "seeds.json").read_text())["post_processing"]["grow"] is False
    assert not (nib.load(str(seeds)).get_fdata() > np.asarray(nib.load(str(pred)).get_fdata())).any()
    # the local contrast rule and the thin-growth limit are on unless switched off; off, the mask can only grow
    for flag, field, default in (("--no-local-contrast", "min_contrast_hu", 100.0), ("--no-thin-growth", "min_thick_fraction", 0.75)):
        assert rep["post_processing"][field] == default
        kept_more = tmp_path / f"{field}_off.nii.gz"
        assert run("segment", "--input", study, "--seg", tmp_path / "transunet" / "model.pt", "--output", kept_more,
                   "--report", tmp_path / f"{field}_off.json", flag, "--device", "cpu") == 0
        assert json.loads((tmp_path / f"{field}_off.json").read_text())["post_processing"][field] is None
        assert not (nib.load(str(pred)).get_fdata() > np.asarray(nib.load(str(kept_more)).get_fdata())).any()
    # faint components join without a seed unless switched off; off, the mask can only shrink
    assert rep["post_processing"]["faint_component_hu"] == -525.0
    seeded = tmp_path / "seeded.nii.gz"
    assert run("segment", "--input", study, "--seg", tmp_path / "transunet" / "model.pt", "--output", seeded,
               "--report", tmp_path / "seeded.json", "--no-faint-components", "--device", "cpu") == 0
    assert json.loads((tmp_path / "seeded.json").read_text())["post_processing"]["faint_component_hu"] is None
    assert not (nib.load(str(seeded)).get_fdata() > np.asarray(nib.load(str(pred)).get_fdata())).any()
    # small dense components are dropped unless kept (--keep-small-dense); kept, the mask can only grow
    assert rep["post_processing"]["small_dense_hu"] == -475.0 and rep["post_processing"]["small_dense_ml"] == 4.0
    kept_dense = tmp_path / "kept_dense.nii.gz"
    assert run("segment", "--input", study, "--seg", tmp_path / "transunet" / "model.pt", "--output", kept_dense,
               "--report", tmp_path / "kept_dense.json", "--keep-small-dense", "--device", "cpu") == 0
    assert json.loads((tmp_path / "kept_dense.json").read_text())["post_processing"]["small_dense_hu"] is None
    assert not (nib.load(str(pred)).get_fdata() > np.asarray(nib.load(str(kept_dense)).get_fdata())).any()
    # the detections' rim joins unless switched off (--no-detection-rim); off, the mask can only shrink
    assert rep["post_processing"]["detection_rim_mm"] == 2.5
    no_rim = tmp_path / "no_rim.nii.gz"
    assert run("segment", "--input", study, "--seg", tmp_path / "transunet" / "model.pt", "--output", no_rim,
               "--report", tmp_path / "no_rim.json", "--no-detection-rim", "--device", "cpu") == 0
    assert json.loads((tmp_path / "no_rim.json").read_text())["post_processing"]["detection_rim_mm"] == 0.0
    assert not (nib.load(str(no_rim)).get_fdata() > np.asarray(nib.load(str(pred)).get_fdata())).any()
    # the GAN-agreement gate is off unless asked for (--gan-gate K); gated, the mask can only shrink
    assert rep["post_processing"]["gan_gate_sigmas"] is None and rep["post_processing"]["gan_gate_hu"] is None
    gated = tmp_path / "gated.nii.gz"
    assert run("segment", "--input", study, "--gan", tmp_path / "gan" / "model.pt", "--seg", tmp_path / "transunet" / "model.pt",
               "--output", gated, "--report", tmp_path / "gated.json", "--gan-gate", "4", "--device", "cpu") == 0
    gated_rep = json.loads((tmp_path / "gated.json").read_text())["post_processing"]
    assert gated_rep["gan_gate_sigmas"] == 4.0 and gated_rep["gan_gate_hu"] is not None
    assert not (nib.load(str(gated)).get_fdata() > np.asarray(nib.load(str(pred)).get_fdata())).any()
    assert run("segment", "--input", study, "--seg", tmp_path / "transunet" / "model.pt", "--output", tmp_path / "x.nii.gz",
               "--gan-gate", "4") == 2
    assert "--gan-gate needs the GAN checkpoint" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()
    assert run("evaluate", "--pred", tmp_path / "pred", "--truth", cohort / "masks", "--lungs", tmp_path / "lungs",
               "--out", tmp_path / "ev", "--method", "transunet") == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["cases"] == 1 and "dice" in summary["models"]["transunet"]
    # a GAN checkpoint given as --seg is refused with exit code 2 and nothing is written
    bad = tmp_path / "bad.nii.gz"
    assert run("segment", "--input", study, "--seg", tmp_path / "gan" / "model.pt", "--output", bad) == 2
    assert "'gan' checkpoint" in capsys.readouterr().err and not bad.exists()
