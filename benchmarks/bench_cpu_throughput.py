"""CPU training throughput of the segmenter under the usual speed levers (issue 8, "training throughput").

One training step of the ``small`` TransUNet (and the U-Net) on a batch of 8 x 1 x 128 x 128 slices
(the quick demo's segmenter grid): forward, the demo's losses (eq. 5 + MSE over the lung), backward,
Adam. Variants, interleaved round-robin in one process so that a busy machine slows them alike:

* ``fp32``: the default;
* ``channels_last``: the model and inputs in ``torch.channels_last`` memory format;
* ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss;
* ``compile``: ``torch.compile(model)`` (inductor; compile time reported apart, skipped with
  ``--no-compile``).

Prints the median seconds per step and saves ``benchmarks/results/cpu_throughput_<date>.json``.

    python benchmarks/bench_cpu_throughput.py --threads 2 --steps 12
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--arch", nargs="+", default=["transunet", "unet"])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from CovidGANSegLib.seg.losses import SensitivityEnhancedLoss, mse_to_pseudo_mask
    from CovidGANSegLib.seg.transunet import get_seg_config
    from CovidGANSegLib.seg.unet import build_segmenter

    torch.set_num_threads(args.threads)
    cfg = get_seg_config("small").replace(image_size=128, batch_size=8)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 128, 128, generator=g)
    y = (torch.rand(8, 1, 128, 128, generator=g) > 0.9).float()
    lung = torch.ones(8, 1, 128, 128, dtype=torch.bool)
    sens = SensitivityEnhancedLoss(cfg.beta, fn_mode=cfg.fn_mode)
    results: dict[str, dict[str, float]] = {}
    for arch in args.arch:
        variants = {}
        for name in ("fp32", "channels_last", "bf16", *(() if args.no_compile else ("compile",))):
            torch.manual_seed(0)
            model = build_segmenter(arch, cfg)
            xin = x
            if name == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                xin = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            fwd = model
            compile_s = None
            if name == "compile":
                fwd = torch.compile(model)
            variants[name] = {"model": model, "fwd": fwd, "opt": opt, "x": xin, "bf16": name == "bf16", "times": [], "compile_s": compile_s}

        def step(v: dict) -> float:
            t0 = time.perf_counter()
            v["opt"].zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v["bf16"]):
                logits = v["fwd"](v["x"])
                loss = sens(logits.float(), y, lung) + mse_to_pseudo_mask(logits.float(), y, lung)
            loss.backward()
            v["opt"].step()
            return time.perf_counter() - t0

        for name, v in variants.items():  # warm-up (the compile happens here)
            t = time.perf_counter()
            step(v)
            if name == "compile":
                v["compile_s"] = time.perf_counter() - t
            step(v)
        for _ in range(args.steps):
            for v in variants.values():
                v["times"].append(step(v))
        results[arch] = {name: {"median_s_per_step": statistics.median(v["times"]), "compile_s": v["compile_s"]}
                         for name, v in variants.items()}
        base = results[arch]["fp32"]["median_s_per_step"]
        for name, r in results[arch].items():
            extra = f" (compile {r['compile_s']:.0f} s)" if r["compile_s"] else ""
            print(f"{arch:10s} {name:14s} {r['median_s_per_step']:.3f} s/step  x{base / r['median_s_per_step']:.2f}{extra}")
    out = ROOT / "benchmarks" / "results" / f"cpu_throughput_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                               "threads": args.threads, "batch": "8 x 1 x 128 x 128", "results": results}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
