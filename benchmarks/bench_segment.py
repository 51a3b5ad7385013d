"""Benchmark ``covidganseg segment`` end to end, file to file, on a MosMed-size CT (512 x 512 x 40).

For each segmenter configuration (``small`` and ``paper`` TransUNet by default) this writes a
checkpoint with RANDOM-INIT weights (timing and memory do not depend on the weights; the masks
are meaningless), then runs ``segment`` in a fresh child process per repetition and records:

* ``segment_s``: wall time of ``segment_file`` inside the child (read CT, lung mask, preprocess,
  segment all slices, map back, quantify, write mask + lungs + report), the number the target
  refers to;
* ``process_s``: the child's whole wall time including Python start-up and the torch import;
* ``peak_rss_mb``: the child's peak resident memory (``ru_maxrss``);
* a breakdown of the stages from one extra child run.

The CT is a synthetic ``mosmed`` phantom (512 x 512 in-plane, 0.75 mm, 8 mm slices, LAS), cut or
edge-padded to 40 slices. Results are printed as a table and saved as JSON in
``benchmarks/results/``. Target for ``small`` on 2 CPU cores: <= 5 s and <= 2 GB peak memory.

    python benchmarks/bench_segment.py                       # CPU, small + paper, 3 repetitions
    python benchmarks/bench_segment.py --device cuda         # on a GPU machine
    python benchmarks/bench_segment.py --configs small --repeat 5
    python benchmarks/bench_segment.py train --device cuda   # training seconds per step
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

from bench_gan import make_ct  # a MosMed-sized phantom CT written as NIfTI
from machine import describe, machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(path: Path, config_name: str, arch: str = "transunet") -> Path:
    import torch

    from CovidGANSegLib.checkpoints import save_checkpoint, write_model_card
    from CovidGANSegLib.config import DEFAULT_PREPROCESS
    from CovidGANSegLib.seg.transunet import SEG_CONFIGS, count_parameters
    from CovidGANSegLib.seg.unet import build_segmenter

    torch.manual_seed(0)
    cfg = SEG_CONFIGS[config_name]
    model = build_segmenter(arch, cfg)
    save_checkpoint(path, kind="seg", arch=arch, config=cfg.to_dict(), metadata={"note": "random init, benchmark only"},
                    preprocess=DEFAULT_PREPROCESS.to_dict(), model=model.state_dict(), threshold=0.5)
    write_model_card(path, name=f"bench-{config_name}", kind="seg", arch=arch, config_name=config_name, config=cfg.to_dict(),
                     trained_on="nothing: random initial weights (benchmark only)", demo=True,
                     extra={"parameters": count_parameters(model)})
    return path


def child(args: argparse.Namespace) -> None:
    """Run one segmentation in this process and print a JSON line with the measurements."""
    t_start = time.perf_counter()
    from CovidGANSegLib import progress
    from CovidGANSegLib.seg.inference import segment_file

    progress.set_mode("none")
    t0 = time.perf_counter()
    out = Path(args.workdir)
    rep = segment_file(args.input, seg=args.ckpt, output=out / "lesion.nii.gz", lungs=out / "lungs.nii.gz", report=out / "report.json",
                       device=args.device)
    seg_s = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"segment_s": seg_s, "import_s": t0 - t_start, "peak_rss_mb": peak_kb / 1024.0, "device": rep["device"],
                      "percent_involved": rep["percent_involved"]}))


def breakdown(args: argparse.Namespace) -> None:
    """Time the stages of segment_file separately (one run)."""
    import numpy as np
    import torch

    from CovidGANSegLib import progress
    from CovidGANSegLib.nifti import load_ct, save_like
    from CovidGANSegLib.preprocessing import preprocess_ct
    from CovidGANSegLib.quantify import quantify
    from CovidGANSegLib.seg.inference import load_segmenter, predict_slices
    from CovidGANSegLib.seg.postprocess import PostProcessing, post_process

    progress.set_mode("none")
    times = {}
    t = time.perf_counter()
    model, _ = load_segmenter(args.ckpt, args.device)
    times["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    ct = load_ct(args.input)
    times["read_ct"] = time.perf_counter() - t
    t = time.perf_counter()
    from CovidGANSegLib.lungmask import extract_lung_mask

    lung = extract_lung_mask(ct.array, ct.spacing)
    times["lung_mask"] = time.perf_counter() - t
    t = time.perf_counter()
    pv = preprocess_ct(ct, model.preprocess_config, lung_mask=lung)
    times["preprocess_resample"] = time.perf_counter() - t
    t = time.perf_counter()
    prob = predict_slices(model, pv.image)
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.synchronize()
    times["network_all_slices"] = time.perf_counter() - t
    t = time.perf_counter()
    canon = pv.mapping.to_canonical(prob, order=1)
    times["map_back"] = time.perf_counter() - t
    t = time.perf_counter()
    mask = post_process(canon > model.threshold, np.asarray(ct.array), lung, tuple(ct.spacing), PostProcessing())
    times["post_process"] = time.perf_counter() - t  # HU prior, opening, density filter, growth (no GAN)
    t = time.perf_counter()
    quantify(mask, lung, ct.spacing)
    out = Path(args.workdir)
    save_like(mask.astype(np.uint8), ct, out / "lesion.nii.gz", dtype=np.uint8)
    save_like(lung.astype(np.uint8), ct, out / "lungs.nii.gz", dtype=np.uint8)
    times["quantify_write"] = time.perf_counter() - t
    print(json.dumps(times))


def train_throughput(args: argparse.Namespace) -> dict:
    """Seconds per phase-2 training step (batch of the configuration, 128 x 128 slices) per configuration."""
    import torch

    from CovidGANSegLib.seg.training import PHASE_END_TO_END, SegTrainer
    from CovidGANSegLib.seg.transunet import SEG_CONFIGS, count_parameters

    out = {}
    for name in args.configs:
        for arch in ("transunet", "unet"):
            cfg = SEG_CONFIGS[name].replace(image_size=128)
            tr = SegTrainer(arch, cfg, device=args.device, seed=0)
            dev = tr.device
            b = cfg.batch_size
            x = torch.rand(b, 1, 128, 128, device=dev)
            y = (torch.rand(b, 1, 128, 128, device=dev) > 0.9).float()
            lung = torch.ones(b, 1, 128, 128, dtype=torch.bool, device=dev)
            labels = torch.tensor([0, 1] * (b // 2), device=dev)
            times = []
            for i in range(args.train_steps + 3):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                tr.step(x, y, labels, PHASE_END_TO_END, lung)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            steady = statistics.median(times[3:])
            out[f"{name}/{arch}"] = {"parameters": count_parameters(tr.model), "batch": b, "s_per_step": steady,
                                     "s_per_1000_steps": steady * 1000}
            print(f"  train {name:6s} {arch:9s} batch {b}: {steady * 1000:.1f} ms/step ({steady * 1000 / 60:.1f} min per 1000 steps)", flush=True)
    return out


def _run_child(mode: str, ckpt: Path, ct: Path, device: str, workdir: Path) -> tuple[dict, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--ckpt", str(ckpt), "--input", str(ct), "--device", device, "--workdir", str(workdir)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "child", "breakdown", "train"],
                        help="bench (default): segment end to end; train: seconds per training step of each configuration")
    parser.add_argument("--configs", nargs="+", default=["small", "paper"], choices=["tiny", "small", "paper"])
    parser.add_argument("--arch", default="transunet", choices=["transunet", "unet"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--repeat", type=int, default=3, help="child runs per configuration (default 3)")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps per configuration in 'train' mode (default 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "child":
        child(args)
        return 0
    if args.mode == "breakdown":
        breakdown(args)
        return 0

    import torch  # noqa: F401  (machine_info describes torch only once it is imported)

    info = machine_info()
    if args.mode == "train":
        res = train_throughput(args)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"train_step_{args.device}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"benchmark": "segmenter training step (phase 2, synthetic batch)", "device": args.device,
                                    "machine": info, "results": res}, indent=2) + "\n")
        print(f"saved {path}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_segment_") as tmp:
        tmp = Path(tmp)
        ct = make_ct(tmp / "ct_512x512x40.nii.gz", args.slices)
        import nibabel as nib

        shape = nib.load(str(ct)).shape
        for name in args.configs:
            ckpt = make_checkpoint(tmp / f"{name}.pt", name, args.arch)
            card = json.loads((tmp / f"{name}.pt.json").read_text())
            runs = []
            for i in range(args.repeat):
                work = tmp / f"{name}_{i}"
                work.mkdir()
                m, wall = _run_child("child", ckpt, ct, args.device, work)
                runs.append({**m, "process_s": wall})
                print(f"  {name} run {i + 1}: segment {m['segment_s']:.2f} s, process {wall:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
            work = tmp / f"{name}_breakdown"
            work.mkdir()
            stages, _ = _run_child("breakdown", ckpt, ct, args.device, work)
            results.append({
                "config": name, "arch": args.arch, "parameters": card["parameters"], "device": runs[0]["device"],
                "segment_s_median": statistics.median(r["segment_s"] for r in runs),
                "segment_s_min": min(r["segment_s"] for r in runs),
                "process_s_median": statistics.median(r["process_s"] for r in runs),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
                "runs": runs, "stages_s": stages,
            })
    doc = {"benchmark": "segment end to end, file to file", "input_shape": list(shape), "weights": "random init (timing only)",
           "outputs": ["lesion mask", "lung mask", "report.json"], "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": info, "targets": {"small": {"segment_s": 5.0, "peak_rss_mb": 2048}}, "results": results}
    print()
    print(f"segment, {shape[0]}x{shape[1]}x{shape[2]} CT, file to file, {describe(info)}, device {args.device}, random-init weights")
    print(f"{'config':8s} {'params':>9s} {'segment s':>10s} {'process s':>10s} {'peak RSS MB':>12s}  stages (s)")
    for r in results:
        st = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
        print(f"{r['config']:8s} {r['parameters'] / 1e6:8.1f}M {r['segment_s_median']:10.2f} {r['process_s_median']:10.2f} {r['peak_rss_mb_max']:12.0f}  {st}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"segment_{args.device}_{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
