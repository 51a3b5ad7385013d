"""Run the library's command line in a child process that can be watched and killed as a tree.

Inference never runs in Slicer's GUI process: the module starts ``PythonSlicer -m CovidGANSegLib
--progress lines ...`` (``sys.executable`` outside the Slicer application), reads its stdout and
stderr on two daemon threads, and hands complete lines to whoever polls (a ``QTimer`` in the
Widget, a blocking loop in the Python console or in tests). The child is started in its own
process group (POSIX: a new session; Windows: a new process group) because ``PythonSlicer`` is a
launcher that starts the real interpreter as *its* child: killing only the launcher would leave
the interpreter (and the GPU memory it holds) running. :meth:`ChildProcess.kill` ends the group.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: ``PROGRESS <fraction> <text>`` (CovidGANSegLib.progress in ``lines`` mode)
PROGRESS_PATTERN = re.compile(r"^PROGRESS\s+([-+0-9.eE]+)\s?(.*)$")
#: ``covidganseg <command>: error: <file>: <problem>`` (CovidGANSegLib.cli, exit code 2)
ERROR_PATTERN = re.compile(r"^covidganseg [\w-]+: (?:error: )?(.*)$")
#: stderr text that means "CUDA is missing or ran out of memory": rerun on the CPU
CUDA_OOM_PATTERN = re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", re.IGNORECASE)
CUDA_MISSING_PATTERN = re.compile(
    r"CUDA (?:is |was requested but is )?not available|Torch not compiled with CUDA|no CUDA(?:-capable)? device|"
    r"CUDA driver version is insufficient|Found no NVIDIA driver|cuda.*unavailable",
    re.IGNORECASE,
)

#: a warning logged by the library (``logging`` format of CovidGANSegLib.cli): shown to the user
WARNING_PATTERN = re.compile(r"\bWARNING [\w.]+: (.*)$")

#: how many stderr lines are kept for error messages
STDERR_TAIL_LINES = 400


def parseProgressLine(line: str) -> tuple[float, str] | None:
    """``"PROGRESS 0.25 GAN 3/12"`` -> ``(0.25, "GAN 3/12")``; anything else -> None."""
    match = PROGRESS_PATTERN.match(line.strip())
    if not match:
        return None
    try:
        fraction = float(match.group(1))
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), match.group(2).strip()


def cudaProblem(stderrText: str) -> str | None:
    """``"out of memory"`` or ``"not available"`` when the child failed because of CUDA, else None."""
    if CUDA_OOM_PATTERN.search(stderrText):
        return "out of memory"
    if CUDA_MISSING_PATTERN.search(stderrText):
        return "not available"
    return None


def errorMessage(stderrLines: Sequence[str], returncode: int | None, replacements: Mapping[str, str] | None = None) -> str:
    """The message a user should see for a failed child.

    The library's own errors (``covidganseg CMD: error: ...``) are shown alone; anything else (a
    crash with a traceback) is shown as its last lines. Temporary file names are replaced by what
    the user knows (``/tmp/.../input.nii`` -> ``volume 'CT chest'``).
    """
    lines = [line.rstrip() for line in stderrLines if line.strip()]
    own = [m.group(1) for m in (ERROR_PATTERN.match(line) for line in lines) if m]
    if own:
        text = "\n".join(own)
    elif lines:
        # a traceback: its last line names the exception; keep a few lines of context
        text = "\n".join(lines[-8:])
    else:
        text = f"the processing command stopped with exit code {returncode} and printed no error"
    for old, new in (replacements or {}).items():
        if old:
            text = text.replace(old, new)
    return text


def pythonExecutable() -> str:
    """Slicer's Python for child processes: ``PythonSlicer`` inside the application, else this Python."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app") and not getattr(sys.modules["slicer"].app, "isTestHarness", False):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def libraryRoot() -> Path:
    """The folder that holds the ``CovidGANSegLib`` package (put on the child's PYTHONPATH)."""
    import importlib.util

    spec = importlib.util.find_spec("CovidGANSegLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CovidGANSegLib library is not installed beside the CovidGANSeg module")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def childEnvironment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the child: this one, unbuffered UTF-8 output, the library on PYTHONPATH."""
    env = dict(os.environ)
    root = str(libraryRoot())
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        paths.insert(0, root)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra or {})
    return env


class ChildProcess:
    """A running child with its stdout / stderr read on threads; killable as a process tree."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.argv = [str(a) for a in argv]
        kwargs: dict = dict(
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
            env=None if env is None else dict(env), cwd=None if cwd is None else str(cwd),
        )
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session = own process group (pgid == pid)
        log.debug("starting %s", " ".join(self.argv))
        self._popen = subprocess.Popen(self.argv, **kwargs)
        self.pid = self._popen.pid
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stderrTail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._killed = False
        self._threads = [
            threading.Thread(target=self._read, args=("stdout", self._popen.stdout), daemon=True, name=f"covidganseg-stdout-{self.pid}"),
            threading.Thread(target=self._read, args=("stderr", self._popen.stderr), daemon=True, name=f"covidganseg-stderr-{self.pid}"),
        ]
        for t in self._threads:
            t.start()

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip("\r\n")
                if name == "stderr":
                    self.stderrTail.append(line)
                self._lines.put((name, line))
        except (OSError, ValueError):  # stream closed while reading (kill)
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def readLines(self) -> list[tuple[str, str]]:
        """All complete lines received since the last call, as ``(stream, line)``."""
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def poll(self) -> int | None:
        """Exit code once the child has exited and its output has been read to the end, else None."""
        code = self._popen.poll()
        if code is None:
            return None
        for t in self._threads:  # the pipes close at exit; give the readers a moment to finish
            t.join(timeout=2.0)
        return code

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @property
    def killed(self) -> bool:
        return self._killed

    def wait(self, timeout: float | None = None) -> int:
        self._popen.wait(timeout)
        return self.poll()  # type: ignore[return-value]

    def kill(self, grace: float = 3.0) -> None:
        """End the whole process tree: SIGTERM to the group, SIGKILL after ``grace`` seconds."""
        self._killed = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            self._signalGroup(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._groupAlive():
                time.sleep(0.05)
            if self._groupAlive():
                self._signalGroup(signal.SIGKILL)
        try:
            self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if the kernel refuses
            log.error("child process %d did not exit after SIGKILL", self.pid)
        for t in self._threads:
            t.join(timeout=2.0)

    def _signalGroup(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _groupAlive(self) -> bool:
        self._popen.poll()  # reap the leader so that it does not linger as a zombie member
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class SubprocessRunner:
    """The default process runner: starts :class:`ChildProcess` objects.

    The Logic's ``processRunner`` can be replaced (tests, other launchers) by any object with a
    ``start(argv, env=..., cwd=...)`` method returning an object with the :class:`ChildProcess`
    interface (``readLines``, ``poll``, ``kill``, ``stderrTail``, ``pid``).
    """

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> ChildProcess:
        return ChildProcess(argv, env=env, cwd=cwd)
