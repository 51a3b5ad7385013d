"""Pseudo-healthy CT and difference maps from a trained generator (paper eqs. 1 and 3), in HU.

``pseudo_healthy`` preprocesses a CT with the checkpoint's own ``PreprocessConfig`` (same grid and
HU window as in training), runs G on the model grid and brings the result back to the CT's own
grid:

* G removes ``r = I_C - G(I_C)`` (window units, model grid). ``r`` is mapped back to the
  canonical grid with ``GridMapping.to_canonical`` (trilinear; zero outside the model's crop) and
  converted to HU by the window's width, ``R = r * (high - low)``.
* pseudo-healthy HU = input HU outside the lung mask (bit-identical), and ``input - R`` inside it.
  Subtracting the correction (instead of pasting G's low-resolution output) keeps the input's full
  resolution wherever G changed nothing, and the result is continuous.
* The HU window clips: G saw every voxel below ``low`` as ``low`` and above ``high`` as ``high``.
  Voxels below the window (air) have ``I_C = 0``, so the residual G cannot change them and they
  stay as they are. Where the trilinear correction would push lung below the window's lower end
  (next to a lesion), the pseudo-healthy value is limited to ``min(input, low)``: G never claims
  tissue less dense than air. Voxels above the window (e.g. calcifications) get the same HU
  correction as their clipped value: G's estimate of the density to remove.
* difference (eq. 3) = input - pseudo-healthy, in HU, exactly (computed after the limits above).
  With the residual generator it is >= 0. A ``direct`` generator can also *add* density; those
  negative differences are kept as they are (never clamped silently) and mean "G brightened".

Integral inputs (the usual int16 CT) give integral outputs: the correction is rounded to whole HU,
and files are written as int16, so the pseudo-healthy equals the input exactly outside the lungs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from CovidGANSegLib import progress
from CovidGANSegLib.checkpoints import load_checkpoint
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError
from CovidGANSegLib.gan import GAN_ARCH
from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, GANConfig, resolve_device

log = logging.getLogger(__name__)


@dataclass
class PseudoHealthyResult:
    """Output of :func:`pseudo_healthy`.

    Attributes:
        pseudo_healthy_hu: (x, y, z) canonical grid, HU, float32.
        difference_hu: (x, y, z), input minus pseudo-healthy (eq. 3), HU, float32.
        lung_mask: (x, y, z) bool, the lung mask used.
        preprocessed: the model-grid input (``preprocessing.PreprocessedVolume``).
        generated: (D, H, W) float32 in [0, 1], G's pseudo-healthy volume on the model grid.
    """

    pseudo_healthy_hu: np.ndarray
    difference_hu: np.ndarray
    lung_mask: np.ndarray
    preprocessed: Any
    generated: np.ndarray

    @property
    def difference_model(self) -> np.ndarray:
        """(D, H, W) eq. 3 on the model grid, window units."""
        return self.preprocessed.image - self.generated


def load_generator(checkpoint: str | Path, device: str = "cpu") -> tuple[DenseUNetGenerator3D, dict[str, Any]]:
    """Load G from a GAN checkpoint (``model.pt`` or a training ``last.pt``), in eval mode.

    Returns ``(generator, payload)``; ``payload["preprocess"]`` is the training preprocessing and
    ``payload["metadata"]`` what the run recorded.

    Raises:
        CheckpointError: missing, corrupt, truncated or foreign file, a segmenter checkpoint,
            another architecture, or weights that do not fit the stored configuration.
    """
    path = Path(checkpoint)
    payload = load_checkpoint(path, kind="gan", arch=GAN_ARCH, map_location="cpu")
    if "generator" not in payload or not isinstance(payload["generator"], dict):
        raise CheckpointError("GAN checkpoint without generator weights", path)
    try:
        config = GANConfig.from_dict(payload["config"])
        PreprocessConfig.from_dict(payload["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"GAN checkpoint with an invalid configuration ({exc})", path) from exc
    generator = DenseUNetGenerator3D(config)
    try:
        generator.load_state_dict(payload["generator"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"generator weights do not match the stored configuration ({first})", path) from exc
    generator.to(resolve_device(device)).eval()
    return generator, payload


def preprocess_config_of(payload: dict[str, Any]) -> PreprocessConfig:
    """The PreprocessConfig a checkpoint was trained with."""
    return PreprocessConfig.from_dict(payload["preprocess"])


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def run_generator(generator: DenseUNetGenerator3D, images: np.ndarray, lungs: np.ndarray, *, batch: int = 1) -> np.ndarray:
    """G(I) for model-grid volumes ``(N, D, H, W)`` in [0, 1] with their lung masks; float32 out."""
    if images.ndim != 4 or lungs.shape != images.shape:
        raise ValueError(f"images and lungs must be (N, D, H, W) arrays of one shape, got {images.shape} and {lungs.shape}")
    generator.eval()
    device = _device_of(generator)
    out = np.empty(images.shape, dtype=np.float32)
    use_amp = device.type == "cuda" and generator.config.amp
    dtype = torch.float16 if generator.config.amp_dtype == "float16" else torch.bfloat16
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch], dtype=np.float32))[:, None].to(device)  # (B, 1, D, H, W)
        m = torch.from_numpy(np.ascontiguousarray(lungs[s:s + batch], dtype=bool))[:, None].to(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            y = generator(x, m)
        out[s:s + batch] = y.float()[:, 0].cpu().numpy()
    return out


def pseudo_healthy(generator: DenseUNetGenerator3D, ct, preprocess: PreprocessConfig, *, lung_mask: np.ndarray | None = None,
                   device: str | None = None) -> PseudoHealthyResult:
    """Pseudo-healthy CT (HU, canonical grid) and difference map for one ``nifti.CTVolume``.

    Args:
        generator: from :func:`load_generator`.
        ct: the CT (``nifti.CTVolume``).
        preprocess: the checkpoint's preprocessing (``payload["preprocess"]``).
        lung_mask: canonical (x, y, z) bool lung mask; computed when None.
        device: move G there first (default: where G already is).

    See the module docstring for how the result is composed.
    """
    from CovidGANSegLib.preprocessing import preprocess_ct

    if device is not None:
        generator.to(resolve_device(device))
    pv = preprocess_ct(ct, preprocess, lung_mask=lung_mask)
    generated = run_generator(generator, pv.image[None], pv.lung_mask[None])[0]  # (D, H, W)
    lung_c = lung_mask if lung_mask is not None else getattr(pv, "lung_mask_canonical", None)
    if lung_c is None:
        lung_c = pv.mapping.to_canonical(pv.lung_mask.astype(np.float32), order=0) > 0.5
    lung_c = np.asarray(lung_c, dtype=bool)
    ph, diff = compose_pseudo_healthy(ct.array, pv.image - generated, pv.mapping, lung_c, preprocess.hu_window)
    return PseudoHealthyResult(pseudo_healthy_hu=ph, difference_hu=diff, lung_mask=lung_c, preprocessed=pv, generated=generated)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box of a 3D bool mask as slices (None when empty); uses axis projections only."""
    box = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def model_to_canonical_box(model: np.ndarray, mapping, box: tuple[slice, slice, slice]) -> torch.Tensor:
    """Trilinear resampling of a model-grid ``(D, H, W)`` array onto a canonical box ``(x, y, z)``.

    Same geometry and interpolation as ``GridMapping.to_canonical(order=1)`` (edge values extended,
    as scipy's ``mode="nearest"``), computed separably with torch (multi-threaded) on the box only,
    and without its anti-aliasing filter (a no-op unless the model grid is finer than the CT).
    Returns a float32 tensor of the box's shape.
    """
    t = torch.from_numpy(np.ascontiguousarray(model, dtype=np.float32))  # (D, H, W)
    # canonical axis (x, y, z) -> model tensor axis (W=2, H=1, D=0); resample the smallest output first
    for canon_axis, dim in ((2, 0), (1, 1), (0, 2)):
        sl = box[canon_axis]
        coords = (np.arange(sl.start, sl.stop, dtype=np.float64) - mapping.origin[canon_axis]) / mapping.step[canon_axis]
        n = t.shape[dim]
        coords = np.clip(coords, 0.0, n - 1)
        i0 = np.floor(coords).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        w = torch.from_numpy((coords - i0).astype(np.float32))
        shape = [1, 1, 1]
        shape[dim] = -1
        a = t.index_select(dim, torch.from_numpy(i0))
        b = t.index_select(dim, torch.from_numpy(i1))
        t = torch.lerp(a, b, w.view(shape))
    return t.permute(2, 1, 0)  # (z, y, x) -> (x, y, z)


def compose_pseudo_healthy(hu: np.ndarray, removed_model: np.ndarray, mapping, lung: np.ndarray, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-healthy and difference in HU on the canonical grid (see the module docstring).

    Args:
        hu: (x, y, z) input HU.
        removed_model: (D, H, W) ``I_C - G(I_C)`` on the model grid, window units.
        mapping: the volume's ``GridMapping``.
        lung: (x, y, z) bool lung mask.
        window: the HU window (low, high).

    Returns:
        ``(pseudo_healthy, difference)``, float32 (x, y, z); both equal the input / zero outside
        the lung mask.
    """
    lo, hi = float(window[0]), float(window[1])
    hu = np.asarray(hu, dtype=np.float32)
    ph = hu.copy()
    diff = np.zeros_like(hu)
    box = _bounding_box(np.asarray(lung, dtype=bool))
    if box is None:
        return ph, diff
    with torch.inference_mode():
        hb = torch.from_numpy(np.ascontiguousarray(hu[box]))
        lb = torch.from_numpy(np.ascontiguousarray(lung[box], dtype=bool))
        corr = model_to_canonical_box(removed_model, mapping, box).contiguous()
        corr.mul_(hi - lo)  # window units -> HU removed by G
        if bool(torch.equal(hb, torch.round(hb))):
            corr.round_()  # integral input -> integral output
        new = hb - corr
        # never below air / above the window unless the input already was
        new = torch.maximum(new, torch.clamp(hb, max=lo))
        new = torch.minimum(new, torch.clamp(hb, min=hi))
        new = torch.where(lb, new, hb)
        ph[box] = new.numpy()
        diff[box] = (hb - new).numpy()  # eq. 3, exactly input - pseudo-healthy
    return ph, diff


def _check_nifti_name(path: Path) -> None:
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InputError("output must be a NIfTI file name ending in .nii or .nii.gz", path)


def pseudo_healthy_file(checkpoint: str | Path, input: str | Path, output: str | Path, *, difference: str | Path | None = None,
                        device: str = "auto", lungs: str | Path | None = None) -> None:
    """File to file: pseudo-healthy CT (and optionally the difference map) in HU.

    Both outputs have the input file's shape and affine, so they overlay it exactly; integral
    inputs give int16 files. Writes are atomic and happen together at the end: on any failure
    nothing is written.

    Args:
        checkpoint: GAN checkpoint (``model.pt``).
        input: CT NIfTI in HU.
        output: pseudo-healthy NIfTI to write.
        difference: difference-map NIfTI to write (eq. 3, input minus pseudo-healthy).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        lungs: optional lung mask NIfTI on the input's grid (else computed).

    Raises:
        InputError / CheckpointError: unreadable input, bad checkpoint, output name or clash.
    """
    from CovidGANSegLib.atomic import atomic_path
    from CovidGANSegLib.nifti import load_ct, load_mask, save_like

    input, output = Path(input), Path(output)
    outputs = [output] + ([Path(difference)] if difference is not None else [])
    for o in outputs:
        _check_nifti_name(o)
        if o.resolve() == input.resolve():
            raise InputError("output would overwrite the input CT; choose another file name", o)
    if len({o.resolve() for o in outputs}) != len(outputs):
        raise InputError("--output and --difference must be different files", outputs[-1])
    progress.report(0.0, "loading model")
    generator, payload = load_generator(checkpoint, device)
    preprocess = preprocess_config_of(payload)
    progress.report(0.1, "reading CT")
    ct = load_ct(input)
    lung_mask = load_mask(lungs, ct) if lungs is not None else None
    progress.report(0.2, "preprocessing and synthesising pseudo-healthy CT")
    result = pseudo_healthy(generator, ct, preprocess, lung_mask=lung_mask)
    integral = bool(np.all(result.pseudo_healthy_hu == np.rint(result.pseudo_healthy_hu)))
    lim = np.iinfo(np.int16)
    if integral and (result.pseudo_healthy_hu.min() < lim.min or result.pseudo_healthy_hu.max() > lim.max or
                     result.difference_hu.min() < lim.min or result.difference_hu.max() > lim.max):
        integral = False
    dtype = np.int16 if integral else np.float32
    progress.report(0.8, "writing outputs")
    with atomic_path(output) as tmp_out:
        if difference is not None:
            with atomic_path(difference) as tmp_diff:
                save_like(result.pseudo_healthy_hu, ct, tmp_out, dtype=dtype)
                save_like(result.difference_hu, ct, tmp_diff, dtype=dtype)
        else:
            save_like(result.pseudo_healthy_hu, ct, tmp_out, dtype=dtype)
    progress.report(1.0, "done")
    log.info("wrote %s%s", output, f" and {difference}" if difference is not None else "")
