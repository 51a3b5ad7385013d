#!/usr/bin/env python3
"""Write docs/figures/phantoms.png: axial slices of phantom chest CTs, healthy and COVID.

Lung window (W 1500, L -600); lesion outlines in yellow. Rows: "small" size (128 x 128, the
embedded test / demo cohort) with the training lesion model ("perlin"); "small" with the
independent evaluation lesion model; "mosmed" size (512 x 512) with the independent model. The
healthy column shows the anatomy that a plain HU threshold confuses with lesions (vessels,
dependent density, motion blur); its title gives the fraction of lung in -750..0 HU.

    python tools/phantom_montage.py [--out docs/figures/phantoms.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from CovidGANSegLib.synth.phantoms import draw_involvement, generate_phantom, study_rng  # noqa: E402

COLUMNS = (("healthy", None), ("CT-1", "CT-1"), ("CT-1", "CT-1"), ("CT-2", "CT-2"), ("CT-3", "CT-3"))
WINDOW = (-1350.0, 150.0)  # lung window: level -600, width 1500


def _slice_index(ph, category: str | None) -> int:
    """A slice in the middle of the lungs (above the diaphragm domes), with the most lesion."""
    lung = ph.lung_mask.sum(axis=(0, 1))
    ks = np.flatnonzero(lung)
    lo, hi = ks[0] + int(0.4 * len(ks)), ks[0] + int(0.75 * len(ks))
    if category is not None and ph.lesion_mask.any():
        per_slice = ph.lesion_mask.sum(axis=(0, 1))
        return lo + int(np.argmax(per_slice[lo:hi + 1]))
    return (lo + hi) // 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "phantoms.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (("small", "perlin"), ("small", "independent"), ("mosmed", "independent"))
    fig, axes = plt.subplots(len(rows), len(COLUMNS), figsize=(3.0 * len(COLUMNS), 3.15 * len(rows)), facecolor="black")
    for row, (size, model) in enumerate(rows):
        for col, (_, category) in enumerate(COLUMNS):
            rng = study_rng(args.seed, 100 * row + col + 1)
            inv = draw_involvement(rng, category) if category else None
            ph = generate_phantom(rng, size=size, covid=category is not None, involvement=inv, return_labels=False,
                                  lesion_model=model)
            k = _slice_index(ph, category)
            # file order is LAS: axis 0 -> patient left, axis 1 -> anterior. Radiological view:
            # patient right on the image left, anterior up.
            img = ph.hu[:, ::-1, k].T.astype(np.float32)
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="bilinear")
            if ph.lesion_mask[:, :, k].any():
                ax.contour(ph.lesion_mask[:, ::-1, k].T.astype(np.float32), levels=[0.5], colors="#ffe000", linewidths=0.9)
            label = f"{size} {ph.hu.shape[0]}x{ph.hu.shape[1]}x{ph.hu.shape[2]}, {model}\n{ph.category}"
            if category:
                label += f", {100 * ph.involvement:.2f} % of lung"
            else:
                band = (ph.hu >= -750) & (ph.hu <= 0) & ph.lung_mask
                label += f", {100 * band.sum() / ph.lung_mask.sum():.0f} % of lung in -750..0 HU"
            ax.set_title(label, color="white", fontsize=8.5)
            ax.axis("off")
    fig.suptitle("CovidGANSeg synthetic phantoms (lung window; yellow: lesion mask)", color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90, facecolor="black")
    plt.close(fig)
    try:  # palette PNG keeps the file small
        from PIL import Image

        Image.open(tmp).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE).save(args.out, optimize=True)
        tmp.unlink()
    except ImportError:
        tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
