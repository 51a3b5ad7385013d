"""CPU training throughput of the segmenter under the usual speed levers (issue 8, "training throughput").

One training step of the ``small`` TransUNet (and the U-Net) on a batch of 8 x 1 x 128 x 128 slices
(the quick demo's segmenter grid): forward, the demo's loss (plain BCE over the lung, eq. 5 with
beta = 0), backward, Adam, through ``SegTrainer.step`` as training runs it. Variants:

* ``fp32``: float32 throughout (``SegConfig.cpu_bf16 = False``);
* ``bf16``: bfloat16 autocast of the forward pass (``cpu_bf16 = True``; in training it takes effect
  only where the CPU has native bfloat16, forced on here so that the figure exists on any CPU);
* ``channels_last``: float32 with the model and inputs in ``torch.channels_last`` memory format;
* ``compile``: float32 with the training forward pass ``torch.compile``-d (inductor; compile time reported apart,
  skipped with ``--no-compile``).

With ``--side-by-side``: the float32 step of every architecture trained one after the other with
``--threads`` threads, against all of them at once in separate processes with an equal share of the
threads each (how the demo trains its two segmenters on a CPU, ``CovidGANSegLib.cpu_jobs``): the
seconds for one step of each, both ways.

Each variant runs in its own Python process, one after the other, so that a variant that crashes
the interpreter (with torch 2.13 CPU, ``channels_last`` crashed the TransUNet's backward with a
glibc heap assertion on the 2-core AMD EPYC) is reported as such and the others still run. Time it
on an otherwise idle machine. Prints the median seconds per step and saves
``benchmarks/results/cpu_throughput_<date>.json``.

    python benchmarks/bench_cpu_throughput.py --threads 2 --steps 12
    python benchmarks/bench_cpu_throughput.py --threads 2 --steps 20 --side-by-side
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("fp32", "bf16", "channels_last", "compile")


def _one(arch: str, variant: str, threads: int, steps: int) -> dict:
    """Time ``steps`` training steps of one variant in this process (after 2 warm-up steps)."""
    import torch

    from CovidGANSegLib.seg import training
    from CovidGANSegLib.seg.transunet import get_seg_config

    torch.set_num_threads(threads)
    cfg = get_seg_config("small").replace(image_size=128, batch_size=8, cpu_bf16=variant == "bf16")
    if variant == "bf16":
        training.cpu_has_native_bf16 = lambda: True  # measure it even where it is off by default
    trainer = training.SegTrainer(arch, cfg, device="cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 128, 128, generator=g)  # (B, C, H, W)
    y = (torch.rand(8, 1, 128, 128, generator=g) > 0.9).float()
    lung = torch.ones(8, 1, 128, 128, dtype=torch.bool)
    labels = torch.full((8,), -1, dtype=torch.long)
    if variant == "channels_last":
        trainer.model = trainer.model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compile_s = None
    if variant == "compile":  # the training step calls forward_with_projection: compile that method
        trainer.model.forward_with_projection = torch.compile(trainer.model.forward_with_projection)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.step(x, y, labels, training.PHASE_END_TO_END, lung)
        seconds = time.perf_counter() - t0
        if i == 0 and variant == "compile":
            compile_s = seconds
        if i >= 2:
            times.append(seconds)
    return {"median_s_per_step": statistics.median(times), "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--arch", nargs="+", default=["transunet", "unet"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--side-by-side", action="store_true",
                    help="only float32: the architectures one after the other against all at once, threads shared")
    ap.add_argument("--child", nargs=2, metavar=("ARCH", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args.child[0], args.child[1], args.threads, args.steps)))
        return 0

    import torch

    from CovidGANSegLib.seg import cpu_has_native_bf16

    if args.side_by_side:
        return _side_by_side(args.arch, args.threads, args.steps)
    info = machine_info()
    variants = [v for v in VARIANTS if not (args.no_compile and v == "compile")]
    results: dict[str, dict[str, dict]] = {}
    for arch in args.arch:
        results[arch] = {}
        for variant in variants:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arch, variant,
                   "--threads", str(args.threads), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                results[arch][variant] = {"crashed": f"exit code {done.returncode}: {last}"}
                print(f"{arch:10s} {variant:14s} crashed ({results[arch][variant]['crashed']})")
                continue
            results[arch][variant] = json.loads(done.stdout.strip().splitlines()[-1])
        base = results[arch].get("fp32", {}).get("median_s_per_step")
        for variant, r in results[arch].items():
            if "crashed" in r:
                continue
            extra = f" (compile {r['compile_s']:.0f} s)" if r.get("compile_s") else ""
            speed = f"  x{base / r['median_s_per_step']:.2f}" if base else ""
            print(f"{arch:10s} {variant:14s} {r['median_s_per_step']:.3f} s/step{speed}{extra}")
    out = ROOT / "benchmarks" / "results" / f"cpu_throughput_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "torch": torch.__version__,
                               "native_bf16": cpu_has_native_bf16(), "threads": args.threads, "batch": "8 x 1 x 128 x 128",
                               "results": results}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


def _child(arch: str, variant: str, threads: int, steps: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", arch, variant, "--threads", str(threads), "--steps", str(steps)]


def _side_by_side(archs: list[str], threads: int, steps: int) -> int:
    """fp32 steps of ``archs`` one after the other (``threads`` each) and all at once (an equal share each)."""
    import torch

    share = threads // len(archs)
    if share < 1:
        print(f"--side-by-side needs at least one thread per architecture ({len(archs)}), got --threads {threads}")
        return 2
    info = machine_info()

    def median(done: subprocess.CompletedProcess, arch: str) -> float:
        if done.returncode != 0:
            raise SystemExit(f"{arch} crashed: {(done.stderr.strip().splitlines() or ['(no message)'])[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["median_s_per_step"]

    alone = {a: median(subprocess.run(_child(a, "fp32", threads, steps), capture_output=True, text=True), a) for a in archs}
    alone_share = {a: median(subprocess.run(_child(a, "fp32", share, steps), capture_output=True, text=True), a) for a in archs}
    procs = {a: subprocess.Popen(_child(a, "fp32", share, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in archs}
    together = {}
    for a, p in procs.items():
        out, err = p.communicate()
        together[a] = median(subprocess.CompletedProcess(p.args, p.returncode, out, err), a)
    one_after = sum(alone.values())
    at_once = max(together.values())
    for a in archs:
        print(f"{a:10s} alone {threads} thread(s) {alone[a]:.3f} s/step, alone {share} {alone_share[a]:.3f}, "
              f"side by side {share} {together[a]:.3f}")
    print(f"one step of each: one after the other {one_after:.3f} s, side by side {at_once:.3f} s (x{one_after / at_once:.2f})")
    out = ROOT / "benchmarks" / "results" / f"cpu_side_by_side_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "torch": torch.__version__, "threads": threads, "share": share,
                               "batch": "8 x 1 x 128 x 128", "steps": steps, "alone_s_per_step": alone,
                               "alone_share_s_per_step": alone_share, "side_by_side_s_per_step": together,
                               "one_step_each_s": {"one_after_the_other": one_after, "side_by_side": at_once}}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
