"""Specificity on real anatomy: percent of lung each model marks as lesion on real normal chest CTs.

The real CTs in ``shared/data/real_ct`` (TotalSegmentator test volumes, CC BY 4.0) have no lesion,
so every voxel a model marks is a false positive; the target is under 2 % of lung per CT. Models:
every ``model.pt`` of ``train-seg`` found under the given folders (a demo output folder holds
``runs/transunet`` and ``runs/unet``), plus the HU-threshold baseline. Each segmenter runs as
``segment`` does (its own threshold, the HU floor, the lung mask computed on the input grid); with
``--gan`` the GAN's difference map is summarised (95th / 99th percentile in the lungs, HU), and
with ``--gan-gate K`` too the segmenters are gated by it as ``segment --gan-gate K`` does. Each CT
is also scored resampled to 8 mm thick slices (``preprocessing.thick_slices``: MosMed's geometry, where the partial volume of
vessels and of the diaphragm is what a threshold or a phantom-trained model mistakes for lesion).

    python benchmarks/bench_real_normal.py demo-out
    python benchmarks/bench_real_normal.py demo-out/runs/transunet/model.pt --gan demo-out/runs/gan/model.pt
    python benchmarks/bench_real_normal.py demo-out --noise-hu 25   # each CT as a noisier (lower-dose) scan

``--noise-hu SIGMA`` adds CT noise of that standard deviation to every volume, each from its own
seeded stream (:func:`with_ct_noise`).

Prints a table and saves ``benchmarks/results/real_normal_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from CovidGANSegLib.quantify import percent_of_lung  # noqa: E402


def find_models(paths: list[Path]) -> list[Path]:
    """``model.pt`` files given directly or found under folders (segmenters only, by their model cards)."""
    found = []
    for p in paths:
        candidates = [p] if p.is_file() else sorted(p.rglob("model.pt"))
        for c in candidates:
            card = c.with_name(c.name + ".json")
            if card.is_file() and json.loads(card.read_text()).get("kind") == "seg":
                found.append(c)
    return found


def with_ct_noise(ct, sigma_hu: float, rng):
    """``ct`` (a ``CTVolume``) plus Gaussian CT noise of standard deviation ``sigma_hu`` (HU), drawn
    by ``rng`` with the phantoms' noise model (``synth.chest.noise.ct_noise``; in-plane correlated
    for pixels finer than 2 mm, as a reconstruction kernel correlates them); ``ct`` itself when
    ``sigma_hu`` is 0. A noisier, lower-dose acquisition of the same anatomy."""
    import numpy as np

    from CovidGANSegLib.nifti import CTVolume
    from CovidGANSegLib.synth.chest.noise import ct_noise

    if sigma_hu < 0:
        raise ValueError(f"sigma_hu must be >= 0, got {sigma_hu}")
    if sigma_hu == 0:
        return ct
    noise = ct_noise(rng, ct.shape, sigma_hu, correlated=min(ct.spacing[:2]) < 2.0)
    return CTVolume.from_array((np.asarray(ct.array, dtype=np.float32) + noise).astype(np.float32), ct.affine, ct.path)


def load_models(paths: list[Path], gan: Path | None) -> tuple[dict, object, dict] | None:
    """``({path: segmenter}, generator or None, GAN payload)`` on the CPU; None when no segmenter is found."""
    from CovidGANSegLib.seg.inference import load_segmenter

    models = find_models(paths)
    if not models:
        print("no segmenter model.pt found", file=sys.stderr)
        return None
    loaded = {str(m): load_segmenter(m, "cpu")[0] for m in models}
    generator = payload = None
    if gan is not None:
        from CovidGANSegLib.gan.inference import load_generator

        generator, payload = load_generator(gan, "cpu")
    return loaded, generator, payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="segmenter model.pt files or folders to search")
    ap.add_argument("--real-ct", type=Path, default=ROOT.parent / "shared" / "data" / "real_ct", help="folder of real normal CTs")
    ap.add_argument("--gan", type=Path, default=None, help="GAN model.pt: also report its difference map in the lungs")
    ap.add_argument("--gan-gate", type=float, default=None, metavar="K", help="with --gan: gate the segmenters (`segment --gan-gate K`)")
    ap.add_argument("--noise-hu", type=float, default=0.0, metavar="SIGMA",
                    help="add CT noise of this standard deviation in HU to every volume (a lower-dose scan; default 0)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.noise_hu >= 0:
        ap.error("--noise-hu must be >= 0")

    import numpy as np
    import torch

    from CovidGANSegLib import progress
    from CovidGANSegLib.demo import real_normal_volumes
    from CovidGANSegLib.lungmask import extract_lung_mask
    from CovidGANSegLib.seg.hu_threshold import hu_threshold_segment
    from CovidGANSegLib.seg.inference import gan_gate, segment_ct
    from CovidGANSegLib.seg.postprocess import PostProcessing

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    if args.gan_gate is not None and args.gan is None:
        ap.error("--gan-gate needs --gan")
    post = PostProcessing(gan_gate_sigmas=args.gan_gate)
    progress.set_mode("none")
    found = load_models(args.models, args.gan)
    if found is None:
        return 2
    loaded, generator, payload = found
    rows: dict[str, dict[str, float]] = {name: {} for name in [*loaded, "hu_threshold"]}
    gan_rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    cases: list[str] = []
    for index, (name, at_8mm, ct) in enumerate(real_normal_volumes(args.real_ct)):
        case = f"{name} (8 mm)" if at_8mm else name
        cases.append(case)
        ct = with_ct_noise(ct, args.noise_hu, np.random.default_rng([2026, index]))
        lung = extract_lung_mask(ct.array, ct.spacing)
        diff = gate = None
        if generator is not None:
            ph, gate = gan_gate(ct, lung, generator, payload, post)
            diff = ph.difference_hu
            d = diff[lung]
            gan_rows[case] = {"median_hu": float(np.median(d)), "p95_hu": float(np.percentile(d, 95)),
                              "p99_hu": float(np.percentile(d, 99)), "gate_hu": gate}
        for mname, model in loaded.items():
            t = time.perf_counter()
            mask = segment_ct(ct, model, lung_mask=lung, post=post, difference_hu=diff, gate_hu=gate).lesion_mask
            seconds[mname] = seconds.get(mname, 0.0) + time.perf_counter() - t
            rows[mname][case] = round(percent_of_lung(mask, lung), 3)
        rows["hu_threshold"][case] = round(percent_of_lung(hu_threshold_segment(ct.array, lung), lung), 3)
    noise = f", {args.noise_hu:g} HU of noise added" if args.noise_hu else ""
    print(f"percent of lung marked as lesion on real normal CTs (target < 2 %{noise})")
    print("| model | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cases) + " |")
    for case, g in gan_rows.items():
        print(f"GAN difference in the lungs of {case}: median {g['median_hu']:.0f} HU, p95 {g['p95_hu']:.0f} HU, p99 {g['p99_hu']:.0f} HU")
    out = ROOT / "benchmarks" / "results" / f"real_normal_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "cases": cases, "noise_hu": args.noise_hu,
                               "percent_of_lung": rows, "gan_difference": gan_rows, "segment_seconds_total": seconds}, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
