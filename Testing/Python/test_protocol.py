"""The contract between the library's CLI and the Slicer module (``CovidGANSegLib.protocol``).

Line formats round-trip through their parsers and through what the library really prints; the
job parameters build command lines that the CLI's own parser reads back to the same values; the
CLI exits with the protocol's codes for a missing CUDA and a GPU out of memory in every command
that takes ``--device``; the module itself imports without torch or numpy and compiles under
Python 3.9 (Slicer 5.6 / 5.8).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from CovidGANSegLib import cli, progress, protocol

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# line formats
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction,text", [(0.0, "loading models"), (0.25, "GAN 3/12"), (1.0, "done"), (0.12345, ""),
                                           (0.5, "tabs\tand  double  spaces"), (0.75, "two\nlines")])
def test_progress_lines_round_trip(fraction, text):
    line = protocol.format_progress(fraction, text)
    assert "\n" not in line and line.startswith("PROGRESS ")
    parsed = protocol.parse_progress(line)
    assert parsed is not None
    assert parsed[0] == pytest.approx(fraction, abs=5e-5)
    assert parsed[1] == " ".join(text.split())


@pytest.mark.parametrize("line,expected", [
    ("PROGRESS 0.2500 GAN 3/12", (0.25, "GAN 3/12")),
    ("PROGRESS 1 done", (1.0, "done")),
    ("PROGRESS 1.7 over", (1.0, "over")),
    ("PROGRESS -0.1", (0.0, "")),
    ("PROGRESS 0.5\r", (0.5, "")),
    ("PROGRESS nan x", None),
    ("PROGRESS x y", None),
    ("PROGRESS 0.5x y", None),
    ("progress 0.5", None),
    ("log line", None),
])
def test_progress_parser(line, expected):
    assert protocol.parse_progress(line) == expected


def test_progress_report_prints_the_protocols_lines(capsys):
    progress.set_mode("lines")
    try:
        with progress.scope(0.5, 1.0):
            progress.report(0.5, "segmenting slices")
        list(progress.track(range(4), desc="GAN"))
    finally:
        progress.set_mode("bar")
    lines = capsys.readouterr().out.splitlines()
    parsed = [protocol.parse_progress(line) for line in lines]
    assert None not in parsed
    assert parsed[0] == (0.75, "segmenting slices")
    assert parsed[-1] == (1.0, "GAN done")


def test_error_lines_round_trip():
    line = protocol.format_error("segment", "/tmp/ct.nii: not Hounsfield units")
    assert line == "covidganseg segment: error: /tmp/ct.nii: not Hounsfield units"
    assert protocol.parse_error(line) == "/tmp/ct.nii: not Hounsfield units"
    assert protocol.parse_error(protocol.format_error("pseudo-healthy", "x")) == "x"
    assert protocol.parse_error(protocol.format_interrupted("train-gan")) == "interrupted"
    assert protocol.parse_error("2026-01-01 INFO covidganseg: error: no") is None
    assert protocol.parse_error("Traceback (most recent call last):") is None


def test_warning_lines_are_read_from_the_clis_logging_format():
    formatter = logging.Formatter(protocol.LOG_FORMAT)

    def line(level, message, name="CovidGANSegLib.seg.inference"):
        return formatter.format(logging.LogRecord(name, level, __file__, 1, message, None, None))

    assert protocol.parse_warning(line(logging.WARNING, "lung mask is empty; using the body")) == "lung mask is empty; using the body"
    assert protocol.parse_warning(line(logging.INFO, "loading")) is None
    assert protocol.parse_warning(line(logging.ERROR, "boom")) is None
    assert protocol.parse_warning("WARNING: no logger name") is None


def test_the_cli_logs_in_the_protocols_format(tmp_path):
    """A real CLI run's warning line is what ``parse_warning`` reads (``--grid`` is ignored with ``--resume``)."""
    result = subprocess.run([sys.executable, "-m", "CovidGANSegLib", "--progress", "none", "train-gan", "--data", str(tmp_path / "none"),
                             "--out", str(tmp_path / "run"), "--resume", "--grid", "32", "32", "8", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    warnings = [protocol.parse_warning(line) for line in result.stderr.splitlines()]
    assert "--grid is ignored with --resume: the run keeps its own preprocessing" in warnings, result.stderr


# --------------------------------------------------------------------------------------------
# exit codes and the device policy
# --------------------------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_documented():
    codes = [protocol.EXIT_OK, protocol.EXIT_FAILURE, protocol.EXIT_INPUT_ERROR, protocol.EXIT_CUDA_MISSING,
             protocol.EXIT_GPU_OUT_OF_MEMORY, protocol.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes) and set(codes) == set(protocol.EXIT_CODES)
    assert all(0 <= c <= 125 or c == 130 for c in codes)  # never a shell's "killed by signal" code
    assert protocol.CudaMissingError("x").exit_code == protocol.EXIT_CUDA_MISSING
    assert protocol.GpuOutOfMemoryError("x").exit_code == protocol.EXIT_GPU_OUT_OF_MEMORY
    assert issubclass(protocol.CudaMissingError, ValueError)  # callers that caught ValueError still do


@pytest.mark.parametrize("device,available,expected", [
    ("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cpu", False, "cpu"),
    ("cuda", True, "cuda"), ("cuda:1", True, "cuda:1"), ("cuda", False, protocol.CudaMissingError),
    ("cuda:0", False, protocol.CudaMissingError),
])
def test_resolve_device(device, available, expected):
    for flag in (available, lambda: available):
        if isinstance(expected, str):
            assert protocol.resolve_device(device, flag) == expected
        else:
            with pytest.raises(expected, match="no CUDA GPU"):
                protocol.resolve_device(device, flag)


def test_resolve_device_asks_nothing_for_the_cpu_and_refuses_unknown_devices():
    def never():
        raise AssertionError("the CPU needs no CUDA check")

    assert protocol.resolve_device("cpu", never) == "cpu"
    for bad in ("tpu", "CUDA", "cuda:", "cuda:x", "", None, 0):
        with pytest.raises(ValueError, match="device must be"):
            protocol.resolve_device(bad, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("device,code,expected", [
    ("cuda", protocol.EXIT_CUDA_MISSING, "cpu"), ("cuda", protocol.EXIT_GPU_OUT_OF_MEMORY, "cpu"),
    ("auto", protocol.EXIT_GPU_OUT_OF_MEMORY, "cpu"), ("cuda:1", protocol.EXIT_CUDA_MISSING, "cpu"),
    ("cpu", protocol.EXIT_CUDA_MISSING, None), ("cpu", protocol.EXIT_GPU_OUT_OF_MEMORY, None),
    ("cuda", protocol.EXIT_INPUT_ERROR, None), ("cuda", protocol.EXIT_FAILURE, None), ("cuda", 0, None),
    ("cuda", -9, None), ("cuda", None, None),
])
def test_fallback_policy(device, code, expected):
    assert protocol.fallback_device(device, code) == expected
    assert (protocol.fallback_reason(code) is not None) == (code in (protocol.EXIT_CUDA_MISSING, protocol.EXIT_GPU_OUT_OF_MEMORY))


# --------------------------------------------------------------------------------------------
# command lines vs the real argument parser
# --------------------------------------------------------------------------------------------

def _parsed(parameters):
    return cli.build_parser().parse_args(parameters.as_args())


def test_pseudo_healthy_command_line_is_what_the_cli_parses(tmp_path):
    full = protocol.PseudoHealthyParameters(checkpoint=tmp_path / "gan model.pt", input=str(tmp_path / "in put.nii"),
                                            output=tmp_path / "ph.nii", difference=tmp_path / "diff.nii",
                                            lungs=tmp_path / "lungs.nii", device="cuda")
    args = _parsed(full)
    assert args.command == "pseudo-healthy" and args.progress == "lines" and args.device == "cuda"
    for field in ("checkpoint", "input", "output", "difference", "lungs"):
        assert getattr(args, field) == Path(getattr(full, field)), field
    minimal = _parsed(protocol.PseudoHealthyParameters("g.pt", "in.nii", "out.nii"))
    assert minimal.difference is None and minimal.lungs is None and minimal.device == "auto"
    assert full.asArgList() == full.as_args()
    assert _parsed(full.with_device("cpu")).device == "cpu" and full.device == "cuda"


def test_segment_command_line_is_what_the_cli_parses(tmp_path):
    paths = {f.name: tmp_path / f"{f.name}.nii" for f in dataclasses.fields(protocol.SegmentParameters)
             if f.name not in ("threshold", "grow", "device", "progress")}
    full = protocol.SegmentParameters(**paths, threshold=0.35, grow=False, device="cpu", progress="none")
    args = _parsed(full)
    assert args.command == "segment" and args.progress == "none" and args.device == "cpu"
    for field, value in paths.items():
        assert getattr(args, field) == Path(value), field
    assert args.threshold == 0.35 and args.grow is False
    minimal = _parsed(protocol.SegmentParameters(input="ct.nii", seg="s.pt", output="l.nii"))
    for field in ("gan", "lungs", "pseudo_healthy", "difference", "report", "input_lungs", "threshold"):
        assert getattr(minimal, field) is None, field
    assert minimal.device == "auto" and minimal.grow is True


def test_command_line_prefix_and_device():
    params = protocol.SegmentParameters(input="ct.nii", seg="s.pt", output="l.nii", device="cuda")
    argv = protocol.command_line(["/opt/Slicer/bin/PythonSlicer", "-m", "CovidGANSegLib"], params, device="cpu")
    assert argv[:5] == ["/opt/Slicer/bin/PythonSlicer", "-m", "CovidGANSegLib", "--progress", "lines"]
    assert argv[argv.index("--device") + 1] == "cpu" and argv.count("--device") == 1
    assert cli.build_parser().parse_args(argv[3:]).device == "cpu"


def test_parameters_refuse_what_the_cli_would_refuse():
    with pytest.raises(ValueError, match="device"):
        protocol.SegmentParameters(input="ct.nii", seg="s.pt", output="l.nii", device="gpu")
    with pytest.raises(ValueError, match="GAN"):
        protocol.SegmentParameters(input="ct.nii", seg="s.pt", output="l.nii", difference="d.nii")
    with pytest.raises(ValueError, match="device"):
        protocol.PseudoHealthyParameters("g.pt", "in.nii", "out.nii", device="cuda:x")


# --------------------------------------------------------------------------------------------
# the CLI's exit codes
# --------------------------------------------------------------------------------------------

DEVICE_COMMANDS = {
    "segment": ["segment", "--input", "ct.nii", "--seg", "s.pt", "--output", "l.nii"],
    "pseudo-healthy": ["pseudo-healthy", "--checkpoint", "g.pt", "--input", "ct.nii", "--output", "ph.nii"],
    "pseudo-masks": ["pseudo-masks", "--checkpoint", "g.pt", "--data", "d", "--out", "pm"],
    "train-gan": ["train-gan", "--data", "d", "--out", "run"],
    "train-seg": ["train-seg", "--pseudo-masks", "pm", "--out", "run"],
    "demo": ["demo", "--out", "out"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_explicit_cuda_without_a_gpu_exits_with_the_cuda_missing_code(command, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(protocol, "_torch_cuda_available", lambda: False)
    code = cli.main(["--progress", "none", *DEVICE_COMMANDS[command], "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == protocol.EXIT_CUDA_MISSING
    assert err and "no CUDA GPU" in protocol.parse_error(err[-1])
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


def test_unknown_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["segment", "--input", "ct.nii", "--seg", "s.pt", "--output", "l.nii", "--device", "tpu"])
    assert info.value.code == protocol.EXIT_INPUT_ERROR
    assert "invalid device value: 'tpu'" in capsys.readouterr().err


SEED_COMMANDS = {**{name: DEVICE_COMMANDS[name] for name in ("train-gan", "train-seg", "demo")},
                 "phantoms": ["phantoms", "out", "--healthy", "1", "--covid", "0"]}


@pytest.mark.parametrize("command", sorted(SEED_COMMANDS))
def test_a_negative_seed_is_a_usage_error_before_any_work(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main([*SEED_COMMANDS[command], "--seed", "-5"])
    assert info.value.code == protocol.EXIT_INPUT_ERROR
    assert "argument --seed: must be >= 0, got -5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


@pytest.fixture
def inWorkFolder(monkeypatch, tmp_path):
    """Run the CLI in an empty folder with the checkpoints' checksum check switched off (the
    library functions are replaced; what is tested is the CLI's mapping of their exceptions)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("CovidGANSegLib.checkpoints.verify_checkpoint", lambda *args, **kwargs: None)
    return tmp_path


def _raise_oom(*args, **kwargs):
    import torch

    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("command,target", [
    ("demo", "CovidGANSegLib.demo.run_demo"),
    ("segment", "CovidGANSegLib.seg.inference.segment_file"),
    ("pseudo-healthy", "CovidGANSegLib.gan.inference.pseudo_healthy_file"),
    ("pseudo-masks", "CovidGANSegLib.gan.pseudomasks.make_pseudo_masks"),
    ("train-gan", "CovidGANSegLib.gan.training.train_gan"),
    ("train-seg", "CovidGANSegLib.seg.training.train_segmenter"),
])
def test_gpu_out_of_memory_exits_with_its_code(command, target, monkeypatch, capsys, inWorkFolder):
    pytest.importorskip("torch")
    monkeypatch.setattr(protocol, "_torch_cuda_available", lambda: True)
    monkeypatch.setattr(target, _raise_oom)
    code = cli.main(["--progress", "none", *DEVICE_COMMANDS[command], "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == protocol.EXIT_GPU_OUT_OF_MEMORY
    message = protocol.parse_error(err[-1])
    assert message.startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_device_errors_count_wherever_they_are_in_the_chain(monkeypatch, capsys, inWorkFolder):
    pytest.importorskip("torch")
    from CovidGANSegLib.errors import CheckpointError, InputError

    def wrapped_oom(*args, **kwargs):
        try:
            _raise_oom()
        except RuntimeError as exc:
            raise CheckpointError("could not load", "s.pt") from exc

    def wrapped_missing(*args, **kwargs):
        try:
            protocol.resolve_device("cuda", False)
        except ValueError as exc:
            raise InputError(str(exc)) from exc

    monkeypatch.setattr(protocol, "_torch_cuda_available", lambda: True)
    monkeypatch.setattr("CovidGANSegLib.seg.inference.segment_file", wrapped_oom)
    assert cli.main(DEVICE_COMMANDS["segment"]) == protocol.EXIT_GPU_OUT_OF_MEMORY
    monkeypatch.setattr("CovidGANSegLib.seg.inference.segment_file", wrapped_missing)
    assert cli.main(DEVICE_COMMANDS["segment"]) == protocol.EXIT_CUDA_MISSING
    assert "no CUDA GPU" in protocol.parse_error(capsys.readouterr().err.strip().splitlines()[-1])
    assert cli.exit_code_for(InputError("bad")) == protocol.EXIT_INPUT_ERROR
    assert cli.exit_code_for(RuntimeError("a bug")) is None


def test_a_bug_keeps_its_traceback(monkeypatch, inWorkFolder):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("CovidGANSegLib.seg.inference.segment_file", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([*DEVICE_COMMANDS["segment"], "--device", "cpu"])


def test_library_functions_follow_the_same_policy(monkeypatch):
    torch = pytest.importorskip("torch")
    from CovidGANSegLib.gan.networks import resolve_device as gan_device
    from CovidGANSegLib.seg import resolve_device as seg_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seg_device("auto") == "cpu" and gan_device("auto").type == "cpu"
    with pytest.raises(protocol.CudaMissingError):
        seg_device("cuda")  # it used to fall back to the CPU with a warning while the GAN failed
    with pytest.raises(protocol.CudaMissingError):
        gan_device("cuda")


# --------------------------------------------------------------------------------------------
# what Slicer's GUI process needs: no torch, no numpy, Python 3.9
# --------------------------------------------------------------------------------------------

def test_protocol_imports_without_torch_or_numpy():
    code = ("import sys; import CovidGANSegLib.protocol as p; "
            "assert p.resolve_device('auto', False) == 'cpu'; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def _python39():
    for candidate in (shutil.which("python3.9"), str(Path.home() / ".pyenv" / "versions" / "3.9.18" / "bin" / "python3.9")):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"], capture_output=True, text=True)
            if probe.stdout.strip() == "True":
                return candidate
    return None


def test_protocol_runs_under_python_3_9():
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter here")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import CovidGANSegLib.protocol as p; "
            "s = p.SegmentParameters(input='a', seg='b', output='c', gan='g', difference='d', threshold=0.5); "
            "assert p.parse_progress(p.format_progress(0.5, 'x')) == (0.5, 'x'); "
            "assert p.fallback_device('cuda', p.EXIT_CUDA_MISSING) == 'cpu'; print(' '.join(s.as_args()))")
    result = subprocess.run([python, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--gan g" in result.stdout and "--threshold 0.5" in result.stdout
