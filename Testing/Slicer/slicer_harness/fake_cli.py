"""A stand-in for ``python -m CovidGANSegLib`` with known outputs, for tests of the module's Logic.

It is the library's real command line (:func:`CovidGANSegLib.cli.main`: its argument parser,
logging format, ``PROGRESS`` lines, error lines and exit codes, all from
:mod:`CovidGANSegLib.protocol`) with the handlers of ``pseudo-healthy`` and ``segment`` replaced by
ones that need no torch and write NIfTI outputs on the input file's grid whose content the test
knows exactly. Devices follow the protocol's policy: ``auto`` takes the (pretended) GPU when there
is one, an explicit ``cuda`` without one exits with ``EXIT_CUDA_MISSING``, and a GPU that runs out
of memory exits with ``EXIT_GPU_OUT_OF_MEMORY``, exactly as the real CLI does. Its behaviour comes
from a JSON spec in ``$COVIDGANSEG_FAKE_SPEC`` (a file path)::

    {"lesion_box": [i0, i1, j0, j1, k0, k1],   # lesion voxels (input file order), half-open
     "lungs_box":  [i0, i1, j0, j1, k0, k1],   # the lungs written (segment --input-lungs: the given ones)
     "steps": 5, "step_seconds": 0.0,          # progress lines and the time between them
     "grandchild": false,                      # start a long-running grandchild (process-tree kill test)
     "fail": null,                             # "message" -> "covidganseg CMD: error: <input>: message", exit 2
     "fail_on": null,                          # fail only when the input path contains this text
     "cuda": null,                             # null: a working GPU; "missing": no GPU; "oom": a GPU too small
     "shift_affine": false,                    # write outputs on a wrong grid (the Logic must refuse them)
     "warning": null,                          # a logged WARNING line (shown to the user by the Logic)
     "log": "/path/calls.jsonl"}               # one line per call: argv, device, pids

A real child process: the tests exercise the module's process handling (own process group,
reader threads, kill of the whole tree), not a mock of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from CovidGANSegLib import cli, progress, protocol
from CovidGANSegLib.commands import gan as gan_commands
from CovidGANSegLib.commands import seg as seg_commands
from CovidGANSegLib.errors import InputError


def _spec() -> dict:
    path = os.environ.get("COVIDGANSEG_FAKE_SPEC")
    return json.loads(Path(path).read_text()) if path else {}


def _box_mask(shape, box) -> np.ndarray:
    mask = np.zeros(shape[:3], dtype=np.uint8)
    if box:
        i0, i1, j0, j1, k0, k1 = box
        mask[i0:i1, j0:j1, k0:k1] = 1
    return mask


def _save(array, affine, path, dtype) -> None:
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _run(args: argparse.Namespace) -> int:
    """The fake handler of both commands (the real CLI maps its exceptions to exit codes)."""
    spec = _spec()
    cuda = spec.get("cuda")
    if spec.get("log"):
        with open(spec["log"], "a") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "command": args.command, "device": args.device, "pid": os.getpid(),
                                 "pgid": os.getpgid(0) if hasattr(os, "getpgid") else None}) + "\n")
    device = protocol.resolve_device(args.device, cuda_available=cuda != "missing")  # CudaMissingError -> its exit code
    if spec.get("grandchild"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(spec["grandchild"]).write_text(str(child.pid))

    if spec.get("warning"):  # logged through the CLI's own logging set-up
        logging.getLogger("CovidGANSegLib.seg.inference").warning(spec["warning"])
    if cuda == "oom" and device != "cpu":
        raise protocol.GpuOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if spec.get("fail") and (not spec.get("fail_on") or spec["fail_on"] in str(args.input)):
        raise InputError(spec["fail"], args.input)

    steps = int(spec.get("steps", 5))
    for s in range(steps):
        progress.report(s / steps, f"step {s + 1}/{steps}")
        print(f"log line {s}", file=sys.stderr, flush=True)
        time.sleep(float(spec.get("step_seconds", 0.0)))

    image = nib.load(str(args.input))
    hu = np.asanyarray(image.dataobj).astype(np.float32)
    affine = image.affine.copy()
    if spec.get("shift_affine"):
        affine[:3, 3] += 5.0
    lesion = _box_mask(hu.shape, spec.get("lesion_box"))
    lungs = _box_mask(hu.shape, spec.get("lungs_box"))
    if getattr(args, "input_lungs", None) is not None:
        # as the real ``segment``: the given mask is checked against the CT's grid by the library's own
        # reader (an error naming the file otherwise) and is the lung mask used and written
        from CovidGANSegLib.nifti import load_ct, load_mask

        load_mask(args.input_lungs, load_ct(args.input))
        lungs = (np.asanyarray(nib.load(str(args.input_lungs)).dataobj) > 0).astype(np.uint8)  # input file order
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
                                                     "mosmed_category": "CT-1", "device": device}))
    progress.report(1.0, "done")
    return 0


def main(argv=None) -> int:
    # the real parser binds these handlers when cli.main builds it; every other command is refused
    gan_commands.run_pseudo_healthy = _run
    seg_commands.run_segment = _run
    for module, names in ((gan_commands, ("run_train", "run_pseudo_masks")), (seg_commands, ("run_train",))):
        for name in names:
            setattr(module, name, _not_faked)
    return cli.main(argv)


def _not_faked(args: argparse.Namespace) -> int:
    raise InputError(f"the fake CLI runs only pseudo-healthy and segment, not {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
