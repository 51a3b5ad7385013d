"""Training throughput with 1 vs 2 gloo processes on CPU (issue 10, "Distributed", figures).

The quick plan's sizes: the GAN's ``quick`` configuration on the 64 x 64 x 16 grid (global batch 2)
and the segmenters' ``small`` configuration on 128 x 128 slices (global batch 8), on synthetic
volumes and slices (the step's cost does not depend on the data). Each measurement is a separate
``torchrun --standalone --nproc_per_node N`` job running :class:`GANTrainer` / :class:`SegTrainer`
steps as ``covidganseg train`` does (N = 1: no process group at all; N = 2: DDP over gloo, each
rank on its half of the global batch). Iterations per second count global batches, so a perfect
2-process speed-up is 2x. ``make_noisy`` (the GAN's lesion synthesis, done for the whole global
batch on every rank so that the random streams match one process) is timed apart.

Prints the table and saves ``benchmarks/results/distributed_<date>.json``.

    python benchmarks/bench_distributed.py --threads 1 --steps 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _volumes(n: int, grid_dhw: tuple[int, int, int], seed: int):
    """Smooth volumes in [0, 1] with two ellipsoid lungs (darker), ``(n, D, H, W)`` and bool lungs."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    d, h, w = grid_dhw
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    lung = (((xx - 0.45) / 0.35) ** 2 + (yy / 0.6) ** 2 + (zz / 0.9) ** 2 < 1) | (((xx + 0.45) / 0.35) ** 2 + (yy / 0.6) ** 2 + (zz / 0.9) ** 2 < 1)
    images = np.empty((n, d, h, w), dtype=np.float32)
    for i in range(n):
        noise = ndimage.gaussian_filter(rng.random((d, h, w)), 2).astype(np.float32)
        images[i] = np.where(lung, 0.1, 0.6) + 0.2 * (noise - noise.mean())
    return np.clip(images, 0, 1), np.broadcast_to(lung, images.shape).copy()


def _time_gan(args: argparse.Namespace, gan_batch: int) -> dict[str, object]:
    """Seconds per GAN iteration (quick configuration, global batch ``gan_batch``)."""
    import dataclasses

    from CovidGANSegLib import distributed
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.gan.networks import get_gan_config
    from CovidGANSegLib.gan.training import GANTrainer

    cfg = dataclasses.replace(get_gan_config("quick"), batch_size=gan_batch)
    pre = PreprocessConfig(grid=tuple(cfg.grid))
    healthy, h_lungs = _volumes(4, pre.grid_dhw, 1)
    covid, c_lungs = _volumes(4, pre.grid_dhw, 2)
    trainer = GANTrainer(cfg, pre, device="cpu", seed=0)
    times, noisy_times = [], []
    for i in range(args.warmup + args.steps):
        batch = trainer.sample_batch(healthy, h_lungs, covid, c_lungs)
        t0 = time.perf_counter()
        noisy = trainer.make_noisy(batch[0], batch[1])
        t1 = time.perf_counter()
        trainer.step(*batch[:4], noisy_healthy=noisy)
        distributed.barrier()
        t2 = time.perf_counter()
        if i >= args.warmup:
            times.append(t2 - t0)
            noisy_times.append(t1 - t0)
    return {"config": "quick", "grid_dhw": list(pre.grid_dhw), "global_batch": cfg.batch_size,
            "seconds_per_iteration": sum(times) / len(times), "iterations_per_second": len(times) / sum(times),
            "lesion_synthesis_seconds": sum(noisy_times) / len(noisy_times)}


def worker(args: argparse.Namespace) -> None:
    """One torchrun job: time GAN and segmenter steps; rank 0 writes the JSON to ``args.result``."""
    import torch

    from CovidGANSegLib import distributed, progress
    from CovidGANSegLib.seg.training import PHASE_END_TO_END, SegTrainer
    from CovidGANSegLib.seg.transunet import get_seg_config

    torch.set_num_threads(args.threads)
    progress.set_mode("none")
    out: dict[str, object] = {}
    with distributed.session("cpu"):
        world = distributed.world_size()
        # GAN: quick configuration, 64 x 64 x 16 grid (its batch 2, and larger global batches)
        for gan_batch in args.gan_batch:
            out["gan" if gan_batch == 2 else f"gan_batch{gan_batch}"] = _time_gan(args, gan_batch)
        # segmenters: small configuration, 128 x 128 slices, phase 2 with severity labels (eq. 4 gathered)
        g = torch.Generator().manual_seed(0)
        vol, lungs = _volumes(2, (16, 128, 128), 3)
        pool = torch.from_numpy(vol.reshape(-1, 1, 128, 128))
        pool_lung = torch.from_numpy(lungs.reshape(-1, 1, 128, 128))
        pool_mask = (torch.rand(pool.shape, generator=g) > 0.95).float() * pool_lung
        for arch in args.arch:
            scfg = get_seg_config("small")
            st = SegTrainer(arch, scfg, device="cpu", seed=0)
            times = []
            for i in range(args.warmup + args.steps):
                idx = torch.randint(len(pool), (scfg.batch_size,), generator=st.generator)
                labels = torch.randint(0, 2, (scfg.batch_size,), generator=st.generator)
                x, y, lung = st.augment(pool[idx], pool_mask[idx], pool_lung[idx])
                t0 = time.perf_counter()
                st.step(x, y, labels, PHASE_END_TO_END, lung)
                distributed.barrier()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            out[f"seg_{arch}"] = {"config": "small", "image_size": 128, "global_batch": scfg.batch_size,
                                  "seconds_per_iteration": sum(times) / len(times), "iterations_per_second": len(times) / sum(times)}
        if distributed.is_main():
            out["world_size"] = world
            Path(args.result).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--steps", type=int, default=8, help="timed iterations (after the warm-up ones)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--arch", nargs="+", default=["transunet", "unet"])
    ap.add_argument("--gan-batch", type=int, nargs="+", default=[2, 4], help="global GAN batches (2: the quick plan's)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    info = machine_info(shared="yes: the CPUs were shared with another job during the run")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            result = Path(tmp) / f"n{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__, "--worker",
                   "--result", str(result), "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--arch", *args.arch, "--gan-batch", *[str(b) for b in args.gan_batch]]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[str(n)] = {**json.loads(result.read_text()), "wall_seconds": time.perf_counter() - t0}
    base = runs.get("1")
    print(f"{'model':<16}" + "".join(f"{n + ' proc it/s':>16}" for n in runs) + (f"{'speed-up':>12}" if base and len(runs) > 1 else ""))
    for key in [k for k in runs[next(iter(runs))] if isinstance(runs[next(iter(runs))][k], dict)]:
        rates = [runs[n][key]["iterations_per_second"] for n in runs]
        line = f"{key:<16}" + "".join(f"{r:>16.3f}" for r in rates)
        if base and len(runs) > 1:
            line += f"{rates[-1] / base[key]['iterations_per_second']:>11.2f}x"
        print(line)
    record = {
        "benchmark": "bench_distributed", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "torch": torch.__version__, "backend": "gloo", "threads_per_process": args.threads, "steps": args.steps, "warmup": args.warmup,
        "runs": runs,
        "notes": [
            "iterations/s count global batches: 2 processes each train on half of the same batch (perfect speed-up 2x)",
            "the machine's 2 CPUs were shared with another job: figures vary from run to run",
            "GAN at the quick plan's batch 2: each rank gets 1 volume, and torch on CPU runs a batch-1 Conv3d on slow_conv3d "
            "instead of oneDNN (measured ~2.7x slower per sample), so 2 processes are slower than 1; with a global batch of 4 "
            "(2 per rank) both use oneDNN",
        ],
    }
    out = ROOT / "benchmarks" / "results" / f"distributed_{dt.date.today():%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
