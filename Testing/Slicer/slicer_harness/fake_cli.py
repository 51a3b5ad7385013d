"""A stand-in for ``python -m CovidGANSegLib`` with known outputs, for tests of the module's Logic.

It accepts the real command lines of ``pseudo-healthy`` and ``segment`` (same options), prints
``PROGRESS`` lines, and writes NIfTI outputs on the input file's grid whose content the test knows
exactly. Its behaviour comes from a JSON spec in ``$COVIDGANSEG_FAKE_SPEC`` (a file path)::

    {"lesion_box": [i0, i1, j0, j1, k0, k1],   # lesion voxels (input file order), half-open
     "lungs_box":  [i0, i1, j0, j1, k0, k1],
     "steps": 5, "step_seconds": 0.0,          # progress lines and the time between them
     "grandchild": false,                      # start a long-running grandchild (process-tree kill test)
     "fail": null,                             # "message" -> "covidganseg CMD: error: <input>: message", exit 2
     "fail_on": null,                          # fail only when the input path contains this text
     "cuda": null,                             # "oom" / "missing": fail like torch does unless --device cpu
     "shift_affine": false,                    # write outputs on a wrong grid (the Logic must refuse them)
     "warning": null,                          # a logged WARNING line (shown to the user by the Logic)
     "log": "/path/calls.jsonl"}               # one line per call: argv, device, pids

A real child process: the tests exercise the module's process handling (own process group,
reader threads, kill of the whole tree), not a mock of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _spec() -> dict:
    path = os.environ.get("COVIDGANSEG_FAKE_SPEC")
    return json.loads(Path(path).read_text()) if path else {}


def _box_mask(shape, box) -> np.ndarray:
    mask = np.zeros(shape[:3], dtype=np.uint8)
    if box:
        i0, i1, j0, j1, k0, k1 = box
        mask[i0:i1, j0:j1, k0:k1] = 1
    return mask


def _save(array, affine, path: str, dtype) -> None:
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="covidganseg")
    parser.add_argument("--progress", default="bar")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    ph = sub.add_parser("pseudo-healthy")
    ph.add_argument("--checkpoint", required=True)
    ph.add_argument("--input", required=True)
    ph.add_argument("--output", required=True)
    ph.add_argument("--difference")
    ph.add_argument("--device", default="auto")
    seg = sub.add_parser("segment")
    for option in ("--input", "--seg", "--output"):
        seg.add_argument(option, required=True)
    for option in ("--gan", "--lungs", "--pseudo-healthy", "--difference", "--report"):
        seg.add_argument(option)
    seg.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    spec = _spec()

    if spec.get("log"):
        with open(spec["log"], "a") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "command": args.command, "device": args.device, "pid": os.getpid(),
                                 "pgid": os.getpgid(0) if hasattr(os, "getpgid") else None}) + "\n")
    if spec.get("grandchild"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(spec["grandchild"]).write_text(str(child.pid))

    if spec.get("warning"):  # the library's logging format on stderr
        print(f"2026-01-01 00:00:00,000 WARNING CovidGANSegLib.seg.inference: {spec['warning']}", file=sys.stderr, flush=True)
    cuda = spec.get("cuda")
    if cuda and args.device != "cpu":
        if cuda == "oom":
            print("Traceback (most recent call last):\n  File \"inference.py\", line 1, in <module>", file=sys.stderr)
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
            return 1
        print(f"covidganseg {args.command}: error: CUDA was requested but is not available on this computer", file=sys.stderr)
        return 2
    if spec.get("fail") and (not spec.get("fail_on") or spec["fail_on"] in args.input):
        print(f"covidganseg {args.command}: error: {args.input}: {spec['fail']}", file=sys.stderr)
        return 2

    steps = int(spec.get("steps", 5))
    for s in range(steps):
        if args.progress == "lines":
            print(f"PROGRESS {s / steps:.4f} step {s + 1}/{steps}", flush=True)
        print(f"log line {s}", file=sys.stderr, flush=True)
        time.sleep(float(spec.get("step_seconds", 0.0)))

    image = nib.load(args.input)
    hu = np.asanyarray(image.dataobj).astype(np.float32)
    affine = image.affine.copy()
    if spec.get("shift_affine"):
        affine[:3, 3] += 5.0
    lesion = _box_mask(hu.shape, spec.get("lesion_box"))
    lungs = _box_mask(hu.shape, spec.get("lungs_box"))
    pseudo = np.where(lesion > 0, -850.0, hu).astype(np.float32)
    difference = (hu - pseudo).astype(np.float32)
    if args.command == "pseudo-healthy":
        _save(pseudo, affine, args.output, np.float32)
        if args.difference:
            _save(difference, affine, args.difference, np.float32)
    else:
        _save(lesion, affine, args.output, np.uint8)
        if args.lungs:
            _save(lungs, affine, args.lungs, np.uint8)
        if args.pseudo_healthy:
            _save(pseudo, affine, args.pseudo_healthy, np.float32)
        if args.difference:
            _save(difference, affine, args.difference, np.float32)
        if args.report:
            voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
            lesion_ml = float(np.count_nonzero(lesion & lungs)) * voxel_ml
            lung_ml = float(np.count_nonzero(lungs)) * voxel_ml
            Path(args.report).write_text(json.dumps({"lesion_ml": lesion_ml, "lung_ml": lung_ml,
                                                     "percent_involved": 100.0 * lesion_ml / lung_ml if lung_ml else 0.0,
                                                     "mosmed_category": "CT-1"}))
    if args.progress == "lines":
        print("PROGRESS 1.0000 done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
