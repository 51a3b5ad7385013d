"""``covidganseg phantoms``: write a synthetic chest-CT cohort in the MosMedData layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from CovidGANSegLib.commands import whole_number

_DESCRIPTION = """\
Generate synthetic chest CT phantoms (HU, int16 NIfTI, LAS orientation) with lungs, airways,
branching vessels down to sub-voxel calibre, heart, great vessels, bones and body wall, dependent
density, motion blur and CT noise (some studies low-dose). COVID phantoms get multifocal,
peripheral and posterior lesions with exact masks, from one of two lesion models:
  perlin       the training lesion model (thresholded Perlin noise; GGO, consolidation, crazy paving)
  independent  the evaluation model: analytic subpleural wedges, rounded nodules (halo, reversed
               halo), curvilinear bands, patchy areas; partial volume across the slab
Each COVID study is filed under CT-1..CT-4 by its true lung involvement (MosMed bands: <25 %,
25-50 %, 50-75 %, >75 %); healthy phantoms go to CT-0. The output is written atomically:

  OUT/studies/CT-0..CT-4/study_NNNN.nii.gz   CT volumes
  OUT/masks/study_NNNN_mask.nii.gz           lesion masks of COVID studies (evaluation only)
  OUT/lungs/study_NNNN_lungs.nii.gz          lung masks (lungs incl. vessels and lesions)
  OUT/cohort.json                            seed, size, lesion model, per-study category, involvement, volumes

The same seed gives the same bytes; study NNNN depends only on (seed, NNNN).
These are synthetic phantoms for demonstrations and tests, not patient data."""

_EPILOG = """\
examples:
  covidganseg phantoms data/phantoms --healthy 8 --covid 12 --seed 0
  covidganseg phantoms data/mosmed_like --healthy 4 --covid 6 --seed 1 --size mosmed
  covidganseg phantoms data/held_out --healthy 0 --covid 10 --seed 7 --lesion-model independent"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantoms", help="write a synthetic chest-CT phantom cohort (MosMedData layout)",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--healthy", type=whole_number, required=True, metavar="N", help="number of healthy studies (CT-0)")
    p.add_argument("--covid", type=whole_number, required=True, metavar="M", help="number of COVID studies (CT-1..CT-4)")
    p.add_argument("--seed", type=whole_number, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--size", choices=("small", "mosmed"), default="small",
                   help="small: 128 x 128 at ~2.8 mm, 32-40 slices of 8 mm, about 0.5 s per study (default); "
                        "mosmed: 512 x 512 at 0.6-0.8 mm, 32-48 slices of 8 mm, like MosMedData, a few s per study")
    p.add_argument("--lesion-model", choices=("perlin", "independent"), default="perlin",
                   help="lesions of COVID studies: perlin (the training lesion model, default) or independent "
                        "(the evaluation model, for held-out phantoms)")
    p.add_argument("--first-id", type=whole_number, default=1, metavar="K", help="number of the first study (default 1)")
    p.add_argument("--categories", nargs="+", choices=("CT-1", "CT-2", "CT-3", "CT-4"), default=None, metavar="CT-k",
                   help="categories the COVID studies cycle through (default: a MosMed-like mix; e.g. CT-1 for mild cases only)")
    p.add_argument("--workers", type=whole_number, default=1, metavar="W",
                   help="studies generated at a time, in separate processes (default 1; the files are the same)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    import json

    from CovidGANSegLib.synth.phantoms import write_cohort

    if args.healthy + args.covid < 1:
        args.parser.error("ask for at least one study (--healthy N and/or --covid M)")
    if args.workers < 1:
        args.parser.error("--workers must be at least 1")
    if args.first_id + args.healthy + args.covid - 1 > 9999:
        args.parser.error("study numbers must stay within 0..9999")
    out = write_cohort(args.out, healthy=args.healthy, covid=args.covid, seed=args.seed, size=args.size,
                       first_id=args.first_id, overwrite=args.overwrite, lesion_model=args.lesion_model, categories=args.categories,
                       workers=args.workers)
    meta = json.loads((out / "cohort.json").read_text())
    counts: dict[str, int] = {}
    for rec in meta["studies"]:
        counts[rec["category"]] = counts.get(rec["category"], 0) + 1
    summary = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts))
    print(f"wrote {len(meta['studies'])} {args.size} phantom studies to {out} ({summary}; "
          f"lesion model {args.lesion_model})")
    return 0
