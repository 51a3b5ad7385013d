"""Atomic file and folder writes: a failed or killed run never leaves half-written outputs.

* :func:`atomic_path` - one file, written to a temporary file beside it and renamed at the end;
* :func:`atomic_directory` - one folder, built in a temporary folder beside it and renamed;
* :func:`atomic_files` - a *set* of files (``segment``'s mask, lungs, pseudo-healthy CT,
  difference map and report) staged in hidden folders beside them and renamed together at the
  end: they appear together or not at all.

Temporary names start with ``.`` and end in ``.partial`` (plus the real suffixes). They are
removed on any error, on Ctrl-C (``KeyboardInterrupt``) and, once :func:`install_signal_handlers`
has run (the CLI does it), on SIGTERM and SIGHUP too. SIGINT / SIGTERM / SIGHUP are held off
while a temporary file is created or removed and during the final renames, so a signal cannot
leave a temporary file behind or split a set of outputs. Only ``kill -9`` or a power loss can:
a stray hidden ``.*.partial`` file or folder, or, during the renames of :func:`atomic_files` (a
few microseconds: one ``rename`` per file), a set of which some files are new and some old.

An ``OSError`` while creating, writing or renaming (read-only folder, disk full, file-size limit)
becomes :class:`~CovidGANSegLib.errors.OutputError`, whose message names the file the caller
asked for, never the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from CovidGANSegLib.errors import OutputError

#: the signals that stop a command: held off around temporary-file bookkeeping and final renames;
#: training finishes its current step on them (runlock.stop_after_step)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

#: temporary path -> the path its content is meant for (so that errors name the real output)
_FINAL: dict[str, Path] = {}
_FINAL_LOCK = threading.Lock()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP until the block ends; they are handled right after it.

    A no-op where ``signal.pthread_sigmask`` does not exist (Windows).
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like Ctrl-C (SIGINT) does.

    Context managers of this module (and ``finally`` blocks everywhere) then clean up before the
    process ends. Signals that are ignored (e.g. SIGINT of a background job) stay ignored; only the
    main thread can install handlers, elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        try:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue
            if sig == signal.SIGINT:
                if current is signal.default_int_handler:
                    continue
            elif current not in (signal.SIG_DFL, None):
                continue  # somebody else's handler
            signal.signal(sig, _raise_keyboard_interrupt)
        except (OSError, ValueError):
            continue


def is_temporary_name(name: str) -> bool:
    """Whether a file or folder name is one of this module's temporary names (hidden, ``.partial``)."""
    return name.startswith(".") and ".partial" in name


def final_name(path: str | Path) -> Path:
    """The output a temporary path stands for (``path`` itself when it is not a temporary path)."""
    p = Path(path)
    with _FINAL_LOCK:
        for _ in range(16):
            nxt = _FINAL.get(str(p))
            if nxt is None:
                break
            p = nxt
    return p


def _register(tmp: Path, final: Path) -> None:
    with _FINAL_LOCK:
        _FINAL[str(tmp)] = final


def _unregister(tmp: Path) -> None:
    with _FINAL_LOCK:
        _FINAL.pop(str(tmp), None)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError) -> str:
    """A short reason for a failed write, with a hint for the usual causes."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hints = {
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EFBIG: "the file exceeds the file-size limit (ulimit -f) or the file system's maximum",
        errno.ENOTDIR: "a part of the folder path is a file",
        errno.EEXIST: "a part of the folder path is a file",
        errno.EISDIR: "the output is a folder",
    }
    if hasattr(errno, "EDQUOT"):
        hints[errno.EDQUOT] = "the disk quota is exhausted"
    hint = hints.get(exc.errno) if exc.errno is not None else None
    return f"cannot write the output: {hint} ({reason})" if hint else f"cannot write the output ({reason})"


def _is_ours(exc: OSError, *temporaries: Path) -> bool:
    """Whether ``exc`` came from writing one of ``temporaries`` (or from an unnamed write)."""
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if n]
    if not names:
        return True
    for name in names:
        text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
        for tmp in temporaries:
            if text == str(tmp) or text.startswith(str(tmp) + os.sep):
                return True
    return False


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffixes (``.nii.gz``, ``.pt``) so writers that infer the
    format from the name still work. The file gets the usual permissions (``0666 & ~umask``).

    Raises:
        OutputError: the file cannot be created, written or renamed (naming ``path``).
    """
    path = Path(path)
    final = final_name(path)
    tmp_path: Path | None = None
    try:
        with signals_deferred():
            path.parent.mkdir(parents=True, exist_ok=True)
            suffix = "".join(path.suffixes)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".partial{suffix}", dir=path.parent)
            tmp_path = Path(tmp)
            _register(tmp_path, final)
            os.close(fd)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        with signals_deferred():
            os.replace(tmp_path, path)
            _unregister(tmp_path)
            tmp_path = None
    except OSError as exc:
        if exc.errno is None or (tmp_path is not None and not _is_ours(exc, tmp_path)):
            raise  # not an error of this write (e.g. a message-only FileExistsError from the block)
        raise OutputError(describe_os_error(exc), final) from exc
    finally:
        if tmp_path is not None:
            with signals_deferred():
                _remove(tmp_path)
                _unregister(tmp_path)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` only if the block succeeds.

    The folder gets the usual permissions (``0777 & ~umask``), like its files, so a shared data set
    stays readable by colleagues when the umask allows it.

    Raises:
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
        OutputError: the folder cannot be created, written or renamed (naming ``path``).
    """
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path}: output folder exists and is not empty (choose another or remove it)")
    final = final_name(path)
    tmp: Path | None = None
    trash: Path | None = None
    try:
        with signals_deferred():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
            _register(tmp, final)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        yield tmp
        with signals_deferred():
            if path.exists() or path.is_symlink():
                if path.is_dir() and not path.is_symlink():
                    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.partial", dir=path.parent))
                    os.replace(path, trash / "old")
                else:
                    path.unlink()
            os.replace(tmp, path)
            _unregister(tmp)
            tmp = None
    except OSError as exc:
        if exc.errno is None or (tmp is not None and not _is_ours(exc, tmp, path)):
            raise
        raise OutputError(describe_os_error(exc), final) from exc
    finally:
        with signals_deferred():
            if tmp is not None:
                if trash is not None and (trash / "old").exists() and not path.exists():
                    os.replace(trash / "old", path)  # put the previous output back
                _remove(tmp)
                _unregister(tmp)
            if trash is not None:
                _remove(trash)


@contextlib.contextmanager
def atomic_files(paths: Mapping[str, str | Path]) -> Iterator[dict[str, Path]]:
    """Stage a set of output files and make them appear together, or not at all.

    Yields ``{key: staged path}``: each staged path has its output's file name, inside a hidden
    folder ``.<name>.XXXX.partial`` created beside the output (one per output folder, so the final
    renames stay within one file system). When the block succeeds, every staged file is renamed
    onto its output with SIGINT / SIGTERM / SIGHUP held off; if one rename fails, the outputs
    already replaced are restored (from hard links of the previous files, or removed when there was
    none). On any error or signal the staging folders are removed. Staged files that the block did
    not create are simply not written.

    Raises:
        ValueError: two keys name the same file.
        OutputError: a staging folder cannot be created or a file cannot be renamed (naming the output).
    """
    finals = {key: Path(p) for key, p in paths.items()}
    if len({str(p.resolve()) for p in finals.values()}) != len(finals):
        raise ValueError("two outputs have the same file name")
    stage_dirs: dict[str, Path] = {}
    staged: dict[str, Path] = {}
    created: list[Path] = []  # output folders made here, removed again (when empty) on failure
    committed = False
    try:
        for key, final in finals.items():
            parent = str(final.parent.resolve())
            if parent not in stage_dirs:
                with signals_deferred():
                    try:
                        missing = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
                        final.parent.mkdir(parents=True, exist_ok=True)
                        created.extend(missing)  # deepest first
                        stage = Path(tempfile.mkdtemp(prefix=f".{final.name.split('.')[0]}.", suffix=".partial", dir=final.parent))
                    except OSError as exc:
                        raise OutputError(describe_os_error(exc), final) from exc
                    stage_dirs[parent] = stage
                    _register(stage, final.parent)
            staged[key] = stage_dirs[parent] / final.name
            _register(staged[key], final)
        yield dict(staged)
        for key, tmp in staged.items():  # flush what was written before the renames
            if tmp.is_file():
                try:
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())
                except OSError as exc:
                    raise OutputError(describe_os_error(exc), finals[key]) from exc
        with signals_deferred():
            _commit({k: (staged[k], finals[k]) for k in staged if staged[k].is_file()})
            committed = True
    finally:
        with signals_deferred():
            for tmp in staged.values():
                _unregister(tmp)
            for stage in stage_dirs.values():
                _remove(stage)
                _unregister(stage)
            if not committed:
                for folder in created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break


def _commit(moves: dict[str, tuple[Path, Path]]) -> None:
    """Rename every staged file onto its output; on failure restore the outputs already replaced."""
    done: list[tuple[Path, Path | None, bool]] = []  # (output, backup of its previous content, it existed)
    for tmp, final in moves.values():
        backup: Path | None = None
        existed = final.is_file()
        if existed:
            backup = tmp.with_name(f".{tmp.name}.previous")
            try:
                os.link(final, backup)
            except OSError:
                backup = None
        try:
            os.replace(tmp, final)
        except OSError as exc:
            for out, old, had in reversed(done):
                try:
                    if old is not None:
                        os.replace(old, out)
                    elif not had:
                        out.unlink()
                except OSError:
                    pass
            raise OutputError(describe_os_error(exc), final) from exc
        done.append((final, backup, existed))
