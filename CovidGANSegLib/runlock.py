"""One process per run folder, stale temporary files of killed runs, and stopping training cleanly.

* :func:`run_lock`: ``RUN/.lock`` holds the owner's pid, host, command and start time. It is created
  atomically (``O_CREAT | O_EXCL``): a second run into the same folder refuses, naming the owner. A
  lock left by a killed run on this host (its pid is no longer alive) is reported and taken over.
  A lock from another host cannot be checked and is never taken over.
* :func:`clean_stale_partials`: after ``kill -9`` the atomic writers (:mod:`CovidGANSegLib.atomic`)
  may leave hidden ``.<name>.XXXX.partial*`` files or folders. They are removed on start, only
  inside the run folder and only while its lock is held (no other process can be writing them).
* :func:`stop_after_step`: during a training loop, SIGINT / SIGTERM / SIGHUP let the current step
  finish; then a checkpoint is written and the run stops with a message saying how to resume. A
  second signal stops at once (the atomic writers still clean up).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from CovidGANSegLib.atomic import STOP_SIGNALS, is_temporary_name
from CovidGANSegLib.errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
T = TypeVar("T")


class RunLockedError(InputError):
    """The run folder is in use by another process."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def read_lock(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner recorded in ``RUN/.lock`` (``{}`` if unreadable), or None without a lock."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process (unreadable lock file)"
    return (f"pid {owner.get('pid')} on host {owner.get('host')} ({owner.get('command', 'a command')}, "
            f"started {owner.get('started', '?')})")


def is_stale(owner: dict[str, Any]) -> bool:
    """Whether a lock's owner is a process of this host that is no longer alive."""
    try:
        pid = int(owner.get("pid"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return owner.get("host") == socket.gethostname() and not _pid_alive(pid)


class RunLock:
    """``RUN/.lock`` held by this process (see :func:`run_lock`)."""

    def __init__(self, run_dir: str | Path, command: str = "train") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.held = False
        self.took_over: dict[str, Any] | None = None
        self._created: list[Path] = []

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.owner) + "\n")
        return True

    def acquire(self) -> RunLock:
        """Take the lock (creating RUN); take over a stale one.

        Raises:
            RunLockedError: another live process (or another host) holds it.
        """
        from CovidGANSegLib.atomic import describe_os_error

        try:
            self._created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                if self._create():
                    self.held = True
                    return self
                owner = read_lock(self.run_dir)
                if owner is None:
                    continue  # released meanwhile
                if not is_stale(owner):
                    self._remove_created()
                    raise RunLockedError(f"the run folder is in use by {_describe(owner)}; wait for that run to end or choose "
                                         f"another --out (if that process is gone, remove {LOCK_NAME})", self.run_dir)
                if self._take_over(owner):
                    log.warning("%s: stale lock of %s, a run that no longer exists; taking it over", self.run_dir, _describe(owner))
                    self.took_over = owner
        except OSError as exc:
            raise InputError(describe_os_error(exc), self.run_dir) from exc
        raise RunLockedError(f"could not take the run folder's lock ({LOCK_NAME}); try again", self.run_dir)

    def _take_over(self, owner: dict[str, Any]) -> bool:
        """Move a stale lock aside (only the one that was read); False if it changed meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved != owner:  # another process took over first and this is its fresh lock: put it back
            with contextlib.suppress(OSError):
                os.replace(aside, self.path)
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        return True

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        if not self.held:
            return
        self.held = False
        owner = read_lock(self.run_dir)
        if owner and owner.get("pid") == self.owner["pid"] and owner.get("started") == self.owner["started"]:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders :meth:`acquire` created when nothing else was written in them."""
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_lock(run_dir: str | Path, command: str = "train") -> RunLock:
    """``with run_lock(RUN, "train-gan"):`` hold ``RUN/.lock`` for the block."""
    return RunLock(run_dir, command)


# ------------------------------------------------------------------------------------------------
# stale temporary files


def clean_stale_partials(run_dir: str | Path, lock: RunLock | None = None) -> list[Path]:
    """Remove the temporary files and folders a killed run left in ``run_dir``; returns them.

    Only names of the atomic writers (hidden, with ``.partial``) are removed, only inside
    ``run_dir`` (symbolic links are not followed), and only while ``lock`` (this run's) is held.
    """
    run_dir = Path(run_dir)
    if lock is not None and not lock.held:
        raise RuntimeError("clean_stale_partials needs the run's lock")
    removed: list[Path] = []
    if not run_dir.is_dir():
        return removed
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        for name in [d for d in dirs if is_temporary_name(d)]:
            path = Path(root) / name
            dirs.remove(name)
            if path.is_symlink():
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        for name in files:
            if is_temporary_name(name):
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    for path in removed:
        log.warning("removed %s, left by an interrupted run", path)
    return removed


# ------------------------------------------------------------------------------------------------
# stopping a training loop between steps


class TrainingInterrupted(KeyboardInterrupt):
    """A training run stopped on a signal after writing its checkpoint."""


class _StopRequest:
    def __init__(self) -> None:
        self.signal: str | None = None

    def handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt(f"signal {name}")
        self.signal = name
        log.warning("%s received: finishing the current training step, then writing a checkpoint (send it again to stop at once)", name)


def stop_after_step(steps: Iterable[T], on_stop: Callable[[], str], agree: Callable[[bool], bool] | None = None) -> Iterator[T]:
    """Yield ``steps``; on SIGINT / SIGTERM / SIGHUP finish the current one, call ``on_stop`` and stop.

    ``on_stop`` writes the checkpoint and returns the message to show (how to resume); the loop
    then ends with :class:`TrainingInterrupted` (a ``KeyboardInterrupt``: the command line exits
    with code 130). Outside the main thread signals cannot be caught: the steps run unchanged.
    ``agree`` (distributed training: :func:`CovidGANSegLib.distributed.any_rank`) turns this
    process's "a signal came" into the answer every process shares, so all stop after the same step.
    """
    if threading.current_thread() is not threading.main_thread():
        yield from steps
        return
    request = _StopRequest()
    saved: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue  # e.g. SIGINT of a background job stays ignored
            saved[sig] = current
            signal.signal(sig, request.handler)
        except (OSError, ValueError):
            continue
    try:
        for step in steps:
            yield step
            stop = request.signal is not None
            if agree is not None:
                stop = agree(stop)
            if stop:
                message = on_stop()
                print(message, file=sys.stderr, flush=True)  # shown whatever the log level
                raise TrainingInterrupted(message)
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler)
