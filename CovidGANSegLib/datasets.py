"""Find the CT studies of a data set: the MosMedData layout or a plain healthy / COVID folder.

Supported layouts (``*.nii.gz`` or ``*.nii`` files):

* MosMedData: ``ROOT/studies/CT-0 .. CT-4/<id>.nii.gz`` (CT-0 healthy, CT-1..CT-4 COVID by lung
  involvement), lesion masks in ``ROOT/masks/<id>_mask.nii.gz``. ``ROOT`` may also be the
  ``studies`` folder itself.
* Plain: ``ROOT/healthy/*.nii.gz`` and ``ROOT/covid/*.nii.gz`` (no category).

Only the header of each file is read here, to skip volumes with too few slices (the paper's rule
of at least 32 slices); full reading and checking happen in ``nifti.load_ct``.

Lesion masks are for evaluation only: training and pseudo-mask code must never call
:func:`lesion_mask_path` (the method is self-supervised; the seed paper's mistake of training on
the evaluation masks is not repeated here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from CovidGANSegLib.errors import InputError

log = logging.getLogger(__name__)

#: MosMedData categories; CT-0 is healthy
CATEGORIES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Study:
    """One CT study.

    Attributes:
        id: file name without ``.nii(.gz)``, e.g. ``study_0001``.
        path: the NIfTI file.
        category: ``"CT-0"`` .. ``"CT-4"`` (MosMedData layout) or None (plain layout).
        covid: True for COVID studies (CT-1..CT-4 or the ``covid`` folder).
    """

    id: str
    path: Path
    category: str | None
    covid: bool


def study_id(path: str | Path) -> str:
    """The study id of a NIfTI path: its name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES) and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.name)


def _layout(root: Path) -> tuple[str, Path]:
    if (root / "studies").is_dir() and any((root / "studies" / c).is_dir() for c in CATEGORIES):
        return "mosmed", root / "studies"
    if any((root / c).is_dir() for c in CATEGORIES):
        return "mosmed", root
    if (root / "healthy").is_dir() or (root / "covid").is_dir():
        return "plain", root
    raise InputError(
        "no data set found: expected the MosMedData layout (studies/CT-0 .. CT-4/*.nii.gz) or "
        "a folder with healthy/ and covid/ subfolders of NIfTI volumes",
        root,
    )


def slice_count(path: str | Path) -> int:
    """Number of axial slices of a NIfTI file, from its header only.

    The slice axis is the file axis closest to the patient's superior-inferior direction.

    Raises:
        InputError: the header cannot be read or the image is not 3D.
    """
    import nibabel as nib
    import numpy as np
    from nibabel.orientations import io_orientation

    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = img.shape
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a broken header
        raise InputError(f"cannot read the NIfTI header ({exc})", path) from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"expected a 3D volume, got shape {tuple(shape)}", path)
    from CovidGANSegLib.nifti import check_affine

    check_affine(affine, path)  # non-finite, singular or implausible: io_orientation would fail or mislead
    ornt = io_orientation(affine)
    slice_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return int(shape[slice_axis])


def discover_studies(root: str | Path, *, min_slices: int = 32) -> list[Study]:
    """All studies under ``root`` in a deterministic order (healthy first, then COVID, by name).

    Volumes with fewer than ``min_slices`` slices are skipped with a logged warning (only the
    header is read).

    Raises:
        InputError: ``root`` is missing, has neither layout, a header is unreadable, or two
            studies share an id.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("data folder not found" if not root.exists() else "not a folder", root)
    if min_slices < 1:
        raise ValueError(f"min_slices must be >= 1, got {min_slices}")
    layout, base = _layout(root)
    groups: list[tuple[Path, str | None, bool]]
    if layout == "mosmed":
        groups = [(base / c, c, c != "CT-0") for c in CATEGORIES]
    else:
        groups = [(base / "healthy", None, False), (base / "covid", None, True)]
    studies: list[Study] = []
    for folder, category, covid in groups:
        if not folder.is_dir():
            continue
        for path in _nifti_files(folder):
            n = slice_count(path)
            if n < min_slices:
                log.warning("skipping %s: %d slices, fewer than the %d required", path, n, min_slices)
                continue
            studies.append(Study(id=study_id(path), path=path, category=category, covid=covid))
    seen: dict[str, Path] = {}
    for s in studies:
        if s.id in seen:
            raise InputError(f"study id {s.id!r} appears twice (also {seen[s.id]}); rename one", s.path)
        seen[s.id] = s.path
    studies.sort(key=lambda s: (s.covid, s.category or "", s.id))
    log.info("found %d healthy and %d COVID studies in %s", sum(not s.covid for s in studies),
             sum(s.covid for s in studies), root)
    return studies


def lesion_mask_path(root: str | Path, study_id: str) -> Path | None:
    """The lesion mask of a study (``ROOT/masks/<id>_mask.nii.gz``), or None if there is none.

    EVALUATION ONLY: training, pseudo-mask and preprocessing code must never call this.
    """
    root = Path(root)
    candidates = [root / "masks", root.parent / "masks"] if root.name == "studies" else [root / "masks"]
    for folder in candidates:
        for suffix in _SUFFIXES:
            path = folder / f"{study_id}_mask{suffix}"
            if path.is_file():
                return path
    return None
