"""The ``covidganseg`` command line: one subcommand per step of the pipeline.

Each subcommand lives in ``CovidGANSegLib/commands/<name>.py`` with ``register(subparsers)``;
heavy imports (torch) happen inside the handlers so ``--help`` stays fast. Logging is configured
here and only here. Exit codes, error lines and the device policy are those of
:mod:`CovidGANSegLib.protocol` (the contract with the Slicer module).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from CovidGANSegLib import __version__, atomic, distributed, progress, protocol
from CovidGANSegLib.errors import CovidGANSegError, exception_chain

#: command modules, in the order of the pipeline
COMMAND_MODULES = ("phantoms", "preprocess", "gan", "seg", "train", "evaluate", "demo", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidganseg",
        description="Self-supervised COVID-19 lesion segmentation in chest CT (3D GAN + TransUNet).",
        epilog="Run 'covidganseg COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    parser.add_argument("--progress", default="bar", choices=["bar", "lines", "none"],
                        help="progress display: tqdm bars, 'PROGRESS <fraction> <text>' lines on stdout (for the Slicer module), or none")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"CovidGANSegLib.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit codes are :data:`CovidGANSegLib.protocol.EXIT_CODES`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format=protocol.LOG_FORMAT, stream=sys.stderr)
    progress.set_mode(args.progress)
    atomic.install_signal_handlers()  # SIGTERM / SIGHUP raise KeyboardInterrupt, so temporary files are removed
    try:
        result = args.handler(args)
    except KeyboardInterrupt as exc:
        _hold_signals_if_broken()
        # torchrun stops the surviving ranks of a failed job with SIGTERM: one that came while this
        # rank was reporting the failure must not hide it
        failure = distributed.broken_by() or next((e for e in exception_chain(exc)[1:] if isinstance(e, distributed.DistributedError)), None)
        if failure is None:
            print(protocol.format_interrupted(args.command), file=sys.stderr)
            return _leave(protocol.EXIT_INTERRUPTED)
        return _leave(_report(args.command, failure, exit_code_for(failure)))
    except Exception as exc:
        _hold_signals_if_broken()
        code = exit_code_for(exc)
        if code is None:
            raise  # a bug: the traceback is the message (exit code 1)
        return _leave(_report(args.command, exc, code))
    return int(result or 0)


def _report(command: str, exc: BaseException, code: int | None) -> int:
    """Print the one error line of ``exc``, a known error whose exit code (:func:`exit_code_for`) is ``code``; return it."""
    assert code is not None
    message = str(exc)
    if code == protocol.EXIT_GPU_OUT_OF_MEMORY and not isinstance(exc, protocol.GpuOutOfMemoryError):
        first = message.splitlines()[0][:300] if message else type(exc).__name__
        message = f"the GPU ran out of memory ({first}); run again with --device cpu"
    else:  # a device error wrapped in another error: its own message
        message = next((str(e) for e in exception_chain(exc) if isinstance(e, protocol.DeviceError)), message)
    print(protocol.format_error(command, message), file=sys.stderr)
    return code


def _hold_signals_if_broken() -> None:
    """After another rank's death, keep SIGINT / SIGTERM / SIGHUP pending: the error is reported whole."""
    if distributed.broken_by() is not None and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, atomic.STOP_SIGNALS)


def _leave(code: int) -> int:
    """``code``; after another rank's death the process ends here with it, without the interpreter's
    teardown, which can deadlock freeing DDP's state on the broken group (:func:`distributed.broken_by`)."""
    if distributed.broken_by() is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a command that raised ``exc``; None for an unexpected error (a bug).

    A device problem counts wherever it is in the chain of causes (an ``InputError`` raised from a
    :class:`~CovidGANSegLib.protocol.CudaMissingError` still means "CUDA missing").
    """
    chain = exception_chain(exc)
    for current in chain:
        if _torch_out_of_memory(current):
            return protocol.EXIT_GPU_OUT_OF_MEMORY
        if isinstance(current, protocol.DeviceError):
            return current.exit_code
    if isinstance(exc, (CovidGANSegError, FileExistsError)):
        return protocol.EXIT_INPUT_ERROR
    return None


def _torch_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's CUDA out-of-memory error (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom_types = tuple(t for t in (getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
                                  getattr(torch, "OutOfMemoryError", None)) if isinstance(t, type))
    return bool(oom_types) and isinstance(exc, oom_types)

if __name__ == "__main__":
    raise SystemExit(main())
