"""Segment one CT file without a GUI, through the CovidGANSeg module's Logic only.

In 3D Slicer (headless)::

    Slicer --no-main-window --python-script headless_segment.py --input ct.nii.gz \
        --gan models/gan/model.pt --seg models/seg/model.pt --output out/ [--device auto]

With plain Python and the slicer-core wheel (the project's test harness stands in for the
application)::

    python Testing/Slicer/headless_segment.py --input ct.nii.gz --gan ... --seg ... --output out/

Writes ``segmentation.seg.nrrd`` (Lungs, Lesion), ``pseudo_healthy.nrrd``, ``difference.nrrd`` and
``quantification.csv`` into the output folder and prints a one-line JSON summary (which also says
whether torch was ever imported in this process: it must not be).
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _application():
    """(slicer, logic module): the running Slicer, or the harness over slicer-core."""
    import slicer

    if hasattr(slicer, "app"):  # inside 3D Slicer: the module is already loaded by the module factory
        import CovidGANSeg

        return slicer, CovidGANSeg, False
    sys.path.insert(0, str(HERE))
    import slicer_harness

    harness = slicer_harness.install()
    return slicer, harness.loadScriptedModule(ROOT / "CovidGANSeg" / "CovidGANSeg.py"), True


def _save(slicer, node, path: Path, storageClass: str) -> None:
    storage = slicer.mrmlScene.AddNewNodeByClass(storageClass)
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {path}")
    slicer.mrmlScene.RemoveNode(storage)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--gan", required=True)
    parser.add_argument("--seg", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)

    slicer, module, harnessUsed = _application()
    logic = module.CovidGANSegLogic()
    ct = slicer.modules.volumes.logic().AddArchetypeVolume(str(args.input), args.input.name.split(".")[0])
    if ct is None:
        raise SystemExit(f"{args.input}: could not be read as a volume")
    start = time.monotonic()
    result = logic.segmentLesions(ct, args.gan, args.seg, args.device,
                                  progressCallback=lambda s: print(f"{100 * s.fraction:5.1f} % {s.text}", file=sys.stderr))
    args.output.mkdir(parents=True, exist_ok=True)
    _save(slicer, result["segmentation"], args.output / "segmentation.seg.nrrd", "vtkMRMLSegmentationStorageNode")
    _save(slicer, result["pseudoHealthy"], args.output / "pseudo_healthy.nrrd", "vtkMRMLVolumeArchetypeStorageNode")
    _save(slicer, result["difference"], args.output / "difference.nrrd", "vtkMRMLVolumeArchetypeStorageNode")
    _save(slicer, result["quantificationTable"], args.output / "quantification.csv", "vtkMRMLTableStorageNode")
    segmentation = result["segmentation"].GetSegmentation()
    summary = {
        "input": str(args.input), "seconds": round(time.monotonic() - start, 2), "harness": harnessUsed,
        "segments": [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
        "quantities": {k: result["quantities"][k] for k in ("lesion_ml", "lung_ml", "percent_involved", "mosmed_category")},
        "messages": [], "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    try:
        import slicer

        if hasattr(slicer, "app") and not getattr(slicer.app, "isTestHarness", False):
            slicer.util.exit(code)
    except ImportError:
        pass
    raise SystemExit(code)
