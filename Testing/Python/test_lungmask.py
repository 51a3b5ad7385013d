"""Lung masks: plausible on real (partial field of view) CT, Dice >= 0.95 against phantom lungs."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, io_orientation
from scipy import ndimage as ndi

from CovidGANSegLib.lungmask import extract_lung_mask
from CovidGANSegLib.nifti import CTVolume, load_ct

REAL = ("aorta_report_ct_cropped", "pulmonary_report_ct_cropped", "example_ct")
S2D = np.zeros((3, 3, 3), bool)
S2D[:, :, 1] = ndi.generate_binary_structure(2, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def real_masks(real_ct_dir):
    out = {}
    for name in REAL:
        ct = load_ct(real_ct_dir / f"{name}.nii.gz")
        out[name] = (ct, extract_lung_mask(ct.array, ct.spacing))
    return out


def _outside_air(hu: np.ndarray) -> np.ndarray:
    """Reference outside air, computed independently: per slice, air regions touching the border."""
    smooth = ndi.median_filter(hu, size=(3, 3, 1))
    lab, n = ndi.label(smooth < -900, S2D)
    edge = np.zeros(hu.shape, bool)
    edge[[0, -1]] = True
    edge[:, [0, -1]] = True
    touching = np.unique(lab[edge])
    out = np.isin(lab, touching[touching > 0])
    med = ndi.median(smooth, lab, np.arange(1, n + 1))
    pure = np.concatenate([[False], np.asarray(med) < -950])
    return out & pure[lab]


def _left_right_fractions(mask: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    xs = np.nonzero(body)[0]
    mid = np.median(xs)
    x = np.nonzero(mask)[0]
    return float(np.mean(x < mid)), float(np.mean(x >= mid))


@pytest.mark.parametrize("name", REAL)
def test_real_ct_mask_is_plausible(real_masks, name):
    ct, mask = real_masks[name]
    hu = ct.array
    assert mask.dtype == bool and mask.shape == hu.shape
    ml = mask.sum() * ct.voxel_volume_ml
    assert ml > 50, f"{name}: only {ml:.0f} mL of lung"
    assert hu[mask].mean() < -600, "lung mask must be mostly air-filled parenchyma"
    assert not np.any(mask & (hu <= -1500)), "outside-FOV values are never lung"
    outside = _outside_air(hu)
    assert (mask & outside).sum() <= 1e-3 * mask.sum(), "nothing outside the body"
    left, right = _left_right_fractions(mask, ~outside)
    assert min(left, right) > 0.2, f"both lungs expected, got left/right fractions {left:.2f}/{right:.2f}"


@pytest.mark.parametrize("name", REAL[:2])
def test_real_ct_mask_covers_the_lung_parenchyma(real_masks, name):
    """> 85 % of the low-density voxels inside the body (airways and gas excluded) are lung."""
    ct, mask = real_masks[name]
    hu = ct.array
    smooth = ndi.gaussian_filter(hu, (1, 1, 0))
    low = (smooth < -600) & ~_outside_air(hu)
    lab, n = ndi.label(low)
    idx = np.arange(1, n + 1)
    size = ndi.sum(low, lab, idx)
    med = ndi.median(smooth, lab, idx)
    # drop pure-air structures (trachea, main bronchi, stomach gas) and tiny bits
    keep = idx[(np.asarray(med) > -950) & (np.asarray(size) * ct.voxel_volume_ml > 5)]
    reference = np.isin(lab, keep)
    airway = (smooth < -950) & low
    reference &= ~ndi.binary_dilation(airway, iterations=2)
    coverage = (mask & reference).sum() / reference.sum()
    assert coverage > 0.85, f"{name}: lung mask covers {coverage:.1%} of the parenchyma"
    # the trachea (pure air, top slices, near the midline) is not lung
    top = hu[:, :, -5:]
    if name.startswith("aorta"):
        trachea = ndi.binary_erosion(ndi.gaussian_filter(top, (1, 1, 0)) < -950, iterations=2)
        assert (mask[:, :, -5:] & trachea).sum() <= 0.05 * trachea.sum()


def test_real_ct_lung_bases_only(real_masks):
    """example_ct shows abdomen and pelvis with only the lung bases: no bowel gas taken for lung."""
    ct, mask = real_masks["example_ct"]
    z = np.nonzero(mask)[2]
    assert z.min() >= 90, f"lung found at slice {z.min()} among bowel loops"
    assert ct.array[mask].mean() < -600


# ---- phantoms -----------------------------------------------------------------------------------
phantoms = pytest.importorskip("CovidGANSegLib.synth.phantoms")


def _phantom(seed, covid, involvement=None):
    ph = phantoms.generate_phantom(np.random.default_rng([2024, seed]), size="small", covid=covid, involvement=involvement)
    ct = CTVolume.from_array(ph.hu, ph.affine)
    ornt = io_orientation(ph.affine)
    return ct, apply_orientation(ph.lung_mask, ornt), apply_orientation(ph.lesion_mask, ornt), ph


@pytest.fixture(scope="module")
def phantom_cases():
    cases = {
        "healthy-1": _phantom(1, False),
        "healthy-2": _phantom(2, False),
        "covid-10%": _phantom(3, True, 0.10),
        "covid-20%": _phantom(4, True, 0.20),
        "covid-35%": _phantom(5, True, 0.35),
    }
    return {k: (*v, extract_lung_mask(v[0].array, v[0].spacing)) for k, v in cases.items()}


@pytest.mark.parametrize("case", ["healthy-1", "healthy-2", "covid-10%", "covid-20%"])
def test_phantom_lung_dice(phantom_cases, case):
    ct, truth, lesions, ph, mask = phantom_cases[case]
    d = dice(mask, truth)
    assert d >= 0.95, f"{case}: lung Dice {d:.4f}"
    if lesions.any():
        inside = (mask & lesions).sum() / lesions.sum()
        assert inside >= 0.8, f"{case}: only {inside:.1%} of the lesions inside the lung mask"


def test_phantom_peripheral_consolidation(phantom_cases):
    """Dense lesion voxels (consolidation, > -250 HU) at the pleura stay (mostly) in the mask.

    Current level: about 40-80 % for CT-1 phantoms (closing + z closing + hole filling); dense
    lesions lining the chest wall over many slices are the known weak spot of the algorithm.
    """
    ct, truth, lesions, ph, mask = phantom_cases["covid-20%"]
    dense = lesions & (ct.array > -250)
    near_pleura = ndi.distance_transform_edt(truth, sampling=ct.spacing) < 10.0
    peripheral = dense & near_pleura
    assert peripheral.sum() > 50
    assert (mask & peripheral).sum() / peripheral.sum() >= 0.4


def test_phantom_extensive_lesions(phantom_cases):
    """CT-2 involvement (about a third of the lungs, ground glass and consolidation)."""
    ct, truth, lesions, ph, mask = phantom_cases["covid-35%"]
    assert dice(mask, truth) >= 0.92
    assert (mask & lesions).sum() / lesions.sum() >= 0.7


def test_phantom_two_lungs(phantom_cases):
    ct, truth, lesions, ph, mask = phantom_cases["healthy-1"]
    lab, n = ndi.label(mask)
    sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
    assert n >= 1 and sizes[0] > 0.3 * mask.sum()
    left, right = _left_right_fractions(mask, ct.array > -500)
    assert min(left, right) > 0.3


@pytest.mark.parametrize("pad", [-1024.0, -2048.0, -3024.0])
def test_outside_fov_padding_is_not_lung(phantom_cases, pad):
    ct, truth, lesions, ph, _ = phantom_cases["healthy-1"]
    hu = ct.array.copy()
    nx, ny, _ = hu.shape
    x, y = np.meshgrid(np.arange(nx) - nx / 2, np.arange(ny) - ny / 2, indexing="ij")
    body = np.any(hu > -500, axis=2)
    radius = np.sqrt(x[body] ** 2 + y[body] ** 2).max() + 2  # circular FOV just around the body
    outside_fov = np.broadcast_to((x ** 2 + y ** 2 > radius ** 2)[:, :, None], hu.shape)
    hu[outside_fov] = pad
    mask = extract_lung_mask(hu, ct.spacing)
    assert not np.any(mask & outside_fov)
    assert dice(mask, truth) >= 0.95


def test_partial_field_of_view(phantom_cases):
    """A crop through one lung (lungs touch the image border) still gives both lungs."""
    ct, truth, lesions, ph, _ = phantom_cases["covid-20%"]
    xs = np.nonzero(truth.any(axis=(1, 2)))[0]
    ys = np.nonzero(truth.any(axis=(0, 2)))[0]
    x0 = xs[0] + (xs[-1] - xs[0]) // 6  # cut through the lateral part of one lung
    y1 = ys[-1] - (ys[-1] - ys[0]) // 5  # and the anterior part of both
    hu, tr = ct.array[x0:, : y1 + 1], truth[x0:, : y1 + 1]
    mask = extract_lung_mask(hu, ct.spacing)
    assert dice(mask, tr) >= 0.93
    left, right = _left_right_fractions(mask, hu > -500)
    assert min(left, right) > 0.15


def test_no_lungs_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    hu = np.full((64, 64, 12), -1000.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    body = (xx - 32) ** 2 / 25 ** 2 + (yy - 32) ** 2 / 18 ** 2 < 1
    hu[body] = 40.0 + rng.normal(0, 10, size=(body.sum(), 12))
    mask = extract_lung_mask(hu, (3.0, 3.0, 8.0))
    assert mask.shape == hu.shape and not mask.any()


def test_argument_checks():
    with pytest.raises(ValueError, match="3D"):
        extract_lung_mask(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        extract_lung_mask(np.zeros((4, 4, 4)), (1, 0, 1))


def test_phantom_severe_involvement():
    """CT-3 (about 70 % involvement): a non-empty mask, Dice >= 0.85, >= 70 % of the lesions inside.

    Level on the generator-2.0 phantoms (denser dependent lung, motion blur, low-dose noise): over
    seeds 0-5, Dice 0.87-0.93 and 73-90 % of the lesion voxels inside the mask (seed 0: 73 %; it was
    84 % on the generator-1.0 phantoms). Dense consolidation lining the chest wall is the lung
    mask's known weakness (README, limitations); severe cases only.
    """
    ph = phantoms.generate_phantom(np.random.default_rng(0), size="small", covid=True, involvement=0.7)
    assert ph.category in ("CT-3", "CT-4")
    ct = CTVolume.from_array(ph.hu, ph.affine)
    ornt = io_orientation(ph.affine)
    truth, lesions = apply_orientation(ph.lung_mask, ornt), apply_orientation(ph.lesion_mask, ornt)
    mask = extract_lung_mask(ct.array, ct.spacing)
    assert mask.any()
    assert dice(mask, truth) >= 0.85
    assert (mask & lesions).sum() / lesions.sum() >= 0.7


def test_mediastinum_between_touching_lungs_is_not_lung():
    """Where the two lungs meet in front of and behind the mediastinum (anterior and posterior
    junction lines), the mediastinum is enclosed by lung in every slice: it is a hole, but not lung.
    A nodule enclosed by one lung is still filled in."""
    nx, ny, nz = 160, 128, 24
    x, y = np.mgrid[0:nx, 0:ny].astype(float)
    hu = np.full((nx, ny, nz), -1000.0)
    body = ((x - 80) / 74) ** 2 + ((y - 64) / 56) ** 2 <= 1
    cavity = ((x - 80) / 64) ** 2 + ((y - 64) / 46) ** 2 <= 1
    ribs = body & ~(((x - 80) / 68) ** 2 + ((y - 64) / 50) ** 2 <= 1)
    mediastinum = ((x - 80) / 16) ** 2 + ((y - 64) / 30) ** 2 <= 1
    spine = ((x - 80) / 8) ** 2 + ((y - 114) / 5) ** 2 <= 1
    nodule = ((x - 40) / 5) ** 2 + ((y - 64) / 5) ** 2 <= 1
    sl = np.full((nx, ny), -1000.0)
    sl[body] = 40.0
    sl[cavity] = -850.0  # one lung space around the mediastinum: the lungs touch front and back
    sl[mediastinum] = 40.0
    sl[nodule] = 20.0
    sl[ribs & ((np.arctan2(y - 64, x - 80) * 8) % 2 < 1)] = 700.0
    sl[spine] = 700.0
    hu[:, :, 2:-2] = sl[:, :, None]
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 15, hu.shape)
    mask = extract_lung_mask(hu, (2.0, 2.0, 5.0))
    mid = mask[:, :, 4:-4]
    med = np.broadcast_to(mediastinum[:, :, None], mid.shape)
    nod = np.broadcast_to(nodule[:, :, None], mid.shape)
    assert (mid & med).sum() < 0.05 * med.sum(), f"{(mid & med).sum() / med.sum():.0%} of the mediastinum marked as lung"
    assert (mid & nod).sum() > 0.9 * nod.sum(), "a nodule enclosed by one lung must stay in the mask"
