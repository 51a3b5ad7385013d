"""Slicer-side cost of the CovidGANSeg module: Apply -> nodes in the scene vs the CLI alone.

For a MosMed-size CT (512 x 512 x 40, 0.7 x 0.7 x 8 mm, a synthetic phantom) on the machine's CPU
cores this measures, through the module's Logic in this (torch-free) process:

* ``logic_s``: wall time from ``startSegmentation`` (what Apply calls) to the segmentation,
  pseudo-healthy, difference and table nodes being in the scene;
* ``cli_s``: wall time of the same ``python -m CovidGANSegLib segment`` command line run alone on
  the same input file (process start, imports, model loading and inference included);
* ``overhead_s = logic_s - cli_s`` (target: at most 2 s): writing the input NIfTI, polling, reading
  the outputs into nodes, building the segmentation and the quantification table;
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
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
    from CovidGANSegLib.phantoms import generate_phantom

    for seed in range(50):
        p = generate_phantom(np.random.default_rng(seed), size="mosmed", covid=True, return_labels=False)
        if p.hu.shape[2] >= slices:
            return p.hu[:, :, :slices], p.affine
    raise RuntimeError("no phantom with enough slices")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_slicer_logic.json")
    args = parser.parse_args(argv)

    import numpy as np
    import slicer_harness

    work = Path(tempfile.mkdtemp(prefix="bench-slicer-"))
    subprocess.run([sys.executable, "-c", _MODELS, str(work / "models")], check=True)
    gan, seg = str(work / "models/gan/model.pt"), str(work / "models/seg/model.pt")

    harness = slicer_harness.install(work / "slicer-temp")
    module = harness.loadScriptedModule(ROOT / "CovidGANSeg" / "CovidGANSeg.py")
    import slicer
    from CovidGANSegModuleLib import process, volumeio

    hu, affine = mosmedPhantom(args.slices)  # file order (i, j, k), LAS
    ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), affine, "MosMed-size CT")
    del hu
    inputBytes = slicer.util.arrayFromVolume(ct).nbytes
    logic = module.CovidGANSegLogic()

    # the CLI alone, on exactly the file the Logic writes
    cliInput = work / "cli" / "input.nii"
    cliInput.parent.mkdir()
    volumeio.writeVolumeNifti(ct, cliInput)
    cliArgv = [*logic.commandPrefix(), "--progress", "none", "segment", "--input", str(cliInput), "--gan", gan, "--seg", seg,
               "--output", str(work / "cli/lesion.nii"), "--lungs", str(work / "cli/lungs.nii"),
               "--pseudo-healthy", str(work / "cli/ph.nii"), "--difference", str(work / "cli/diff.nii"),
               "--report", str(work / "cli/report.json"), "--device", "cpu"]
    env = process.childEnvironment()

    # warm-up, not measured: first-use imports in this process (nibabel, the library's numpy modules)
    # and the OS file cache, as for any but the very first Apply of a Slicer session
    warm = logic.startSegmentation(ct, gan, seg, "cpu").wait(interval=0.02)
    for n in (warm["pseudoHealthy"], warm["difference"], warm["segmentation"], warm["quantificationTable"]):
        volumeio.removeNode(slicer.mrmlScene, n)
    del warm

    cliTimes, logicTimes, peaks, outputBytes, reportTimes = [], [], [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        subprocess.run(cliArgv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cliTimes.append(time.perf_counter() - t)
        reportTimes.append(json.loads((work / "cli/report.json").read_text()).get("runtime_s"))

        with PeakRSS() as memory:
            t = time.perf_counter()
            result = logic.startSegmentation(ct, gan, seg, "cpu").wait(interval=0.02)
            logicTimes.append(time.perf_counter() - t)
        peaks.append(memory.peak - memory.start)
        nodes = (result["pseudoHealthy"], result["difference"])
        outBytes = sum(slicer.util.arrayFromVolume(n).nbytes for n in nodes)
        segmentation = result["segmentation"]
        for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            image = segmentation.GetBinaryLabelmapInternalRepresentation(segmentation.GetSegmentation().GetNthSegmentID(i))
            outBytes += image.GetPointData().GetScalars().GetNumberOfValues() * image.GetScalarSize()
        outputBytes.append(outBytes)
        print(f"run {r + 1}: CLI {cliTimes[-1]:.2f} s, Logic {logicTimes[-1]:.2f} s, peak +{peaks[-1] / 2**20:.0f} MiB", file=sys.stderr)
        for n in (result["pseudoHealthy"], result["difference"], result["segmentation"], result["quantificationTable"]):
            volumeio.removeNode(slicer.mrmlScene, n)
        del result, nodes, segmentation

    cli, lg = statistics.median(cliTimes), statistics.median(logicTimes)
    budget = inputBytes + max(outputBytes)
    out = {
        "benchmark": "bench_slicer_logic",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "volume": {"shape_ijk": list(volumeio.dimensions(ct)), "spacing_mm": [round(s, 3) for s in ct.GetSpacing()], "dtype": "int16",
                   "input_mib": round(inputBytes / 2**20, 1)},
        "models": "tiny random-weight GAN + TransUNet, paper grid 128x128x32 (network cost not the subject)",
        "repeats": args.repeats,
        "cli_s": [round(x, 3) for x in cliTimes], "cli_report_runtime_s": reportTimes,
        "logic_s": [round(x, 3) for x in logicTimes],
        "cli_median_s": round(cli, 3), "logic_median_s": round(lg, 3), "overhead_median_s": round(lg - cli, 3),
        "overhead_target_s": 2.0, "overhead_ok": (lg - cli) <= 2.0,
        "peak_rss_increase_mib": [round(p / 2**20, 1) for p in peaks],
        "input_plus_outputs_mib": round(budget / 2**20, 1),
        "memory_ok": max(peaks) <= budget,
        "torch_imported_in_slicer_process": "torch" in sys.modules,
    }
    assert not out["torch_imported_in_slicer_process"], "torch was imported in the Slicer-side process"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
