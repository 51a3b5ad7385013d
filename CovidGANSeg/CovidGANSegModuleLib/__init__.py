"""Helpers of the CovidGANSeg Slicer module (logic pieces that need no Qt and no torch).

The module file ``CovidGANSeg.py`` keeps Slicer's Module / Widget / Logic / Test classes; the
pieces of its Logic live here so that they can be tested against real MRML nodes without the
Slicer application:

* :mod:`.process` runs the library's command line in a child process (own process group,
  stdout read on a thread, ``PROGRESS`` lines parsed, the whole tree killed on cancel).
* :mod:`.jobs` turns child processes into cancellable jobs that a QTimer (Widget) or a blocking
  loop (Python console, headless Slicer, tests) polls; nodes are created only when a job
  succeeds, so a cancelled or failed job leaves the scene as it was.
* :mod:`.volumeio` exchanges volumes with the child as NIfTI files on the input's exact geometry.
* :mod:`.segmentations`, :mod:`.tables`, :mod:`.display` build and show the result nodes.
* :mod:`.review` keeps the AI result, compares Segment Editor corrections with it, exports the
  corrected lesion mask as ``study_XXXX_mask.nii.gz`` on the CT's grid.
* :mod:`.models` lists model cards (no torch), :mod:`.dependencies` installs packages on request.

Nothing here imports torch; nibabel is imported only inside the functions that read or write
NIfTI files, so Slicer can load the module before the Python dependencies are installed.
"""

__all__ = ["dependencies", "display", "jobs", "models", "process", "review", "segmentations", "tables", "volumeio"]
