"""``covidganseg train-seg | segment``: the 2D segmenter on pseudo-masks (paper phase 3) and inference."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from CovidGANSegLib import protocol
from CovidGANSegLib.commands import whole_number
from CovidGANSegLib.seg.postprocess import DETECTION_RIM_MM, FAINT_COMPONENT_HU, SMALL_DENSE_HU, SMALL_DENSE_ML

_DEVICE_HELP = ("auto (CUDA when available, else CPU), cpu or cuda[:N] (default auto); cuda without a GPU exits with "
                f"code {protocol.EXIT_CUDA_MISSING}, a GPU out of memory with code {protocol.EXIT_GPU_OUT_OF_MEMORY}")


def register(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "train-seg", formatter_class=fmt,
        help="train TransUNet (or the U-Net baseline) on GAN pseudo-masks (paper section 3.3)",
        description=(
            "Train a 2D lesion segmenter on the pseudo-masks of 'covidganseg pseudo-masks' (never on lesion\n"
            "masks). Phase 1: contrastive pre-training of the encoder on high- vs low-infection slices with\n"
            "the enhanced contrastive loss (eq. 4, learnable temperature, initial 0.06). Phase 2: end to end\n"
            "with the sensitivity-enhanced loss (eq. 5), MSE to the pseudo-mask and the contrastive loss.\n"
            "(The paper's schedule, kept by --config paper. The CPU configuration small has no phase 1 and\n"
            "uses plain BCE, eq. 5 with beta = 0, without the MSE: measured better on synthetic labels.)\n"
            "Synthetic-lesion supervision (--synthetic-fraction, default all of each phase-2 batch): the folder's\n"
            "healthy volumes with lesions drawn by the Perlin lesion model, exactly labelled by construction.\n"
            "Adam with x0.9 every 1,000 steps; the model (and the probability threshold) with the best Dice\n"
            "on synthetic lesions in held-out healthy VOLUMES is kept (without healthy volumes: Dice\n"
            "against the pseudo-masks of held-out COVID volumes).\n\n"
            "RUN receives checkpoints/last.pt (resumable), losses.csv, loss_curves.png, samples/*.png and\n"
            "model.pt with its model card."),
        epilog=("configurations: paper (~67 M parameters, Adam 5e-5, 10,000 iterations; GPU), small (~2 M, lr 3e-4,\n"
                "plain BCE; CPU), tiny (tests). A JSON file may override fields of one: {\"base\": \"small\", \"beta\": 2.0}\n"
                "examples:\n"
                "  covidganseg train-seg --data MosMedData --pseudo-masks runs/pseudo-masks --out runs/transunet --model transunet\n"
                "  covidganseg train-seg --pseudo-masks runs/pseudo-masks --out runs/unet --model unet --config small --iterations 2000\n"
                "  covidganseg train-seg --pseudo-masks runs/pseudo-masks --out runs/transunet --model transunet --resume"),
    )
    p.add_argument("--data", type=Path, default=None, help="the dataset the pseudo-masks came from (provenance for the model card; optional)")
    p.add_argument("--pseudo-masks", type=Path, required=True, metavar="DIR", help="pseudo-masks folder (covidganseg pseudo-masks), or a preprocessed data set (covidganseg preprocess) to train on synthetic lesions in its healthy volumes alone (--synthetic-fraction 1, no contrastive phase)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder (refused if it already has a checkpoint, unless --resume)")
    p.add_argument("--model", default="transunet", choices=["transunet", "unet"], help="architecture (default transunet)")
    p.add_argument("--config", default="small", metavar="NAME|FILE.json", help="tiny, small, paper or a JSON file (default small; --resume keeps the run's)")
    p.add_argument("--iterations", type=int, default=None, metavar="N", help="total iterations of both phases (default: the configuration's)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt exactly where it stopped")
    p.add_argument("--device", default="auto", type=protocol.device_argument, help=_DEVICE_HELP)
    p.add_argument("--seed", type=whole_number, default=0, metavar="S", help="random seed of a fresh run (default 0)")
    p.add_argument("--synthetic-fraction", type=float, default=1.0, metavar="F",
                   help="share of each end-to-end batch from synthetic lesions in the pseudo-masks folder's healthy volumes "
                        "(default 1: the pseudo-masks then serve only the contrastive phase, if the configuration has one; "
                        "0 = the paper's pseudo-masks alone)")
    p.set_defaults(handler=run_train)

    p = subparsers.add_parser(
        "segment", formatter_class=fmt,
        help="segment COVID-19 lesions in one CT; outputs on the input's own grid",
        description=(
            "Segment lesions in a chest CT (NIfTI, HU; any slice count, spacing and orientation). The CT is\n"
            "preprocessed as in training, segmented slice by slice, and the result is mapped back onto the\n"
            "input grid and restricted to the lung mask. Every output has the input's shape and affine.\n"
            "The report holds lesion and lung volume (mL), percent of lung involved and the MosMed category\n"
            "(CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 %; under 0.1 % counts as CT-0)."),
        epilog=("example:\n  covidganseg segment --input ct.nii.gz --gan runs/gan/model.pt --seg runs/transunet/model.pt \\\n"
                "      --output lesion.nii.gz --lungs lungs.nii.gz --report report.json"),
    )
    p.add_argument("--input", type=Path, required=True, help="CT NIfTI in Hounsfield units")
    p.add_argument("--seg", type=Path, required=True, metavar="CKPT", help="segmenter checkpoint (RUN/model.pt of train-seg)")
    p.add_argument("--gan", type=Path, default=None, metavar="CKPT",
                   help="GAN checkpoint; needed for --pseudo-healthy / --difference, and checked to share the segmenter's preprocessing")
    p.add_argument("--output", type=Path, required=True, help="lesion mask to write (.nii / .nii.gz, uint8 0/1)")
    p.add_argument("--lungs", type=Path, default=None, help="lung mask to write (.nii / .nii.gz, uint8)")
    p.add_argument("--pseudo-healthy", type=Path, default=None, help="pseudo-healthy CT to write (HU; needs --gan)")
    p.add_argument("--difference", type=Path, default=None, help="difference map to write (input minus pseudo-healthy, HU; needs --gan)")
    p.add_argument("--report", type=Path, default=None, help="JSON report to write (volumes, percent involved, MosMed category)")
    p.add_argument("--input-lungs", type=Path, default=None,
                   help="use this lung mask (NIfTI on the input grid) instead of computing one; lesions are only looked for inside it, "
                        "and dense consolidation at the chest wall is what the computed mask most often leaves out")
    p.add_argument("--threshold", type=float, default=None, metavar="P", help="probability threshold in (0, 1) (default: the checkpoint's, 0.5)")
    p.add_argument("--no-growth", dest="grow", action="store_false",
                   help="keep the segmenter's detections only, without growing them into connected lesion-range density "
                        "(about twice as precise, but it misses most of the extent of lesions: lower Dice, on mild disease too)")
    p.add_argument("--no-local-contrast", dest="local_contrast", action="store_false",
                   help="keep components that are less than 100 HU denser than the lung within 6 mm around them "
                        "(by default dropped: gravity-dependent density and partial volume along the pleura; faint "
                        "ground glass in dense lung goes with them)")
    p.add_argument("--no-thin-growth", dest="thin_growth", action="store_false",
                   help="let grown components that are mostly thin (vessel trees) keep all their growth (by default they "
                        "keep only their detections and 3 mm around them; a lesion reached through a vessel goes with it)")
    p.add_argument("--no-faint-components", dest="faint_components", action="store_false",
                   help="mark only components the segmenter seeded (by default faint ground glass that the rules find, "
                        f"mean {FAINT_COMPONENT_HU:g} HU or less, is marked without a seed too)")
    p.add_argument("--keep-small-dense", dest="small_dense", action="store_false",
                   help=f"keep components under {SMALL_DENSE_ML:g} mL whose mean is above {SMALL_DENSE_HU:g} HU (by default dropped: "
                        "mostly vessels and partial volume on real CTs; small solid nodules go with them)")
    p.add_argument("--no-detection-rim", dest="detection_rim", action="store_false",
                   help=f"leave out the segmenter's detections within {DETECTION_RIM_MM:g} mm of a final component at its edge "
                        "(by default they join it: the in-plane opening rounds the detections' edges off)")
    p.add_argument("--gan-gate", type=float, default=None, metavar="K",
                   help="keep only detections where the GAN removed density (mean difference above median + K sigma of its "
                        "healthy-lung difference; needs --gan). Off by default: on real anatomy it dropped most true mild lesions")
    p.add_argument("--device", default="auto", type=protocol.device_argument, help=_DEVICE_HELP)
    p.set_defaults(handler=run_segment)


def run_train(args: argparse.Namespace) -> int:
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.seg.training import train_segmenter
    from CovidGANSegLib.seg.transunet import get_seg_config

    device = protocol.resolve_device(args.device)  # CudaMissingError: exit code EXIT_CUDA_MISSING
    config = _seg_config(args.config, get_seg_config)
    try:
        if args.iterations is not None and args.iterations < 1:
            raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    from CovidGANSegLib.seg.synthetic import SyntheticSupervision

    if not 0.0 <= args.synthetic_fraction <= 1.0:
        from CovidGANSegLib.errors import InputError

        raise InputError(f"--synthetic-fraction must be in [0, 1], got {args.synthetic_fraction}")
    from CovidGANSegLib.runlock import clean_stale_partials, run_lock

    with run_lock(args.out, "train-seg") as lock:  # one process per run folder
        clean_stale_partials(args.out, lock)  # temporary files of a killed earlier run
        path = train_segmenter(args.pseudo_masks, args.out, model=args.model, config=config, iterations=args.iterations,
                               resume=args.resume, device=device, seed=args.seed, data=args.data,
                               synthetic=SyntheticSupervision(fraction=args.synthetic_fraction))
    print(path)
    return 0


def _seg_config(name: str, get_seg_config):
    """The segmenter configuration ``name`` (a registry name or a JSON file); errors name the file."""
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.seg.transunet import SEG_CONFIGS

    if name in SEG_CONFIGS:
        return get_seg_config(name)
    path = Path(name)
    if not path.is_file():
        if path.suffix.lower() == ".json" or path.exists():
            raise InputError("segmenter config file not found" if not path.exists() else "not a file", path)
        raise InputError(f"unknown segmenter configuration {name!r}: use one of {sorted(SEG_CONFIGS)} or a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read the segmenter config JSON ({exc})", path) from exc
    if not isinstance(data, dict):
        raise InputError(f"a segmenter config JSON must be an object of fields, got {type(data).__name__}", path)
    try:
        return get_seg_config(path)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        message = str(exc).replace(f"{path}: ", "")
        raise InputError(f"invalid segmenter config ({message})", path) from exc


_SEGMENT_OUTPUTS = ("output", "lungs", "pseudo_healthy", "difference", "report")


def _segment_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """The output files of ``segment``, checked before anything is computed or written."""
    from CovidGANSegLib.errors import InputError

    given = {k: Path(getattr(args, k)) for k in _SEGMENT_OUTPUTS if getattr(args, k) is not None}
    if ("pseudo_healthy" in given or "difference" in given) and args.gan is None:
        raise InputError("--pseudo-healthy and --difference need the GAN checkpoint (--gan)", given.get("pseudo_healthy", given.get("difference")))
    seen: dict[Path, str] = {}
    for key, p in given.items():
        option = "--" + key.replace("_", "-")
        if key != "report" and not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
            raise InputError(f"{option} must be a NIfTI file name ending in .nii or .nii.gz", p)
        if key == "report" and p.suffix.lower() != ".json":
            raise InputError("--report must be a .json file name", p)
        if p.is_dir():
            raise InputError(f"{option} is a folder; give a file name", p)
        resolved = p.resolve()
        if resolved == args.input.resolve():
            raise InputError(f"{option} would overwrite the input CT; choose another file name", p)
        if resolved in seen:
            raise InputError(f"{option} and {seen[resolved]} name the same file", p)
        seen[resolved] = option
    return given


def run_segment(args: argparse.Namespace) -> int:
    from CovidGANSegLib.atomic import atomic_files, atomic_path
    from CovidGANSegLib.checkpoints import verify_checkpoint
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.seg.inference import segment_file

    device = protocol.resolve_device(args.device)  # CudaMissingError: exit code EXIT_CUDA_MISSING
    try:
        if args.threshold is not None and not 0.0 < args.threshold < 1.0:
            raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")
        if args.gan_gate is not None and not (args.gan_gate >= 0 and math.isfinite(args.gan_gate)):
            raise ValueError(f"--gan-gate must be a finite value >= 0, got {args.gan_gate}")
        if args.gan_gate is not None and args.gan is None:
            raise ValueError("--gan-gate needs the GAN checkpoint (--gan)")
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    outputs = _segment_outputs(args)
    verify_checkpoint(args.seg)  # SHA-256 against the model card, before the weights are used
    if args.gan is not None:
        verify_checkpoint(args.gan)
    # all outputs are staged beside their destinations and appear together at the end (or none do)
    with atomic_files(outputs) as staged:
        rep = segment_file(args.input, seg=args.seg, gan=args.gan, output=staged["output"], lungs=staged.get("lungs"),
                           pseudo_healthy=staged.get("pseudo_healthy"), difference=staged.get("difference"), report=None,
                           device=device, threshold=args.threshold, input_lungs=args.input_lungs, grow=args.grow,
                           gan_gate_sigmas=args.gan_gate, local_contrast=args.local_contrast,
                           thin_growth=args.thin_growth, faint_components=args.faint_components,
                           small_dense=args.small_dense, detection_rim=args.detection_rim)
        rep["outputs"] = {k: str(outputs[k]) if k in outputs else None for k in _SEGMENT_OUTPUTS}
        if "report" in staged:
            with atomic_path(staged["report"]) as tmp:
                tmp.write_text(json.dumps(rep, indent=2) + "\n")
    summary = {k: rep[k] for k in ("lesion_ml", "lung_ml", "percent_involved", "mosmed_category")}
    print(json.dumps({"output": str(args.output), **summary, "runtime_s": round(rep["runtime_s"], 2)}))
    return 0
