"""``covidganseg evaluate``: standard segmentation metrics against reference masks (never for training)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="score lesion masks against reference masks: per volume, per slice, tables and box plots",
        description=(
            "Compare predicted lesion masks with reference masks: two NIfTI files, or two folders matched by\n"
            "study id (study_0001.nii.gz or study_0001_lesion.nii.gz vs study_0001_mask.nii.gz). Each pair\n"
            "must share the voxel grid. Per volume, over ALL voxels: Dice, sensitivity, specificity,\n"
            "precision, absolute volume difference (mL) and HD95 (mm); the same per axial slice; and, with\n"
            "--lungs, the predecessor's slice protocol separately labelled, for comparison only.\n"
            "Empty masks: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 undefined (left out of means).\n\n"
            "--compare scores a second set of predictions of the same studies (e.g. a HU threshold's) and\n"
            "compares the first with it case by case: mean Dice difference, 95 % bootstrap interval over\n"
            "cases, Wilcoxon signed-rank p and cases won (a lead is a finding only where the interval\n"
            "excludes 0).\n\n"
            "DIR receives per_volume.csv, per_slice.csv, predecessor_protocol.csv, summary.csv, summary.json,\n"
            "summary.md (mean / std in the form of the paper's Table 1) and boxplots.png."),
        epilog=("examples:\n  covidganseg evaluate --pred results/ --truth MosMedData/masks --lungs results/lungs --out evaluation/\n"
                "  covidganseg evaluate --pred results/ --method transunet --compare threshold_masks/ --compare-method hu_threshold \\\n"
                "      --truth MosMedData/masks --out evaluation/"),
    )
    p.add_argument("--pred", type=Path, required=True, metavar="P", help="predicted mask (or probability) file, or a folder of them")
    p.add_argument("--truth", type=Path, required=True, metavar="T", help="reference mask file, or a folder of them")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder for tables, JSON and box plots")
    p.add_argument("--lungs", type=Path, default=None, help="lung mask file or folder (enables the predecessor's slice protocol)")
    p.add_argument("--threshold", type=float, default=0.5, help="predictions >= THRESHOLD are lesion (default 0.5; 0/1 masks are unaffected)")
    p.add_argument("--method", default="prediction", help="method name used in the tables (default 'prediction')")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster on large volumes)")
    p.add_argument("--compare", type=Path, default=None, metavar="P2",
                   help="a second set of predictions of the same studies (file or folder like --pred) to compare with, case by case")
    p.add_argument("--compare-method", default="reference", metavar="NAME", help="its name in the tables (default 'reference')")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from CovidGANSegLib.comparison import describe
    from CovidGANSegLib.evaluation import evaluate_paths, table1_markdown

    summary = evaluate_paths(args.pred, args.truth, args.out, lungs=args.lungs, threshold=args.threshold, method=args.method,
                             with_hd95=not args.no_hd95, reference_pred=args.compare, reference_method=args.compare_method)
    print(f"{summary['cases']} case(s); tables and box plots in {args.out}")
    print(table1_markdown(summary["models"]), end="")
    if "paired" in summary:
        print(describe(summary["paired"]["methods"][args.method], args.method, args.compare_method))
    return 0
