"""The module's child-process helpers (pure Python: no slicer-core needed)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CovidGANSeg"))
from CovidGANSegModuleLib import process  # noqa: E402
from CovidGANSegModuleLib.jobs import CliJob, JobFailed, JobState  # noqa: E402


@pytest.mark.parametrize("line,expected", [
    ("PROGRESS 0.2500 GAN 3/12", (0.25, "GAN 3/12")),
    ("PROGRESS 1 done", (1.0, "done")),
    ("PROGRESS 1.7 over", (1.0, "over")),
    ("PROGRESS -0.1", (0.0, "")),
    ("PROGRESS x y", None),
    ("progress 0.5", None),
    ("log line", None),
])
def test_progress_lines(line, expected):
    assert process.parseProgressLine(line) == expected


def test_error_messages_prefer_the_librarys_own_error_and_hide_temporary_paths():
    lines = ["2026 INFO x: loading", "covidganseg segment: error: /tmp/w/input.nii: expected a 3D volume, got shape (1, 2)"]
    text = process.errorMessage(lines, 2, {"/tmp/w/input.nii": "input volume 'CT'"})
    assert text == "input volume 'CT': expected a 3D volume, got shape (1, 2)"
    crash = ["Traceback (most recent call last):", '  File "x.py", line 1', "RuntimeError: boom"]
    assert process.errorMessage(crash, 1).endswith("RuntimeError: boom")
    assert "exit code 139" in process.errorMessage([], 139)


def test_cuda_problems_are_recognised():
    assert process.cudaProblem("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate") == "out of memory"
    assert process.cudaProblem("AssertionError: Torch not compiled with CUDA enabled") == "not available"
    assert process.cudaProblem("error: CUDA was requested but is not available") == "not available"
    assert process.cudaProblem("ValueError: not Hounsfield units") is None


def test_child_output_is_read_on_threads_and_the_tree_is_killed(tmp_path):
    """A child that prints progress, starts a grandchild and never ends: read, then killed as a group."""
    pidFile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); open({str(pidFile)!r}, 'w').write(str(p.pid))\n"
            "print('PROGRESS 0.5 half', flush=True)\n"
            "print('to stderr', file=sys.stderr, flush=True)\n"
            "time.sleep(600)\n")
    child = process.SubprocessRunner().start([sys.executable, "-c", code])
    lines, deadline = [], time.monotonic() + 30
    while len(lines) < 2 or not pidFile.exists():
        lines += child.readLines()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert ("stdout", "PROGRESS 0.5 half") in lines and ("stderr", "to stderr") in lines
    grandchild = int(pidFile.read_text())
    child.kill(grace=1.0)
    assert child.poll() is not None
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_a_job_whose_child_cannot_start_fails_cleanly(tmp_path):
    cleaned = []
    job = CliJob("Test", lambda device: ["/nonexistent/python", "-m", "x"], device="cpu", onSuccess=lambda: None,
                 runner=process.SubprocessRunner())
    job.addCleanup(lambda: cleaned.append(True))
    with pytest.raises(FileNotFoundError):
        job.start()
    job.cancel()
    assert job.state == JobState.CANCELLED and cleaned == [True]


def test_a_job_that_fails_while_loading_results_reports_it(tmp_path):
    def onSuccess():
        raise RuntimeError("output file is not on the input grid")

    job = CliJob("Test", lambda device: [sys.executable, "-c", "print('PROGRESS 1 done')"], device="cpu", onSuccess=onSuccess,
                 runner=process.SubprocessRunner())
    with pytest.raises(JobFailed, match="not on the input grid"):
        job.start().wait()
