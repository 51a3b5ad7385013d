"""``covidganseg preprocess DATA OUT``: lung masks, crop, HU window and resampling for a data set."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="preprocess a data set (MosMedData layout or healthy/ + covid/ folders) into model-grid arrays",
        description=(
            "Find the studies of DATA (MosMedData layout studies/CT-0..CT-4/*.nii.gz, or healthy/ and covid/ "
            "subfolders), skip volumes with too few slices, extract lung masks, crop to the lungs with a margin, "
            "clip and scale the HU window to [0, 1] and resample into the model grid. OUT receives healthy.npy, "
            "covid.npy, healthy_lungs.npy, covid_lungs.npy (N x D x H x W), index.json (each study's geometry and "
            "grid mapping) and config.json, written atomically. Lesion masks are never read."
        ),
    )
    p.add_argument("data", type=Path, metavar="DATA", help="data set folder")
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (must not exist or be empty unless --overwrite)")
    p.add_argument("--config", type=Path, metavar="JSON", help="preprocessing parameters as JSON (PreprocessConfig fields)")
    p.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"), help="model grid in voxels (default 128 128 32)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm (default 2 2 8)")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), help="HU window (default -1000 400)")
    p.add_argument("--min-slices", type=int, metavar="N", help="skip volumes with fewer slices (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=run)


def build_config(args: argparse.Namespace):
    """The PreprocessConfig from --config and the individual options (options win)."""
    from CovidGANSegLib.config import DEFAULT_PREPROCESS, PreprocessConfig
    from CovidGANSegLib.errors import InputError

    config = DEFAULT_PREPROCESS
    if args.config is not None:
        if not args.config.is_file():
            raise InputError("config file not found", args.config)
        try:
            config = PreprocessConfig.from_json(args.config)
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid preprocessing config ({exc})", args.config) from exc
    changes = {}
    if args.grid is not None:
        changes["grid"] = tuple(args.grid)
    if args.spacing is not None:
        changes["target_spacing"] = tuple(args.spacing)
    if args.window is not None:
        changes["hu_window"] = tuple(args.window)
    if getattr(args, "min_slices", None) is not None:
        changes["min_slices"] = args.min_slices
    try:
        config = dataclasses.replace(config, **changes) if changes else config
    except ValueError as exc:
        raise InputError(f"invalid preprocessing option: {exc}") from exc
    from CovidGANSegLib.nifti import SPACING_RANGE_MM

    lo, hi = SPACING_RANGE_MM
    if not all(lo <= float(s) <= hi for s in config.target_spacing):
        where = "--spacing" if args.spacing is not None else f"target_spacing of {args.config}"
        raise InputError(f"{where} {tuple(config.target_spacing)} mm is implausible for a CT (each must be within {lo:g}..{hi:g} mm)")
    return config


def run(args: argparse.Namespace) -> int:
    from CovidGANSegLib.preprocessing import load_preprocessed, preprocess_dataset

    config = build_config(args)
    out = preprocess_dataset(args.data, args.out, config, overwrite=args.overwrite)
    ds = load_preprocessed(out, mmap=True)
    print(f"{out}: {ds.healthy.shape[0]} healthy and {ds.covid.shape[0]} COVID volumes, grid (D, H, W) = {config.grid_dhw}")
    return 0
