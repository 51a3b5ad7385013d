"""Synthetic chest-CT phantoms in HU: the project's embedded default data set (numpy only).

Each phantom is an analytic chest (:mod:`CovidGANSegLib.synth.chest`, one module per organ
system) rendered with partial-volume edges: air, a body outline with skin, subcutaneous fat and
muscle, ribs, spine, sternum and scapulae, a mediastinum with heart, aorta, pulmonary trunk and
arteries, superior vena cava, oesophagus, trachea and main bronchi, upper abdominal organs under
the diaphragm domes, a patient table, and two lungs. The lungs hold branching vessel trees
(arteries and veins of unenhanced blood, +35..+50 HU, tapering by Murray's law to sub-voxel twigs
of 0.3-0.55 mm radius, partial volume across 8 mm slices, so thin vessels have lesion-like HU) and
bronchi beside the arteries, over parenchyma of -870..-815 HU with texture and a dependent
(posterior) density gradient; some studies have faint dependent subpleural density (not a lesion),
cardiac motion blur next to the heart and respiratory blur above the domes. CT noise is added last
(standard deviation 12-35 HU, 35-60 HU in low-dose studies). A plain HU threshold (-750..0 HU)
therefore flags a quarter to a half of a healthy phantom's lung, about as on real normal CT at
similar spacing (``Testing/Python/test_eval_lesions.py`` checks it).

COVID phantoms get lesions from one of two models: ``lesion_model="perlin"`` (the training model,
:mod:`lesions`: thresholded Perlin noise) or ``"independent"`` (:mod:`eval_lesions`: analytic
wedges, nodules, bands and patches, for held-out evaluation that does not measure how well a model
learned its own generator). The category follows MosMedData's bands of the *true* involvement.
Every phantom is a pure function of the generator state, and a cohort of its (seed, study number),
so the same seed gives the same bytes.

Arrays are in the file's voxel order, orientation LAS like MosMedData: axis 0 runs to the
patient's left, axis 1 anterior, axis 2 superior.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from CovidGANSegLib.synth.chest import render_chest
from CovidGANSegLib.synth.chest.geometry import SIZES
from CovidGANSegLib.synth.chest.labels import LABELS  # noqa: F401  (public API)
from CovidGANSegLib.synth.chest.noise import ct_noise, draw_noise_sigma, upsample2
from CovidGANSegLib.synth.eval_lesions import synthesize_eval_lesions
from CovidGANSegLib.synth.lesions import LesionConfig, synthesize_lesions

log = logging.getLogger(__name__)

GENERATOR_VERSION = "2.0"
#: the ``generator`` of every ``cohort.json`` that :func:`write_cohort` writes (how readers recognise phantoms)
GENERATOR = "CovidGANSegLib.synth.phantoms"
#: lesion models: "perlin" (:mod:`lesions`, the training model) or "independent" (:mod:`eval_lesions`)
LESION_MODELS = ("perlin", "independent")
CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: MosMedData bands of lung involvement: CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 > 75 %
CATEGORY_BANDS = ((0.25, "CT-1"), (0.50, "CT-2"), (0.75, "CT-3"), (math.inf, "CT-4"))
#: how COVID phantoms of a cohort cycle through the categories (mostly CT-1 / CT-2, like MosMed)
COHORT_CATEGORY_CYCLE = ("CT-1", "CT-2", "CT-1", "CT-3", "CT-1", "CT-2", "CT-4", "CT-1", "CT-2", "CT-1")
#: the involvement range each category is drawn from (inside its band, away from the edges)
INVOLVEMENT_RANGES = {"CT-1": (0.001, 0.22), "CT-2": (0.27, 0.48), "CT-3": (0.52, 0.73), "CT-4": (0.77, 0.88)}

HU_MIN, HU_MAX = -1024, 3071


def category_for(involvement: float, covid: bool = True) -> str:
    """MosMedData category of a lung involvement fraction (CT-0 for healthy)."""
    if not covid:
        return "CT-0"
    for upper, name in CATEGORY_BANDS:
        if involvement < upper:
            return name
    return "CT-4"


@dataclass
class Phantom:
    """One synthetic chest CT (all arrays in file voxel order, LAS).

    Attributes:
        hu: int16 Hounsfield units.
        affine: voxel-to-world (RAS mm) affine, LAS orientation.
        lung_mask: anatomical lungs, including vessels, intrapulmonary airways and lesions,
            excluding the trachea and main bronchi.
        lesion_mask: exactly the voxels changed by lesions (empty for healthy phantoms).
        involvement: lesion volume / lung volume.
        category: "CT-0" (healthy) .. "CT-4", from the true involvement.
        labels: uint8 tissue labels (see :data:`LABELS`), before lesions.
    """

    hu: np.ndarray
    affine: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    involvement: float
    category: str
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def voxel_ml(self) -> float:
        sx, sy, sz = self.spacing
        return sx * sy * sz / 1000.0

    @property
    def lung_ml(self) -> float:
        return float(self.lung_mask.sum()) * self.voxel_ml

    @property
    def lesion_ml(self) -> float:
        return float(self.lesion_mask.sum()) * self.voxel_ml

    @property
    def covid(self) -> bool:
        return self.category != "CT-0"


# --------------------------------------------------------------------------------------------
# public API


def draw_involvement(rng: np.random.Generator, category: str | None = None) -> float:
    """Draw a lung involvement fraction, for ``category`` or a MosMed-like category mix."""
    if category is None:
        category = str(rng.choice(["CT-1", "CT-2", "CT-3", "CT-4"], p=[0.55, 0.27, 0.13, 0.05]))
    if category not in INVOLVEMENT_RANGES:
        raise ValueError(f"category must be one of {sorted(INVOLVEMENT_RANGES)}, got {category!r}")
    lo, hi = INVOLVEMENT_RANGES[category]
    if category == "CT-1":
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return float(rng.uniform(lo, hi))


def lesion_config_for(involvement: float) -> LesionConfig:
    """Lesion parameters that suit a given involvement (small multifocal foci when mild)."""
    if involvement < 0.05:
        return LesionConfig(blob_scale_mm=(30.0, 50.0), consolidation_fraction=(0.0, 0.12), crazy_paving_fraction=(0.0, 0.1))
    if involvement < 0.25:
        return LesionConfig(blob_scale_mm=(40.0, 70.0), consolidation_fraction=(0.02, 0.2), crazy_paving_fraction=(0.0, 0.2))
    return LesionConfig(blob_scale_mm=(55.0, 100.0), consolidation_fraction=(0.08, 0.3), crazy_paving_fraction=(0.05, 0.25))


def generate_phantom(rng: np.random.Generator, *, size: str = "small", covid: bool,
                     involvement: float | None = None, return_labels: bool = True,
                     lesion_model: str = "perlin") -> Phantom:
    """Generate one synthetic chest CT.

    Args:
        rng: random source; the phantom is a pure function of its state.
        size: "small" (128 x 128 at about 2.8 mm, 32-40 slices of 8 mm; fast, for tests) or
            "mosmed" (512 x 512 at 0.6-0.8 mm, 32-48 slices of 8 mm, like MosMedData).
        covid: add lesions.
        involvement: target lesion fraction of the lungs (COVID only); drawn when None.
        return_labels: keep the tissue label map (``Phantom.labels``).
        lesion_model: "perlin" (the training lesion model, :func:`lesions.synthesize_lesions`) or
            "independent" (:func:`eval_lesions.synthesize_eval_lesions`, for held-out evaluation).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if lesion_model not in LESION_MODELS:
        raise ValueError(f"lesion_model must be one of {LESION_MODELS}, got {lesion_model!r}")
    if involvement is not None:
        if not covid:
            raise ValueError("involvement is only meaningful for COVID phantoms")
        if not 0.0 < involvement < 1.0:
            raise ValueError(f"involvement must be in (0, 1), got {involvement}")
    chest = render_chest(rng, size)
    g = chest.grid
    hu, lung, labels = chest.hu, chest.lung, chest.labels
    if g.factor == 2:
        hu = upsample2(hu)
        lung = upsample2(lung)
        labels = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
    lung_mask = lung >= 0.5
    lesion_mask = np.zeros(hu.shape, dtype=bool)
    if covid:
        if involvement is None:
            involvement = draw_involvement(rng)
        if lesion_model == "perlin":
            hu, lesion_mask = synthesize_lesions(hu, lung_mask, rng, config=lesion_config_for(involvement),
                                                 spacing=g.spacing, coverage=involvement)
        else:
            hu, lesion_mask = synthesize_eval_lesions(hu, lung_mask, rng, spacing=g.spacing, coverage=involvement,
                                                      posterior_axis=1, posterior_direction=-1)
    sigma = draw_noise_sigma(rng)
    hu += ct_noise(rng, hu.shape, sigma, correlated=g.spacing[0] < 1.5)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    n_lung = int(lung_mask.sum())
    true_inv = float(lesion_mask.sum()) / n_lung if n_lung else 0.0
    return Phantom(
        hu=hu.astype(np.int16),
        affine=g.affine(chest.z0_world),
        lung_mask=lung_mask,
        lesion_mask=lesion_mask,
        involvement=true_inv,
        category=category_for(true_inv, covid),
        labels=labels if return_labels else None,
    )


def study_rng(seed: int, number: int) -> np.random.Generator:
    """The random source of study ``number`` of a cohort with ``seed``."""
    return np.random.default_rng([int(seed), int(number), 0x9E3779B9])


def _write_study(tmp: Path, seed: int, number: int, is_covid: bool, cat: str | None, size: str, lesion_model: str) -> dict:
    """Generate study ``number`` of a cohort, write its files under ``tmp`` and return its record."""
    from CovidGANSegLib.nifti import save_array

    rng = study_rng(seed, number)
    inv = draw_involvement(rng, cat) if is_covid else None
    ph = generate_phantom(rng, size=size, covid=is_covid, involvement=inv, return_labels=False, lesion_model=lesion_model)
    sid = f"study_{number:04d}"
    rel = Path("studies") / ph.category / f"{sid}.nii.gz"
    save_array(ph.hu, ph.affine, tmp / rel, dtype=np.int16)
    lungs_rel = Path("lungs") / f"{sid}_lungs.nii.gz"
    save_array(ph.lung_mask, ph.affine, tmp / lungs_rel, dtype=np.uint8)
    rec = {
        "id": sid, "number": number, "category": ph.category, "covid": is_covid,
        "involvement_percent": round(100.0 * ph.involvement, 4),
        "target_involvement_percent": None if inv is None else round(100.0 * inv, 4),
        "lesion_ml": round(ph.lesion_ml, 3), "lung_ml": round(ph.lung_ml, 3),
        "shape": list(ph.hu.shape), "spacing_mm": [round(s, 5) for s in ph.spacing],
        "path": rel.as_posix(), "lungs": lungs_rel.as_posix(), "mask": None,
    }
    if is_covid:
        mask_rel = Path("masks") / f"{sid}_mask.nii.gz"
        save_array(ph.lesion_mask, ph.affine, tmp / mask_rel, dtype=np.uint8)
        rec["mask"] = mask_rel.as_posix()
    return rec


def _logged(rec: dict) -> dict:
    log.info("%s: %s, involvement %.2f %%, lungs %.0f mL", rec["id"], rec["category"], rec["involvement_percent"], rec["lung_ml"])
    return rec


def write_cohort(out: Path, *, healthy: int, covid: int, seed: int, size: str = "small",
                 first_id: int = 1, overwrite: bool = False, lesion_model: str = "perlin",
                 categories: Sequence[str] | None = None, workers: int = 1) -> Path:
    """Write a phantom cohort in the MosMedData layout (atomically) and return ``out``.

    Layout: ``studies/CT-0..CT-4/study_NNNN.nii.gz`` (int16 HU), ``masks/study_NNNN_mask.nii.gz``
    (COVID studies, uint8), ``lungs/study_NNNN_lungs.nii.gz`` (every study, uint8) and
    ``cohort.json``. Study numbers start at ``first_id``: healthy studies first, then COVID ones,
    whose categories cycle through ``categories`` (default :data:`COHORT_CATEGORY_CYCLE`, so that a
    cohort spans them; e.g. ``("CT-1",)`` for a cohort of mild cases only).
    Study ``n`` is generated from ``study_rng(seed, n)`` alone. ``lesion_model`` ("perlin" or
    "independent", see :func:`generate_phantom`) is recorded in ``cohort.json``. ``workers`` > 1
    generates that many studies at a time in spawned processes (the same files: each study depends
    on its own random source only).
    """
    from CovidGANSegLib import progress
    from CovidGANSegLib.atomic import atomic_directory

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if lesion_model not in LESION_MODELS:
        raise ValueError(f"lesion_model must be one of {LESION_MODELS}, got {lesion_model!r}")
    if healthy < 0 or covid < 0 or healthy + covid < 1:
        raise ValueError(f"need at least one study (healthy={healthy}, covid={covid})")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if first_id < 0 or first_id + healthy + covid - 1 > 9999:
        raise ValueError(f"study numbers must fit in 0..9999 (first_id={first_id})")
    cycle = tuple(COHORT_CATEGORY_CYCLE if categories is None else categories)
    if not cycle or any(c not in INVOLVEMENT_RANGES for c in cycle):
        raise ValueError(f"categories must be COVID categories among {sorted(INVOLVEMENT_RANGES)}, got {list(cycle)}")
    out = Path(out)
    plan = [(first_id + i, False, None) for i in range(healthy)]
    plan += [(first_id + healthy + i, True, cycle[i % len(cycle)]) for i in range(covid)]
    records = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        jobs = [(tmp, seed, number, is_covid, cat, size, lesion_model) for number, is_covid, cat in plan]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_write_study, *job) for job in jobs]
                try:
                    outcomes = (f.result() for f in futures)
                    records += [_logged(rec) for rec in progress.track(outcomes, total=len(jobs), desc="phantoms")]
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # nothing writes into ``tmp`` once it is removed
                    raise
        else:
            records += [_logged(_write_study(*job)) for job in progress.track(jobs, desc="phantoms")]
        for cat in CATEGORIES:
            (tmp / "studies" / cat).mkdir(parents=True, exist_ok=True)
        meta = {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed), "size": size, "first_id": int(first_id), "lesion_model": lesion_model,
            "healthy": int(healthy), "covid": int(covid), "categories": list(cycle),
            "orientation": "LAS", "hu_dtype": "int16",
            "note": "synthetic phantoms, not patient data; lesion masks are for evaluation only",
            "studies": records,
        }
        (tmp / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
