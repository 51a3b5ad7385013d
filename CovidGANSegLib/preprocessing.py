"""Preprocessing of the paper (section 4.1) with an exact way back to the CT's own grid.

Steps for one CT (``preprocess_ct``): lung mask (``lungmask``; the training volumes' closes over a
shorter length along z than the one used at inference) -> crop box = lung bounding box +
``lung_margin_mm``, clipped to the volume -> HU window clip and scale to [0, 1] -> resampling
into the model grid ``(D, H, W)``.

Geometry decision (``GridMapping``), following the paper's "maintaining the aspect ratio":

* In-plane, the crop is resampled to ``target_spacing``; if it does not fit in the grid at that
  spacing (the usual case for adult lungs at 2 mm in a 128 grid), both in-plane axes are zoomed
  out by the same factor until the larger side fits. The aspect ratio is kept and the crop is
  centred; the rest of the grid is padded with 0 (the window minimum, i.e. air).
* Along z, the crop's slices are resampled to fill all ``D`` model slices (the slice spacing
  becomes ``crop height / D``, close to the paper's 8 mm for a chest CT).
* Images are resampled linearly after a Gaussian anti-aliasing filter where the grid is coarser
  (sigma = (step - 1) / 2 voxels per axis, as in scikit-image); masks (bool arrays) the same way
  on their float version, thresholded at 0.5.

The mapping is stored as JSON (``GridMapping.to_dict``) so that model outputs can be brought back
onto the input CT (``GridMapping.to_canonical`` then ``nifti.CTVolume.to_original``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from CovidGANSegLib import progress
from CovidGANSegLib.atomic import atomic_directory
from CovidGANSegLib.config import DEFAULT_PREPROCESS, PreprocessConfig, dataclass_from_dict, dataclass_to_dict
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.nifti import CTVolume

log = logging.getLogger(__name__)

#: format tag written into index.json
FORMAT = "covidganseg-preprocessed"
FORMAT_VERSION = 1
_ARRAYS = ("healthy", "covid", "healthy_lungs", "covid_lungs")


def window_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window = (low, high)`` and scale linearly to [0, 1] (float32)."""
    lo, hi = (float(v) for v in window)
    if not lo < hi:
        raise ValueError(f"window must be (low, high) with low < high, got {window}")
    out = np.asarray(hu, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def unwindow(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`window_hu` inside the window: [0, 1] -> HU (float32)."""
    lo, hi = (float(v) for v in window)
    if not lo < hi:
        raise ValueError(f"window must be (low, high) with low < high, got {window}")
    return (np.asarray(x, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32, copy=False)


def _triple(values: Any, kind: type, name: str) -> tuple:
    out = tuple(kind(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} must have three values, got {values}")
    return out


@dataclass
class GridMapping:
    """Exact, JSON-serialisable map between a CT's canonical grid and the model grid.

    Canonical voxel ``(x, y, z)`` and model voxel ``(d, h, w)`` are related per axis by
    ``x = origin[0] + w * step[0]``, ``y = origin[1] + h * step[1]``, ``z = origin[2] + d * step[2]``
    (voxel-centre coordinates). Only the crop box ``[crop_start, crop_stop)`` of the canonical grid
    is represented in the model grid; model voxels outside it are padding.

    Attributes:
        canonical_shape: shape of the canonical CT array ``(x, y, z)``.
        spacing: canonical voxel size in mm ``(x, y, z)``.
        crop_start, crop_stop: crop box in canonical voxels (half-open), ``(x, y, z)``.
        grid_dhw: model grid ``(D, H, W)``.
        origin: canonical coordinate ``(x, y, z)`` of model voxel ``(0, 0, 0)``.
        step: canonical voxels per model voxel along ``(x, y, z)`` (i.e. along W, H, D).
        affine: the canonical grid's voxel-to-world affine (4 x 4), or None.
    """

    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    grid_dhw: tuple[int, int, int]
    origin: tuple[float, float, float]
    step: tuple[float, float, float]
    affine: list[list[float]] | None = field(default=None)

    def __post_init__(self) -> None:
        self.canonical_shape = _triple(self.canonical_shape, int, "canonical_shape")
        self.spacing = _triple(self.spacing, float, "spacing")
        self.crop_start = _triple(self.crop_start, int, "crop_start")
        self.crop_stop = _triple(self.crop_stop, int, "crop_stop")
        self.grid_dhw = _triple(self.grid_dhw, int, "grid_dhw")
        self.origin = _triple(self.origin, float, "origin")
        self.step = _triple(self.step, float, "step")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4).tolist()
        for a, b, n in zip(self.crop_start, self.crop_stop, self.canonical_shape):
            if not 0 <= a < b <= n:
                raise ValueError(f"crop box {self.crop_start}..{self.crop_stop} is not inside {self.canonical_shape}")
        if min(self.step) <= 0 or min(self.spacing) <= 0 or min(self.grid_dhw) < 1:
            raise ValueError("step, spacing and grid must be positive")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_box(cls, crop_start: tuple[int, int, int], crop_stop: tuple[int, int, int],
                 canonical_shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 config: PreprocessConfig = DEFAULT_PREPROCESS, *, affine: np.ndarray | None = None) -> "GridMapping":
        """Fit a canonical crop box into ``config.grid`` (see the module docstring)."""
        start = np.asarray(crop_start, dtype=np.int64)
        stop = np.asarray(crop_stop, dtype=np.int64)
        size = (stop - start).astype(np.float64)  # voxels (x, y, z)
        sp = np.asarray(spacing, dtype=np.float64)
        gw, gh, gd = config.grid
        tx, ty, _ = config.target_spacing
        # in-plane: target spacing, zoomed out by one common factor until the box fits
        zoom = max(1.0, size[0] * sp[0] / (gw * tx), size[1] * sp[1] / (gh * ty))
        model_sp = np.array([tx * zoom, ty * zoom, size[2] * sp[2] / gd])  # z: fill the D slices
        step = model_sp / sp
        grid_xyz = np.array([gw, gh, gd], dtype=np.float64)
        centre = start + (size - 1.0) / 2.0
        origin = centre - (grid_xyz - 1.0) / 2.0 * step
        return cls(
            canonical_shape=tuple(int(n) for n in canonical_shape),
            spacing=tuple(float(s) for s in sp),
            crop_start=tuple(int(v) for v in start),
            crop_stop=tuple(int(v) for v in stop),
            grid_dhw=config.grid_dhw,
            origin=tuple(float(v) for v in origin),
            step=tuple(float(v) for v in step),
            affine=None if affine is None else np.asarray(affine, dtype=np.float64),
        )

    @classmethod
    def from_lung_mask(cls, lung_mask: np.ndarray, spacing: tuple[float, float, float],
                       config: PreprocessConfig = DEFAULT_PREPROCESS, *, affine: np.ndarray | None = None) -> "GridMapping":
        """Crop box = bounding box of ``lung_mask`` plus ``config.lung_margin_mm``, clipped to the volume."""
        lung_mask = np.asarray(lung_mask, dtype=bool)
        if lung_mask.ndim != 3 or not lung_mask.any():
            raise ValueError("lung_mask must be a non-empty 3D mask")
        start, stop = [], []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(lung_mask.any(axis=other))
            margin = int(math.ceil(config.lung_margin_mm / float(spacing[axis]) - 1e-9))
            start.append(max(0, int(idx[0]) - margin))
            stop.append(min(lung_mask.shape[axis], int(idx[-1]) + 1 + margin))
        return cls.from_box(tuple(start), tuple(stop), lung_mask.shape, spacing, config, affine=affine)

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        """Slices of the crop box in the canonical array."""
        return tuple(slice(a, b) for a, b in zip(self.crop_start, self.crop_stop))

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))

    @property
    def grid_xyz(self) -> tuple[int, int, int]:
        d, h, w = self.grid_dhw
        return (w, h, d)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Model voxel size in mm along ``(x, y, z)`` (W, H, D)."""
        return tuple(float(a * b) for a, b in zip(self.step, self.spacing))

    @property
    def model_affine(self) -> np.ndarray:
        """Voxel-to-world affine of the model grid indexed ``(w, h, d)`` (the (D, H, W) array transposed)."""
        if self.affine is None:
            raise ValueError("this mapping was built without the CT affine")
        m = np.eye(4)
        m[:3, :3] = np.diag(self.step)
        m[:3, 3] = self.origin
        return np.asarray(self.affine) @ m

    def canonical_to_model_coords(self, xyz: np.ndarray) -> np.ndarray:
        """Canonical voxel coordinates ``(..., 3)`` (x, y, z) -> model coordinates ``(..., 3)`` (d, h, w)."""
        m = (np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)) / np.asarray(self.step)
        return m[..., ::-1]

    def model_to_canonical_coords(self, dhw: np.ndarray) -> np.ndarray:
        """Model coordinates ``(..., 3)`` (d, h, w) -> canonical voxel coordinates ``(..., 3)`` (x, y, z)."""
        m = np.asarray(dhw, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + m * np.asarray(self.step)

    # ---- resampling ---------------------------------------------------------------------------
    def to_model(self, canonical: np.ndarray, *, order: int = 1, antialias: bool = True, cval: float = 0.0) -> np.ndarray:
        """Canonical ``(x, y, z)`` array -> model grid ``(D, H, W)``.

        bool arrays are treated as masks (anti-aliased, linear, threshold 0.5) and returned as
        bool; integer arrays with ``order=0`` keep their dtype (labels); anything else gives
        float32. Model voxels outside the crop box are ``cval``.
        """
        canonical = np.asarray(canonical)
        if canonical.shape != self.canonical_shape:
            raise ValueError(f"array shape {canonical.shape} does not match the canonical grid {self.canonical_shape}")
        return self.crop_to_model(canonical[self.crop_slices], order=order, antialias=antialias, cval=cval)

    def crop_to_model(self, crop: np.ndarray, *, order: int = 1, antialias: bool = True, cval: float = 0.0) -> np.ndarray:
        """Like :meth:`to_model` for an array that is already the crop box of the canonical grid."""
        crop = np.asarray(crop)
        if crop.shape != self.crop_shape:
            raise ValueError(f"crop shape {crop.shape} does not match the crop box {self.crop_shape}")
        is_mask = crop.dtype == bool
        labels = (not is_mask) and order == 0 and np.issubdtype(crop.dtype, np.integer)
        if is_mask:
            order = 1
        work = crop if labels else crop.astype(np.float32, copy=False)
        if antialias and not labels:
            sigma = [max(0.0, (s - 1.0) / 2.0) for s in self.step]
            if any(s > 0 for s in sigma):
                work = ndi.gaussian_filter(work, sigma=sigma, mode="nearest", truncate=3.0)
        offset = np.asarray(self.origin) - np.asarray(self.crop_start)
        out = ndi.affine_transform(work, np.asarray(self.step), offset=offset, output_shape=self.grid_xyz,
                                   order=order, mode="nearest", prefilter=order > 1)
        inside = self._inside_crop()
        if is_mask:
            out = (out > 0.5) & inside
        else:
            out[~inside] = cval
        return np.ascontiguousarray(out.transpose(2, 1, 0))  # (x, y, z) -> (D, H, W)

    def to_canonical(self, model: np.ndarray, *, order: int = 1, antialias: bool = True, cval: float = 0.0) -> np.ndarray:
        """Model grid ``(D, H, W)`` -> canonical ``(x, y, z)`` array; ``cval`` outside the crop box.

        bool arrays are treated as masks (linear, threshold 0.5) and returned as bool.
        """
        model = np.asarray(model)
        if model.shape != self.grid_dhw:
            raise ValueError(f"array shape {model.shape} does not match the model grid {self.grid_dhw}")
        is_mask = model.dtype == bool
        labels = (not is_mask) and order == 0 and np.issubdtype(model.dtype, np.integer)
        if is_mask:
            order = 1
        work = model.transpose(2, 1, 0)  # (D, H, W) -> (x, y, z)
        work = work if labels else work.astype(np.float32)
        if antialias and not labels:
            sigma = [max(0.0, (1.0 / s - 1.0) / 2.0) for s in self.step]
            if any(s > 0 for s in sigma):
                work = ndi.gaussian_filter(work, sigma=sigma, mode="nearest", truncate=3.0)
        inv = 1.0 / np.asarray(self.step)
        offset = (np.asarray(self.crop_start) - np.asarray(self.origin)) * inv
        crop = ndi.affine_transform(work, inv, offset=offset, output_shape=self.crop_shape,
                                    order=order, mode="nearest", prefilter=order > 1)
        if is_mask:
            out = np.zeros(self.canonical_shape, dtype=bool)
            out[self.crop_slices] = crop > 0.5
            return out
        out = np.full(self.canonical_shape, cval, dtype=crop.dtype)
        out[self.crop_slices] = crop
        return out

    def _inside_crop(self) -> np.ndarray:
        """bool ``(W, H, D)``: model voxels whose centre lies inside the crop box."""
        axes = []
        for o, s, a, b, n in zip(self.origin, self.step, self.crop_start, self.crop_stop, self.grid_xyz):
            c = o + s * np.arange(n)
            axes.append((c >= a - 0.5 - 1e-6) & (c <= b - 0.5 + 1e-6))
        return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GridMapping":
        return dataclass_from_dict(cls, data, "GridMapping fields", tuples=False)


@dataclass
class PreprocessedVolume:
    """One preprocessed CT.

    Attributes:
        image: ``(D, H, W)`` float32 in [0, 1] (HU window scaled).
        lung_mask: ``(D, H, W)`` bool.
        mapping: the map back to the CT's canonical grid.
        lung_mask_canonical: ``(x, y, z)`` bool lung mask on the canonical CT grid.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    mapping: GridMapping
    lung_mask_canonical: np.ndarray


def thick_slices(ct: CTVolume, thickness_mm: float = 8.0) -> CTVolume | None:
    """``ct`` as a thick-slice scan: groups of ``k`` consecutive slices averaged into one slice of
    about ``thickness_mm`` (the partial volume of MosMed's 8 mm slices), centred on the group.

    None when the slices are already at least ``0.75 * thickness_mm`` thick (nothing to average).
    A trailing group of fewer than ``k`` slices is dropped.
    """
    dz = ct.spacing[2]
    k = int(round(thickness_mm / dz))
    if dz >= 0.75 * thickness_mm or k < 2 or ct.shape[2] < k:
        return None
    n = ct.shape[2] // k
    x, y, _ = ct.shape
    slabs = ct.array[:, :, :n * k].reshape(x, y, n, k).mean(axis=3)  # (x, y, z) -> (x, y, n, k) -> (x, y, n)
    affine = ct.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (k - 1) / 2.0  # first slab centre
    affine[:3, 2] *= k
    return CTVolume.from_array(slabs.astype(np.float32), affine, ct.path)


def check_voxel_budget(ct: CTVolume, config: PreprocessConfig = DEFAULT_PREPROCESS, *, work_spacing_mm: float = 2.0) -> None:
    """Refuse, before anything is allocated, a CT whose grids would exceed :data:`nifti.MAX_VOXELS`.

    Checked: the CT itself, the lung mask's working grid (``lungmask.extract_lung_mask`` averages
    blocks of about ``work_spacing_mm`` in-plane and pads the image to whole blocks, so a header
    with tiny voxels would blow it up) and the model grid of ``config``.

    Raises:
        InputError: naming the CT file, the grid and its size.
    """
    from CovidGANSegLib.nifti import MAX_VOXELS

    nx, ny, nz = ct.shape
    sx, sy, _ = ct.spacing
    fx, fy = (max(1, int(round(work_spacing_mm / s))) for s in (sx, sy))
    grids = {
        "image": (nx, ny, nz),
        "lung-mask working grid (padded to whole blocks)": (-(-nx // fx) * fx, -(-ny // fy) * fy, nz),
        "model grid": tuple(int(v) for v in config.grid),
    }
    for name, shape in grids.items():
        voxels = math.prod(int(v) for v in shape)
        if voxels > MAX_VOXELS:
            raise InputError(f"the {name} {shape} would have {voxels:,} voxels, more than the budget of {MAX_VOXELS:,} "
                             f"(spacing {', '.join(f'{v:.4g}' for v in ct.spacing)} mm)", ct.path)


def preprocess_ct(ct: CTVolume, config: PreprocessConfig = DEFAULT_PREPROCESS, *,
                  lung_mask: np.ndarray | None = None, for_training: bool = False) -> PreprocessedVolume:
    """Lung mask, crop to the lungs with a margin, HU window to [0, 1], resample into the model grid.

    Args:
        ct: the CT (canonical, HU).
        config: preprocessing parameters.
        lung_mask: a lung mask on the canonical grid; computed with
            :func:`lungmask.extract_lung_mask` when None.
        for_training: compute the training volumes' lung mask (closing along z over
            ``lungmask.TRAINING_Z_CLOSING_MM``) instead of the inference one.

    Raises:
        InputError: no lungs are found, or a grid exceeds the voxel budget (naming the file).
    """
    from CovidGANSegLib.lungmask import INFERENCE_Z_CLOSING_MM, TRAINING_Z_CLOSING_MM, extract_lung_mask

    check_voxel_budget(ct, config)
    if lung_mask is None:
        z_closing = TRAINING_Z_CLOSING_MM if for_training else INFERENCE_Z_CLOSING_MM
        lung_mask = extract_lung_mask(ct.array, ct.spacing, z_closing_mm=z_closing)
    else:
        lung_mask = np.asarray(lung_mask).astype(bool, copy=False)
        if lung_mask.shape != ct.shape:
            raise ValueError(f"lung_mask shape {lung_mask.shape} does not match the CT {ct.shape}")
    if not lung_mask.any():
        raise InputError("no lungs found in the image (is it a chest CT in HU?)", ct.path)
    mapping = GridMapping.from_lung_mask(lung_mask, ct.spacing, config, affine=ct.affine)
    windowed = window_hu(ct.array[mapping.crop_slices], config.hu_window)
    image = mapping.crop_to_model(windowed, order=1, cval=0.0)
    np.clip(image, 0.0, 1.0, out=image)
    lungs = mapping.crop_to_model(lung_mask[mapping.crop_slices])
    return PreprocessedVolume(image=image, lung_mask=lungs, mapping=mapping, lung_mask_canonical=lung_mask)


# ---- data sets --------------------------------------------------------------------------------
@dataclass
class PreprocessedDataset:
    """A preprocessed data set (see :func:`preprocess_dataset`).

    Attributes:
        healthy, covid: ``(N, D, H, W)`` float32 in [0, 1].
        healthy_lungs, covid_lungs: ``(N, D, H, W)`` bool.
        records: one dict per study: ``id``, ``category``, ``covid``, ``set`` ("healthy" /
            "covid"), ``index`` (row in that set's arrays), ``path``, ``mapping`` (a
            ``GridMapping.to_dict()``), ``original_shape``, ``original_affine``, ``lung_ml``.
        config: the parameters used.
        folder: where it was loaded from.
    """

    healthy: np.ndarray
    covid: np.ndarray
    healthy_lungs: np.ndarray
    covid_lungs: np.ndarray
    records: list[dict[str, Any]]
    config: PreprocessConfig
    folder: Path | None = None

    def mapping(self, record: dict[str, Any]) -> GridMapping:
        """The GridMapping of one record."""
        return GridMapping.from_dict(record["mapping"])

    def records_of(self, subset: str) -> list[dict[str, Any]]:
        """The records of ``"healthy"`` or ``"covid"`` in array order."""
        return sorted((r for r in self.records if r["set"] == subset), key=lambda r: r["index"])


def _file_fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def preprocess_study(study: Any, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One study on the model grid: ``(image, lung_mask, geometry)`` (``geometry``: JSON-ready)."""
    from CovidGANSegLib.nifti import load_ct

    try:
        ct = load_ct(study.path, min_slices=config.min_slices)
        vol = preprocess_ct(ct, config, for_training=True)
    except InputError:
        raise
    except Exception:
        log.error("preprocessing failed for %s", study.path)
        raise
    geometry = {
        "original_shape": list(ct.original_shape),
        "original_affine": np.asarray(ct.original_affine).tolist(),
        "lung_ml": round(float(vol.lung_mask_canonical.sum()) * ct.voxel_volume_ml, 3),
        "mapping": vol.mapping.to_dict(),
    }
    return vol.image, vol.lung_mask, geometry


def preprocess_shard(data: str | Path, folder: str | Path, config: PreprocessConfig, rank: int, world: int) -> int:
    """Preprocess this process's share of the studies (every ``world``-th, from ``rank``) into
    ``folder`` (one ``<position>.npz`` per study), for :func:`preprocess_dataset` ``(precomputed=folder)``
    to assemble. Returns the number of studies done."""
    from CovidGANSegLib.datasets import discover_studies

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    studies = discover_studies(Path(data), min_slices=config.min_slices)
    done = 0
    for k in range(rank, len(studies), world):
        image, lung, geometry = preprocess_study(studies[k], config)
        tmp = folder / f".{k:06d}.tmp.npz"
        np.savez(tmp, image=image, lung=lung, meta=np.array(json.dumps({"path": str(studies[k].path.resolve()), **geometry})))
        tmp.replace(folder / f"{k:06d}.npz")
        done += 1
    return done


def _precomputed_study(folder: Path | None, position: int, study: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """A study preprocessed by :func:`preprocess_shard`, or None (no file, or one of another study)."""
    if folder is None or not (folder / f"{position:06d}.npz").is_file():
        return None
    with np.load(folder / f"{position:06d}.npz") as f:
        meta = json.loads(str(f["meta"]))
        if meta.pop("path") != str(study.path.resolve()):
            return None
        return f["image"], f["lung"], meta


def preprocess_dataset(data: str | Path, out: str | Path, config: PreprocessConfig = DEFAULT_PREPROCESS, *,
                       overwrite: bool = False, precomputed: str | Path | None = None) -> Path:
    """Preprocess every study of a data set into ``out`` (written atomically).

    ``out`` receives ``healthy.npy``, ``covid.npy`` (float32 ``(N, D, H, W)``),
    ``healthy_lungs.npy``, ``covid_lungs.npy`` (bool), ``index.json`` (one record per study with
    its original geometry and GridMapping) and ``config.json``. Lesion masks are never read.
    ``precomputed``: a folder of :func:`preprocess_shard` results (several processes' shares),
    used where it holds the study; the rest is computed here.

    Raises:
        InputError: no usable study, or a study that cannot be read / has no lungs (the message
            names it); nothing is left in ``out`` then.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    from CovidGANSegLib.datasets import discover_studies

    data, out = Path(data), Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty (choose another or use --overwrite)")
    studies = discover_studies(data, min_slices=config.min_slices)
    if not studies:
        raise InputError(f"no study with at least {config.min_slices} slices found", data)
    healthy = [s for s in studies if not s.covid]
    covid = [s for s in studies if s.covid]
    shape = config.grid_dhw
    from CovidGANSegLib.nifti import MAX_VOXELS

    if math.prod(shape) > MAX_VOXELS:
        raise InputError(f"model grid {tuple(config.grid)} has {math.prod(shape):,} voxels, more than the budget of {MAX_VOXELS:,}")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        arrays = {
            "healthy": _open_array(tmp / "healthy.npy", (len(healthy), *shape), np.float32),
            "covid": _open_array(tmp / "covid.npy", (len(covid), *shape), np.float32),
            "healthy_lungs": _open_array(tmp / "healthy_lungs.npy", (len(healthy), *shape), np.bool_),
            "covid_lungs": _open_array(tmp / "covid_lungs.npy", (len(covid), *shape), np.bool_),
        }
        records = []
        counters = {"healthy": 0, "covid": 0}
        shards = None if precomputed is None else Path(precomputed)
        for position, study in enumerate(progress.track(studies, desc="preprocess")):
            subset = "covid" if study.covid else "healthy"
            image, lung, geometry = _precomputed_study(shards, position, study) or preprocess_study(study, config)
            i = counters[subset]
            counters[subset] += 1
            arrays[subset][i] = image
            arrays[f"{subset}_lungs"][i] = lung
            records.append({
                "id": study.id,
                "category": study.category,
                "covid": study.covid,
                "set": subset,
                "index": i,
                "path": str(study.path.resolve()),
                "relpath": study.path.resolve().relative_to(data.resolve()).as_posix(),
                **_file_fingerprint(study.path),
                **geometry,
            })
        for arr in arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        del arrays
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": str(data.resolve()),
            "grid_dhw": list(shape),
            "n_healthy": len(healthy),
            "n_covid": len(covid),
            "records": records,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    log.info("preprocessed %d healthy and %d COVID studies into %s", len(healthy), len(covid), out)
    return out


def _open_array(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A .npy file opened for writing (memory-mapped, so large data sets stay out of RAM)."""
    if shape[0] == 0:
        np.save(path, np.zeros(shape, dtype=dtype))
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def load_preprocessed(folder: str | Path, *, mmap: bool = False) -> PreprocessedDataset:
    """Load a folder written by :func:`preprocess_dataset` (``mmap=True``: memory-map the arrays).

    Raises:
        InputError: a file is missing or inconsistent (naming it).
    """
    folder = Path(folder)
    index_path, config_path = folder / "index.json", folder / "config.json"
    for p in (index_path, config_path):
        if not p.is_file():
            raise InputError(f"not a preprocessed folder: {p.name} is missing", folder)
    try:
        index = json.loads(index_path.read_text())
        config = PreprocessConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise InputError(f"unreadable preprocessing metadata ({exc})", folder) from exc
    if index.get("format") != FORMAT:
        raise InputError(f"index.json is not a {FORMAT} index", index_path)
    arrays = {}
    for name in _ARRAYS:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise InputError("file is missing", path)
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"unreadable array ({exc})", path) from exc
    counts = {"healthy": index.get("n_healthy"), "covid": index.get("n_covid")}
    for name, arr in arrays.items():
        subset = name.split("_")[0]
        expected = (counts[subset], *config.grid_dhw)
        dtype = np.bool_ if name.endswith("lungs") else np.float32
        if arr.shape != expected or arr.dtype != dtype:
            raise InputError(f"array has shape {arr.shape} {arr.dtype}, expected {expected} {np.dtype(dtype)}",
                             folder / f"{name}.npy")
    return PreprocessedDataset(records=list(index["records"]), config=config, folder=folder, **arrays)


def _is_preprocessed(folder: Path) -> bool:
    return (folder / "index.json").is_file()


def _cache_is_current(ds: PreprocessedDataset, data: Path, config: PreprocessConfig) -> bool:
    from CovidGANSegLib.datasets import discover_studies

    if ds.config != config:
        return False
    try:
        studies = discover_studies(data, min_slices=config.min_slices)
    except InputError:
        return False
    current = {str(s.path.resolve()): _file_fingerprint(s.path) for s in studies}
    cached = {r["path"]: {"size": r.get("size"), "mtime_ns": r.get("mtime_ns")} for r in ds.records}
    return current == cached


def ensure_preprocessed(data: str | Path, cache: str | Path, config: PreprocessConfig = DEFAULT_PREPROCESS, *,
                        mmap: bool = False, precomputed: str | Path | None = None) -> PreprocessedDataset:
    """A preprocessed data set for ``data``.

    ``data`` may be a preprocessed folder (it has ``index.json``; its parameters must equal
    ``config``) or a raw data set, which is then preprocessed into ``cache`` unless ``cache``
    already holds an up-to-date result (same parameters, same files, sizes and times).

    Raises:
        InputError: a preprocessed ``data`` made with other parameters, or a ``cache`` folder that
            holds something else (it is never wiped).
    """
    data, cache = Path(data), Path(cache)
    if _is_preprocessed(data):
        ds = load_preprocessed(data, mmap=mmap)
        if ds.config != config:
            raise InputError(
                f"preprocessed with other parameters ({ds.config.to_dict()}) than required ({config.to_dict()}); "
                "preprocess the raw data again",
                data,
            )
        return ds
    if cache.exists() and (cache.is_file() or (any(cache.iterdir()) and not _is_preprocessed(cache))):
        raise InputError("cache folder exists and is not a preprocessed folder; choose another", cache)
    if _is_preprocessed(cache):
        try:
            ds = load_preprocessed(cache, mmap=mmap)
            if _cache_is_current(ds, data, config):
                log.info("using preprocessed cache %s", cache)
                return ds
        except InputError as exc:
            log.warning("preprocessed cache %s unusable (%s); rebuilding it", cache, exc)
    preprocess_dataset(data, cache, config, overwrite=True, precomputed=precomputed)
    return load_preprocessed(cache, mmap=mmap)
