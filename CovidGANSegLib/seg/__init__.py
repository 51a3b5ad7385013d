"""2D lesion segmenters trained on GAN pseudo-masks (paper section 3.3), and their baselines.

Modules:

* ``transunet`` - TransUNet 2D (CNN encoder + ViT on its 1/16 feature map + U-Net decoder),
  ``SegConfig`` and the ``SEG_CONFIGS`` (``paper``, ``small``, ``tiny``).
* ``unet`` - the predecessor's 2D U-Net baseline with the same interface.
* ``losses`` - enhanced contrastive loss (eq. 4), sensitivity-enhanced loss (eq. 5), MSE.
* ``training`` - two-phase training on a pseudo-masks folder (``train_segmenter``).
* ``inference`` - ``segment_ct`` / ``segment_file``: a CT file in, a lesion mask on its grid out.
* ``hu_threshold`` - the HU-threshold baseline of Slicer's Lung CT Analyzer (numpy only).
* ``figures`` - loss curves and sample segmentations (matplotlib Agg, imported lazily).

This ``__init__`` imports nothing heavy, so ``CovidGANSegLib.seg.hu_threshold`` stays torch-free.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: architectures a segmenter checkpoint may hold
ARCHS = ("transunet", "unet")


def check_device(device: str) -> str:
    """Raise ``ValueError`` unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no torch import)."""
    if not isinstance(device, str) or (device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|cuda`` (or ``cuda:N``) to a usable torch device string.

    ``auto`` picks CUDA when available, else the CPU. An explicit ``cuda`` request on a machine
    without CUDA falls back to the CPU with a logged warning instead of failing.
    """
    import torch

    check_device(device)
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device != "auto":
        log.warning("CUDA was requested but is not available here; falling back to the CPU")
    return "cpu"
