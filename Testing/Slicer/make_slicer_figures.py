"""Figures of the CovidGANSeg module's output, rendered offscreen through Slicer's slice-view pipeline.

    python Testing/Slicer/make_slicer_figures.py --models MODELS_FOLDER [--out docs/figures] [--seed 7]

A synthetic COVID phantom (CovidGANSegLib.synth.phantoms, MosMed size) is loaded through Slicer's own
NIfTI reader, segmented through the module's Logic (the library's CLI in a child process, with
the models found in MODELS_FOLDER), and the Red slice view is rendered with EGL:

* ``slicer_slice_view.png``: CT (lung window) with the "Lungs" (blue outline) and "Lesion" (red)
  segments, at the axial slice with the most lesion;
* ``slicer_difference_overlay.png``: the same slice with the difference map (CT minus
  pseudo-healthy) as heat overlay.

Prints a JSON summary: models, quantification, and the comparison with the phantom's true lesions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--involvement", type=float, default=0.15)
    parser.add_argument("--size", default="mosmed", choices=["small", "mosmed"])
    args = parser.parse_args(argv)

    import nibabel as nib
    import slicer_harness
    from slicer_harness.render import SliceViewRenderer

    from CovidGANSegLib.synth.phantoms import generate_phantom

    work = Path(tempfile.mkdtemp(prefix="covidganseg-figures-"))
    harness = slicer_harness.install(work / "slicer-temp")
    module = harness.loadScriptedModule(ROOT / "CovidGANSeg" / "CovidGANSeg.py")
    import slicer
    from CovidGANSegModuleLib import display, segmentations, tables, volumeio

    phantom = generate_phantom(np.random.default_rng(args.seed), size=args.size, covid=True, involvement=args.involvement,
                               return_labels=False)
    files = {}
    for key, array, dtype in (("ct", phantom.hu, np.int16), ("lesion", phantom.lesion_mask, np.uint8)):
        image = nib.Nifti1Image(np.asarray(array, dtype=dtype), phantom.affine)
        image.set_qform(phantom.affine, code=1)
        image.set_sform(phantom.affine, code=1)
        files[key] = work / f"{key}.nii.gz"
        nib.save(image, str(files[key]))
    volumes = harness.modules.volumes.logic()
    ct = volumes.AddArchetypeVolume(str(files["ct"]), "COVID phantom")
    truth = volumes.AddArchetypeVolume(str(files["lesion"]), "true lesions", 1)
    display.styleCtVolume(ct)

    logic = module.CovidGANSegLogic()
    gans, segs = logic.listModels(args.models)
    if not gans or not segs:
        raise SystemExit(f"{args.models}: needs a GAN and a segmenter with model cards")
    seg = next((c for c in segs if c.get("arch") == "transunet"), segs[0])
    result = logic.segmentLesions(ct, gans[0]["checkpoint_path"], seg["checkpoint_path"], "cpu", show=False)
    segmentation = result["segmentation"]
    comparison = tables.tableRows(logic.compare(segmentation, truth, ct, withHD95=False))[0]
    quantity = tables.tableRows(result["quantificationTable"])[0]

    # the axial slice with the most predicted lesion (true lesion if the model found none)
    lesion = segmentations.segmentMask(segmentation, "Lesion", ct)
    if not lesion.any():
        lesion = slicer.util.arrayFromVolume(truth) > 0
    k = int(np.argmax(lesion.reshape(lesion.shape[0], -1).sum(axis=1)))
    nk, nj, ni = lesion.shape
    centre = (volumeio.ijkToRasArray(ct) @ np.array([(ni - 1) / 2, (nj - 1) / 2, k, 1.0]))[:3]

    args.out.mkdir(parents=True, exist_ok=True)
    renderer = SliceViewRenderer(harness, "Red", size=(512, 512))
    try:
        renderer.show(background=ct)
        renderer.alignTo(ct)
        renderer.jumpTo(centre)
        renderer.savePNG(args.out / "slicer_slice_view.png")
        segmentation.GetDisplayNode().SetVisibility(False)
        renderer.show(foreground=result["difference"], foregroundOpacity=0.6)
        renderer.savePNG(args.out / "slicer_difference_overlay.png")
    finally:
        renderer.close()

    summary = {
        "phantom": {"seed": args.seed, "size": args.size, "shape": list(phantom.hu.shape), "true_involvement_percent":
                    round(100 * phantom.involvement, 2), "category": phantom.category},
        "models": {"gan": gans[0]["name"], "seg": seg["name"], "demo": bool(gans[0].get("demo") or seg.get("demo"))},
        "slice_k": k,
        "quantification": quantity,
        "comparison_with_true_lesions": {key: comparison[key] for key in ("Dice", "Sensitivity", "Specificity", "Precision",
                                                                         "Segmented volume", "Ground truth volume")},
        "figures": [str(args.out / "slicer_slice_view.png"), str(args.out / "slicer_difference_overlay.png")],
    }
    print(json.dumps(summary, indent=2, default=float))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
