"""The contract between the library's command line and the Slicer module that runs it.

One definition, imported by both sides, of everything the two processes must agree on:

* **Devices**: :func:`resolve_device` turns ``auto | cpu | cuda[:N]`` into the device a run uses,
  and :func:`fallback_device` is the one fallback policy:

  - ``auto`` takes CUDA when torch sees a GPU, else the CPU (never an error);
  - ``cpu`` is the CPU;
  - an explicit ``cuda`` without a usable GPU is an error (:class:`CudaMissingError`, exit code
    :data:`EXIT_CUDA_MISSING`): the command line never silently runs somewhere else than asked;
  - a GPU that runs out of memory (:class:`GpuOutOfMemoryError`, exit code
    :data:`EXIT_GPU_OUT_OF_MEMORY`) ends the run;
  - the Slicer module, and only it, reruns a job once on the CPU when the child exited with one of
    these two codes and the device was not already ``cpu``, and tells the user so.

* **Exit codes** (:data:`EXIT_CODES`): the module decides on the code, never on message text.
* **Line formats** of the child's output: ``PROGRESS <fraction> <text>`` on stdout
  (:func:`format_progress` / :func:`parse_progress`), ``covidganseg <command>: error: <message>``
  on stderr (:func:`format_error` / :func:`parse_error`) and logged warnings in
  :data:`LOG_FORMAT` on stderr (:func:`parse_warning`).
* **Command lines** of the two jobs the module runs, built from their parameters:
  :class:`PseudoHealthyParameters` and :class:`SegmentParameters` with ``as_args()`` (alias
  ``asArgList()``), checked against the real argument parser in the tests.

Pure standard library (no torch, no numpy) and Python 3.9-compatible: Slicer 5.6 and 5.8 ship
Python 3.9 and import this module in the GUI process.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, List, Optional, Tuple, Union

#: devices a user may choose (the library also accepts ``cuda:N``)
DEVICES = ("auto", "cpu", "cuda")

# --------------------------------------------------------------------------------------------
# exit codes
# --------------------------------------------------------------------------------------------

#: the command succeeded
EXIT_OK = 0
#: an unexpected failure (a Python traceback on stderr)
EXIT_FAILURE = 1
#: bad input: a file, an option or a checkpoint (one ``error:`` line names it); also argparse's usage errors
EXIT_INPUT_ERROR = 2
#: ``--device cuda`` (or ``cuda:N``) was asked for, but torch sees no usable CUDA GPU (sysexits EX_UNAVAILABLE)
EXIT_CUDA_MISSING = 69
#: the GPU ran out of memory (sysexits EX_TEMPFAIL: the same run fits on the CPU)
EXIT_GPU_OUT_OF_MEMORY = 75
#: stopped by Ctrl+C / SIGINT
EXIT_INTERRUPTED = 130

#: every exit code of the command line and what it means
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "unexpected failure (traceback on stderr)",
    EXIT_INPUT_ERROR: "bad input or options (one error line names the file and the problem)",
    EXIT_CUDA_MISSING: "CUDA was asked for but no CUDA GPU is available",
    EXIT_GPU_OUT_OF_MEMORY: "the GPU ran out of memory",
    EXIT_INTERRUPTED: "interrupted",
}

#: exit codes after which the same command may succeed on the CPU, with the reason shown to the user
_CPU_FALLBACK_REASONS = {
    EXIT_CUDA_MISSING: "CUDA not available",
    EXIT_GPU_OUT_OF_MEMORY: "GPU out of memory",
}


class DeviceError(RuntimeError):
    """A run failed because of the compute device; ``exit_code`` is the command line's exit code."""

    exit_code = EXIT_FAILURE


class CudaMissingError(DeviceError, ValueError):
    """CUDA was asked for explicitly, but torch sees no usable CUDA GPU."""

    exit_code = EXIT_CUDA_MISSING


class GpuOutOfMemoryError(DeviceError):
    """The GPU ran out of memory during a run."""

    exit_code = EXIT_GPU_OUT_OF_MEMORY


# --------------------------------------------------------------------------------------------
# devices and the fallback policy
# --------------------------------------------------------------------------------------------

_CUDA_INDEX = re.compile(r"^cuda:\d+$")


def check_device(device: str) -> str:
    """``device`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` otherwise."""
    if not isinstance(device, str) or (device not in DEVICES and not _CUDA_INDEX.match(device)):
        raise ValueError(f"device must be auto, cpu or cuda (or cuda:N), got {device!r}")
    return device


def device_argument(value: str) -> str:
    """``type=`` of the command line's ``--device`` option: an unknown device is a usage error (exit code 2)."""
    return check_device(value)


device_argument.__name__ = "device"  # argparse: "invalid device value: 'tpu'"


def _torch_cuda_available() -> bool:
    import torch  # only when the caller did not say: the library's side, never Slicer's GUI process

    return bool(torch.cuda.is_available())


def resolve_device(device: str, cuda_available: Union[bool, Callable[[], bool], None] = None) -> str:
    """The device a run uses: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the one policy, see the module doc).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cuda_available: whether a CUDA GPU is usable (a bool or a function returning one); ``None``
            asks torch (imported only then).

    Raises:
        ValueError: an unknown device string.
        CudaMissingError: ``cuda`` / ``cuda:N`` asked for and no CUDA GPU is usable.
    """
    check_device(device)
    if device == "cpu":
        return "cpu"
    if cuda_available is None:
        available = _torch_cuda_available()
    elif callable(cuda_available):
        available = bool(cuda_available())
    else:
        available = bool(cuda_available)
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise CudaMissingError(f"CUDA was asked for (--device {device}) but no CUDA GPU is available here; "
                               "use --device cpu or --device auto")
    return device


def fallback_device(device: str, exit_code: Optional[int]) -> Optional[str]:
    """The device to run a failed command again on, or None: ``"cpu"`` after the CUDA-missing or
    GPU-out-of-memory exit code of a run that was not already on the CPU."""
    if device == "cpu" or exit_code not in _CPU_FALLBACK_REASONS:
        return None
    return "cpu"


def fallback_reason(exit_code: Optional[int]) -> Optional[str]:
    """``"CUDA not available"`` / ``"GPU out of memory"`` for the two fallback exit codes, else None."""
    return _CPU_FALLBACK_REASONS.get(exit_code)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# line formats of the child's output
# --------------------------------------------------------------------------------------------

#: the command line's program name, first word of its error lines
PROGRAM = "covidganseg"
#: ``logging`` format of the command line (stderr): warnings in it are shown to the Slicer user
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_PROGRESS = re.compile(r"^PROGRESS\s+([-+0-9.eE]+)(?:\s(.*))?$")
_ERROR = re.compile(r"^" + PROGRAM + r" [\w-]+: (?:error: )?(.*)$")
_WARNING = re.compile(r"\bWARNING [\w.]+: (.*)$")


def format_progress(fraction: float, text: str = "") -> str:
    """``PROGRESS <fraction> <text>``: fraction in [0, 1] with 4 decimals, text on one line."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    text = " ".join(str(text).split())
    return f"PROGRESS {fraction:.4f} {text}".rstrip()


def parse_progress(line: str) -> Optional[Tuple[float, str]]:
    """``"PROGRESS 0.25 GAN 3/12"`` -> ``(0.25, "GAN 3/12")`` (fraction clipped to [0, 1]); else None."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    try:
        fraction = float(match.group(1))
    except ValueError:
        return None
    if fraction != fraction:  # NaN
        return None
    return min(max(fraction, 0.0), 1.0), (match.group(2) or "").strip()


def format_error(command: str, message: str) -> str:
    """``covidganseg <command>: error: <message>`` (stderr; the message names the file and the problem)."""
    return f"{PROGRAM} {command}: error: {message}"


def format_interrupted(command: str) -> str:
    return f"{PROGRAM} {command}: interrupted"


def parse_error(line: str) -> Optional[str]:
    """The message of an error (or interruption) line of the command line, else None."""
    match = _ERROR.match(line.rstrip())
    return match.group(1) if match else None


def parse_warning(line: str) -> Optional[str]:
    """The message of a ``WARNING`` line logged in :data:`LOG_FORMAT`, else None."""
    match = _WARNING.search(line.rstrip())
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# command lines of the module's jobs
# --------------------------------------------------------------------------------------------

PathLike = Union[str, os.PathLike]


def _option(args: List[str], flag: str, value: object) -> None:
    if value is not None:
        args += [flag, str(value)]


@dataclasses.dataclass(frozen=True)
class PseudoHealthyParameters:
    """``covidganseg pseudo-healthy``: the pseudo-healthy CT (and difference map) of one CT."""

    checkpoint: PathLike
    input: PathLike
    output: PathLike
    difference: Optional[PathLike] = None
    lungs: Optional[PathLike] = None
    device: str = "auto"
    progress: str = "lines"

    command = "pseudo-healthy"

    def __post_init__(self) -> None:
        check_device(self.device)

    def with_device(self, device: str) -> "PseudoHealthyParameters":
        return dataclasses.replace(self, device=device)

    def as_args(self) -> List[str]:
        """The arguments after ``python -m CovidGANSegLib``."""
        args = ["--progress", self.progress, self.command]
        _option(args, "--checkpoint", self.checkpoint)
        _option(args, "--input", self.input)
        _option(args, "--output", self.output)
        _option(args, "--difference", self.difference)
        _option(args, "--lungs", self.lungs)
        _option(args, "--device", self.device)
        return args

    asArgList = as_args  # noqa: N815 - the name Slicer modules use (SlicerNNUnet's Parameter.asArgList)


@dataclasses.dataclass(frozen=True)
class SegmentParameters:
    """``covidganseg segment``: lesion (and lung) masks of one CT, optionally with the GAN's outputs."""

    input: PathLike
    seg: PathLike
    output: PathLike
    gan: Optional[PathLike] = None
    lungs: Optional[PathLike] = None
    pseudo_healthy: Optional[PathLike] = None
    difference: Optional[PathLike] = None
    report: Optional[PathLike] = None
    input_lungs: Optional[PathLike] = None
    threshold: Optional[float] = None
    grow: bool = True
    device: str = "auto"
    progress: str = "lines"

    command = "segment"

    def __post_init__(self) -> None:
        check_device(self.device)
        if (self.pseudo_healthy is not None or self.difference is not None) and self.gan is None:
            raise ValueError("the pseudo-healthy and difference outputs need the GAN checkpoint")

    def with_device(self, device: str) -> "SegmentParameters":
        return dataclasses.replace(self, device=device)

    def as_args(self) -> List[str]:
        """The arguments after ``python -m CovidGANSegLib``."""
        args = ["--progress", self.progress, self.command]
        _option(args, "--input", self.input)
        _option(args, "--seg", self.seg)
        _option(args, "--gan", self.gan)
        _option(args, "--output", self.output)
        _option(args, "--lungs", self.lungs)
        _option(args, "--pseudo-healthy", self.pseudo_healthy)
        _option(args, "--difference", self.difference)
        _option(args, "--report", self.report)
        _option(args, "--input-lungs", self.input_lungs)
        _option(args, "--threshold", None if self.threshold is None else repr(float(self.threshold)))
        if not self.grow:
            args.append("--no-growth")
        _option(args, "--device", self.device)
        return args

    asArgList = as_args  # noqa: N815


#: the parameters of a job the module runs
JobParameters = Union[PseudoHealthyParameters, SegmentParameters]


def command_line(prefix: List[str], parameters: JobParameters, device: Optional[str] = None) -> List[str]:
    """``prefix`` (e.g. ``[PythonSlicer, "-m", "CovidGANSegLib"]``) + the job's arguments, on ``device`` if given."""
    if device is not None:
        parameters = parameters.with_device(device)
    return [str(p) for p in prefix] + parameters.as_args()
