"""The module's child-process helpers (pure Python: no slicer-core needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from CovidGANSegLib import cli, protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CovidGANSeg"))
from CovidGANSegModuleLib import jobs, process  # noqa: E402
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


def test_no_cuda_text_matching_is_left_in_the_module():
    """The module decides on exit codes only (issue 9, item 12): no pattern of CUDA message text remains."""
    source = (Path(process.__file__).read_text() + Path(jobs.__file__).read_text())
    for leftover in ("CUDA_MISSING_PATTERN", "CUDA_OOM_PATTERN", "cudaProblem", "out of memory|", "not compiled with CUDA"):
        assert leftover not in source, leftover


#: a child that exits with the code given for the device it was asked for, and says something misleading
DEVICE_CHILD = ("import sys\n"
                "codes = dict(pair.split('=') for pair in sys.argv[1].split(','))\n"
                "device = sys.argv[sys.argv.index('--device') + 1]\n"
                "print(sys.argv[2], file=sys.stderr, flush=True)\n"
                "print('PROGRESS 1 done', flush=True)\n"
                "sys.exit(int(codes.get(device, 0)))\n")


def _deviceJob(codes: str, device: str, stderrText: str = "", **kwargs) -> CliJob:
    def argv(dev):
        return [sys.executable, "-c", DEVICE_CHILD, codes, stderrText or "nothing", "--device", dev]

    return CliJob("Test", argv, device=device, onSuccess=lambda: "ok", runner=process.SubprocessRunner(), **kwargs)


@pytest.mark.parametrize("code,device,reason", [
    (protocol.EXIT_CUDA_MISSING, "cuda", "CUDA not available"),
    (protocol.EXIT_GPU_OUT_OF_MEMORY, "cuda", "GPU out of memory"),
    (protocol.EXIT_GPU_OUT_OF_MEMORY, "auto", "GPU out of memory"),
])
def test_the_exit_code_alone_makes_the_job_rerun_on_the_cpu(code, device, reason):
    job = _deviceJob(f"{device}={code}", device, stderrText="some unrelated text")
    assert job.start().wait(timeout=60) == "ok"
    assert job.attempts == [(device, code), ("cpu", 0)] and job.device == "cpu"
    assert len(job.messages) == 1 and reason in job.messages[0] and "running again on the CPU" in job.messages[0]


@pytest.mark.parametrize("codes,device,kwargs", [
    ("cuda=1", "cuda", {}),  # a crash whose text talks about CUDA memory: not the protocol's code, so no rerun
    ("cuda=2", "cuda", {}),
    (f"cpu={protocol.EXIT_CUDA_MISSING}", "cpu", {}),  # already on the CPU
    (f"cuda={protocol.EXIT_GPU_OUT_OF_MEMORY}", "cuda", {"fallbackToCpu": False}),
])
def test_other_failures_do_not_rerun(codes, device, kwargs):
    job = _deviceJob(codes, device, stderrText="torch.OutOfMemoryError: CUDA out of memory. CUDA is not available", **kwargs)
    with pytest.raises(JobFailed, match="CUDA out of memory"):
        job.start().wait(timeout=60)
    assert len(job.attempts) == 1 and job.messages == []


def test_a_batch_falls_back_once_and_stays_on_the_cpu(tmp_path):
    cases = [jobs.BatchCase(f"case{i}", tmp_path / f"case{i}.nii", tmp_path / f"case{i}_lesion.nii.gz", tmp_path / f"case{i}_lungs.nii.gz",
                            tmp_path / f"case{i}_report.json") for i in range(3)]

    def argvForCase(case, device):
        return [sys.executable, "-c", DEVICE_CHILD, f"cuda={protocol.EXIT_CUDA_MISSING}", "x", "--device", device]

    batch = jobs.BatchJob("Batch", cases, argvForCase, device="cuda", runner=process.SubprocessRunner(), env=None,
                          csvPath=tmp_path / "results.csv")
    result = batch.wait(timeout=120)
    assert [row["device"] for row in result["rows"]] == ["cpu", "cpu", "cpu"] and result["failed"] == 0
    assert len(batch.messages) == 1 and "CUDA not available" in batch.messages[0]


def test_job_command_lines_come_from_the_protocol_and_parse_with_the_real_cli():
    params = protocol.SegmentParameters(input="/w/input.nii", seg="/m/seg.pt", gan="/m/gan.pt", output="/w/lesion.nii",
                                        lungs="/w/lungs.nii", report="/w/report.json", device="cuda")
    build = jobs.commandLineForDevice(["/opt/Slicer/bin/PythonSlicer", "-m", "CovidGANSegLib"], params)
    for device in ("cuda", "cpu"):
        argv = build(device)
        assert argv[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "CovidGANSegLib"]
        args = cli.build_parser().parse_args(argv[3:])
        assert (args.command, args.device, args.progress, str(args.gan)) == ("segment", device, "lines", "/m/gan.pt")


def test_fallback_runs_under_python_3_9():
    """Slicer 5.6 / 5.8 run the module with Python 3.9: process, jobs and protocol together, there."""
    python = Path.home() / ".pyenv" / "versions" / "3.9.18" / "bin" / "python3.9"
    if not python.is_file():
        pytest.skip("no Python 3.9 interpreter here")
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/CovidGANSeg']\n"
            "from CovidGANSegLib import protocol\n"
            "from CovidGANSegModuleLib import jobs, process\n"
            "child = [sys.executable, '-c', 'import sys; sys.exit(%d if \"cuda\" in sys.argv else 0)' % protocol.EXIT_CUDA_MISSING]\n"
            "job = jobs.CliJob('t', jobs.commandLineForDevice(child, protocol.PseudoHealthyParameters('g', 'i', 'o')), device='cuda',\n"
            "                  onSuccess=lambda: 'ok', runner=process.SubprocessRunner())\n"
            "assert job.start().wait(timeout=60) == 'ok', job.errorText\n"
            "print(job.attempts)\n")
    result = subprocess.run([str(python), "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"[('cuda', {protocol.EXIT_CUDA_MISSING}), ('cpu', 0)]"


# --------------------------------------------------------------------------------------------
# the launcher: PythonSlicer inside Slicer (issue 9, item 11)
# --------------------------------------------------------------------------------------------

def test_launcher_choice(monkeypatch):
    found = {"PythonSlicer": "/opt/Slicer/bin/PythonSlicer"}
    assert process.pythonExecutable(insideSlicer=True, which=found.get) == "/opt/Slicer/bin/PythonSlicer"
    assert process.pythonExecutable(insideSlicer=True, which=lambda name: None) == sys.executable
    assert process.pythonExecutable(insideSlicer=False, which=found.get) == sys.executable
    # detected: a ``slicer`` module with an application object (Slicer itself, or the test harness)
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    assert process.runningInsideSlicer()
    assert process.pythonExecutable(which=found.get) == "/opt/Slicer/bin/PythonSlicer"
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace())  # slicer-core alone: no application
    assert not process.runningInsideSlicer()
    assert process.pythonExecutable(which=found.get) == sys.executable


def test_launcher_is_found_on_the_path_inside_slicer(monkeypatch, tmp_path):
    """As inside Slicer, where ``bin/`` is on the PATH: a launcher script named ``PythonSlicer`` is used."""
    launcher = tmp_path / "bin" / "PythonSlicer"
    launcher.parent.mkdir()
    launcher.write_text(f"#!/bin/sh\n\"{sys.executable}\" \"$@\"\nexit $?\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{launcher.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    assert process.pythonExecutable() == str(launcher)
    # the launcher is a parent process: the exit code of the interpreter it starts comes through
    job = _deviceJob(f"cuda={protocol.EXIT_CUDA_MISSING}", "cuda")
    job.argvForDevice = lambda dev: [process.pythonExecutable(), "-c", DEVICE_CHILD, f"cuda={protocol.EXIT_CUDA_MISSING}", "x",
                                     "--device", dev]
    assert job.start().wait(timeout=60) == "ok"
    assert job.attempts == [("cuda", protocol.EXIT_CUDA_MISSING), ("cpu", 0)]


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
