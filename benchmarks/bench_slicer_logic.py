"""Slicer-side cost of the CovidGANSeg module: Apply -> nodes in the scene vs the CLI alone.

For a MosMed-size CT (512 x 512 x 40, 0.7 x 0.7 x 8 mm, a synthetic phantom) on the machine's CPU
cores this measures, through the module's Logic in this (torch-free) process:

* ``logic_s``: wall time from ``startSegmentation`` (what Apply calls) to the segmentation,
  pseudo-healthy, difference and table nodes being in the scene;
* ``cli_s``: wall time of the same ``python -m CovidGANSegLib segment`` command line run alone on
  the same input file (process start, imports, model loading and inference included);
* ``overhead_s = logic_s - cli_s`` (target: at most 2 s): writing the input NIfTI, polling, reading
  the outputs into nodes, building the segmentation and the quantification table. Separate runs on
  a shared machine differ by seconds, so the same quantity is also measured inside each Logic run:
  ``slicer_side_s = logic_s - child_s`` (``child_s``: the child's wall time in that run) and
  ``node_creation_s`` (reading outputs into nodes, segmentation, table);
* the peak resident memory of this process during the Logic run above its level just before
  Apply, against the bytes of the input volume plus the output nodes (target: at most that sum);
* that torch was never imported in this process.

Runs are interleaved (CLI, Logic, CLI, Logic, ...) and the medians reported. The models are tiny
random-weight checkpoints in the real format on the paper's 128 x 128 x 32 grid: the network's own
cost is not what is measured here, the module's cost around it is. Results go to
``benchmarks/results/bench_slicer_logic.json``.

    python benchmarks/bench_slicer_logic.py [--repeats 3] [--slices 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing" / "Slicer"))

_MODELS = r'''
import sys, torch
from pathlib import Path
from CovidGANSegLib.checkpoints import save_checkpoint, write_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.gan import GAN_ARCH
from CovidGANSegLib.gan.networks import GAN_CONFIGS, DenseUNetGenerator3D
from CovidGANSegLib.seg.transunet import SEG_CONFIGS, TransUNet
folder = Path(sys.argv[1]); pp = PreprocessConfig(min_slices=1)  # the paper's 128 x 128 x 32 grid
torch.manual_seed(0)
g = GAN_CONFIGS["tiny"]; s = SEG_CONFIGS["tiny"]
for kind, arch, cfg, state, extra in (("gan", GAN_ARCH, g, DenseUNetGenerator3D(g).state_dict(), {"iteration": 0}),
                                      ("seg", "transunet", s, TransUNet(s).state_dict(), {"threshold": 0.5})):
    path = folder / kind / "model.pt"; path.parent.mkdir(parents=True, exist_ok=True)
    key = "generator" if kind == "gan" else "model"
    save_checkpoint(path, kind=kind, arch=arch, config=cfg.to_dict(), metadata={"demo": True}, preprocess=pp.to_dict(), **{key: state}, **extra)
    write_model_card(path, name=f"bench-{kind}", kind=kind, arch=arch, config_name="tiny", config=cfg.to_dict(),
                     trained_on="nothing (random weights, benchmark)", demo=True)
'''


class PeakRSS:
    """Peak resident set size of this process (VmHWM, reset through /proc/self/clear_refs; sampled as fallback)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def current(self) -> int:
        return self._status("VmRSS")

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.hwm = True
        except OSError:
            self.hwm = False
        self.start = self.current()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.hwm:
            self.peak = max(self.peak, self._status("VmHWM"))


def mosmedPhantom(slices: int):
    import numpy as np
    from CovidGANSegLib.synth.phantoms import generate_phantom

    for seed in range(50):
        p = generate_phantom(np.random.default_rng(seed), size="mosmed", covid=True, return_labels=False)
        if p.hu.shape[2] >= slices:
            return p.hu[:, :, :slices], p.affine
    raise RuntimeError("no phantom with enough slices")


def measureOnce(ctPath: Path, gan: str, seg: str, temporary: Path) -> dict:
    """One Apply in a fresh process: Logic time, peak RSS above the level just before Apply."""
    import gc

    import nibabel as nib
    import numpy as np
    import slicer_harness

    harness = slicer_harness.install(temporary)
    module = harness.loadScriptedModule(ROOT / "CovidGANSeg" / "CovidGANSeg.py")
    import slicer
    import CovidGANSegLib.checkpoints  # noqa: F401 - code the module imports at first use, not data
    import CovidGANSegLib.quantify  # noqa: F401
    from CovidGANSegModuleLib import volumeio

    image = nib.load(str(ctPath))
    ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(np.asanyarray(image.dataobj).transpose(2, 1, 0)), image.affine,
                                        "MosMed-size CT")
    del image
    gc.collect()
    logic = module.CovidGANSegLogic()
    inputBytes = slicer.util.arrayFromVolume(ct).nbytes
    with PeakRSS() as memory:
        t = time.monotonic()
        job = logic.startSegmentation(ct, gan, seg, "cpu")
        result = job.wait(interval=0.02)
        seconds = time.monotonic() - t
    outBytes = sum(slicer.util.arrayFromVolume(result[k]).nbytes for k in ("pseudoHealthy", "difference"))
    segmentation = result["segmentation"]
    for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        labelmap = segmentation.GetBinaryLabelmapInternalRepresentation(segmentation.GetSegmentation().GetNthSegmentID(i))
        outBytes += labelmap.GetPointData().GetScalars().GetNumberOfValues() * labelmap.GetScalarSize()
    from CovidGANSegModuleLib import review

    aiResult = review.aiResult(segmentation)  # the AI lesion kept for "Compare with AI result"
    if aiResult is not None:
        outBytes += slicer.util.arrayFromVolume(aiResult).nbytes
    return {"logic_s": seconds, "child_s": job.childSeconds, "load_s": job.loadSeconds, "peak_increase": memory.peak - memory.start, "input_bytes": inputBytes, "output_bytes": outBytes,
            "shape_ijk": list(volumeio.dimensions(ct)), "spacing_mm": [round(x, 3) for x in ct.GetSpacing()],
            "torch_imported": "torch" in sys.modules, "messages": []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_slicer_logic.json")
    parser.add_argument("--measure-once", nargs=4, metavar=("CT", "GAN", "SEG", "TEMP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_once:
        ct, gan, seg, temporary = args.measure_once
        print(json.dumps(measureOnce(Path(ct), gan, seg, Path(temporary))))
        return 0

    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "CovidGANSeg"))
    from CovidGANSegModuleLib import process

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-slicer-"))
    subprocess.run([sys.executable, "-c", _MODELS, str(work / "models")], check=True)
    gan, seg = str(work / "models/gan/model.pt"), str(work / "models/seg/model.pt")
    hu, affine = mosmedPhantom(args.slices)
    ctPath = work / "ct.nii"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(ctPath))
    del hu

    cliOut = work / "cli"
    cliOut.mkdir()
    cliArgv = [process.pythonExecutable(), "-m", "CovidGANSegLib", "--progress", "none", "segment", "--input", str(ctPath),
               "--gan", gan, "--seg", seg, "--output", str(cliOut / "lesion.nii"), "--lungs", str(cliOut / "lungs.nii"),
               "--pseudo-healthy", str(cliOut / "ph.nii"), "--difference", str(cliOut / "diff.nii"),
               "--report", str(cliOut / "report.json"), "--device", "cpu"]
    env = process.childEnvironment()
    # warm-up (not measured): the OS file cache for Python, torch and the models
    subprocess.run(cliArgv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    cliTimes, reportTimes, runs = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        subprocess.run(cliArgv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cliTimes.append(time.perf_counter() - t)
        reportTimes.append(json.loads((cliOut / "report.json").read_text()).get("runtime_s"))
        temporary = work / f"slicer-temp-{r}"
        result = subprocess.run([sys.executable, __file__, "--measure-once", str(ctPath), gan, seg, str(temporary)],
                                capture_output=True, text=True, check=True)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"run {r + 1}: CLI {cliTimes[-1]:.2f} s, Logic {runs[-1]['logic_s']:.2f} s "
              f"(child {runs[-1]['child_s']:.2f} s, nodes {runs[-1]['load_s']:.2f} s), "
              f"peak +{runs[-1]['peak_increase'] / 2**20:.0f} MiB", file=sys.stderr)

    logicTimes = [run["logic_s"] for run in runs]
    sameRun = [run["logic_s"] - run["child_s"] for run in runs]
    overheads = [lg - cl for lg, cl in zip(logicTimes, cliTimes)]
    peaks = [run["peak_increase"] for run in runs]
    budget = runs[0]["input_bytes"] + runs[0]["output_bytes"]
    out = {
        "benchmark": "bench_slicer_logic",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {**info, "load_average_at_end": os.getloadavg()},
        "volume": {"shape_ijk": runs[0]["shape_ijk"], "spacing_mm": runs[0]["spacing_mm"], "dtype": "int16",
                   "input_mib": round(runs[0]["input_bytes"] / 2**20, 1)},
        "models": "tiny random-weight GAN + TransUNet, paper grid 128x128x32 (network cost not the subject)",
        "repeats": args.repeats,
        "cli_s": [round(x, 3) for x in cliTimes], "cli_report_runtime_s": reportTimes,
        "logic_s": [round(x, 3) for x in logicTimes], "overhead_s": [round(x, 3) for x in overheads],
        "cli_median_s": round(statistics.median(cliTimes), 3), "logic_median_s": round(statistics.median(logicTimes), 3),
        "overhead_median_s": round(statistics.median(overheads), 3),
        "child_in_logic_s": [round(run["child_s"], 3) for run in runs],
        "slicer_side_s": [round(x, 3) for x in sameRun], "slicer_side_median_s": round(statistics.median(sameRun), 3),
        "node_creation_s": [round(run["load_s"], 3) for run in runs],
        "overhead_target_s": 2.0, "overhead_ok": statistics.median(overheads) <= 2.0 and statistics.median(sameRun) <= 2.0,
        "peak_rss_increase_mib": [round(p / 2**20, 1) for p in peaks],
        "input_plus_outputs_mib": round(budget / 2**20, 1),
        "memory_ok": max(peaks) <= budget,
        "torch_imported_in_slicer_process": any(run["torch_imported"] for run in runs),
    }
    shutil.rmtree(work, ignore_errors=True)
    assert not out["torch_imported_in_slicer_process"], "torch was imported in the Slicer-side process"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
