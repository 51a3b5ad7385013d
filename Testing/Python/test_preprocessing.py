"""Preprocessing: HU window, the exact model-grid mapping and its inverse, data set folders, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from CovidGANSegLib import cli
from CovidGANSegLib import preprocessing as pp
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.lungmask import extract_lung_mask
from CovidGANSegLib.nifti import CTVolume, load_ct, save_like
from CovidGANSegLib.preprocessing import (
    GridMapping,
    ensure_preprocessed,
    load_preprocessed,
    preprocess_ct,
    preprocess_dataset,
    unwindow,
    window_hu,
)

TINY = PreprocessConfig(grid=(64, 64, 16))


def _within_one_model_voxel(back: np.ndarray, orig: np.ndarray, mapping: GridMapping) -> None:
    """Every voxel where the masks differ lies within one model voxel of the original boundary."""
    # distances measured in model voxels (canonical spacing / model spacing per axis)
    scale = tuple(s / m for s, m in zip(mapping.spacing, mapping.model_spacing))
    outside = ndi.distance_transform_edt(~orig, sampling=scale)
    inside = ndi.distance_transform_edt(orig, sampling=scale)
    extra, missing = back & ~orig, orig & ~back
    assert (outside[extra].max() if extra.any() else 0.0) <= 1.0 + 1e-6
    assert (inside[missing].max() if missing.any() else 0.0) <= 1.0 + 1e-6
    assert 2 * (back & orig).sum() / (back.sum() + orig.sum()) > 0.9


def test_window_and_unwindow():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    x = window_hu(hu, (-1000, 400))
    assert x.dtype == np.float32 and np.allclose(x, [0, 0, 0.5, 1, 1])
    inside = np.linspace(-1000, 400, 15)
    assert np.allclose(unwindow(window_hu(inside, (-1000, 400)), (-1000, 400)), inside, atol=1e-3)
    with pytest.raises(ValueError):
        window_hu(hu, (400, -1000))


def _ellipsoid(shape, spacing, centre_mm, radii_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm)) <= 1.0


@pytest.mark.parametrize("shape,spacing", [((300, 260, 40), (0.7, 0.7, 8.0)), ((90, 80, 120), (1.5, 1.5, 1.5)),
                                           ((50, 40, 20), (3.0, 3.0, 5.0))])
def test_mask_round_trip_within_one_voxel(shape, spacing):
    extent = np.array(shape) * np.array(spacing)
    mask = _ellipsoid(shape, spacing, extent * [0.45, 0.5, 0.5], extent * [0.3, 0.25, 0.35])
    mask |= _ellipsoid(shape, spacing, extent * [0.72, 0.55, 0.45], extent * [0.12, 0.2, 0.3])
    for config in (PreprocessConfig(), TINY):
        mapping = GridMapping.from_lung_mask(mask, spacing, config)
        model = mapping.to_model(mask)
        assert model.shape == config.grid_dhw and model.dtype == bool
        back = mapping.to_canonical(model)
        assert back.shape == mask.shape and back.dtype == bool
        _within_one_model_voxel(back, mask, mapping)


def test_real_ct_round_trip(real_ct_dir):
    ct = load_ct(real_ct_dir / "pulmonary_report_ct_cropped.nii.gz")
    vol = preprocess_ct(ct)
    assert vol.image.shape == (32, 128, 128) and vol.image.dtype == np.float32
    assert 0.0 <= vol.image.min() and vol.image.max() <= 1.0
    assert vol.lung_mask.any() and vol.lung_mask_canonical.shape == ct.shape
    back = vol.mapping.to_canonical(vol.lung_mask)
    _within_one_model_voxel(back, vol.lung_mask_canonical, vol.mapping)
    # the image maps back close to the windowed CT inside the crop (linear resampling)
    img_back = vol.mapping.to_canonical(vol.image)
    ref = window_hu(ct.array, (-1000, 400))
    inside = ndi.binary_erosion(vol.lung_mask_canonical, iterations=3)
    assert np.median(np.abs(img_back[inside] - ref[inside])) < 0.05


def test_mapping_geometry_and_json():
    spacing = (0.7, 0.7, 8.0)
    mask = np.zeros((512, 512, 40), bool)
    mask[60:460, 150:380, 3:37] = True  # 280 x 161 x 272 mm of "lung"
    config = PreprocessConfig()
    affine = np.diag([0.7, 0.7, 8.0, 1.0])
    affine[:3, 3] = [-180, -150, 20]
    m = GridMapping.from_lung_mask(mask, spacing, config, affine=affine)
    margin = int(np.ceil(10 / 0.7))
    assert m.crop_start == (60 - margin, 150 - margin, 3 - 2) and m.crop_stop == (460 + margin, 380 + margin, 39)
    sx, sy, sz = m.model_spacing
    assert sx == pytest.approx(sy)  # aspect ratio kept in-plane
    assert sx == pytest.approx(m.crop_shape[0] * 0.7 / 128)  # the longer side fills the grid
    assert sz == pytest.approx(m.crop_shape[2] * 8.0 / 32)  # slices fill D
    # JSON round trip
    again = GridMapping.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    # coordinates: model <-> canonical are inverse; model_affine agrees with the canonical affine
    dhw = np.array([[0, 0, 0], [31, 127, 127], [10.5, 20.25, 64]])
    assert np.allclose(m.canonical_to_model_coords(m.model_to_canonical_coords(dhw)), dhw)
    xyz = m.model_to_canonical_coords(dhw[1])
    assert np.allclose(m.model_affine @ [127, 127, 31, 1], affine @ [*xyz, 1])
    # the crop box sits inside the grid, centred; the padding is zero
    img = m.to_model(np.ones(mask.shape, np.float32), antialias=False)
    assert img[:, 0, :].max() == 0.0 and img[:, :, 0].max() == 1.0
    assert img[:, 64, :].min() == 1.0
    with pytest.raises(ValueError):
        GridMapping.from_dict({**m.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="canonical grid"):
        m.to_model(np.zeros((10, 10, 10)))


def test_small_crop_keeps_target_spacing():
    mask = np.zeros((100, 100, 30), bool)
    mask[40:60, 45:55, 5:25] = True
    m = GridMapping.from_lung_mask(mask, (1.0, 1.0, 2.0), PreprocessConfig())
    assert m.model_spacing[:2] == pytest.approx((2.0, 2.0))  # fits at 2 mm: no zoom, padded


def test_labels_nearest_keep_dtype():
    labels = np.zeros((60, 50, 20), np.int16)
    labels[10:50, 10:40, 2:18] = 3
    m = GridMapping.from_lung_mask(labels > 0, (1.5, 1.5, 4.0), TINY)
    model = m.to_model(labels, order=0)
    assert model.dtype == np.int16 and set(np.unique(model)) <= {0, 3}
    assert m.to_canonical(model, order=0).dtype == np.int16


def _synthetic_ct(tmp_path: Path) -> CTVolume:
    """A chest-like volume (body, two air-filled lungs) without the phantom generator."""
    shape, spacing = (96, 80, 36), (3.0, 3.0, 8.0)
    rng = np.random.default_rng(1)
    hu = np.full(shape, -1000.0, np.float32)
    body = _ellipsoid(shape, spacing, (144, 120, 144), (130, 95, 400))
    hu[body] = 40.0
    for cx in (85.0, 203.0):
        hu[_ellipsoid(shape, spacing, (cx, 125, 150), (48, 60, 110))] = -850.0
    hu += rng.normal(0, 15, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return CTVolume.from_array(hu, affine, tmp_path / "synthetic.nii.gz")


def test_preprocess_ct_and_errors(tmp_path):
    ct = _synthetic_ct(tmp_path)
    vol = preprocess_ct(ct, TINY)
    assert vol.image.shape == (16, 64, 64) and vol.lung_mask.shape == (16, 64, 64)
    lung_hu = unwindow(vol.image[vol.lung_mask], TINY.hu_window)
    assert np.median(lung_hu) < -700
    _within_one_model_voxel(vol.mapping.to_canonical(vol.lung_mask), vol.lung_mask_canonical, vol.mapping)
    given = preprocess_ct(ct, TINY, lung_mask=vol.lung_mask_canonical)
    assert np.array_equal(given.image, vol.image)
    with pytest.raises(ValueError, match="shape"):
        preprocess_ct(ct, TINY, lung_mask=np.ones((3, 3, 3), bool))
    solid = CTVolume.from_array(np.full((40, 40, 10), 30.0, np.float32), np.eye(4), tmp_path / "solid.nii.gz")
    with pytest.raises(InputError, match="no lungs found") as info:
        preprocess_ct(solid, TINY)
    assert str(tmp_path / "solid.nii.gz") in str(info.value)


# ---- data sets -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    phantoms = pytest.importorskip("CovidGANSegLib.synth.phantoms")
    out = tmp_path_factory.mktemp("cohort") / "data"
    phantoms.write_cohort(out, healthy=2, covid=2, seed=5)
    return out


def _sorted_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_preprocess_dataset(cohort, tmp_path):
    # lesion masks are never read: make them unreadable garbage
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    for mask in (data / "masks").glob("*.nii.gz"):
        mask.write_bytes(b"not a mask")
    out = preprocess_dataset(data, tmp_path / "pre", TINY)
    assert _sorted_names(out) == ["config.json", "covid.npy", "covid_lungs.npy", "healthy.npy",
                                  "healthy_lungs.npy", "index.json"]
    ds = load_preprocessed(out)
    assert ds.healthy.shape == (2, 16, 64, 64) and ds.covid.shape == (2, 16, 64, 64)
    assert ds.healthy.dtype == np.float32 and ds.healthy_lungs.dtype == bool
    assert 0 <= ds.covid.min() and ds.covid.max() <= 1
    assert all(ds.healthy_lungs[i].any() for i in range(2)) and all(ds.covid_lungs[i].any() for i in range(2))
    assert ds.config == TINY
    recs = ds.records_of("covid")
    assert [r["index"] for r in recs] == [0, 1] and all(r["covid"] for r in recs)
    assert {r["category"] for r in ds.records_of("healthy")} == {"CT-0"}
    rec = recs[0]
    assert Path(rec["path"]).is_file() and rec["original_shape"] == list(nib.load(rec["path"]).shape)
    mapping = ds.mapping(rec)
    assert mapping.grid_dhw == (16, 64, 64)
    ct = load_ct(rec["path"])
    assert mapping.to_canonical(ds.covid_lungs[0]).shape == ct.shape
    mm = load_preprocessed(out, mmap=True)
    assert isinstance(mm.covid, np.memmap) and np.array_equal(mm.covid, ds.covid)
    with pytest.raises(FileExistsError):
        preprocess_dataset(data, out, TINY)


def test_shards_of_several_processes_assemble_into_the_same_data_set(cohort, tmp_path, monkeypatch):
    """Distributed preprocessing: two processes' shares (every 2nd study) assembled by rank 0 give
    exactly what one process computes; a shard file of another study is not used."""
    import CovidGANSegLib.preprocessing as pp

    whole = load_preprocessed(preprocess_dataset(cohort, tmp_path / "one", TINY))
    shards = tmp_path / "shards"
    assert pp.preprocess_shard(cohort, shards, TINY, 0, 2) + pp.preprocess_shard(cohort, shards, TINY, 1, 2) == 4
    assert sorted(p.name for p in shards.iterdir()) == ["000000.npz", "000001.npz", "000002.npz", "000003.npz"]
    computed = []
    original = pp.preprocess_study
    monkeypatch.setattr(pp, "preprocess_study", lambda study, config: computed.append(study.id) or original(study, config))
    assembled = load_preprocessed(preprocess_dataset(cohort, tmp_path / "two", TINY, precomputed=shards))
    assert computed == []  # everything came from the shards
    for name in ("healthy", "covid", "healthy_lungs", "covid_lungs"):
        assert np.array_equal(getattr(assembled, name), getattr(whole, name)), name
    assert assembled.records == whole.records
    # a shard that holds another study (e.g. left from another data set) is recomputed, not used
    (shards / "000001.npz").replace(shards / "000000.npz")
    load_preprocessed(preprocess_dataset(cohort, tmp_path / "three", TINY, precomputed=shards))
    assert len(computed) == 2  # position 0 (wrong study) and 1 (missing)


def test_corrupt_study_leaves_nothing(cohort, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    victim = sorted((data / "studies").rglob("*.nii.gz"))[-1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # truncated gzip
    out = tmp_path / "out"
    with pytest.raises(InputError) as info:
        preprocess_dataset(data, out, TINY)
    assert str(victim) in str(info.value) and "gzip" in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no partial folder left"


def test_dataset_without_lungs_is_named(tmp_path):
    data = tmp_path / "plain"
    for sub in ("healthy", "covid"):
        (data / sub).mkdir(parents=True)
    hu = np.full((40, 40, 32), 30.0, np.float32)
    hu[:2] = -1000.0
    nib.save(nib.Nifti1Image(hu, np.diag([3.0, 3.0, 8.0, 1.0])), str(data / "covid" / "abdomen.nii.gz"))
    with pytest.raises(InputError, match="no lungs found") as info:
        preprocess_dataset(data, tmp_path / "out", TINY)
    assert "abdomen.nii.gz" in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="no study"):
        preprocess_dataset(tmp_path / "plain", tmp_path / "out", PreprocessConfig(min_slices=64))


def test_ensure_preprocessed(cohort, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = ensure_preprocessed(cohort, cache, TINY)
    assert ds.folder == cache and ds.covid.shape[0] == 2
    stamp = (cache / "index.json").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("should use the cache")

    monkeypatch.setattr(pp, "preprocess_dataset", boom)
    again = ensure_preprocessed(cohort, cache, TINY)
    assert np.array_equal(again.covid, ds.covid) and (cache / "index.json").stat().st_mtime_ns == stamp
    # a preprocessed folder given as data is used directly
    assert ensure_preprocessed(cache, tmp_path / "unused", TINY).folder == cache
    with pytest.raises(InputError, match="other parameters"):
        ensure_preprocessed(cache, tmp_path / "unused", PreprocessConfig())
    monkeypatch.undo()
    # other parameters for raw data: the cache is rebuilt
    other = PreprocessConfig(grid=(32, 32, 8))
    assert ensure_preprocessed(cohort, cache, other).covid.shape == (2, 8, 32, 32)
    # a cache folder holding something else is never wiped
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(InputError, match="not a preprocessed folder"):
        ensure_preprocessed(cohort, foreign, TINY)
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_load_preprocessed_errors(cohort, tmp_path):
    with pytest.raises(InputError, match="index.json is missing"):
        load_preprocessed(tmp_path)
    out = preprocess_dataset(cohort, tmp_path / "pre", TINY)
    os.remove(out / "covid_lungs.npy")
    with pytest.raises(InputError, match="covid_lungs.npy"):
        load_preprocessed(out)


def test_cli_preprocess(cohort, tmp_path, capsys):
    out = tmp_path / "pre"
    rc = cli.main(["--progress", "none", "preprocess", str(cohort), str(out), "--grid", "32", "32", "8",
                   "--window", "-1000", "300"])
    assert rc == 0
    ds = load_preprocessed(out)
    assert ds.healthy.shape == (2, 8, 32, 32) and ds.config.hu_window == (-1000.0, 300.0)
    assert "2 healthy and 2 COVID" in capsys.readouterr().out
    # OUT exists: a clear error, exit code 2
    assert cli.main(["--progress", "none", "preprocess", str(cohort), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"grid": [32, 32, 8], "lung_margin_mm": 5.0}))
    assert cli.main(["--progress", "none", "preprocess", str(cohort), str(out), "--config", str(cfg), "--overwrite"]) == 0
    assert load_preprocessed(out).config.lung_margin_mm == 5.0
    # bad data: the file is named, exit code 2
    assert cli.main(["--progress", "none", "preprocess", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    assert "nothing" in capsys.readouterr().err
    cfg.write_text(json.dumps({"gird": [1, 2, 3]}))
    assert cli.main(["--progress", "none", "preprocess", str(cohort), str(tmp_path / "o3"), "--config", str(cfg)]) == 2
    assert "cfg.json" in capsys.readouterr().err


def test_thick_slices_average_groups_of_slices_and_keep_the_geometry():
    """1.5 mm slices -> 7.5 mm slabs (5 slices averaged), centred on each group, in world mm."""
    from CovidGANSegLib.nifti import CTVolume
    from CovidGANSegLib.preprocessing import thick_slices

    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    affine[:3, 3] = (-50.0, -60.0, 100.0)
    hu = np.zeros((6, 5, 23), dtype=np.float32)
    hu[:, :, :] = np.arange(23, dtype=np.float32)[None, None, :] * 10.0  # HU = 10 x slice index
    ct = CTVolume.from_array(hu, affine)
    thick = thick_slices(ct, 8.0)
    assert thick.shape == (6, 5, 4)  # 23 // 5: the last 3 slices are dropped
    assert np.allclose(thick.spacing, (0.8, 0.8, 7.5))
    assert np.allclose(thick.array[0, 0], [20.0, 70.0, 120.0, 170.0])  # means of slices 0-4, 5-9, ...
    # slab centre = world z of the middle slice of its group
    assert np.allclose(thick.affine @ [0, 0, 1, 1], affine @ [0, 0, 7, 1])
    assert thick_slices(CTVolume.from_array(hu, np.diag([0.8, 0.8, 7.0, 1.0])), 8.0) is None  # already thick


def test_training_volumes_and_inference_get_their_own_lung_mask(real_ct_dir, tmp_path):
    """The training volumes' lung masks close over 16 mm along z, every mask at inference (``preprocess_ct``'s
    default, so ``segment_ct``, ``segment_file`` and the GAN) over 24 mm: on a real CT at 7.5 mm slices the
    inference mask holds the training one and more (tissue between lung above and below)."""
    ct = pp.thick_slices(load_ct(real_ct_dir / "pulmonary_report_ct_cropped.nii.gz"), 8.0)
    train = preprocess_ct(ct, TINY, for_training=True).lung_mask_canonical
    infer = preprocess_ct(ct, TINY).lung_mask_canonical
    assert np.array_equal(train, extract_lung_mask(ct.array, ct.spacing, z_closing_mm=16.0))
    assert np.array_equal(infer, extract_lung_mask(ct.array, ct.spacing, z_closing_mm=24.0))
    assert not (train & ~infer).any()
    assert (infer & ~train).sum() * ct.voxel_volume_ml > 5.0  # mL
    # a data set's studies are preprocessed as training volumes
    path = save_like(ct.array, ct, tmp_path / "study.nii.gz")
    thick = PreprocessConfig(grid=TINY.grid, min_slices=8)
    _, _, geometry = pp.preprocess_study(SimpleNamespace(id="study", path=path), thick)
    assert geometry["lung_ml"] == round(float(train.sum()) * ct.voxel_volume_ml, 3)
