"""``covidganseg demo``: the whole pipeline on the embedded synthetic phantom cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from CovidGANSegLib import protocol
from CovidGANSegLib.commands import whole_number


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
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="score on the held-out test cohort (default) or on the validation cohort used for development choices")
    p.add_argument("--seed", type=whole_number, default=None, metavar="S",
                   help="a replicate with other phantoms and training draws: training cohort and training seed S, "
                        "held-out cohort S + 1, validation cohort S + 2 (default 2026, the README's figures); replicates "
                        "need seeds at least 3 apart, or one's training cohort is another's held-out one")
    p.add_argument("--real-normal", type=Path, default=None, metavar="DIR",
                   help="folder of real normal chest CTs (NIfTI, HU) for the specificity check "
                        "(default: shared/data/real_ct beside the checkout when present; skipped otherwise)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from CovidGANSegLib.demo import run_demo

    device = protocol.resolve_device(args.device)  # before any work: cuda without a GPU exits with EXIT_CUDA_MISSING
    if args.real_normal is not None and not args.real_normal.is_dir():
        from CovidGANSegLib.errors import InputError

        raise InputError("--real-normal: folder not found", args.real_normal)
    metrics = run_demo(args.out, quick=args.quick, device=device, overwrite=args.overwrite, split=args.split, real_normal=args.real_normal,
                       seed=args.seed)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'metrics.json'} ({metrics['cases']} held-out cases)")
    return 0
