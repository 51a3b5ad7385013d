"""Run the library's command line in a child process that can be watched and killed as a tree.

Inference never runs in Slicer's GUI process: the module starts ``PythonSlicer -m CovidGANSegLib
--progress lines ...`` (``sys.executable`` outside the Slicer application), reads its stdout and
stderr on two daemon threads, and hands complete lines to whoever polls (a ``QTimer`` in the
Widget, a blocking loop in the Python console or in tests). The child is started in its own
process group (POSIX: a new session; Windows: a new process group) because ``PythonSlicer`` is a
launcher that starts the real interpreter as *its* child: killing only the launcher would leave
the interpreter (and the GPU memory it holds) running. :meth:`ChildProcess.kill` ends the group.

What the child's lines and exit codes mean is defined once, in :mod:`CovidGANSegLib.protocol`
(torch-free), which the library's command line uses too.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Optional

from CovidGANSegLib import protocol

log = logging.getLogger(__name__)

#: how many stderr lines are kept for error messages
STDERR_TAIL_LINES = 400

#: the launcher of Slicer's Python (``bin/PythonSlicer``, on the PATH inside the Slicer application)
PYTHON_SLICER = "PythonSlicer"


def parseProgressLine(line: str) -> tuple[float, str] | None:
    """``"PROGRESS 0.25 GAN 3/12"`` -> ``(0.25, "GAN 3/12")``; anything else -> None (:func:`protocol.parse_progress`)."""
    return protocol.parse_progress(line)


def parseWarningLine(line: str) -> str | None:
    """The message of a warning the library logged on stderr, else None (:func:`protocol.parse_warning`)."""
    return protocol.parse_warning(line)


def errorMessage(stderrLines: Sequence[str], returncode: int | None, replacements: Mapping[str, str] | None = None) -> str:
    """The message a user should see for a failed child.

    The library's own errors (``covidganseg CMD: error: ...``, :func:`protocol.parse_error`) are
    shown alone; anything else (a crash with a traceback) is shown as its last lines. Temporary
    file names are replaced by what the user knows (``/tmp/.../input.nii`` -> ``volume 'CT chest'``).
    """
    lines = [line.rstrip() for line in stderrLines if line.strip()]
    own = [message for message in (protocol.parse_error(line) for line in lines) if message is not None]
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


def runningInsideSlicer() -> bool:
    """Whether this Python runs inside the Slicer application (``slicer.app`` exists)."""
    return "slicer" in sys.modules and getattr(sys.modules["slicer"], "app", None) is not None


def pythonExecutable(insideSlicer: Optional[bool] = None, which: Callable[[str], Optional[str]] = shutil.which) -> str:
    """The Python that runs the library's command line in the child process.

    Inside the Slicer application (``insideSlicer``; default :func:`runningInsideSlicer`) that is
    Slicer's ``PythonSlicer`` launcher, found on the PATH as Slicer sets it (``which``); elsewhere,
    or when no launcher is found, this process's own interpreter (``sys.executable``). The test
    harness is an application like any other here: it gets ``PythonSlicer`` when one is on the PATH.
    The launcher (CTK's AppLauncher) exits with the exit code of the interpreter it starts, so the
    protocol's exit codes come through it.
    """
    if runningInsideSlicer() if insideSlicer is None else insideSlicer:
        found = which(PYTHON_SLICER)
        if found:
            return found
        log.info("%s is not on the PATH; running the library with %s", PYTHON_SLICER, sys.executable)
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
