"""Pseudo-healthy CT, difference maps (eq. 3), checkpoint checks and pseudo-masks / severity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CovidGANSegLib import progress
from CovidGANSegLib.checkpoints import save_checkpoint
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError
from CovidGANSegLib.gan import GAN_ARCH
from CovidGANSegLib.gan.inference import (
    compose_pseudo_healthy,
    load_generator,
    model_to_canonical_box,
    pseudo_healthy,
    pseudo_healthy_file,
)
from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, get_gan_config
from CovidGANSegLib.gan.pseudomasks import binarise, make_pseudo_masks, severity, threshold_from_stats

TINY_GRID = (32, 32, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save_generator(path: Path, *, config: str = "tiny", grid=TINY_GRID, seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    cfg = get_gan_config(config)
    g = DenseUNetGenerator3D(cfg)
    return save_checkpoint(path, kind="gan", arch=GAN_ARCH, config=cfg.to_dict(), preprocess=PreprocessConfig(grid=tuple(grid)).to_dict(),
                           generator=g.state_dict(), **extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(cohort folder, preprocessed folder on the tiny grid, untrained tiny G checkpoint)."""
    from CovidGANSegLib.synth.phantoms import write_cohort
    from CovidGANSegLib.preprocessing import preprocess_dataset

    progress.set_mode("none")
    root = tmp_path_factory.mktemp("gan_inf")
    cohort = write_cohort(root / "cohort", healthy=2, covid=2, seed=2)
    train = root / "train"
    shutil.copytree(cohort / "studies", train / "studies")  # no lesion masks
    pre = preprocess_dataset(train, root / "pre", PreprocessConfig(grid=TINY_GRID))
    ckpt = _save_generator(root / "model.pt")
    return cohort, pre, ckpt


def _covid_study(cohort: Path) -> tuple[Path, Path]:
    meta = json.loads((cohort / "cohort.json").read_text())
    rec = next(r for r in meta["studies"] if r["covid"])
    return cohort / rec["path"], cohort / rec["lungs"]


# ------------------------------------------------------------------------------------------------
# pseudo-healthy


def test_pseudo_healthy_file_overlays_input_and_is_identical_outside_lungs(data, tmp_path):
    cohort, _, ckpt = data
    ct_path, lungs_path = _covid_study(cohort)
    out, diff = tmp_path / "ph.nii.gz", tmp_path / "diff.nii.gz"
    pseudo_healthy_file(ckpt, ct_path, out, difference=diff, device="cpu", lungs=lungs_path)
    src, ph_img, diff_img = nib.load(ct_path), nib.load(out), nib.load(diff)
    for img in (ph_img, diff_img):
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        assert img.get_data_dtype() == np.int16  # integral input -> integral output
    hu = np.asarray(src.dataobj).astype(np.int32)
    ph = np.asarray(ph_img.dataobj).astype(np.int32)
    d = np.asarray(diff_img.dataobj).astype(np.int32)
    lungs = np.asarray(nib.load(lungs_path).dataobj) > 0
    assert np.array_equal(ph[~lungs], hu[~lungs])  # identical outside the lungs
    assert np.array_equal(d, hu - ph)  # eq. 3 exactly, in HU
    assert d.min() >= 0 and d[lungs].max() > 0  # the residual G only removes density
    assert not list(tmp_path.glob(".*partial*"))


def test_pseudo_healthy_real_ct_with_computed_lungs(data, real_ct_dir, tmp_path):
    from CovidGANSegLib.nifti import load_ct

    _, _, ckpt = data
    path = real_ct_dir / "pulmonary_report_ct_cropped.nii.gz"  # LPS, real anatomy, partial lungs
    g, payload = load_generator(ckpt)
    ct = load_ct(path)
    res = pseudo_healthy(g, ct, PreprocessConfig.from_dict(payload["preprocess"]))
    assert res.pseudo_healthy_hu.shape == ct.shape == res.difference_hu.shape == res.lung_mask.shape
    assert res.generated.shape == (8, 32, 32) and res.difference_model.shape == (8, 32, 32)
    assert res.lung_mask.any()
    assert np.array_equal(res.pseudo_healthy_hu[~res.lung_mask], ct.array[~res.lung_mask])
    np.testing.assert_array_equal(res.difference_hu, ct.array - res.pseudo_healthy_hu)
    out = tmp_path / "ph.nii"
    pseudo_healthy_file(ckpt, path, out, device="auto")
    src, img = nib.load(path), nib.load(out)
    assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-5)
    back = load_ct(out)
    assert np.array_equal(back.array[~res.lung_mask], ct.array[~res.lung_mask])


def test_compose_rules_window_limits_and_resampler():
    from CovidGANSegLib.preprocessing import GridMapping

    cfg = PreprocessConfig(grid=(16, 16, 4))
    mapping = GridMapping.from_box((2, 2, 1), (30, 26, 9), (32, 28, 10), (1.0, 1.0, 2.0), cfg)
    rng = np.random.default_rng(0)
    removed = rng.uniform(0, 0.2, size=cfg.grid_dhw).astype(np.float32)
    # the separable torch resampler equals GridMapping.to_canonical (steps >= 1: no anti-aliasing)
    box = (slice(3, 29), slice(4, 25), slice(1, 9))
    np.testing.assert_allclose(model_to_canonical_box(removed, mapping, box).numpy(), mapping.to_canonical(removed)[box], atol=1e-6)

    hu = np.full((32, 28, 10), -850.0, dtype=np.float32)
    lung = np.zeros(hu.shape, dtype=bool)
    lung[4:28, 4:24, 2:8] = True
    hu[5, 5, 3] = -1100.0  # below the window, inside the lung
    hu[6, 6, 3] = 900.0  # above the window (calcification), inside the lung
    hu[0, 0, 0] = 1200.0  # outside the lung
    big = np.full(cfg.grid_dhw, 0.5, dtype=np.float32)  # G "removes" 700 HU everywhere
    ph, diff = compose_pseudo_healthy(hu, big, mapping, lung, cfg.hu_window)
    assert np.array_equal(ph[~lung], hu[~lung]) and np.all(diff[~lung] == 0)
    assert ph[10, 10, 4] == -1000.0  # limited at the window's lower end, not -1550
    assert ph[5, 5, 3] == -1100.0  # already below the window: unchanged
    assert ph[6, 6, 3] == 200.0  # 900 - 700: the same HU correction as its clipped value
    np.testing.assert_array_equal(diff, hu - ph)
    assert np.all(ph == np.rint(ph))  # integral input -> whole-HU output
    ph0, diff0 = compose_pseudo_healthy(hu, big, mapping, np.zeros_like(lung), cfg.hu_window)
    assert np.array_equal(ph0, hu) and not diff0.any()


def test_output_names_and_nothing_written_on_failure(data, tmp_path):
    cohort, _, ckpt = data
    ct_path, _ = _covid_study(cohort)
    with pytest.raises(InputError, match=r"\.nii"):
        pseudo_healthy_file(ckpt, ct_path, tmp_path / "ph.nrrd", device="cpu")
    with pytest.raises(InputError, match="overwrite the input"):
        pseudo_healthy_file(ckpt, ct_path, ct_path, device="cpu")
    with pytest.raises(InputError, match="different files"):
        pseudo_healthy_file(ckpt, ct_path, tmp_path / "a.nii.gz", difference=tmp_path / "a.nii.gz", device="cpu")
    scaled = tmp_path / "scaled.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 8)).astype(np.float32), np.eye(4)), scaled)
    with pytest.raises(InputError, match="not Hounsfield"):
        pseudo_healthy_file(ckpt, scaled, tmp_path / "ph.nii.gz", difference=tmp_path / "d.nii.gz", device="cpu")
    with pytest.raises(InputError, match="not found"):
        pseudo_healthy_file(ckpt, tmp_path / "missing.nii.gz", tmp_path / "ph.nii.gz", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaled.nii.gz"]


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_corrupt_truncated_and_foreign_checkpoints(data, tmp_path):
    from CovidGANSegLib.cli import main

    _, _, ckpt = data
    raw = ckpt.read_bytes()
    cases = {}
    cases["truncated"] = tmp_path / "truncated.pt"
    cases["truncated"].write_bytes(raw[: len(raw) // 2])
    cases["corrupt"] = tmp_path / "corrupt.pt"
    cases["corrupt"].write_bytes(np.random.default_rng(0).bytes(4096))
    cases["foreign"] = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, cases["foreign"])
    cases["seg"] = save_checkpoint(tmp_path / "seg.pt", kind="seg", arch="transunet", config={}, model={})
    cases["arch"] = save_checkpoint(tmp_path / "arch.pt", kind="gan", arch="other-gan", config={}, generator={})
    cases["no_generator"] = save_checkpoint(tmp_path / "nog.pt", kind="gan", arch=GAN_ARCH, config=get_gan_config("tiny").to_dict(),
                                            preprocess=PreprocessConfig().to_dict())
    mismatch = torch.load(ckpt, weights_only=True)
    mismatch["config"] = get_gan_config("quick").to_dict()  # weights of "tiny" under the "quick" architecture
    cases["mismatch"] = tmp_path / "mismatch.pt"
    torch.save(mismatch, cases["mismatch"])
    cases["missing"] = tmp_path / "missing.pt"
    expected = {"truncated": "corrupt, truncated", "corrupt": "corrupt, truncated", "foreign": "not a CovidGANSeg checkpoint",
                "seg": "'seg' checkpoint", "arch": "architecture", "no_generator": "without generator weights",
                "mismatch": "do not match", "missing": "not found"}
    for name, path in cases.items():
        with pytest.raises(CheckpointError, match=expected[name]) as info:
            load_generator(path)
        assert str(path) in str(info.value)
    ct = next(iter(sorted((data[0] / "studies").rglob("*.nii.gz"))))
    out = tmp_path / "out.nii.gz"
    assert main(["--progress", "none", "pseudo-healthy", "--checkpoint", str(cases["truncated"]), "--input", str(ct), "--output", str(out), "--device", "cpu"]) == 2
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# pseudo-masks and severity


def test_severity_quartiles_and_groups():
    diff = np.zeros((2, 5, 4, 4), dtype=np.float32)
    lungs = np.zeros(diff.shape, dtype=bool)
    lungs[:, :4, 1:3, 1:3] = True  # slice 4 of each volume has no lung
    for v in range(2):
        for s in range(4):
            diff[v, s, 1:3, 1:3] = (4 * v + s) / 4.0  # slice sums 0, 1, ..., 7
    diff[0, 0, 1, 1] = -1.0  # negative: added density, not counted
    sev = severity(diff, lungs)
    q = sev["quartiles"]
    assert sev["per_slice_sums"][1][3] == 7.0 and sev["per_slice_sums"][0][0] == 0.0
    assert (q["q1"], q["median"], q["q3"], q["n_slices"]) == (1.75, 3.5, 5.25, 8)
    assert sev["high"] == [[1, 2], [1, 3]]  # sums 6, 7 > Q3
    assert sev["low"] == [[0, 2], [0, 3]]  # sums 2, 3 in [Q1, median]
    assert [0, 4] not in sev["high"] + sev["low"]
    with pytest.raises(InputError):
        severity(diff, np.zeros_like(lungs))


def test_threshold_rule_and_binarise():
    assert threshold_from_stats(None, floor=0.05) == 0.05
    assert threshold_from_stats({"count": 10, "median": 0.01, "sigma": 0.02}, k=5, floor=0.05) == pytest.approx(0.11)
    assert threshold_from_stats({"count": 10, "median": 0.0, "sigma": 0.001}, k=5, floor=0.05) == 0.05
    diff = np.zeros((1, 8, 8, 8), dtype=np.float32)
    diff[0, 1:4, 1:4, 1:4] = 0.3  # a 27-voxel blob
    diff[0, 6, 6, 6] = 0.3  # an isolated voxel
    diff[0, 5, 1, 1] = 0.3  # outside the lung below
    lungs = np.ones(diff.shape, dtype=bool)
    lungs[0, 5] = False
    m = binarise(diff, lungs, 0.1, min_size=5)
    assert m.sum() == 27 and not m[0, 6, 6, 6] and not m[0, 5, 1, 1]


def test_make_pseudo_masks_folder(data, tmp_path):
    from CovidGANSegLib.cli import main
    from CovidGANSegLib.preprocessing import load_preprocessed

    _, pre, ckpt = data
    out = make_pseudo_masks(ckpt, pre, tmp_path / "pm", device="cpu", rule="paper")
    ds = load_preprocessed(pre)
    n = len(ds.covid)
    diff = np.load(out / "difference.npy")
    masks = np.load(out / "pseudo_masks.npy")
    assert diff.shape == (n, 8, 32, 32) and diff.dtype == np.float32
    assert masks.dtype == bool and masks.shape == diff.shape
    np.testing.assert_array_equal(np.load(out / "images.npy"), ds.covid)
    lungs = np.load(out / "lungs.npy")
    assert lungs.dtype == bool and not (masks & ~lungs).any()
    index = json.loads((out / "index.json").read_text())
    t = index["threshold"]
    assert t["value"] >= 0.05 and t["healthy_difference"]["count"] > 0 and "healthy volumes" in t["healthy_difference_source"]
    assert not (masks & (diff <= t["value"])).any()
    assert [r["id"] for r in index["records"]] == [r["id"] for r in ds.records_of("covid")]
    sev = json.loads((out / "severity.json").read_text())
    assert sev == json.loads(json.dumps(severity(diff, lungs)))
    assert (out / "severity_boxplot.png").stat().st_size > 1000
    with pytest.raises(FileExistsError):
        make_pseudo_masks(ckpt, pre, out, device="cpu")
    fixed = make_pseudo_masks(ckpt, pre, out, device="cpu", threshold=0.0, min_size=0, overwrite=True, rule="paper")
    assert np.array_equal(np.load(fixed / "pseudo_masks.npy"), (diff > 0) & lungs)
    assert main(["--progress", "none", "pseudo-masks", "--checkpoint", str(ckpt), "--data", str(pre), "--out", str(tmp_path / "cli"),
                 "--threshold", "0.02", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["threshold"]["value"] == 0.02


def test_refined_pseudo_masks_on_a_finer_grid(data, tmp_path):
    from CovidGANSegLib.preprocessing import load_preprocessed

    _, pre, ckpt = data
    out = make_pseudo_masks(ckpt, pre, tmp_path / "pm", device="cpu", grid=(64, 64, 16))
    ds = load_preprocessed(pre)
    index = json.loads((out / "index.json").read_text())
    assert index["rule"] == "refined" and index["preprocess"]["grid"] == [64, 64, 16] and index["gan_preprocess"]["grid"] == list(TINY_GRID)
    images, masks, lungs = (np.load(out / f"{n}.npy") for n in ("images", "pseudo_masks", "lungs"))
    assert images.shape == masks.shape == lungs.shape == (len(ds.covid), 16, 64, 64)
    assert not (masks & ~lungs).any()
    healthy, healthy_lungs = np.load(out / "healthy.npy"), np.load(out / "healthy_lungs.npy")
    assert healthy.shape == (len(ds.healthy), 16, 64, 64) and healthy_lungs.dtype == bool
    # the HU prior holds for every marked voxel
    hu = images * 1400.0 - 1000.0
    assert ((hu[masks] >= -750.0) & (hu[masks] <= 100.0)).all()
    assert [r["id"] for r in index["records"]] == [r["id"] for r in ds.records_of("covid")]
    assert np.load(out / "difference.npy").shape == images.shape


def test_pseudo_masks_refuse_data_preprocessed_differently(data, tmp_path):
    _, pre, _ = data
    other = _save_generator(tmp_path / "g16.pt", grid=(32, 32, 16))
    with pytest.raises(InputError, match="other parameters"):
        make_pseudo_masks(other, pre, tmp_path / "pm", device="cpu")
    assert not (tmp_path / "pm").exists()
