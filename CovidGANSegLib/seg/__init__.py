"""2D lesion segmenters trained on GAN pseudo-masks (paper section 3.3), and their baselines.

Modules:

* ``transunet`` - TransUNet 2D (CNN encoder + ViT on its 1/16 feature map + U-Net decoder),
  ``SegConfig`` and the ``SEG_CONFIGS`` (``paper``, ``small``, ``tiny``).
* ``unet`` - the predecessor's 2D U-Net baseline with the same interface.
* ``augmentation`` - training-time augmentation of slice batches (``light``, ``strong``).
* ``losses`` - enhanced contrastive loss (eq. 4), sensitivity-enhanced loss (eq. 5), MSE.
* ``training`` - two-phase training on a pseudo-masks folder (``train_segmenter``).
* ``inference`` - ``segment_ct`` / ``segment_file``: a CT file in, a lesion mask on its grid out.
* ``postprocess`` - the rules that turn detections into the lesion mask on the CT's own grid, and
  the rules alone (numpy only).
* ``hu_threshold`` - the HU-threshold baseline of Slicer's Lung CT Analyzer (numpy only).
* ``figures`` - loss curves and sample segmentations (matplotlib Agg, imported lazily).

This ``__init__`` imports nothing heavy, so ``CovidGANSegLib.seg.hu_threshold`` and ``seg.postprocess``
stay torch-free.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: architectures a segmenter checkpoint may hold
ARCHS = ("transunet", "unet")


def check_device(device: str) -> str:
    """Raise ``ValueError`` unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no torch import)."""
    from CovidGANSegLib import protocol

    return protocol.check_device(device)


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|cuda`` (or ``cuda:N``) to a usable torch device string (:mod:`CovidGANSegLib.protocol`'s policy).

    ``auto`` picks CUDA when available, else the CPU; an explicit ``cuda`` without CUDA raises
    :class:`~CovidGANSegLib.protocol.CudaMissingError` (a ``ValueError``).
    """
    import torch

    from CovidGANSegLib import protocol

    return protocol.resolve_device(device, torch.cuda.is_available)


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX tiles)? Where it does not,
    bfloat16 autocast is emulated and slower than float32."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:  # pragma: no cover - a torch build without the CPU capability queries
        return False
