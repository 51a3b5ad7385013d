"""Benchmark: preprocessing time and peak memory for a MosMed-size CT, and phantom generation time.

For a 512 x 512 x 40 volume at 0.7 x 0.7 x 8 mm (a ``mosmed`` phantom, or a synthetic chest if the
phantom generator is missing) it measures, each time in a fresh Python process that does only
this: reading the file (``nifti.load_ct``) plus ``preprocessing.preprocess_ct`` (lung mask, crop,
window, resampling), in seconds, and the process's peak resident memory (VmHWM, else ``ru_maxrss``;
the figure includes the interpreter and the imported libraries, shown separately as the baseline).
It also times phantom generation per study for each size. Targets: at most 2 s and 1.5 GB.

Usage: ``python benchmarks/bench_preprocess.py [--repeats 5] [--out benchmarks/results/preprocess.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import describe, machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (512, 512, 40)
SPACING = (0.7, 0.7, 8.0)
TARGET_S = 2.0
TARGET_MB = 1536.0


def _mosmed_volume(path: Path) -> str:
    """Write a 512 x 512 x 40, 0.7 x 0.7 x 8 mm chest CT (LAS, int16) and say where it came from."""
    from CovidGANSegLib.nifti import save_array

    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [SHAPE[0] * SPACING[0] / 2, -SHAPE[1] * SPACING[1] / 2, 0.0]
    try:
        from CovidGANSegLib.synth import phantoms
    except ImportError:
        phantoms = None
    if phantoms is not None:
        for seed in range(50):
            ph = phantoms.generate_phantom(np.random.default_rng([40, seed]), size="mosmed", covid=True, involvement=0.2)
            hu = ph.hu
            if hu.shape[:2] == SHAPE[:2] and hu.shape[2] >= SHAPE[2]:
                z0 = (hu.shape[2] - SHAPE[2]) // 2
                save_array(hu[:, :, z0: z0 + SHAPE[2]], affine, path, dtype=np.int16)
                return f"mosmed phantom (seed {seed}, central {SHAPE[2]} of {hu.shape[2]} slices, COVID 20 %)"
    # fallback: an elliptic chest with two lungs and noise
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(SHAPE[0]) * SPACING[0] - 180, np.arange(SHAPE[1]) * SPACING[1] - 180, indexing="ij")
    hu = np.full(SHAPE, -1000.0, np.float32)
    body = (x / 160) ** 2 + (y / 115) ** 2 < 1
    hu[body] = 40.0
    for cx in (-75.0, 75.0):
        hu[((x - cx) / 60) ** 2 + (y / 85) ** 2 < 1] = -850.0
    hu += rng.normal(0, 20, SHAPE).astype(np.float32)
    save_array(hu, affine, path, dtype=np.int16)
    return "synthetic elliptic chest (phantom generator not available)"


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    ``/proc/self/status`` VmHWM belongs to the process image and starts afresh at exec;
    ``ru_maxrss`` (the fallback) may carry over the parent's size at fork time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(path: str) -> None:
    """Run in a fresh process: import, then time load + preprocess; print one JSON line."""
    from CovidGANSegLib.nifti import load_ct
    from CovidGANSegLib.preprocessing import preprocess_ct

    base = _peak_rss_mb()
    t0 = time.perf_counter()
    ct = load_ct(path)
    t1 = time.perf_counter()
    vol = preprocess_ct(ct)
    t2 = time.perf_counter()
    peak = _peak_rss_mb()
    print(json.dumps({"load_s": t1 - t0, "preprocess_s": t2 - t1, "total_s": t2 - t0, "baseline_mb": base,
                      "peak_mb": peak, "shape": list(ct.shape), "grid": list(vol.image.shape),
                      "lung_ml": float(vol.lung_mask_canonical.sum()) * ct.voxel_volume_ml}))


def _phantom_times(repeats: int) -> dict:
    from CovidGANSegLib.synth import phantoms

    out = {}
    for size in phantoms.SIZES:
        times = []
        for i in range(repeats):
            for covid in (False, True):
                t = time.perf_counter()
                phantoms.generate_phantom(np.random.default_rng([41, i, covid]), size=size, covid=covid)
                times.append(time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            phantoms.write_cohort(Path(tmp) / "c", healthy=1, covid=1, seed=3, size=size)
            written = (time.perf_counter() - t) / 2
        out[size] = {"generate_s_median": float(np.median(times)), "generate_s_max": float(np.max(times)),
                     "generate_and_write_s_per_study": written, "n": len(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes for the preprocessing timing")
    parser.add_argument("--phantom-repeats", type=int, default=2, help="phantoms of each kind and size to time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    import scipy

    info = machine_info(numpy=np.__version__, scipy=scipy.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mosmed_size.nii.gz"
        source = _mosmed_volume(path)
        runs = []
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                                 check=True, cwd=ROOT)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        file_mb = path.stat().st_size / 2**20
    try:
        phantom = _phantom_times(args.phantom_repeats)
    except ImportError:
        phantom = None

    total = [r["total_s"] for r in runs]
    peak = max(r["peak_mb"] for r in runs)
    result = {
        "volume": {"shape": list(SHAPE), "spacing_mm": list(SPACING), "source": source, "file_mb": round(file_mb, 2)},
        "preprocess": {
            "load_s_median": float(np.median([r["load_s"] for r in runs])),
            "preprocess_s_median": float(np.median([r["preprocess_s"] for r in runs])),
            "total_s_median": float(np.median(total)),
            "total_s_max": float(np.max(total)),
            "peak_rss_mb": peak,
            "baseline_rss_mb": float(np.median([r["baseline_mb"] for r in runs])),
            "runs": runs,
        },
        "targets": {"total_s": TARGET_S, "peak_rss_mb": TARGET_MB,
                    "met": bool(np.max(total) <= TARGET_S and peak <= TARGET_MB)},
        "phantoms": phantom,
        "machine": info,
    }

    p = result["preprocess"]
    print(f"machine: {describe(info)}")
    print(f"volume: {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]}, {SPACING[0]} x {SPACING[1]} x {SPACING[2]} mm, {source}")
    print(f"{'step':<36}{'value':>12}{'target':>12}")
    print(f"{'read file (load_ct), median':<36}{p['load_s_median']:>10.2f} s")
    print(f"{'preprocess_ct, median':<36}{p['preprocess_s_median']:>10.2f} s")
    print(f"{'read + preprocess, median':<36}{p['total_s_median']:>10.2f} s")
    print(f"{'read + preprocess, worst of ' + str(len(runs)):<36}{p['total_s_max']:>10.2f} s{TARGET_S:>10.1f} s")
    print(f"{'peak RSS (fresh process)':<36}{p['peak_rss_mb']:>9.0f} MB{TARGET_MB:>9.0f} MB")
    print(f"{'  of which interpreter + imports':<36}{p['baseline_rss_mb']:>9.0f} MB")
    if phantom:
        for size, v in phantom.items():
            print(f"{'phantom ' + size + ', generate, median':<36}{v['generate_s_median']:>10.2f} s")
            print(f"{'phantom ' + size + ', generate + write':<36}{v['generate_and_write_s_per_study']:>10.2f} s")
    print("targets met" if result["targets"]["met"] else "TARGETS NOT MET")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from CovidGANSegLib.atomic import atomic_path

    with atomic_path(args.out) as tmp_out:
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0 if result["targets"]["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
