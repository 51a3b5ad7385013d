"""NIfTI CT I/O that keeps the affine and spacing, with input checks and an exact way back.

Volumes are reoriented to the closest canonical orientation (RAS+) for processing; outputs are
written back on the input file's own voxel grid (same shape, same affine) so they overlay it.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from CovidGANSegLib.atomic import atomic_path
from CovidGANSegLib.errors import InputError

log = logging.getLogger(__name__)

#: A CT in HU has air near -1000 HU; anything whose minimum is above this is not HU.
_HU_MIN_BELOW = -500.0
#: ...and a real CT spans well over this range (air to soft tissue at least).
_HU_MIN_RANGE = 600.0

#: Plausible CT voxel sizes in mm (each axis). Clinical reconstructions range from about 0.15 mm
#: in-plane (ultra-high-resolution scanners, small field of view) to 10 mm slices (MosMedData: 8 mm);
#: the bounds leave a margin of 3x below and 2x above. Outside them a header is broken, and the
#: volume maths would be absurd (1e4 mm voxels: 1e12 mL of lung) or the lung-mask working grid
#: explode (1e-4 mm voxels: a 2 mm working grid 20,000 times the image in each in-plane axis).
SPACING_RANGE_MM = (0.05, 20.0)
#: Largest image accepted, in voxels: 2**30 (e.g. 1024 x 1024 x 1024; 4 GiB as float32, which the
#: pipeline holds a few times). A clinical chest CT has 512 x 512 x 30..1000 = 8..260 M voxels.
#: Checked from the header before the data are read or decompressed.
MAX_VOXELS = 2**30
#: Largest header + extensions before the image data (a header's vox_offset), bytes.
_MAX_DATA_OFFSET = 64 * 2**20
#: Most bytes accepted after the image data in a .nii.gz (they are read only to check the gzip CRC).
_MAX_TRAILING_BYTES = 64 * 2**20


@dataclass
class CTVolume:
    """A CT volume in HU, reoriented to canonical RAS+ and indexed ``(x, y, z)``.

    Attributes:
        array: float32 HU values, canonical orientation.
        affine: voxel-to-world (RAS mm) affine of ``array``.
        path: the file it came from (None for in-memory volumes).
        original_affine: the file's own affine.
        original_shape: the file's own 3D shape.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical ``(x, y, z)`` axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def voxel_volume_ml(self) -> float:
        sx, sy, sz = self.spacing
        return sx * sy * sz / 1000.0

    def to_original(self, canonical: np.ndarray) -> np.ndarray:
        """Map an array on the canonical grid back to the file's own voxel order (exact)."""
        if canonical.shape[:3] != self.array.shape:
            raise ValueError(f"array shape {canonical.shape} does not match the canonical grid {self.array.shape}")
        back = ornt_transform(io_orientation(self.affine), io_orientation(self.original_affine))
        return apply_orientation(canonical, back)

    @classmethod
    def from_array(cls, array_xyz: np.ndarray, affine: np.ndarray, path: str | Path | None = None) -> "CTVolume":
        """Wrap an HU array in the file's own orientation (as nibabel reads it) and canonicalise."""
        return _canonicalise(np.asarray(array_xyz, dtype=np.float32), np.asarray(affine, dtype=np.float64), path)


def _canonicalise(data: np.ndarray, affine: np.ndarray, path: str | Path | None) -> CTVolume:
    ornt = io_orientation(affine)
    canonical = apply_orientation(data, ornt)
    canonical_affine = affine @ inv_ornt_aff(ornt, data.shape)
    return CTVolume(
        array=np.ascontiguousarray(canonical, dtype=np.float32),
        affine=canonical_affine,
        path=None if path is None else Path(path),
        original_affine=affine.copy(),
        original_shape=tuple(int(s) for s in data.shape),
    )


_GZIP_MAGIC = b"\x1f\x8b"


def _bytes_needed(head: bytes, path: Path) -> int | None:
    """Bytes of header, extensions and image data that the header at the start of ``head`` declares.

    None when ``head`` is not a NIfTI header (the caller's parser then says what is wrong).

    Raises:
        InputError: the declared image is larger than :data:`MAX_VOXELS` or its data offset is
            implausible (a header-driven memory bomb), checked before anything large is read.
    """
    if len(head) < 348:
        return None
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    klass = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes and len(head) >= 540 else None
    if klass is None:
        return None
    try:
        header = klass.from_fileobj(io.BytesIO(head[: klass.template_dtype.itemsize]), check=False)
        ndim = int(header["dim"][0])
        if not 1 <= ndim <= 7:
            return None
        shape = [int(d) for d in header["dim"][1 : 1 + ndim]]
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header["vox_offset"])
    except Exception:  # nibabel raises many types for a broken header; the full parser reports it
        return None
    if any(d < 0 for d in shape):
        raise InputError(f"the header declares a negative image size {tuple(shape)}", path)
    voxels = 1
    for d in shape:
        voxels *= max(d, 1)
    if voxels > MAX_VOXELS:
        raise InputError(
            f"the header declares an image of {tuple(shape)} = {voxels:,} voxels, more than the {MAX_VOXELS:,} "
            f"this tool handles (about {MAX_VOXELS * 4 / 2**30:.0f} GiB as float32); the header is broken or the "
            "image must be split or downsampled first",
            path,
        )
    if offset > _MAX_DATA_OFFSET:
        raise InputError(f"the header declares the image data at byte {offset:,}, which is implausible", path)
    header_end = klass.template_dtype.itemsize + 4  # the header and its 4-byte extension flag
    return max(offset, header_end) + voxels * itemsize


def _read_bytes(path: Path) -> bytes:
    """The file's NIfTI bytes, read only after the header's image size passed the voxel budget.

    gzip files are decompressed to their end so that truncation and corruption are detected (CRC
    and length check at the end of the stream); bytes after the image are only counted.
    """
    with open(path, "rb") as fh:
        magic = fh.read(2)
    gz = magic == _GZIP_MAGIC or path.name.endswith(".gz")
    opener = gzip.open if gz else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
        needed = _bytes_needed(head, path)
        if needed is None:
            return head + (fh.read(4096) if len(head) == 540 else b"")
        parts = [head]
        if needed > len(head):
            parts.append(fh.read(needed - len(head)))
        elif needed < len(head):
            parts = [head[:needed]]
        if gz:
            trailing = 0
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                trailing += len(block)
                if trailing > _MAX_TRAILING_BYTES:
                    raise InputError(f"more than {_MAX_TRAILING_BYTES:,} bytes of unexpected data after the image", path)
    return b"".join(parts)


def _image_from_bytes(raw: bytes, path: Path) -> nib.Nifti1Image:
    if len(raw) < 348:
        raise InputError(f"not a NIfTI image (only {len(raw)} bytes)", path)
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    klass = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
    if klass is None:
        raise InputError("not a NIfTI image (unknown header size)", path)
    header = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
    if header.get("magic", b"").tobytes().rstrip(b"\x00") not in (b"n+1", b"n+2"):
        raise InputError("not a single-file NIfTI image (.nii / .nii.gz)", path)
    _check_raw_pixdim(header, path)
    return klass.from_bytes(raw)


def _check_raw_pixdim(header: nib.Nifti1Header, path: Path) -> None:
    """Refuse zero / negative / non-finite voxel sizes in the header when the affine uses them.

    nibabel silently replaces them (0 -> 1 mm, negative -> absolute value), which would give a
    wrong geometry; with an sform the pixdim values are not used and only a warning is logged.
    """
    ndim = int(header["dim"][0])
    pixdim = np.asarray(header["pixdim"][1 : 1 + min(3, max(ndim, 1))], dtype=np.float64)
    if np.all(np.isfinite(pixdim)) and np.all(pixdim > 0):
        return
    text = ", ".join(f"{v:g}" for v in pixdim)
    if int(header["sform_code"]) > 0:
        log.warning("%s: header voxel sizes (pixdim %s) are not positive; using the sform", path, text)
        return
    raise InputError(f"voxel spacing must be positive, got pixdim {text} mm", path)


def _read_image(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    if not path.exists():
        raise InputError("file not found", path)
    if not path.is_file():
        raise InputError("not a file", path)
    try:
        raw = _read_bytes(path)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(f"corrupt or truncated gzip data ({exc})", path) from exc
    except OSError as exc:
        raise InputError(f"unreadable file ({exc})", path) from exc
    try:
        img = _image_from_bytes(raw, path)
        del raw
        data = np.asarray(img.dataobj, dtype=np.float32)  # scl_slope / scl_inter applied, in float32
    except InputError:
        raise
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(f"not a readable NIfTI image ({exc})", path) from exc
    except (OSError, ValueError, TypeError, EOFError, nib.spatialimages.HeaderDataError) as exc:
        raise InputError(f"unreadable or truncated image file ({exc})", path) from exc
    return img, data


def check_affine(affine: np.ndarray, path: str | Path | None) -> None:
    """Refuse affines that cannot place a CT in space.

    Refused: non-finite entries; zero / negative voxel spacing; a singular (or nearly singular)
    matrix, i.e. voxel axes that are parallel; voxel spacing outside :data:`SPACING_RANGE_MM`.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError("affine has non-finite entries", path)
    matrix = affine[:3, :3]
    spacing = np.sqrt((matrix**2).sum(axis=0))
    text = ", ".join(f"{v:.4g}" for v in spacing)
    if np.any(spacing <= 1e-6):
        raise InputError(f"voxel spacing must be positive, got {text} mm", path)
    # |det| / product of the axis lengths: 1 for orthogonal axes, 0 when two axes are parallel
    independence = abs(float(np.linalg.det(matrix))) / float(np.prod(spacing))
    if not independence > 1e-3:
        raise InputError(
            "affine is singular: two or more voxel axes point the same way (|det| / product of spacings = "
            f"{independence:.2g}), so the image cannot be placed in space; the header's sform / qform is broken",
            path,
        )
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise InputError(
            f"voxel spacing {text} mm is implausible for a CT (each must be within {lo:g}..{hi:g} mm); "
            "the header's pixdim / affine is broken",
            path,
        )


def check_hu(array: np.ndarray, path: str | Path | None) -> None:
    """Refuse arrays that are not a CT in Hounsfield units (non-finite, already scaled) or are blank.

    A uniform image, or one with nothing denser than lung, has values that may well be HU; it is
    refused as having no lungs (with its value range) rather than as "not Hounsfield units".
    """
    if not np.all(np.isfinite(array)):
        n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{n} voxels are NaN or infinite", path)
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise InputError(f"no lungs found: the image is blank (every voxel is {lo:.6g})", path)
    if lo <= _HU_MIN_BELOW and hi - lo < _HU_MIN_RANGE:
        raise InputError(
            f"no lungs found: intensities range {lo:.4g}..{hi:.4g} HU, air without any body tissue around it", path
        )
    if lo > _HU_MIN_BELOW:
        raise InputError(
            f"intensities range {lo:.4g}..{hi:.4g}, which is not Hounsfield units "
            "(expected air near -1000 HU; is the image already scaled to 0..1 or 0..255?)",
            path,
        )


def load_ct(path: str | Path, *, min_slices: int = 1) -> CTVolume:
    """Read a CT NIfTI file in HU, check it, and reorient it to canonical RAS+.

    Raises:
        InputError: missing or unreadable file, corrupt gzip, not 3D, non-finite values,
            intensities that are not HU, zero or negative spacing, fewer than ``min_slices``.
    """
    path = Path(path)
    img, raw = _read_image(path)
    data = raw
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3D volume, got shape {data.shape}", path)
    if min(data.shape) < 2:
        raise InputError(f"expected a 3D volume, got shape {data.shape} (a single slice or line)", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    check_hu(data, path)
    ct = _canonicalise(data, affine, path)
    if ct.shape[2] < min_slices:
        raise InputError(f"{ct.shape[2]} slices, fewer than the {min_slices} required", path)
    return ct


def read_canonical(path: str | Path, *, what: str = "volume") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read any 3D NIfTI image (mask, prediction, map), checked and reoriented to canonical RAS+.

    Returns ``(canonical float32 array (x, y, z), its affine, the file's own affine)``.

    Raises:
        InputError: missing, unreadable or corrupt file, not 3D, invalid affine.
    """
    path = Path(path)
    img, data = _read_image(path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3D {what}, got shape {data.shape}", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    ornt = io_orientation(affine)
    canonical = np.ascontiguousarray(apply_orientation(data, ornt))
    return canonical, affine @ inv_ornt_aff(ornt, data.shape), affine


def load_mask(path: str | Path, reference: CTVolume | None = None) -> np.ndarray:
    """Read a binary / label mask as bool, canonical orientation, checked against ``reference``."""
    path = Path(path)
    canonical, canon_affine, _ = read_canonical(path, what="mask")
    mask = canonical > 0
    if reference is not None:
        if mask.shape != reference.shape or not np.allclose(canon_affine, reference.affine, atol=1e-3):
            raise InputError(
                f"mask grid {mask.shape} does not match the CT grid {reference.shape} "
                f"({reference.path}); resample it first",
                path,
            )
    return mask


def save_like(canonical: np.ndarray, reference: CTVolume, path: str | Path, *, dtype: str | np.dtype = np.float32) -> Path:
    """Write an array on ``reference``'s canonical grid to ``path`` on the reference file's own grid.

    The output has the reference file's shape and affine, so it overlays the input exactly. The
    write is atomic: nothing is left at ``path`` if it fails.
    """
    path = Path(path)
    data = reference.to_original(np.asarray(canonical)).astype(dtype, copy=False)
    img = nib.Nifti1Image(data, reference.original_affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(reference.original_affine, code=1)
    img.set_sform(reference.original_affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_array(array: np.ndarray, affine: np.ndarray, path: str | Path, *, dtype: str | np.dtype = np.float32) -> Path:
    """Write an array in its own voxel order with ``affine`` (atomic)."""
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
