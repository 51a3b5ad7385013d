"""Benchmark our TransUNet (``paper``, ``small``) against the seed's implementation, 1 CPU thread.

The issue measured the ``paper`` TransUNet at 2x the time of the seed's implementation
(mkara44/transunet_pytorch, the code the paper cites) at the same size. This script times, in ONE
process and INTERLEAVED (round r runs every model once before round r + 1 starts; the reported
figure is the median over rounds, so a neighbour's load on a shared machine hits all models
alike):

* ``forward_s``: inference forward pass (``eval()``, ``torch.inference_mode``) of a batch;
* ``train_step_s``: one training step: forward in ``train()`` mode, BCE-with-logits loss against a
  random mask, backward and an Adam step (the same for every model).

Batch 8 x 1 x 128 x 128, ``torch.set_num_threads(1)`` (and ``OMP_NUM_THREADS=1`` set before torch
is imported). Ours are built from the named configurations (``paper``, ``small``, or a JSON file
accepted by ``get_seg_config``); ``paper-v1`` is the first ``paper`` configuration (64-wide
full-resolution residual stem, decoder 512/256/128/64) and ``paper-v2`` the second (7 x 7 stride-2
stem, a 32-wide full-resolution block beside it as the 1/1 skip), kept here for the before/after
figures. The seed's model is loaded AT RUN TIME from a checkout given with ``--seed-repo`` (its
``utils/transunet.py``; nothing of it is copied into this project), built as its README builds it
for 128 x 128: ``TransUNet(img_dim=128, in_channels=1, out_channels=128, head_num=4, mlp_dim=512,
block_num=8, patch_dim=16, class_num=1)``.

    git --git-dir=<mirror of mkara44/transunet_pytorch> archive HEAD | tar -x -C /tmp/seedrepo
    OMP_NUM_THREADS=1 python benchmarks/bench_transunet.py --seed-repo /tmp/seedrepo
    python benchmarks/bench_transunet.py --configs paper,paper-v2,paper-v1,small --rounds 5 --tag after

Results are printed as a table and saved as ``benchmarks/results/transunet_<tag>.json`` with the
machine (CPU model, core count, load average at start, torch version).

``--dice-check`` is a DEVELOPMENT check of the architecture change, never part of the pipeline:
it trains configurations side by side (same phantoms, same batches, same seed, same number of
iterations, BCE + soft Dice on the phantoms' TRUE lesion masks, which the pipeline never reads)
on 2D slices of ``small`` phantoms (128 x 128, about 2.8 mm, HU window [-1000, 400]) and reports
the pooled Dice on held-out phantoms. ``paper`` is too slow to train for long on 1 CPU thread, so
the check compares ``small`` (full-resolution stem) with ``small`` given the stride-2 stem
(``small-s2``: same widths, ``stem_stride=2``, the input image as the 1/1 skip), with the
stride-2 stem plus a light full-resolution block for the 1/1 skip (``small-s2-fr8``) and with a
narrower full-resolution stem (``small-stem4``):

    python benchmarks/bench_transunet.py --dice-check --configs small,small-s2,small-s2-fr8 --tag dice_check
    python benchmarks/bench_transunet.py --dice-check --configs small,small-s2-fr8,small-stem4 --lr 1e-3 \
        --iterations 600 --train-seed S --tag dice_check_600it_seedS

The second form is the one to use: at 300 iterations and ``small``'s learning rate (3e-4) two of
four training seeds had not started to mark lesions (Dice 0 with the loss still falling), so the
first form compares how soon a model starts rather than what it learns. Seeds move the Dice by
about 0.05: compare several.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from CovidGANSegLib.seg.transunet import TransUNet, count_parameters, get_seg_config  # noqa: E402
from machine import describe, machine_info  # noqa: E402

#: the first ``paper`` configuration: 64-wide full-resolution stem, decoder 512/256/128/64
PAPER_V1 = dict(stem_stride=1, full_res_channels=0, encoder_channels=(64, 128, 256, 512, 1024), encoder_blocks=(1, 1, 2, 1, 1),
                decoder_channels=(512, 256, 128, 64))
#: the second: 7 x 7 stride-2 stem, 64 wide at 1/2, and a 32-wide full-resolution block for the 1/1 skip
PAPER_V2 = dict(stem_stride=2, full_res_channels=32, encoder_channels=(64, 64, 128, 256, 1472), encoder_blocks=(1, 1, 2, 1, 1),
                decoder_channels=(256, 128, 64, 16))


def build_ours(name: str) -> nn.Module:
    """Our TransUNet for a configuration name, a JSON file, ``paper-v1`` / ``paper-v2`` (earlier ``paper``),
    ``<name>-s2`` (that configuration with the stride-2 stem, the input as the 1/1 skip),
    ``<name>-s2-fr<N>`` (stride-2 stem and an N-wide full-resolution block for the 1/1 skip) or
    ``<name>-stem<N>`` (its full-resolution stem N wide, the rest unchanged)."""
    match = re.fullmatch(r"(.+)-s2(?:-fr(\d+))?", name)
    if match and not Path(name).is_file():
        return TransUNet(get_seg_config(match.group(1)).replace(stem_stride=2, full_res_channels=int(match.group(2) or 0)))
    match = re.fullmatch(r"(.+)-stem(\d+)", name)
    if match and not Path(name).is_file():
        cfg = get_seg_config(match.group(1))
        return TransUNet(cfg.replace(encoder_channels=(int(match.group(2)), *cfg.encoder_channels[1:])))
    if name in ("paper-v1", "paper-v2"):
        cfg = get_seg_config("paper")
        if not hasattr(cfg, "stem_stride"):  # the code before the stride-2 stem: ``paper`` IS v1
            return TransUNet(cfg)
        return TransUNet(cfg.replace(**(PAPER_V1 if name == "paper-v1" else PAPER_V2)))
    return TransUNet(get_seg_config(name))


def build_seed(seed_repo: Path) -> nn.Module:
    """The seed's TransUNet, imported from its checkout (``utils/transunet.py`` imports ``utils.vit``)."""
    if not (seed_repo / "utils" / "transunet.py").is_file():
        raise SystemExit(f"--seed-repo {seed_repo}: no utils/transunet.py there (export mkara44/transunet_pytorch)")
    sys.path.insert(0, str(seed_repo))
    try:
        spec = importlib.util.spec_from_file_location("seed_transunet", seed_repo / "utils" / "transunet.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(seed_repo))
    return module.TransUNet(img_dim=128, in_channels=1, out_channels=128, head_num=4, mlp_dim=512, block_num=8, patch_dim=16,
                            class_num=1)


class Case:
    """One model with its optimiser and fixed inputs; ``forward()`` and ``train_step()`` return seconds."""

    def __init__(self, name: str, model: nn.Module, batch: int, size: int) -> None:
        self.name = name
        self.model = model
        self.params = count_parameters(model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 1, size, size, generator=gen)  # (B, 1, H, W)
        self.y = (torch.rand(batch, 1, size, size, generator=gen) > 0.9).float()  # (B, 1, H, W)
        self.times: Dict[str, List[float]] = {k: [] for k in ("forward_s", "train_step_s", "forward_cpu_s", "train_step_cpu_s")}

    def forward(self) -> tuple[float, float]:
        """Wall and CPU seconds of one inference forward pass."""
        self.model.eval()
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = self.model(self.x)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        assert out.shape == self.y.shape, (self.name, tuple(out.shape))
        return wall, cpu

    def train_step(self) -> tuple[float, float]:
        """Wall and CPU seconds of one training step."""
        self.model.train()
        t, c = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - t, time.process_time() - c


def run(cases: List[Case], rounds: int, warmup: int, log: Callable[[str], None]) -> None:
    """Interleaved timing: each round runs every case's forward, then every case's training step."""
    for r in range(warmup + rounds):
        for kind in ("forward", "train_step"):
            for case in cases:
                wall, cpu = case.forward() if kind == "forward" else case.train_step()
                if r >= warmup:
                    case.times[f"{kind}_s"].append(wall)
                    case.times[f"{kind}_cpu_s"].append(cpu)
        if r >= warmup:
            log(f"round {r - warmup + 1}/{rounds}: " + ", ".join(
                f"{c.name} {c.times['forward_s'][-1]:.2f}/{c.times['train_step_s'][-1]:.2f} s" for c in cases))


def phantom_slices(first: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lung-containing axial slices of ``count`` COVID ``small`` phantoms: images in [0, 1] and true masks."""
    import numpy as np

    from CovidGANSegLib.synth.phantoms import generate_phantom

    images, masks = [], []
    for number in range(first, first + count):
        rng = np.random.default_rng([seed, number])
        ph = generate_phantom(rng, size="small", covid=True, involvement=float(rng.uniform(0.03, 0.3)), return_labels=False)
        keep = ph.lung_mask.sum(axis=(0, 1)) > 0
        hu = np.moveaxis(ph.hu[:, :, keep], 2, 0).astype(np.float32)  # (D, X, Y)
        images.append(np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0))
        masks.append(np.moveaxis(ph.lesion_mask[:, :, keep], 2, 0).astype(np.float32))  # (D, X, Y)
    x = torch.from_numpy(np.concatenate(images))[:, None]  # (N, 1, 128, 128)
    y = torch.from_numpy(np.concatenate(masks))[:, None]  # (N, 1, 128, 128)
    return x, y


def dice_check(args: argparse.Namespace, info: Dict[str, Any]) -> Dict[str, Any]:
    """Equal-budget training of each configuration on true phantom masks; pooled Dice on held-out phantoms."""
    t0 = time.perf_counter()
    x_train, y_train = phantom_slices(0, args.train_phantoms, args.data_seed)
    x_test, y_test = phantom_slices(1000, args.test_phantoms, args.data_seed)
    print(f"data: {len(x_train)} training slices ({args.train_phantoms} phantoms), {len(x_test)} test slices "
          f"({args.test_phantoms} phantoms), {time.perf_counter() - t0:.0f} s")
    positive = torch.nonzero(y_train.flatten(1).sum(1) > 0).flatten()
    results: Dict[str, Any] = {}
    for name in [c for c in args.configs.split(",") if c]:
        torch.manual_seed(args.train_seed)
        model = build_ours(name)
        lr = model.config.learning_rate if args.lr is None else args.lr
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(args.train_seed)  # the same batches for every model
        model.train()
        t = time.perf_counter()
        for it in range(args.iterations):
            half = args.batch // 2
            idx = torch.cat([positive[torch.randint(len(positive), (half,), generator=gen)],
                             torch.randint(len(x_train), (args.batch - half,), generator=gen)])
            xb, yb = x_train[idx], y_train[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            logits = model(xb)
            prob = torch.sigmoid(logits)
            soft_dice = 1 - (2 * (prob * yb).sum() + 1) / (prob.sum() + yb.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, yb) + soft_dice
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (it + 1) % max(1, args.iterations // 5) == 0:
                print(f"  {name}: iteration {it + 1}, loss {loss.item():.3f}", flush=True)
        train_s = time.perf_counter() - t
        model.eval()
        with torch.inference_mode():
            pred = torch.cat([model(x_test[i:i + 16]) > 0 for i in range(0, len(x_test), 16)]).float()
        inter, total = float((pred * y_test).sum()), float(pred.sum() + y_test.sum())
        results[name] = {"parameters": count_parameters(model), "learning_rate": lr, "train_s": train_s,
                         "dice": 2 * inter / total if total else 1.0,
                         "precision": inter / float(pred.sum()) if pred.sum() else 0.0,
                         "sensitivity": inter / float(y_test.sum()) if y_test.sum() else 0.0}
        r = results[name]
        print(f"{name}: Dice {r['dice']:.3f} (precision {r['precision']:.3f}, sensitivity {r['sensitivity']:.3f}), "
              f"training {train_s:.0f} s for {args.iterations} iterations")
    payload = {"benchmark": "transunet_dice_check", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": info,
               "protocol": (f"DEVELOPMENT CHECK ONLY (not the pipeline, which never reads lesion masks): each model trained "
                            f"{args.iterations} iterations, batch {args.batch} (half from slices with lesions), Adam at the "
                            "configuration's learning rate, BCE + soft Dice on TRUE masks of 2D slices of 'small' COVID "
                            f"phantoms (involvement 3-30 %, perlin lesion model, {args.train_phantoms} phantoms, data seed "
                            f"{args.data_seed}); the same batches for every model (train seed {args.train_seed}); Dice pooled "
                            f"over all lung slices of {args.test_phantoms} held-out phantoms, logits > 0; "
                            f"{args.threads} torch thread(s)"),
               "note": args.note, "results": results}
    return payload


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="paper,small",
                   help="ours, comma-separated: paper, small, tiny, paper-v1, paper-v2, <name>-s2, <name>-s2-fr<N>, <name>-stem<N> "
                        "or JSON files")
    p.add_argument("--seed-repo", type=Path, default=None, help="checkout of mkara44/transunet_pytorch (omit to skip the seed)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="cpu_threads1", help="results file: benchmarks/results/transunet_<tag>.json")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran on the machine)")
    dev = p.add_argument_group("--dice-check (development check of the architecture, trains on TRUE phantom masks)")
    dev.add_argument("--dice-check", action="store_true", help="train --configs side by side instead of timing them")
    dev.add_argument("--iterations", type=int, default=300)
    dev.add_argument("--train-phantoms", type=int, default=10)
    dev.add_argument("--test-phantoms", type=int, default=4)
    dev.add_argument("--data-seed", type=int, default=8)
    dev.add_argument("--train-seed", type=int, default=0)
    dev.add_argument("--lr", type=float, default=None, help="default: each configuration's learning rate")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"machine: {describe(info)}, load average at start {info['load_average_at_start'][0]:.2f}")
    if args.dice_check:
        payload = dice_check(args, info)
        out = ROOT / "benchmarks" / "results" / f"transunet_{args.tag}.json"
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"saved {out.relative_to(ROOT)}")
        return payload
    cases = []
    for name in [c for c in args.configs.split(",") if c]:
        torch.manual_seed(0)
        cases.append(Case(f"ours-{name}", build_ours(name), args.batch, args.size))
    if args.seed_repo is not None:
        torch.manual_seed(0)
        cases.append(Case("seed", build_seed(args.seed_repo), args.batch, args.size))
    run(cases, args.rounds, args.warmup, print)

    results = {}
    for c in cases:
        results[c.name] = {"parameters": c.params, **{k: statistics.median(v) for k, v in c.times.items()},
                           "all": {k: [round(s, 4) for s in v] for k, v in c.times.items()}}
    seed = results.get("seed")
    print(f"\nTransUNet, batch {args.batch} x 1 x {args.size} x {args.size}, {args.threads} thread(s), median of {args.rounds} "
          f"interleaved rounds")
    print("wall seconds, and CPU seconds of this process (1 thread: less disturbed by other jobs on the machine)")
    print(f"{'model':<20}{'params (M)':>11}{'fwd (s)':>9}{'fwd CPU':>9}{'train (s)':>11}{'train CPU':>11}"
          f"{'fwd CPU vs seed':>17}{'train CPU vs seed':>19}")
    for name, r in results.items():
        rel = ("", "")
        if seed is not None:
            rel = (f"{r['forward_cpu_s'] / seed['forward_cpu_s']:.2f}x", f"{r['train_step_cpu_s'] / seed['train_step_cpu_s']:.2f}x")
        print(f"{name:<20}{r['parameters'] / 1e6:>11.2f}{r['forward_s']:>9.3f}{r['forward_cpu_s']:>9.3f}{r['train_step_s']:>11.3f}"
              f"{r['train_step_cpu_s']:>11.3f}{rel[0]:>17}{rel[1]:>19}")

    payload = {"benchmark": "transunet", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": info,
               "protocol": (f"one process, {args.threads} torch thread(s), batch {args.batch} x 1 x {args.size} x {args.size}; "
                            f"{args.warmup} warm-up round(s) then {args.rounds} interleaved rounds (every model's forward, then "
                            "every model's training step, per round); median reported. forward: eval + inference_mode; "
                            "train step: train mode, BCE-with-logits, backward, Adam step. *_s: wall seconds; *_cpu_s: CPU "
                            "seconds of this process (time.process_time; with 1 thread, time spent waiting for a core "
                            "taken by another job is not counted). The machine's other core(s) may be busy with other "
                            "jobs; interleaving spreads that load over all models."),
               "seed": "mkara44/transunet_pytorch utils/transunet.py, TransUNet(img_dim=128, in_channels=1, out_channels=128, "
                       "head_num=4, mlp_dim=512, block_num=8, patch_dim=16, class_num=1)" if seed is not None else None,
               "note": args.note, "results": results}
    out = ROOT / "benchmarks" / "results" / f"transunet_{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")
    return payload


if __name__ == "__main__":
    main()
