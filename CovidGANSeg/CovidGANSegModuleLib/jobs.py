"""Cancellable jobs around child processes, polled from Slicer's main thread.

A job never touches the MRML scene from a thread: the reader threads of
:class:`~.process.ChildProcess` only queue lines, and :meth:`Job.poll` (called by a ``QTimer`` in
the Widget, or by :meth:`Job.wait` in the console / headless Slicer / tests) parses them and,
once the child has succeeded, calls the job's ``onSuccess`` callback *in the calling thread* to
create the result nodes. So a job that is cancelled or fails creates no node at all, and a job's
temporary files are removed whatever the outcome.

Device fallback (:func:`CovidGANSegLib.protocol.fallback_device`, the one policy): when the child
exits with the protocol's "CUDA missing" or "GPU out of memory" code and the device was not
already ``cpu``, the job reruns the same command once on the CPU and says so in its messages. The
decision rests on the exit code alone, never on the child's message text.
"""

from __future__ import annotations

import csv
import enum
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CovidGANSegLib import protocol

from . import process

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobFailed(RuntimeError):
    """The job's child process (or the loading of its outputs) failed; the message says why."""


class JobCancelled(RuntimeError):
    """The job was cancelled by the user."""


@dataclass
class JobStatus:
    """What a progress bar and a status label show."""

    state: JobState
    fraction: float
    text: str
    messages: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Job:
    """Base class: state, progress, messages, cancel, blocking wait."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = JobState.PENDING
        self.fraction = 0.0
        self.statusText = "waiting"
        self.errorText = ""
        self.messages: list[str] = []  # things the user should know (e.g. "CUDA ran out of memory, rerun on CPU")
        self.result: Any = None
        self.startTime = time.monotonic()
        self.endTime: float | None = None
        self._cleanups: list[Callable[[], None]] = []

    # -- to override -------------------------------------------------------------------------
    def _advance(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        """Stop the running work (kill child processes)."""

    # -- public ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def elapsed(self) -> float:
        return (self.endTime or time.monotonic()) - self.startTime

    def status(self) -> JobStatus:
        return JobStatus(self.state, self.fraction, self.statusText, list(self.messages))

    def poll(self) -> JobStatus:
        """Read new output, update progress; create the result nodes when the work succeeded."""
        if not self.done:
            try:
                self._advance()
            except JobCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure ends the job with a message
                log.exception("%s failed", self.name)
                self._stop()
                self._finish(JobState.FAILED, error=str(exc) or type(exc).__name__)
        return self.status()

    def cancel(self) -> None:
        """Stop at once: kill the child process tree, remove temporary files, create no node."""
        if self.done:
            return
        self._stop()
        self._finish(JobState.CANCELLED, text="cancelled")

    def wait(self, progressCallback: Callable[[JobStatus], Any] | None = None, *, interval: float = 0.05,
             timeout: float | None = None) -> Any:
        """Block until the job ends (console / headless use); return its result or raise.

        Raises:
            JobFailed: with the child's error message.
            JobCancelled: if ``progressCallback`` (or another caller) cancelled the job.
            TimeoutError: after ``timeout`` seconds (the job is cancelled first).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll()
            if progressCallback is not None:
                progressCallback(status)
            if status.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{self.name} did not finish within {timeout} s")
            time.sleep(interval)
        self.raiseIfFailed()
        return self.result

    def raiseIfFailed(self) -> None:
        if self.state == JobState.FAILED:
            raise JobFailed(self.errorText)
        if self.state == JobState.CANCELLED:
            raise JobCancelled(f"{self.name} was cancelled")

    def addCleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    # -- internals ---------------------------------------------------------------------------
    def _finish(self, state: JobState, *, error: str = "", text: str | None = None) -> None:
        self.state = state
        self.endTime = time.monotonic()
        if state == JobState.SUCCEEDED:
            self.fraction = 1.0
        self.errorText = error
        self.statusText = text or {JobState.SUCCEEDED: "done", JobState.FAILED: f"failed: {error.splitlines()[0] if error else ''}",
                                   JobState.CANCELLED: "cancelled"}.get(state, self.statusText)
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - cleanup must not hide the job's own outcome
                log.exception("cleanup of %s failed", self.name)
        self._cleanups.clear()


def commandLineForDevice(prefix: Sequence[str], parameters: protocol.JobParameters) -> Callable[[str], list[str]]:
    """The ``argvForDevice`` of a :class:`CliJob` running the library's CLI with ``parameters``
    (:class:`protocol.PseudoHealthyParameters` / :class:`protocol.SegmentParameters`).

    ``prefix`` starts the CLI, e.g. ``[PythonSlicer, "-m", "CovidGANSegLib"]``.
    """
    prefix = [str(p) for p in prefix]

    def build(device: str) -> list[str]:
        return protocol.command_line(prefix, parameters, device)

    return build


class CliJob(Job):
    """One run of the library's command line, with CPU fallback and result loading.

    Args:
        name: shown in messages ("Pseudo-healthy generation").
        argvForDevice: builds the command line for a device ("auto", "cpu", "cuda").
        device: the requested device.
        onSuccess: called (in the polling thread) after the child exited with 0; creates the
            result nodes and returns the job's result. It must clean up after itself if it fails.
        runner: starts the child (:class:`~.process.SubprocessRunner` or a replacement).
        env: the child's environment.
        replacements: temporary paths -> names the user knows, applied to error messages.
        progressRange: the part of the overall progress bar the child's own progress fills.
    """

    def __init__(self, name: str, argvForDevice: Callable[[str], Sequence[str]], *, device: str, onSuccess: Callable[[], Any],
                 runner: Any, env: Mapping[str, str] | None = None, replacements: Mapping[str, str] | None = None,
                 progressRange: tuple[float, float] = (0.05, 0.95), fallbackToCpu: bool = True) -> None:
        super().__init__(name)
        self.argvForDevice = argvForDevice
        self.device = device
        self.requestedDevice = device
        self.onSuccess = onSuccess
        self.runner = runner
        self.env = env
        self.replacements = dict(replacements or {})
        self.progressRange = progressRange
        self.fallbackToCpu = fallbackToCpu
        self.child = None
        self.childFraction = 0.0
        self.stdoutLog: list[str] = []
        self.attempts: list[tuple[str, int | None]] = []  # (device, exit code) of each finished child
        self.childSeconds = 0.0  # wall time of the child processes (from start to seen exiting)
        self.loadSeconds = 0.0  # time spent creating the result nodes
        self._childStart = 0.0

    def start(self) -> "CliJob":
        if self.state == JobState.PENDING:
            self._startChild()
        return self

    def _startChild(self) -> None:
        argv = list(self.argvForDevice(self.device))
        self._childStart = time.monotonic()
        self.child = self.runner.start(argv, env=self.env)
        self.state = JobState.RUNNING
        self.childFraction = 0.0
        self.statusText = f"{self.name}: starting ({self._deviceText()})"
        self.fraction = self.progressRange[0]

    def _deviceText(self) -> str:
        return {"auto": "GPU if available, else CPU", "cpu": "CPU", "cuda": "GPU (CUDA)"}.get(self.device, self.device)

    def _advance(self) -> None:
        if self.state == JobState.PENDING:
            self._startChild()
        for stream, line in self.child.readLines():
            if stream != "stdout":
                warning = process.parseWarningLine(line)
                if warning and warning not in self.messages and len(self.messages) < 10:
                    self.messages.append(warning)  # something the library wants the user to know
                continue
            parsed = process.parseProgressLine(line)
            if parsed is None:
                self.stdoutLog.append(line)
                continue
            self.childFraction, text = parsed
            lo, hi = self.progressRange
            self.fraction = lo + (hi - lo) * self.childFraction
            self.statusText = f"{self.name}: {text}" if text else self.name
        code = self.child.poll()
        if code is None:
            return
        self.childSeconds += time.monotonic() - self._childStart
        self.attempts.append((self.device, code))
        if code != 0:
            self._childFailed(code)
            return
        self.statusText = f"{self.name}: loading results"
        self.fraction = self.progressRange[1]
        loadStart = time.monotonic()
        self.result = self.onSuccess()
        self.loadSeconds = time.monotonic() - loadStart
        self._finish(JobState.SUCCEEDED, text=f"{self.name}: done in {self.elapsed:.1f} s")

    def _childFailed(self, code: int) -> None:
        fallback = protocol.fallback_device(self.device, code) if self.fallbackToCpu else None
        if fallback is not None:
            reason = protocol.fallback_reason(code)
            note = (f"{self.name}: {reason} on device '{self.device}' (exit code {code}); running again on the CPU "
                    "(slower, but the result is the same).")
            log.warning(note)
            self.messages.append(note)
            self.device = fallback
            self._startChild()
            self.statusText = f"{self.name}: {reason}, rerunning on CPU"
            return
        message = process.errorMessage(list(self.child.stderrTail), code, self.replacements)
        self._finish(JobState.FAILED, error=f"{self.name} failed: {message}")

    def _stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()


@dataclass
class BatchCase:
    """One CT file of a batch and where its outputs go."""

    caseId: str
    input: Path
    lesion: Path
    lungs: Path
    report: Path


BATCH_CSV_COLUMNS = ["case", "input", "status", "lesion_ml", "lung_ml", "percent_involved", "mosmed_category",
                     "lesion_file", "lungs_file", "device", "seconds", "message"]


class BatchJob(Job):
    """Segment every CT file of a folder, one child process after another; one CSV of results.

    Completed cases stay on disk when the batch is cancelled; the CSV (rewritten atomically after
    every case) lists exactly the cases that finished. A failing case is recorded and the batch
    goes on. If CUDA fails on one case, the remaining cases run on the CPU at once.
    """

    def __init__(self, name: str, cases: Sequence[BatchCase], argvForCase: Callable[[BatchCase, str], Sequence[str]], *,
                 device: str, runner: Any, env: Mapping[str, str] | None, csvPath: Path) -> None:
        super().__init__(name)
        if not cases:
            raise ValueError("a batch needs at least one case")
        self.cases = list(cases)
        self.argvForCase = argvForCase
        self.device = device
        self.runner = runner
        self.env = env
        self.csvPath = Path(csvPath)
        self.rows: list[dict[str, Any]] = []
        self.index = -1
        self.current: CliJob | None = None

    def _startNext(self) -> None:
        self.index += 1
        case = self.cases[self.index]
        self.current = CliJob(
            f"{case.caseId} ({self.index + 1}/{len(self.cases)})", lambda device, case=case: self.argvForCase(case, device),
            device=self.device, onSuccess=lambda case=case: self._readReport(case), runner=self.runner, env=self.env,
            replacements={}, progressRange=(0.0, 1.0),
        ).start()
        self.state = JobState.RUNNING

    def _readReport(self, case: BatchCase) -> dict[str, Any]:
        report = json.loads(case.report.read_text()) if case.report.is_file() else {}
        return report

    def _advance(self) -> None:
        if self.current is None:
            self._startNext()
        status = self.current.poll()
        n = len(self.cases)
        self.fraction = (self.index + status.fraction) / n
        self.statusText = f"Batch {self.index + 1}/{n}: {status.text}"
        if not status.done:
            return
        case, job = self.cases[self.index], self.current
        for note in job.messages:
            if note not in self.messages:
                self.messages.append(note)
        if job.device == "cpu" and self.device != "cpu":
            self.device = "cpu"  # CUDA failed once: do not try it again for every case
        row: dict[str, Any] = {"case": case.caseId, "input": str(case.input), "device": job.device, "seconds": round(job.elapsed, 2)}
        if job.state == JobState.SUCCEEDED:
            report = job.result or {}
            row.update(status="ok", lesion_ml=report.get("lesion_ml"), lung_ml=report.get("lung_ml"),
                       percent_involved=report.get("percent_involved"), mosmed_category=report.get("mosmed_category"),
                       lesion_file=case.lesion.name, lungs_file=case.lungs.name, message="")
        else:
            row.update(status="failed", message=job.errorText)
            removePartialOutputs(case)
        self.rows.append(row)
        writeCsvAtomically(self.csvPath, self.rows, BATCH_CSV_COLUMNS)
        if self.index + 1 < n:
            self._startNext()
            return
        failed = sum(1 for r in self.rows if r["status"] != "ok")
        self.result = {"csv": self.csvPath, "rows": list(self.rows), "failed": failed}
        text = f"Batch: {n - failed} of {n} cases segmented in {self.elapsed:.1f} s" + (f", {failed} failed" if failed else "")
        self._finish(JobState.SUCCEEDED, text=text)

    def _stop(self) -> None:
        if self.current is not None and not self.current.done:
            self.current.cancel()
            removePartialOutputs(self.cases[self.index])


def removePartialOutputs(case: BatchCase) -> None:
    """Remove a killed case's half-written files (the library writes ``.<name>.*.partial*`` first)."""
    for final in (case.lesion, case.lungs, case.report):
        stem = final.name.split(".")[0]
        for partial in final.parent.glob(f".{stem}.*partial*"):
            try:
                partial.unlink()
            except OSError:
                pass


def writeCsvAtomically(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write rows as CSV via a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(tmp, path)
    return path


def removeTree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
