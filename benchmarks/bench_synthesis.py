"""Speed of the synthetic-data code the GAN and the segmenters call every iteration (CPU, one process).

* ``fractal_noise_3d`` of a 32 x 128 x 128 volume (periods (2, 4, 4), 4 octaves): target 0.1 s;
* ``synthesize_lesions`` on a batch of 8 windowed 32 x 128 x 128 volumes with two ellipsoid lungs,
  as in one GAN iteration: target 0.5 s.

Each figure is the best of ``--repeats`` timed runs after one warm-up call, with the torch-free
numpy / scipy code on whatever threads the BLAS gives it. These were timed unit tests until a slower
CPU (first-generation EPYC) took 0.59 s for the batch; speed is checked here, not in the test suite.

    python benchmarks/bench_synthesis.py

Prints the figures and saves ``benchmarks/results/synthesis_<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info, save_result  # noqa: E402

SPACING_DHW = (8.0, 2.0, 2.0)
WINDOW = (-1000.0, 400.0)
TARGETS_S = {"fractal_noise_32x128x128_s": 0.1, "lesion_batch_8x32x128x128_s": 0.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the best counts)")
    args = ap.parse_args(argv)

    import numpy as np

    from CovidGANSegLib.synth.lesions import synthesize_lesions
    from CovidGANSegLib.synth.perlin import fractal_noise_3d

    rng = np.random.default_rng(0)
    d, h, w = 32, 128, 128
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")  # (D, H, W)
    lung = (((x - 40) / 28) ** 2 + ((y - 64) / 50) ** 2 + ((z - 16) / 14) ** 2 < 1) | (
        ((x - 88) / 28) ** 2 + ((y - 64) / 50) ** 2 + ((z - 16) / 14) ** 2 < 1)
    image = np.where(lung, 0.11, 0.74).astype(np.float32)  # lung and soft tissue, windowed to [0, 1]

    def noise() -> None:
        fractal_noise_3d((d, h, w), (2, 4, 4), octaves=4, rng=rng)

    def batch() -> None:
        for _ in range(8):
            synthesize_lesions(image, lung, rng, window=WINDOW, spacing=SPACING_DHW)

    figures = {"fractal_noise_32x128x128_s": _best(noise, args.repeats), "lesion_batch_8x32x128x128_s": _best(batch, args.repeats)}
    result: dict[str, Any] = {"machine": machine_info(), "repeats": args.repeats, "targets_s": TARGETS_S,
                              **{k: round(v, 4) for k, v in figures.items()}}
    for key, value in figures.items():
        print(f"{key}: {value:.3f} s (target {TARGETS_S[key]} s{'' if value <= TARGETS_S[key] else ', MISSED'})")
    save_result("synthesis", result)
    return 0


def _best(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    sys.exit(main())
