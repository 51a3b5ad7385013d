"""Phantom chest CTs: tissue HU, anatomy, lesions, categories, determinism, cohort layout and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from CovidGANSegLib import cli
from CovidGANSegLib.nifti import load_ct, load_mask
from CovidGANSegLib.synth.phantoms import (
    CATEGORIES,
    LABELS,
    Phantom,
    category_for,
    draw_involvement,
    generate_phantom,
    study_rng,
    write_cohort,
)


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return generate_phantom(np.random.default_rng(11), size="small", covid=False)


@pytest.fixture(scope="module")
def mild() -> Phantom:
    return generate_phantom(np.random.default_rng(12), size="small", covid=True, involvement=0.06)


@pytest.fixture(scope="module")
def mild_independent() -> Phantom:
    return generate_phantom(np.random.default_rng(12), size="small", covid=True, involvement=0.01,
                            lesion_model="independent")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "phantoms"
    return write_cohort(out, healthy=1, covid=2, seed=5, size="small")


def _median(ph: Phantom, label: str) -> float:
    sel = ph.labels == LABELS[label]
    assert sel.sum() > 50, label
    return float(np.median(ph.hu[sel]))


def test_small_geometry_and_types(healthy):
    ph = healthy
    assert ph.hu.dtype == np.int16 and ph.hu.shape[:2] == (128, 128) and 32 <= ph.hu.shape[2] <= 40
    assert ph.lung_mask.dtype == bool and ph.lesion_mask.dtype == bool and ph.labels.dtype == np.uint8
    sx, sy, sz = ph.spacing
    assert 2.3 < sx < 3.3 and sx == pytest.approx(sy) and sz == pytest.approx(8.0)
    assert nib.aff2axcodes(ph.affine) == ("L", "A", "S")
    assert ph.category == "CT-0" and ph.involvement == 0.0 and not ph.lesion_mask.any()
    assert 2000 < ph.lung_ml < 7500


def test_tissue_hu_statistics(healthy):
    ph = healthy
    hu = ph.hu.astype(np.float32)
    assert abs(_median(ph, "air") + 1000) < 15  # outside the body
    assert -130 < _median(ph, "fat") < -70
    assert 20 < _median(ph, "muscle") < 70
    bone = hu[ph.labels == LABELS["bone"]]
    assert 150 < np.median(bone) < 700 and np.percentile(bone, 99) > 500  # marrow and cortical rim
    lung = hu[ph.labels == LABELS["lung"]]
    assert -880 < np.median(lung) < -740
    assert _median(ph, "vessel") > -550  # vessels are bright (even blurred by partial volume)
    assert _median(ph, "airway") < -800
    # CT noise: std of air far outside the body (top corners of the image); low-dose up to 60 HU
    corner = hu[:10, -10:, :]
    assert 10 < corner.std() < 65
    # the whole lung mask is dark: lungs include vessels but mostly parenchyma (the real normal
    # CTs in ../shared/data/real_ct have lung medians of -742..-774 HU at 6-9 mm slices)
    assert -870 < np.median(hu[ph.lung_mask]) < -720


def test_dependent_density_gradient(healthy):
    ph = healthy
    sel = ph.labels == LABELS["lung"]
    y = np.broadcast_to(np.arange(ph.hu.shape[1])[None, :, None], ph.hu.shape)
    mid = np.median(y[sel])
    posterior = ph.hu[sel & (y < mid)].astype(float)  # axis 1 runs anterior: low y is posterior
    anterior = ph.hu[sel & (y >= mid)].astype(float)
    assert np.median(posterior) - np.median(anterior) > 15


def test_anatomy_two_lungs_airways_and_vessels(healthy):
    ph = healthy
    lab, n = ndi.label(ph.lung_mask)
    sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
    assert n >= 2 and sizes[1] > 0.5 * sizes[0]  # two lungs of similar size
    # lung cross-section tapers toward apex and base
    area = ph.lung_mask.sum(axis=(0, 1))
    ks = np.flatnonzero(area)
    assert area[ks[0]] < 0.5 * area.max() and area[ks[-1]] < 0.5 * area.max()
    assert ks[0] > 0 and ks[-1] < ph.hu.shape[2] - 1  # lungs end inside the scan
    # trachea: air in the upper mediastinum that is not lung
    upper = slice(ks[-1] - 3, ks[-1] + 1)
    trachea = (ph.labels[:, :, upper] == LABELS["airway"]) & ~ph.lung_mask[:, :, upper]
    assert trachea.sum() > 5
    # vessels inside the lungs, included in the lung mask
    vessels = ph.labels == LABELS["vessel"]
    assert (vessels & ph.lung_mask).sum() > 0.01 * ph.lung_mask.sum()
    # a plain HU threshold (-750..0) flags vessels in a healthy lung: the task is not trivial
    thr = (ph.hu > -750) & (ph.hu < 0) & ph.lung_mask
    assert thr.sum() > 0.03 * ph.lung_mask.sum()


def test_covid_lesions(mild):
    ph = mild
    assert ph.lesion_mask.any() and not (ph.lesion_mask & ~ph.lung_mask).any()
    assert ph.involvement == pytest.approx(ph.lesion_mask.sum() / ph.lung_mask.sum())
    assert ph.involvement == pytest.approx(0.06, abs=0.005)
    assert ph.category == "CT-1" == category_for(ph.involvement)
    assert ph.lesion_ml == pytest.approx(ph.involvement * ph.lung_ml)
    vals = ph.hu[ph.lesion_mask].astype(float)
    assert -750 < np.median(vals) < -200
    # peripheral and posterior placement
    dist = ndi.distance_transform_edt(ph.lung_mask, sampling=ph.spacing)
    assert dist[ph.lesion_mask].mean() < 0.8 * dist[ph.lung_mask].mean()
    y = np.broadcast_to(np.arange(ph.hu.shape[1])[None, :, None], ph.hu.shape)
    assert y[ph.lesion_mask].mean() < y[ph.lung_mask].mean()


def test_independent_lesion_model(mild_independent, mild):
    ph = mild_independent
    assert ph.lesion_mask.any() and not (ph.lesion_mask & ~ph.lung_mask).any()
    assert ph.involvement == pytest.approx(ph.lesion_mask.sum() / ph.lung_mask.sum())
    tol = max(0.1 * 0.01, 0.5 / ph.lung_ml)  # eval_lesions' stated tolerance
    assert abs(ph.involvement - 0.01) <= tol
    assert ph.category == "CT-1"
    # the same random state draws the same anatomy: only the lesions differ between the models
    a = generate_phantom(np.random.default_rng(12), size="small", covid=False)
    assert a.hu.shape == ph.hu.shape
    np.testing.assert_array_equal(a.lung_mask, ph.lung_mask)
    # lesions raise the HU inside their mask over what the anatomy had there
    rise = ph.hu[ph.lesion_mask].astype(float) - a.hu[ph.lesion_mask].astype(float)
    assert np.median(rise) > 80
    with pytest.raises(ValueError):
        generate_phantom(np.random.default_rng(0), covid=True, lesion_model="unknown")


@pytest.mark.parametrize("involvement,category", [(0.35, "CT-2"), (0.8, "CT-4")])
def test_category_from_true_involvement(involvement, category):
    ph = generate_phantom(np.random.default_rng(3), size="small", covid=True, involvement=involvement, return_labels=False)
    assert ph.labels is None
    assert ph.involvement == pytest.approx(involvement, abs=0.01)
    assert ph.category == category
    # consolidation appears in larger lesions
    assert (ph.hu[ph.lesion_mask] > -150).mean() > 0.01


def test_category_bands():
    assert category_for(0.0, covid=False) == "CT-0"
    assert category_for(0.001) == "CT-1" and category_for(0.2499) == "CT-1"
    assert category_for(0.25) == "CT-2" and category_for(0.4999) == "CT-2"
    assert category_for(0.5) == "CT-3" and category_for(0.75) == "CT-4"
    rng = np.random.default_rng(0)
    for cat in ("CT-1", "CT-2", "CT-3", "CT-4"):
        for _ in range(20):
            assert category_for(draw_involvement(rng, cat)) == cat
    drawn = [category_for(draw_involvement(rng)) for _ in range(400)]
    counts = {c: drawn.count(c) for c in ("CT-1", "CT-2", "CT-3", "CT-4")}
    assert counts["CT-1"] > counts["CT-2"] > counts["CT-3"] > counts["CT-4"] > 0


def test_determinism():
    a = generate_phantom(study_rng(7, 1), size="small", covid=True)
    b = generate_phantom(study_rng(7, 1), size="small", covid=True)
    c = generate_phantom(study_rng(8, 1), size="small", covid=True)
    assert a.hu.tobytes() == b.hu.tobytes()
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_argument_checks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        generate_phantom(rng, size="huge", covid=False)
    with pytest.raises(ValueError):
        generate_phantom(rng, covid=False, involvement=0.2)
    with pytest.raises(ValueError):
        generate_phantom(rng, covid=True, involvement=1.5)


def test_mosmed_geometry():
    ph = generate_phantom(study_rng(0, 9), size="mosmed", covid=True, involvement=0.1, return_labels=False)
    nx, ny, nz = ph.hu.shape
    assert (nx, ny) == (512, 512) and 32 <= nz <= 60
    sx, sy, sz = ph.spacing
    assert 0.6 <= sx <= 0.8 and sx == pytest.approx(sy) and sz == pytest.approx(8.0)
    assert nib.aff2axcodes(ph.affine) == ("L", "A", "S")
    assert ph.category == "CT-1" and not (ph.lesion_mask & ~ph.lung_mask).any()
    assert 2000 < ph.lung_ml < 7500
    assert abs(np.median(ph.hu[ph.lung_mask & ~ph.lesion_mask]) + 840) < 60


def test_cohort_layout(cohort):
    meta = json.loads((cohort / "cohort.json").read_text())
    assert meta["seed"] == 5 and meta["size"] == "small" and meta["generator_version"]
    assert meta["lesion_model"] == "perlin"
    assert [r["id"] for r in meta["studies"]] == ["study_0001", "study_0002", "study_0003"]
    assert {p.name for p in (cohort / "studies").iterdir()} == set(CATEGORIES)
    cats = [r["category"] for r in meta["studies"]]
    assert cats[0] == "CT-0" and all(c != "CT-0" for c in cats[1:]) and len(set(cats[1:])) >= 2
    for rec in meta["studies"]:
        study = cohort / rec["path"]
        assert study.parent.name == rec["category"]
        img = nib.load(str(study))
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        ct = load_ct(study)  # passes the library's HU checks
        lungs = load_mask(cohort / rec["lungs"], ct)
        assert lungs.sum() * ct.voxel_volume_ml == pytest.approx(rec["lung_ml"], rel=1e-3)
        assert nib.load(str(cohort / rec["lungs"])).get_data_dtype() == np.uint8
        if rec["covid"]:
            mask = load_mask(cohort / rec["mask"], ct)
            assert not (mask & ~lungs).any()
            assert 100 * mask.sum() / lungs.sum() == pytest.approx(rec["involvement_percent"], abs=1e-3)
            assert category_for(rec["involvement_percent"] / 100) == rec["category"]
        else:
            assert rec["mask"] is None and not (cohort / "masks" / f"{rec['id']}_mask.nii.gz").exists()
    assert not list(cohort.parent.glob("*.partial"))


def test_cohort_same_seed_same_bytes(cohort, tmp_path):
    again = write_cohort(tmp_path / "again", healthy=1, covid=2, seed=5, size="small")
    files = sorted(p.relative_to(cohort) for p in cohort.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (cohort / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_cohort_written_by_two_workers_is_the_same_to_the_byte(cohort, tmp_path):
    """Studies generated in two spawned processes give exactly the files of one process."""
    again = write_cohort(tmp_path / "two", healthy=1, covid=2, seed=5, size="small", workers=2)
    files = sorted(p.relative_to(cohort) for p in cohort.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (cohort / rel).read_bytes() == (again / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="workers"):
        write_cohort(tmp_path / "none", healthy=1, covid=0, seed=5, workers=0)
    assert not (tmp_path / "none").exists()


def test_cohort_study_depends_only_on_seed_and_number(cohort, tmp_path):
    """A study written in a cohort of its own equals the same study in a bigger cohort."""
    meta = json.loads((cohort / "cohort.json").read_text())
    single = write_cohort(tmp_path / "single", healthy=1, covid=0, seed=5, size="small")
    rel = meta["studies"][0]["path"]
    assert (single / rel).read_bytes() == (cohort / rel).read_bytes()
    other = write_cohort(tmp_path / "other", healthy=1, covid=0, seed=6, size="small")
    assert (other / rel).read_bytes() != (cohort / rel).read_bytes()


def test_cohort_overwrite_and_atomicity(tmp_path, monkeypatch):
    out = tmp_path / "c"
    write_cohort(out, healthy=1, covid=0, seed=0)
    with pytest.raises(FileExistsError):
        write_cohort(out, healthy=1, covid=0, seed=0)
    write_cohort(out, healthy=0, covid=1, seed=0, overwrite=True)
    assert not list((out / "studies" / "CT-0").iterdir())

    import CovidGANSegLib.synth.phantoms as phantoms

    calls = {"n": 0}
    real = phantoms.generate_phantom

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantoms, "generate_phantom", failing)
    with pytest.raises(RuntimeError):
        write_cohort(tmp_path / "failed", healthy=2, covid=0, seed=0)
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(ValueError):
        write_cohort(tmp_path / "none", healthy=0, covid=0, seed=0)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["phantoms", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--healthy", "--covid", "--seed", "--size", "mosmed", "--overwrite", "CT-0", "cohort.json",
                 "--lesion-model", "independent", "--categories", "--workers"):
        assert word in text


def test_cli_run(tmp_path, capsys):
    out = tmp_path / "p"
    rc = cli.main(["--progress", "none", "phantoms", str(out), "--healthy", "1", "--covid", "1", "--seed", "2"])
    assert rc == 0
    assert "wrote 2 small phantom studies" in capsys.readouterr().out
    meta = json.loads((out / "cohort.json").read_text())
    assert [r["covid"] for r in meta["studies"]] == [False, True]
    assert (out / "masks" / "study_0002_mask.nii.gz").exists()
    assert cli.main(["--progress", "none", "phantoms", str(out), "--healthy", "1", "--covid", "0"]) == 2  # exists
    with pytest.raises(SystemExit) as exc:
        cli.main(["phantoms", str(tmp_path / "q"), "--healthy", "-1", "--covid", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["phantoms", str(tmp_path / "q"), "--healthy", "1", "--covid", "1", "--lesion-model", "other"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # CT-0 studies are --healthy's
        cli.main(["phantoms", str(tmp_path / "q"), "--healthy", "1", "--covid", "1", "--categories", "CT-0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["phantoms", str(tmp_path / "q"), "--healthy", "1", "--covid", "1", "--workers", "0"])
    assert exc.value.code == 2 and not (tmp_path / "q").exists()
    two = tmp_path / "two"
    assert cli.main(["--progress", "none", "phantoms", str(two), "--healthy", "1", "--covid", "1", "--seed", "2", "--workers", "2"]) == 0
    assert json.loads((two / "cohort.json").read_text())["studies"] == meta["studies"]


def test_cli_independent_lesion_model(tmp_path, capsys):
    out = tmp_path / "held_out"
    rc = cli.main(["--progress", "none", "phantoms", str(out), "--healthy", "0", "--covid", "1", "--seed", "3",
                   "--lesion-model", "independent"])
    assert rc == 0 and "lesion model independent" in capsys.readouterr().out
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["lesion_model"] == "independent"
    rec = meta["studies"][0]
    ct = load_ct(out / rec["path"])
    mask = load_mask(out / rec["mask"], ct)
    lungs = load_mask(out / rec["lungs"], ct)
    assert mask.any() and not (mask & ~lungs).any()
    assert 100 * mask.sum() / lungs.sum() == pytest.approx(rec["involvement_percent"], abs=1e-3)


def test_vessel_trees_reach_sub_voxel_calibre():
    """Murray's-law trees end in twigs of 0.3-0.55 mm radius (sub-voxel at any of our spacings)."""
    from CovidGANSegLib.synth.chest.vessels import TIP_RADIUS_MM, grow_tree

    rng = np.random.default_rng(0)
    pts = rng.uniform(-60.0, 60.0, (300, 3))
    segs: list = []
    grow_tree(np.zeros(3), pts, 6.0, segs, rng)
    radii = np.array([r for _, _, r in segs])
    assert radii.max() == pytest.approx(6.0)
    assert TIP_RADIUS_MM[0] <= radii.min() and (radii < 0.55).sum() >= 250  # a twig per attractor point


def test_healthy_anatomy_varies_like_real_studies():
    """Across healthy studies: noise from standard to low dose, and lungs denser or lighter."""
    sig, med = [], []
    for n in range(8):
        ph = generate_phantom(study_rng(3, n), size="small", covid=False, return_labels=False)
        sig.append(ph.hu[:10, -10:, :].astype(float).std())
        med.append(np.median(ph.hu[ph.lung_mask]))
    assert min(sig) < 30 and max(sig) > 35
    assert max(med) - min(med) > 20


def test_chest_package_has_no_import_cycles():
    """One concept per module under synth/chest, imported one way: no cycles, nothing imports phantoms."""
    import ast

    folder = Path(__file__).resolve().parents[2] / "CovidGANSegLib" / "synth" / "chest"
    graph = {}
    for path in folder.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("CovidGANSegLib.synth"):
                assert "phantoms" not in node.module and "lesions" not in node.module, (name, node.module)
                if node.module == "CovidGANSegLib.synth.chest":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("CovidGANSegLib.synth.chest."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[name] = deps - {name}
    assert {"geometry", "canvas", "body", "bones", "abdomen", "mediastinum", "lungs", "vessels", "noise"} <= set(graph)
    seen, done = set(), set()

    def visit(node):
        assert node not in seen or node in done, f"import cycle through {node}"
        if node in done:
            return
        seen.add(node)
        for dep in graph.get(node, ()):
            visit(dep)
        done.add(node)

    for node in graph:
        visit(node)


def test_cohort_of_chosen_categories(tmp_path):
    out = write_cohort(tmp_path / "mild", healthy=0, covid=2, seed=7, size="small", categories=["CT-1"])
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["categories"] == ["CT-1"]
    assert [r["category"] for r in meta["studies"]] == ["CT-1", "CT-1"]
    assert all(r["involvement_percent"] < 25 for r in meta["studies"])
    with pytest.raises(ValueError, match="categories"):
        write_cohort(tmp_path / "bad", healthy=0, covid=1, seed=7, categories=["CT-0"])  # healthy is --healthy's
    assert not (tmp_path / "bad").exists()
