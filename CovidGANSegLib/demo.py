"""The end-to-end demo on the embedded default: the synthetic phantom cohort, offline, on CPU.

Steps (each logged with progress): generate a training cohort (healthy CT-0 and COVID CT-1..4;
its lesion masks are never read) and a held-out COVID cohort whose masks are used only for
evaluation; train the 3D GAN; make pseudo-masks; train TransUNet and the U-Net baseline on the
pseudo-masks; segment the held-out studies on their own grid; score TransUNet, U-Net and the
HU-threshold baseline against the held-out masks; write ``report.md`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CovidGANSegLib import progress
from CovidGANSegLib.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run. ``quick`` fits in 10 minutes on 2 CPU cores."""

    train_healthy: int
    train_covid: int
    test_covid: int
    phantom_size: str
    grid: tuple[int, int, int]
    gan_config: str
    gan_iterations: int
    seg_config: str
    seg_iterations: int
    seed: int = 2026


QUICK = DemoPlan(train_healthy=10, train_covid=16, test_covid=8, phantom_size="small", grid=(64, 64, 16),
                 gan_config="quick", gan_iterations=300, seg_config="tiny", seg_iterations=400)
FULL = DemoPlan(train_healthy=24, train_covid=40, test_covid=16, phantom_size="small", grid=(128, 128, 32),
                gan_config="quick", gan_iterations=1500, seg_config="small", seg_iterations=1500)

METHODS = ("transunet", "unet", "hu_threshold")


def run_demo(out: Path, *, quick: bool = False, device: str = "cpu", plan: DemoPlan | None = None) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; return the ``metrics.json`` content."""
    raise NotImplementedError  # filled in once the pipeline pieces land
