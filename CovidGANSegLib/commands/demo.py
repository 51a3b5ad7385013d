"""``covidganseg demo``: the whole pipeline on the embedded synthetic phantom cohort."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on the built-in phantom cohort (offline, CPU)",
        description=(
            "Generate a synthetic phantom cohort, train the 3D GAN, make pseudo-masks, train TransUNet and "
            "the U-Net baseline on them, segment held-out phantoms on their own grid and score all methods "
            "(incl. the HU-threshold baseline) against the held-out lesion masks, which are used only for "
            "evaluation. Writes OUT/report.md and OUT/metrics.json."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty unless --overwrite)")
    p.add_argument("--quick", action="store_true", help="smaller cohort and shorter training: about 10 minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="device for training and inference (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from CovidGANSegLib.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, device=args.device, overwrite=args.overwrite)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'metrics.json'} ({metrics['cases']} held-out cases)")
    return 0
