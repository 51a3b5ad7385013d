"""``covidganseg train-gan | pseudo-healthy | pseudo-masks``: the 3D GAN (paper phases 1 and 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from CovidGANSegLib import protocol
from CovidGANSegLib.commands import whole_number

_DEVICE_HELP = ("auto (CUDA when available, else CPU), cpu or cuda[:N] (default auto); cuda without a GPU exits with "
                f"code {protocol.EXIT_CUDA_MISSING}, a GPU out of memory with code {protocol.EXIT_GPU_OUT_OF_MEMORY}")


def register(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "train-gan", formatter_class=fmt,
        help="train the 3D GAN that turns COVID CT into pseudo-healthy CT (paper Algorithm 1)",
        description=(
            "Train the 3D GAN of the paper (Algorithm 1, eq. 2): a dense 3D U-Net generator with latent\n"
            "noise (eq. 1) against a 3D CNN discriminator, plus a reconstruction step that removes\n"
            "synthetic Perlin-noise lesions from healthy volumes. Healthy volumes come from CT-0, COVID\n"
            "volumes from CT-1..CT-4; lesion masks are never read.\n\n"
            "RUN receives preprocessed/, checkpoints/last.pt (resumable), losses.csv, loss_curves.png,\n"
            "samples/iter_NNNNN.png (original, pseudo-healthy, difference) and model.pt with its model card."),
        epilog=("configurations: paper (128x128x32 grid, batch 8, 10,000 iterations; GPU), quick (64x64x16,\n"
                "a few minutes on a CPU), tiny (tests). A JSON file may override fields of one:\n"
                '  {"base": "quick", "iterations": 1000, "loss": "lsgan"}\n'
                "examples:\n"
                "  covidganseg train-gan --data MosMedData --out runs/gan --config paper\n"
                "  covidganseg train-gan --data phantoms --out runs/gan-quick --config quick --device cpu\n"
                "  covidganseg train-gan --data phantoms --out runs/gan-quick --resume --iterations 600"),
    )
    p.add_argument("--data", type=Path, required=True, help="dataset folder (MosMedData layout studies/CT-0..CT-4, or healthy/ + covid/) or a preprocessed folder")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder (refused if it already has a checkpoint, unless --resume)")
    p.add_argument("--config", default=None, metavar="NAME|FILE.json", help="GAN configuration: paper, quick, tiny or a JSON file (default paper; --resume keeps the run's)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="total iterations of the run (default: the configuration's; with --resume, continue up to N)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt exactly where it stopped")
    p.add_argument("--device", default="auto", type=protocol.device_argument, help=_DEVICE_HELP)
    p.add_argument("--seed", type=whole_number, default=0, metavar="S", help="random seed of a fresh run (default 0)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model grid in voxels, x y z (default: the configuration's, paper 128 128 32); each divisible by 2**depth")
    p.set_defaults(handler=run_train)

    p = subparsers.add_parser(
        "pseudo-healthy", formatter_class=fmt,
        help="synthesise the pseudo-healthy CT (and difference map) of one CT with a trained GAN",
        description=(
            "Run the trained generator on one CT: the pseudo-healthy CT in HU, identical to the input outside\n"
            "the lungs, and optionally the difference map (paper eq. 3: input minus pseudo-healthy, in HU,\n"
            "positive where infection was removed). Both have the input's shape and affine, so they overlay it."),
        epilog="example:\n  covidganseg pseudo-healthy --checkpoint runs/gan/model.pt --input ct.nii.gz --output ph.nii.gz --difference diff.nii.gz",
    )
    p.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="GAN checkpoint (RUN/model.pt)")
    p.add_argument("--input", type=Path, required=True, help="CT NIfTI in Hounsfield units")
    p.add_argument("--output", type=Path, required=True, help="pseudo-healthy CT to write (.nii or .nii.gz)")
    p.add_argument("--difference", type=Path, default=None, help="difference map to write (.nii or .nii.gz), HU")
    p.add_argument("--lungs", type=Path, default=None, help="lung mask NIfTI on the input's grid (default: computed)")
    p.add_argument("--device", default="auto", type=protocol.device_argument, help=_DEVICE_HELP)
    p.set_defaults(handler=run_pseudo_healthy)

    p = subparsers.add_parser(
        "pseudo-masks", formatter_class=fmt,
        help="difference maps, pseudo-masks and severity groups of every COVID volume (trains the segmenter)",
        description=(
            "For every COVID volume of DATA on the model grid: the difference map (eq. 3, window units), a\n"
            "binarised pseudo-mask inside the lungs, per-slice difference sums with their quartiles and the\n"
            "'high' (> Q3) and 'low' (Q1..median) slice groups of paper section 4.3, and the box plot of\n"
            "Fig. 4. Binarisation (--rule refined, the default): per-HU-band quantiles of G's difference in\n"
            "the lesion-free lungs of DATA's healthy volumes with hysteresis, an HU prior (-750..+100 HU) and\n"
            "suppression of tubular structures (vessels, airway walls). --rule paper: difference >\n"
            "max(FLOOR, median + K * sigma) of that healthy difference. Components smaller than MIN_SIZE\n"
            "voxels are removed. --grid writes everything on a finer grid than the GAN's (e.g. 128 128 32),\n"
            "with DATA's healthy volumes for synthetic-lesion supervision. Lesion masks are never read."),
        epilog="example:\n  covidganseg pseudo-masks --checkpoint runs/gan/model.pt --data MosMedData --out runs/pseudo-masks",
    )
    p.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="GAN checkpoint (RUN/model.pt)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder or preprocessed folder (e.g. RUN/preprocessed of the GAN run)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--threshold", type=float, default=None, help="fixed threshold in window units (difference / window width) instead of the rule")
    p.add_argument("--k", type=float, default=5.0, help="K of the rule (default 5)")
    p.add_argument("--floor", type=float, default=0.05, help="FLOOR of the rule, window units (default 0.05 = 70 HU for a 1400 HU window)")
    p.add_argument("--min-size", type=int, default=5, help="smallest pseudo-mask component kept, voxels (default 5)")
    p.add_argument("--rule", default=None, choices=["refined", "paper"],
                   help="binarisation rule (default refined; paper when --threshold is given)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="output grid (default: the GAN's); the segmenter trains on this grid")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="auto", type=protocol.device_argument, help=_DEVICE_HELP)
    p.set_defaults(handler=run_pseudo_masks)


def run_train(args: argparse.Namespace) -> int:
    from CovidGANSegLib.config import PreprocessConfig
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.gan.networks import get_gan_config
    from CovidGANSegLib.gan.training import train_gan

    if args.iterations is not None and args.iterations < 1:
        raise InputError(f"--iterations must be >= 1, got {args.iterations}")
    try:
        config = get_gan_config(args.config) if args.config is not None else None
        preprocess = None
        if args.grid is not None and not args.resume:
            preprocess = PreprocessConfig(grid=tuple(args.grid))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if args.resume and args.grid is not None:
        import logging

        logging.getLogger(__name__).warning("--grid is ignored with --resume: the run keeps its own preprocessing")
    device = _check_device(args.device)
    from CovidGANSegLib.runlock import clean_stale_partials, run_lock

    with run_lock(args.out, "train-gan") as lock:  # one process per run folder
        clean_stale_partials(args.out, lock)  # temporary files of a killed earlier run
        path = train_gan(args.data, args.out, config=config, preprocess=preprocess, iterations=args.iterations, resume=args.resume,
                         device=device, seed=args.seed)
    print(path)
    return 0


def _check_device(device: str) -> str:
    """The device this run uses (protocol's one policy: ``auto`` -> CUDA if available, else CPU).

    Raises:
        protocol.CudaMissingError: ``cuda`` asked for without a CUDA GPU (exit code ``EXIT_CUDA_MISSING``).
    """
    return protocol.resolve_device(device)


def _pseudo_healthy_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """The output files of ``pseudo-healthy``, checked before anything is computed or written."""
    from CovidGANSegLib.errors import InputError

    given = {k: Path(getattr(args, k)) for k in ("output", "difference") if getattr(args, k) is not None}
    for key, p in given.items():
        if not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
            raise InputError(f"--{key} must be a NIfTI file name ending in .nii or .nii.gz", p)
        if p.is_dir():
            raise InputError(f"--{key} is a folder; give a file name", p)
        if p.resolve() == args.input.resolve():
            raise InputError(f"--{key} would overwrite the input CT; choose another file name", p)
    if len({p.resolve() for p in given.values()}) != len(given):
        raise InputError("--output and --difference must be different files", given["difference"])
    return given


def run_pseudo_healthy(args: argparse.Namespace) -> int:
    from CovidGANSegLib.atomic import atomic_files
    from CovidGANSegLib.checkpoints import verify_checkpoint
    from CovidGANSegLib.gan.inference import pseudo_healthy_file

    device = _check_device(args.device)
    outputs = _pseudo_healthy_outputs(args)
    verify_checkpoint(args.checkpoint)  # SHA-256 against the model card, before the weights are used
    with atomic_files(outputs) as staged:  # both outputs appear together, or neither
        pseudo_healthy_file(args.checkpoint, args.input, staged["output"], difference=staged.get("difference"), device=device,
                            lungs=args.lungs)
    return 0


def run_pseudo_masks(args: argparse.Namespace) -> int:
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks

    from CovidGANSegLib.checkpoints import verify_checkpoint

    device = _check_device(args.device)
    if args.k < 0 or args.floor < 0 or args.min_size < 0:
        raise InputError("--k, --floor and --min-size must be >= 0")
    verify_checkpoint(args.checkpoint)
    rule = args.rule or ("paper" if args.threshold is not None else "refined")
    if args.threshold is not None and rule != "paper":
        raise InputError("--threshold is a parameter of --rule paper")
    if args.grid is not None and min(args.grid) < 4:
        raise InputError(f"--grid must be three sizes of at least 4 voxels, got {args.grid}")
    out = make_pseudo_masks(args.checkpoint, args.data, args.out, device=device, threshold=args.threshold, k=args.k,
                            floor=args.floor, min_size=args.min_size, overwrite=args.overwrite, rule=rule,
                            grid=None if args.grid is None else tuple(args.grid))
    print(out)
    return 0
