"""Benchmark the 3D GAN: training speed and memory, pseudo-healthy inference time, pseudo-mask quality.

Sections (``--sections``, default all three):

* ``train``: seconds per training iteration (Algorithm 1: D step, G adversarial step, lesion
  synthesis + G reconstruction step) and peak memory at a GAN configuration (default ``paper``:
  batch 8, 1 x 32 x 128 x 128). Synthetic chest-like volumes (no files). Each variant runs in a
  fresh child process: on CPU the peak is the child's ``ru_maxrss``; on CUDA it is
  ``torch.cuda.max_memory_allocated`` (target with mixed precision: <= 6 GB), with variants with
  and without AMP and gradient checkpointing; on CPU float32, gradient checkpointing, and the
  weights and inputs in ``torch.channels_last_3d`` memory format (issue 8's throughput levers).
* ``inference``: ``pseudo_healthy_file`` from file to file (read CT, lung mask, preprocess, G,
  map back, compose, write pseudo-healthy + difference) on a MosMed-size phantom (512 x 512 x 40,
  LAS, int16) with a ``paper``-configuration generator (random weights unless ``--checkpoint``;
  timing does not depend on the weights). Each repetition runs in a fresh child process:
  ``call_s`` is the function's wall time (the target: <= 3 s on 2 CPU cores), ``process_s`` the
  child's whole time including the Python start-up and the torch import.
* ``quality``: a short training (default ``quick`` configuration) on a phantom cohort, then
  ``make_pseudo_masks`` and their Dice / sensitivity / precision against the phantoms' true lesion
  masks (read only here, for evaluation), plus the mean difference inside lesions and in
  lesion-free lung. Reported, not asserted.

Results are printed as a table and saved as JSON in ``benchmarks/results/gan_<section>_<device>.json``
(``_<config>`` added for a train section of another configuration than ``paper``, ``_threads<N>`` with
``--threads``, ``_<tag>`` for a quality variant).

    python benchmarks/bench_gan.py                                  # CPU, all sections
    python benchmarks/bench_gan.py --sections train --device cuda   # on a GPU machine
    python benchmarks/bench_gan.py --sections quality --device cuda --quality-config paper --quality-iterations 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe, machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


_THREADS: list[str] = []


def _run_child(args: list[str], timeout: float) -> dict:
    """Run this script as a child worker and return the JSON it prints last."""
    args = [*args, *_THREADS]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(wall, 3)
    return result


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# synthetic data for the training benchmark


def synthetic_volumes(n: int, dhw: tuple[int, int, int], seed: int = 0):
    """Chest-like model-grid volumes in [0, 1] (body, two lungs with texture) and lung masks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, h, w = dhw
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    body = (x ** 2 / 0.85 + y ** 2 / 0.6) < 1
    lung = ((((x - 0.38) ** 2 / 0.09 + y ** 2 / 0.3 + z ** 2 / 1.4) < 1) | (((x + 0.38) ** 2 / 0.09 + y ** 2 / 0.3 + z ** 2 / 1.4) < 1))
    base = np.where(body, 0.74, 0.0).astype(np.float32)
    base[lung] = 0.11
    imgs = np.clip(base[None] + rng.normal(0, 0.01, (n, d, h, w)).astype(np.float32), 0, 1)
    return imgs.astype(np.float32), np.broadcast_to(lung, (n, d, h, w)).copy()


def worker_train(args: argparse.Namespace) -> dict:
    import torch

    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, Discriminator3D, GANConfig, count_parameters, get_gan_config
    from CovidGANSegLib.gan.training import GANTrainer

    base = get_gan_config(args.config)
    cfg = GANConfig.from_dict({**base.to_dict(), "amp": bool(args.amp), "gradient_checkpointing": bool(args.checkpointing),
                               **({"batch_size": args.batch} if args.batch else {})})
    pp = PreprocessConfig(grid=tuple(cfg.grid))
    dhw = pp.grid_dhw
    h, hl = synthetic_volumes(cfg.batch_size, dhw, 0)
    c, cl = synthetic_volumes(cfg.batch_size, dhw, 1)
    trainer = GANTrainer(cfg, pp, device=args.device, seed=0)
    if args.channels_last:  # weights and every input tensor in torch.channels_last_3d (B, C, D, H, W strides NDHWC)
        trainer.generator.to(memory_format=torch.channels_last_3d)
        trainer.discriminator.to(memory_format=torch.channels_last_3d)
        as_tensor = trainer._tensor
        trainer._tensor = lambda array, dtype=torch.float32: as_tensor(array, dtype).contiguous(memory_format=torch.channels_last_3d)
    cuda = trainer.device.type == "cuda"
    rss0 = _peak_rss_mb()
    times, lesion_times = [], []
    for i in range(args.warmup + args.iterations):
        if cuda:
            torch.cuda.synchronize()
            if i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        noisy = trainer.make_noisy(h, hl)
        t1 = time.perf_counter()
        trainer.step(h, hl, c, cl, noisy_healthy=noisy)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= args.warmup:
            times.append(t2 - t0)
            lesion_times.append(t1 - t0)
    out = {
        "config": cfg.name, "batch": cfg.batch_size, "grid_dhw": list(dhw), "device": str(trainer.device), "amp": trainer.use_amp,
        "gradient_checkpointing": cfg.gradient_checkpointing, "channels_last_3d": bool(args.channels_last), "iterations_timed": args.iterations,
        "s_per_iteration_median": round(statistics.median(times), 4), "s_per_iteration_min": round(min(times), 4),
        "lesion_synthesis_s_median": round(statistics.median(lesion_times), 4),
        "generator_params": count_parameters(DenseUNetGenerator3D(cfg)), "discriminator_params": count_parameters(Discriminator3D(cfg)),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_training_mb": round(rss0, 1),
    }
    if cuda:
        out["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        out["cuda_max_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 3)
    return out


def section_train(args: argparse.Namespace) -> dict:
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # (amp, gradient checkpointing, channels_last_3d); each in its own process, so a crash is a row, not the end
    variants = [(True, False, False), (False, False, False), (True, True, False)] if cuda else [
        (False, False, False), (False, True, False), (False, False, True)]
    iters = args.train_iterations or (20 if cuda else 2)
    rows = []
    for amp, ckpt, last in variants:
        cmd = ["worker-train", "--config", args.config, "--device", args.device, "--iterations", str(iters), "--warmup", "1"]
        cmd += (["--amp"] if amp else []) + (["--checkpointing"] if ckpt else []) + (["--channels-last"] if last else [])
        cmd += ["--batch", str(args.batch)] if args.batch else []
        try:
            row = _run_child(cmd, timeout=args.timeout)
        except RuntimeError as exc:  # e.g. a segmentation fault of a memory format's kernels
            rows.append({"variant": {"amp": amp, "gradient_checkpointing": ckpt, "channels_last_3d": last}, "crashed": str(exc)[-500:]})
            print(f"  train amp={amp} ckpt={ckpt} channels_last_3d={last}: crashed", flush=True)
            continue
        rows.append(row)
        print(f"  train {row['config']} batch {row['batch']} {row['grid_dhw']} {row['device']} amp={row['amp']} ckpt={row['gradient_checkpointing']} "
              f"channels_last_3d={row['channels_last_3d']}: "
              f"{row['s_per_iteration_median']:.3f} s/it, peak RSS {row['peak_rss_mb']:.0f} MB"
              + (f", CUDA max allocated {row['cuda_max_allocated_gb']:.2f} GB" if "cuda_max_allocated_gb" in row else ""), flush=True)
    return {"variants": rows, "target": "CUDA max allocated <= 6 GB with mixed precision (paper config, batch 8, 32x128x128)"}


# ------------------------------------------------------------------------------------------------
# inference


def make_ct(path: Path, slices: int = 40, seed: int = 0) -> Path:
    import nibabel as nib
    import numpy as np

    from CovidGANSegLib.synth.phantoms import generate_phantom

    ph = generate_phantom(np.random.default_rng(seed), size="mosmed", covid=True)
    hu = ph.hu[:, :, :slices]
    if hu.shape[2] < slices:  # repeat the end slices (timing only)
        hu = np.pad(hu, ((0, 0), (0, 0), (0, slices - hu.shape[2])), mode="edge")
    img = nib.Nifti1Image(hu.astype(np.int16), ph.affine)
    img.set_qform(ph.affine, code=1)
    img.set_sform(ph.affine, code=1)
    nib.save(img, str(path))
    return path


def make_checkpoint(path: Path, config_name: str = "paper") -> Path:
    import torch

    from CovidGANSegLib.checkpoints import save_checkpoint
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.gan import GAN_ARCH
    from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, get_gan_config

    torch.manual_seed(0)
    cfg = get_gan_config(config_name)
    return save_checkpoint(path, kind="gan", arch=GAN_ARCH, config=cfg.to_dict(), preprocess=PreprocessConfig(grid=tuple(cfg.grid)).to_dict(),
                           generator=DenseUNetGenerator3D(cfg).state_dict())


def worker_inference(args: argparse.Namespace) -> dict:
    from CovidGANSegLib import progress
    from CovidGANSegLib.gan.inference import pseudo_healthy_file

    progress.set_mode("none")
    out = Path(args.out)
    t0 = time.perf_counter()
    pseudo_healthy_file(args.checkpoint, args.input, out / "ph.nii.gz", difference=out / "diff.nii.gz", device=args.device)
    call = time.perf_counter() - t0
    return {"call_s": round(call, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def worker_breakdown(args: argparse.Namespace) -> dict:
    import numpy as np

    from CovidGANSegLib.gan.inference import compose_pseudo_healthy, load_generator, preprocess_config_of, run_generator
    from CovidGANSegLib.nifti import load_ct, save_like
    from CovidGANSegLib.preprocessing import preprocess_ct

    out, t = Path(args.out), {}
    s = time.perf_counter()
    g, payload = load_generator(args.checkpoint, args.device)
    pp = preprocess_config_of(payload)
    t["load_model_s"] = time.perf_counter() - s
    s = time.perf_counter()
    ct = load_ct(args.input)
    t["read_ct_s"] = time.perf_counter() - s
    s = time.perf_counter()
    pv = preprocess_ct(ct, pp)
    t["lungs_and_preprocess_s"] = time.perf_counter() - s
    s = time.perf_counter()
    gen = run_generator(g, pv.image[None], pv.lung_mask[None])[0]
    t["generator_s"] = time.perf_counter() - s
    s = time.perf_counter()
    ph, diff = compose_pseudo_healthy(ct.array, pv.image - gen, pv.mapping, pv.lung_mask_canonical, pp.hu_window)
    t["map_back_and_compose_s"] = time.perf_counter() - s
    s = time.perf_counter()
    save_like(ph, ct, out / "ph.nii.gz", dtype=np.int16)
    save_like(diff, ct, out / "diff.nii.gz", dtype=np.int16)
    t["write_two_files_s"] = time.perf_counter() - s
    return {k: round(v, 3) for k, v in t.items()}


def section_inference(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gan-") as tmp:
        tmp = Path(tmp)
        ct = make_ct(tmp / "ct.nii.gz")
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(tmp / "paper.pt", args.config)
        runs = []
        for _ in range(args.repeat):
            runs.append(_run_child(["worker-inference", "--checkpoint", str(ckpt), "--input", str(ct), "--out", str(tmp), "--device", args.device],
                                   timeout=args.timeout))
        breakdown = _run_child(["worker-breakdown", "--checkpoint", str(ckpt), "--input", str(ct), "--out", str(tmp), "--device", args.device],
                               timeout=args.timeout)
        import nibabel as nib

        shape = list(nib.load(ct).shape)
    calls = [r["call_s"] for r in runs]
    res = {"input_shape": shape, "checkpoint": args.checkpoint or f"random-init {args.config}", "device": args.device,
           "call_s": calls, "call_s_median": round(statistics.median(calls), 3), "call_s_min": round(min(calls), 3),
           "process_s_median": round(statistics.median(r["process_s"] for r in runs), 3),
           "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "breakdown": breakdown,
           "target": "<= 3 s file to file on 2 CPU cores (call_s)"}
    print(f"  pseudo-healthy {shape}: call {res['call_s_median']:.2f} s median (min {res['call_s_min']:.2f}), "
          f"process {res['process_s_median']:.2f} s, peak RSS {res['peak_rss_mb_max']:.0f} MB; breakdown {breakdown}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# quality


def dice(a, b) -> float:
    import numpy as np

    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def section_quality(args: argparse.Namespace) -> dict:
    import shutil

    import numpy as np

    from CovidGANSegLib import progress
    from CovidGANSegLib.gan.networks import GANConfig, get_gan_config
    from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks
    from CovidGANSegLib.gan.training import train_gan
    from CovidGANSegLib.nifti import load_ct, load_mask
    from CovidGANSegLib.synth.phantoms import write_cohort
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.preprocessing import load_preprocessed, preprocess_dataset

    progress.set_mode("none")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-gan-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    cohort = work / "cohort"
    if not cohort.exists():
        write_cohort(cohort, healthy=args.healthy, covid=args.covid, seed=args.seed)
    train = work / "train"
    if not train.exists():  # training data without lesion masks
        shutil.copytree(cohort / "studies", train / "studies")
        shutil.copy2(cohort / "cohort.json", train / "cohort.json")
    base = get_gan_config(args.quality_config)
    overrides = json.loads(args.overrides) if args.overrides else {}
    cfg = GANConfig.from_dict({**base.to_dict(), **overrides, "sample_every": 10 ** 6, "checkpoint_every": 10 ** 6})
    pp = PreprocessConfig(grid=tuple(cfg.grid))
    pre = work / ("pre-" + "x".join(str(g) for g in cfg.grid))  # preprocessed once per grid, shared by the variants
    if not pre.exists():
        preprocess_dataset(train, pre, pp)
    run = work / f"run-{cfg.name}-{args.tag}"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    model = train_gan(pre, run, config=cfg, preprocess=pp, iterations=args.quality_iterations, device=args.device, seed=args.seed)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pm = make_pseudo_masks(model, pre, work / f"pm-{cfg.name}-{args.tag}", device=args.device, overwrite=True)
    pm_s = time.perf_counter() - t0
    ds = load_preprocessed(pre)
    diff = np.load(pm / "difference.npy")
    masks = np.load(pm / "pseudo_masks.npy")
    lungs = np.load(pm / "lungs.npy")
    truth = np.zeros(diff.shape, dtype=bool)
    for r in ds.records_of("covid"):  # EVALUATION ONLY: the phantoms' true lesions
        ct = load_ct(cohort / "studies" / r["category"] / f"{r['id']}.nii.gz")
        truth[r["index"]] = ds.mapping(r).to_model(load_mask(cohort / "masks" / f"{r['id']}_mask.nii.gz", ct))
    truth &= lungs
    per_volume = [dice(masks[i], truth[i]) for i in range(len(masks))]
    tp = int((masks & truth).sum())
    index = json.loads((pm / "index.json").read_text())
    res = {
        "config": cfg.name, "overrides": overrides, "iterations": args.quality_iterations or cfg.iterations, "device": args.device,
        "grid": list(cfg.grid), "cohort": {"healthy": args.healthy, "covid": args.covid, "seed": args.seed},
        "train_s": round(train_s, 1), "pseudo_masks_s": round(pm_s, 1),
        "dice_pooled": round(dice(masks, truth), 4), "dice_per_volume_mean": round(float(np.mean(per_volume)), 4),
        "dice_per_volume": [round(v, 3) for v in per_volume],
        "sensitivity": round(tp / max(1, int(truth.sum())), 4), "precision": round(tp / max(1, int(masks.sum())), 4),
        "mean_difference_in_lesions": round(float(diff[truth].mean()), 5) if truth.any() else None,
        "mean_difference_in_lesion_free_lung": round(float(diff[lungs & ~truth].mean()), 5),
        "threshold": index["threshold"]["value"], "threshold_hu": round(index["threshold"]["value_hu"], 1),
        "workdir": str(work),
        "note": "pseudo-masks vs the phantoms' true lesion masks on the model grid; reported, not asserted",
    }
    print(f"  quality {cfg.name} {res['iterations']} it on {args.device}: train {res['train_s']:.0f} s, Dice pooled {res['dice_pooled']:.3f} "
          f"(per volume {res['dice_per_volume_mean']:.3f}), sens {res['sensitivity']:.3f}, prec {res['precision']:.3f}, "
          f"mean diff lesion {res['mean_difference_in_lesions']} vs lung {res['mean_difference_in_lesion_free_lung']}, "
          f"threshold {res['threshold_hu']} HU", flush=True)
    return res


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="run", choices=["run", "worker-train", "worker-inference", "worker-breakdown"],
                   help=argparse.SUPPRESS)
    p.add_argument("--sections", nargs="+", default=["train", "inference", "quality"], choices=["train", "inference", "quality"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--config", default="paper", help="GAN configuration for train / inference (default paper)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size (train)")
    p.add_argument("--train-iterations", type=int, default=None, help="timed iterations (default 2 on CPU, 20 on CUDA)")
    p.add_argument("--repeat", type=int, default=3, help="inference repetitions (default 3)")
    p.add_argument("--checkpoint", default=None, help="a trained GAN checkpoint for the inference section (default random weights)")
    p.add_argument("--quality-config", default="quick", help="GAN configuration of the quality section (default quick)")
    p.add_argument("--quality-iterations", type=int, default=None, help="training iterations of the quality section (default: the config's)")
    p.add_argument("--overrides", default=None, help='JSON of GANConfig fields for the quality run, e.g. \'{"rec_weight": 10}\'')
    p.add_argument("--tag", default="default", help="name of the quality variant (results file suffix)")
    p.add_argument("--healthy", type=int, default=8, help="healthy phantoms of the quality cohort (default 8)")
    p.add_argument("--covid", type=int, default=16, help="COVID phantoms of the quality cohort (default 16)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep the quality cohort / runs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice). 1 avoids OpenMP spin-wait stalls when the cores are shared")
    # worker arguments
    p.add_argument("--iterations", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.mode != "run":
        fn = {"worker-train": worker_train, "worker-inference": worker_inference, "worker-breakdown": worker_breakdown}[args.mode]
        print(json.dumps(fn(args)))
        return 0

    if args.threads:
        _THREADS[:] = ["--threads", str(args.threads)]
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    import torch  # noqa: F401  (machine_info describes torch only once it is imported; the sections use it anyway)

    info = machine_info()
    print(f"machine: {describe(info)}; load average {info.get('load_average_at_start')}", flush=True)
    device_tag = "cuda" if args.device == "cuda" else ("cpu" if args.device == "cpu" else "auto")
    for section in args.sections:
        print(f"[{section}]", flush=True)
        fn = {"train": section_train, "inference": section_inference, "quality": section_quality}[section]
        res = fn(args)
        payload = {"section": section, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": info,
                   "args": {k: v for k, v in vars(args).items() if k not in ("mode", "input", "out")}, "results": res}
        if section == "quality":
            suffix = f"_{args.tag}" if args.tag != "default" else ""
        else:  # a configuration other than paper, or a thread count, gets its own file
            suffix = (f"_{args.config}" if args.config != "paper" else "") + (f"_threads{args.threads}" if args.threads else "")
        path = results_dir / f"gan_{section}_{device_tag}{suffix}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
        print(f"  -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
