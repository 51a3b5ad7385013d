"""Hostile but realistic inputs (issue 10): each ends in one error line naming the file and the
problem, exit code 2, and leaves nothing behind (no temporary files, no partial outputs)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from CovidGANSegLib import atomic, cli, lungmask, nifti, progress
from CovidGANSegLib.checkpoints import load_checkpoint, save_checkpoint, verify_checkpoint, write_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, CovidGANSegError, InputError, OutputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PP = PreprocessConfig(grid=(32, 32, 8), min_slices=1)
SPACING = (6.0, 6.0, 10.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# helpers


def _chest(n: int = 64, nz: int = 10, seed: int = 0) -> np.ndarray:
    """A minimal chest in HU: air, an elliptic body at 40 HU, two lungs at -850 HU, noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
    hu = np.full((n, n, nz), -1000.0)
    hu[(x / (0.45 * n)) ** 2 + (y / (0.36 * n)) ** 2 <= 1] = 40.0
    for cx in (-0.2 * n, 0.2 * n):
        hu[((x - cx) / (0.15 * n)) ** 2 + (y / (0.25 * n)) ** 2 <= 1] = -850.0
    hu += rng.normal(0, 15, hu.shape)
    return np.round(hu).astype(np.int16)


def _affine(spacing=SPACING) -> np.ndarray:
    a = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    a[:3, 3] = [190.0, -190.0, -50.0]
    return a


def _write(path: Path, data: np.ndarray, affine: np.ndarray, *, qform: bool = True) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    if qform:
        img.set_qform(affine, code=1)
    else:
        img.header["qform_code"] = 0
    nib.save(img, str(path))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["--progress", "none", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err and ": error: " in line, err
    for name in names:
        assert name in line, line
    assert ".partial" not in line, line
    return line


@pytest.fixture(autouse=True)
def _quiet_and_restore_signals():
    progress.set_mode("none")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    progress.set_mode("bar")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny segmenter (constant 'lesion everywhere') and a tiny GAN, both with model cards."""
    from CovidGANSegLib.gan import GAN_ARCH
    from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, get_gan_config
    from CovidGANSegLib.seg.transunet import SEG_CONFIGS, TransUNet

    root = tmp_path_factory.mktemp("hostile_models")
    torch.manual_seed(0)
    cfg = SEG_CONFIGS["tiny"]
    model = TransUNet(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(10.0)
    seg = save_checkpoint(root / "seg.pt", kind="seg", arch="transunet", config=cfg.to_dict(), metadata={"demo": True},
                          preprocess=PP.to_dict(), model=model.state_dict(), threshold=0.5)
    write_model_card(seg, name="tiny-seg", kind="seg", arch="transunet", config_name="tiny", config=cfg.to_dict(),
                     trained_on="nothing (random weights)", demo=True)
    gcfg = get_gan_config("tiny")
    gan = save_checkpoint(root / "gan.pt", kind="gan", arch=GAN_ARCH, config=gcfg.to_dict(), preprocess=PP.to_dict(),
                          generator=DenseUNetGenerator3D(gcfg).state_dict())
    write_model_card(gan, name="tiny-gan", kind="gan", arch=GAN_ARCH, config_name="tiny", config=gcfg.to_dict(),
                     trained_on="nothing (random weights)", demo=True)
    return {"seg": seg, "gan": gan}


@pytest.fixture()
def ct(tmp_path) -> Path:
    return _write(tmp_path / "ct.nii.gz", _chest(), _affine())


def _segment_args(ct: Path, models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["segment", "--input", str(ct), "--seg", str(models["seg"]), "--output", str(out / "lesion.nii.gz"),
            "--device", "cpu", *extra]


def test_segment_writes_the_whole_set_with_real_names_in_the_report(ct, models, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, *_segment_args(ct, models, out, "--gan", str(models["gan"]), "--lungs", str(out / "lungs.nii.gz"),
                                                 "--pseudo-healthy", str(out / "ph.nii.gz"), "--difference", str(out / "diff.nii.gz"),
                                                 "--report", str(out / "report.json")))
    assert rc == 0
    assert _listing(out) == ["diff.nii.gz", "lesion.nii.gz", "lungs.nii.gz", "ph.nii.gz", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["outputs"]["output"] == str(out / "lesion.nii.gz") and rep["outputs"]["report"] == str(out / "report.json")
    assert rep["lung_ml"] > 0 and json.loads(stdout)["output"] == str(out / "lesion.nii.gz")
    src, lesion = nib.load(str(ct)), nib.load(str(out / "lesion.nii.gz"))
    assert lesion.shape == src.shape and np.allclose(lesion.affine, src.affine)


# ------------------------------------------------------------------------------------------------
# 1. singular affine


def test_singular_affine_is_refused(tmp_path, models, capsys):
    affine = _affine()
    affine[:3, 1] = affine[:3, 0]  # two equal columns
    ct = _write(tmp_path / "ct.nii.gz", _chest(), affine, qform=False)
    before = _listing(tmp_path)
    rc, _, err = _run(capsys, *_segment_args(ct, models, tmp_path / "out"))
    assert rc == 2
    assert "singular" in _one_error_line(err, "ct.nii.gz")
    assert _listing(tmp_path) == before
    from CovidGANSegLib.datasets import slice_count

    with pytest.raises(InputError, match="singular"):
        slice_count(ct)


# ------------------------------------------------------------------------------------------------
# 2. implausible spacing, voxel budget


def _no_lung_mask(*args, **kwargs):
    raise AssertionError("the lung mask must not be computed for this input")


@pytest.mark.parametrize("spacing", [(1e-4, 1e-4, 10.0), (6.0, 6.0, 1e-4), (1e4, 1e4, 1e4), (6.0, 6.0, 25.0)])
def test_implausible_spacing_is_refused_before_any_work(tmp_path, models, capsys, monkeypatch, spacing):
    monkeypatch.setattr(lungmask, "extract_lung_mask", _no_lung_mask)  # 1e-4 mm: a 50 GiB working grid
    ct = _write(tmp_path / "ct.nii.gz", _chest(), _affine(spacing))
    before = _listing(tmp_path)
    rc, _, err = _run(capsys, *_segment_args(ct, models, tmp_path / "out", "--report", str(tmp_path / "out" / "r.json")))
    assert rc == 2
    line = _one_error_line(err, "ct.nii.gz")
    assert "implausible" in line and "0.05..20 mm" in line
    assert _listing(tmp_path) == before


def test_preprocess_refuses_an_implausible_target_spacing_and_a_huge_grid(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "healthy").mkdir(parents=True)
    _write(data / "healthy" / "s.nii.gz", _chest(), _affine())
    rc, _, err = _run(capsys, "preprocess", data, tmp_path / "pre", "--spacing", "0.0001", "2", "8")
    assert rc == 2 and "implausible" in _one_error_line(err, "--spacing")
    rc, _, err = _run(capsys, "preprocess", data, tmp_path / "pre", "--grid", "2048", "2048", "1024", "--min-slices", "1")
    assert rc == 2 and "budget" in _one_error_line(err, "(2048, 2048, 1024)")
    assert _listing(tmp_path) == ["data", "data/healthy", "data/healthy/s.nii.gz"]


def test_header_declaring_a_huge_image_is_refused_before_reading(tmp_path, models, capsys):
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    header.set_sform(_affine(), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + b"\x00" * 4096
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(raw))
    rc, _, err = _run(capsys, *_segment_args(path, models, tmp_path / "out"))
    assert rc == 2
    assert "68,719,476,736 voxels" in _one_error_line(err, "huge.nii.gz")
    with pytest.raises(InputError, match="voxels"):
        nifti.read_canonical(path)


def test_resampled_grid_over_the_voxel_budget_is_refused_before_allocating(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setattr(lungmask, "extract_lung_mask", _no_lung_mask)
    # 64 x 64 x 10 = 40,960 voxels; 0.06 mm in-plane: the 2 mm lung-mask grid pads to 66 x 66 x 10 = 43,560
    monkeypatch.setattr(nifti, "MAX_VOXELS", 42_000)
    ct = _write(tmp_path / "ct.nii.gz", _chest(), _affine((0.06, 0.06, 10.0)))
    rc, _, err = _run(capsys, *_segment_args(ct, models, tmp_path / "out"))
    assert rc == 2
    assert "lung-mask working grid" in _one_error_line(err, "ct.nii.gz", "42,000")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# 3. empty checkpoint, empty exception messages


def test_zero_byte_checkpoint(ct, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.touch()
    before = _listing(tmp_path)
    rc, _, err = _run(capsys, "segment", "--input", ct, "--seg", empty, "--output", tmp_path / "o" / "l.nii.gz", "--device", "cpu")
    assert rc == 2
    assert "empty checkpoint" in _one_error_line(err, "empty.pt")
    assert _listing(tmp_path) == before


def test_checkpoint_loader_survives_an_exception_without_message(models, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError, match=r"corrupt, truncated or unsafe checkpoint \(RuntimeError\)"):
        load_checkpoint(models["seg"], kind="seg")
    assert str(CovidGANSegError("")) == "CovidGANSegError (no details)"
    assert str(InputError("line one\nline two", "f.nii")) == "f.nii: line one line two"


# ------------------------------------------------------------------------------------------------
# 4. SHA-256 of the model card checked before loading


def _flip_exponent_byte(path: Path) -> None:
    """Flip one exponent bit of the first weight of the largest tensor (the zip stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    data[start + 30 + name_len + extra_len + 3] ^= 0x01
    path.write_bytes(bytes(data))


def _tampered_copy(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    shutil.copy(src.with_name(src.name + ".json"), dst.with_name(dst.name + ".json"))
    _flip_exponent_byte(dst)
    return dst


def test_checkpoint_with_a_flipped_byte_is_refused(ct, models, tmp_path, capsys):
    bad_seg = _tampered_copy(models["seg"], tmp_path / "bad")
    load_checkpoint(bad_seg, kind="seg")  # it does load: only the checksum tells
    out = tmp_path / "out"
    rc, _, err = _run(capsys, *_segment_args(ct, {"seg": bad_seg}, out, "--report", str(out / "r.json")))
    assert rc == 2
    assert "SHA-256 mismatch" in _one_error_line(err, str(bad_seg))
    assert not out.exists()
    bad_gan = _tampered_copy(models["gan"], tmp_path / "badgan")
    rc, _, err = _run(capsys, *_segment_args(ct, models, out, "--gan", str(bad_gan)))
    assert rc == 2 and "SHA-256 mismatch" in _one_error_line(err, str(bad_gan))
    rc, _, err = _run(capsys, "pseudo-healthy", "--checkpoint", bad_gan, "--input", ct, "--output", out / "ph.nii.gz", "--device", "cpu")
    assert rc == 2 and "SHA-256 mismatch" in _one_error_line(err, str(bad_gan))
    assert not out.exists()


def test_verify_checkpoint_without_card_warns_and_with_bad_card_refuses(models, tmp_path, caplog):
    plain = tmp_path / "last.pt"
    shutil.copy(models["seg"], plain)
    assert verify_checkpoint(plain) is None
    assert "cannot be verified" in caplog.text
    assert verify_checkpoint(models["seg"])["name"] == "tiny-seg"
    (tmp_path / "last.pt.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable model card"):
        verify_checkpoint(plain)


# ------------------------------------------------------------------------------------------------
# 5, 6. models: corrupt card, missing checkpoint


def test_models_names_a_corrupt_card(models, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models["seg"], folder / "seg.pt")
    shutil.copy(models["seg"].with_name("seg.pt.json"), folder / "seg.pt.json")
    (folder / "other.pt.json").write_text('{"name": "x", "kind": ')
    rc, out, err = _run(capsys, "models", folder)
    assert rc == 2
    assert "tiny-seg" in out
    assert "unreadable model card" in _one_error_line(err, "other.pt.json")
    rc, _, err = _run(capsys, "models", tmp_path / "nowhere")
    assert rc == 2 and "not found" in _one_error_line(err, "nowhere")


def test_models_verify_with_missing_checkpoint(models, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models["seg"].with_name("seg.pt.json"), folder / "seg.pt.json")
    rc, _, err = _run(capsys, "models", folder, "--verify")
    assert rc == 2
    assert "checkpoint file not found" in _one_error_line(err, str(folder / "seg.pt"))
    assert _listing(folder) == ["seg.pt.json"]


# ------------------------------------------------------------------------------------------------
# 7. read-only folder, disk full, file-size limit: the real output is named, old outputs kept


def _old_outputs(out: Path, names=("lesion.nii.gz", "report.json")) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    for name in names:
        (out / name).write_bytes(b"old " + name.encode())
        old[name] = (out / name).read_bytes()
    return old


def _assert_unchanged(out: Path, old: dict[str, bytes]) -> None:
    assert _listing(out) == sorted(old)
    for name, content in old.items():
        assert (out / name).read_bytes() == content


def test_read_only_output_folder_simulated(ct, models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    old = _old_outputs(out)
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def deny(real):
        def wrapper(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == out:
                raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".lesion.x1y2.partial"))
            return real(*args, dir=dir, **kwargs)
        return wrapper

    monkeypatch.setattr(tempfile, "mkstemp", deny(real_mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", deny(real_mkdtemp))
    rc, _, err = _run(capsys, *_segment_args(ct, models, out, "--report", str(out / "report.json")))
    assert rc == 2
    assert "no permission" in _one_error_line(err, str(out / "lesion.nii.gz"))
    _assert_unchanged(out, old)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(ct, models, tmp_path, capsys):
    out = tmp_path / "out"
    old = _old_outputs(out)
    out.chmod(0o555)
    try:
        rc, _, err = _run(capsys, *_segment_args(ct, models, out, "--report", str(out / "report.json")))
    finally:
        out.chmod(0o755)
    assert rc == 2
    _one_error_line(err, str(out / "lesion.nii.gz"))
    _assert_unchanged(out, old)


def test_disk_full(ct, models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    old = _old_outputs(out)

    def full(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    rc, _, err = _run(capsys, *_segment_args(ct, models, out, "--report", str(out / "report.json")))
    assert rc == 2
    assert "disk is full" in _one_error_line(err, str(out / "lesion.nii.gz"))
    _assert_unchanged(out, old)


def _cli_subprocess(argv: list[str], *, preexec_fn=None, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    code = prelude + "\nimport sys\nfrom CovidGANSegLib import cli\nsys.exit(cli.main(sys.argv[1:]))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-c", code, "--progress", "none", "--log-level", "ERROR", *argv], capture_output=True,
                          text=True, env=env, cwd=str(PROJECT_ROOT), preexec_fn=preexec_fn, timeout=timeout)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_file_size_limit(ct, models, tmp_path):
    import resource

    out = tmp_path / "out"
    old = _old_outputs(out)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # smaller than a NIfTI header

    proc = _cli_subprocess(_segment_args(ct, models, out, "--report", str(out / "report.json")), preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert "file-size limit" in _one_error_line(proc.stderr, str(out / "lesion.nii.gz"))
    _assert_unchanged(out, old)


# ------------------------------------------------------------------------------------------------
# 8. train-seg with a malformed configuration


@pytest.mark.parametrize("text", ['{"base": "tiny", "lr": ', "[1, 2]", '{"base": "tiny", "no_such_field": 1}'])
def test_train_seg_malformed_config_names_the_file(tmp_path, capsys, text):
    config = tmp_path / "bad config.json"
    config.write_text(text)
    rc, _, err = _run(capsys, "train-seg", "--pseudo-masks", tmp_path / "pm", "--out", tmp_path / "run", "--config", config,
                      "--device", "cpu")
    assert rc == 2
    _one_error_line(err, str(config))
    assert _listing(tmp_path) == ["bad config.json"]


# ------------------------------------------------------------------------------------------------
# 9. interrupts and signals: no temporary files, outputs as a set


def test_interrupt_right_after_the_temporary_file_is_made(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "chmod", interrupted)  # the first call after mkstemp / mkdtemp
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(tmp_path / "x.nii.gz") as tmp:
            tmp.write_bytes(b"never")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(tmp_path / "folder"):
            pass
    assert _listing(tmp_path) == []


def test_output_set_rolls_back_when_a_rename_fails(tmp_path, monkeypatch):
    old = _old_outputs(tmp_path, ("a.nii.gz", "b.nii.gz", "c.json"))
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "b.nii.gz":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="b.nii.gz"):
        with atomic.atomic_files({k: tmp_path / k for k in old}) as staged:
            for path in staged.values():
                path.write_bytes(b"new")
    _assert_unchanged(tmp_path, old)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(RuntimeError):
        with atomic.atomic_files({k: tmp_path / "new" / "sub" / k for k in old}) as staged:
            staged["a.nii.gz"].write_bytes(b"new")
            raise RuntimeError("failed half-way")
    _assert_unchanged(tmp_path, old)  # the folders made for the outputs are gone too


_SIGNAL_DURING_WRITE = """
import os, signal, time
from CovidGANSegLib import nifti
# a foreground process: Ctrl-C is not ignored (a test run started as a background job inherits SIG_IGN)
signal.signal(signal.SIGINT, signal.default_int_handler)
_orig, _calls = nifti.save_like, []
def _save_like(*args, **kwargs):
    out = _orig(*args, **kwargs)
    _calls.append(1)
    if len(_calls) == 1:  # one output written, the others not yet
        os.kill(os.getpid(), signal.{sig})
        time.sleep(5)
    return out
nifti.save_like = _save_like
"""

_SIGNAL_BETWEEN_RENAMES = """
import os, signal
_real, _finals, _done = os.replace, {finals!r}, []
def _replace(src, dst):
    _real(src, dst)
    if os.path.abspath(dst) in _finals and not _done:  # the first output is in place
        _done.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
os.replace = _replace
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_while_writing_leaves_old_outputs_and_no_temporary_files(ct, models, tmp_path, sig):
    out = tmp_path / "out"
    old = _old_outputs(out, ("lesion.nii.gz", "lungs.nii.gz", "report.json"))
    proc = _cli_subprocess(_segment_args(ct, models, out, "--lungs", str(out / "lungs.nii.gz"), "--report", str(out / "report.json")),
                           prelude=_SIGNAL_DURING_WRITE.format(sig=sig))
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr
    _assert_unchanged(out, old)


def test_signal_between_renames_cannot_split_the_output_set(ct, models, tmp_path):
    out = tmp_path / "out"
    names = ("lesion.nii.gz", "lungs.nii.gz", "report.json")
    old = _old_outputs(out, names)
    finals = [os.path.abspath(out / n) for n in names]
    proc = _cli_subprocess(_segment_args(ct, models, out, "--lungs", str(out / "lungs.nii.gz"), "--report", str(out / "report.json")),
                           prelude=_SIGNAL_BETWEEN_RENAMES.format(finals=finals))
    assert proc.returncode in (0, 130), proc.stderr
    assert _listing(out) == sorted(names)
    new = [(out / n).read_bytes() != old[n] for n in names]
    assert all(new) or not any(new), new  # all new (the signal waited for the renames) or all old
    assert json.loads((out / "report.json").read_text())["outputs"]["lungs"] == str(out / "lungs.nii.gz")


def test_cli_turns_sigterm_into_keyboard_interrupt():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    atomic.install_signal_handlers()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass


# ------------------------------------------------------------------------------------------------
# 12. folders follow the umask


def test_folders_are_created_with_the_umask(tmp_path):
    from CovidGANSegLib.preprocessing import preprocess_dataset

    data = tmp_path / "data"
    for sub, seed in (("healthy", 0), ("covid", 1)):
        (data / sub).mkdir(parents=True)
        _write(data / sub / f"s{seed}.nii.gz", _chest(seed=seed), _affine())
    old = os.umask(0o022)
    try:
        with atomic.atomic_directory(tmp_path / "made") as tmp:
            (tmp / "f.txt").write_text("x")
        out = preprocess_dataset(data, tmp_path / "pre", PP)
    finally:
        os.umask(old)
    for folder in (tmp_path / "made", out):
        assert folder.stat().st_mode & 0o777 == 0o755, oct(folder.stat().st_mode)
    assert (out / "index.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------
# 13. evaluate with a shifted affine; blank volumes


def test_evaluate_names_a_shifted_affine(tmp_path, capsys):
    mask = np.zeros((16, 16, 6), dtype=np.uint8)
    mask[4:9, 5:10, 2:4] = 1
    shifted = _affine()
    shifted[:3, 3] += [5.0, 0.0, 0.0]
    pred = _write(tmp_path / "study_0001.nii.gz", mask, shifted)
    truth = _write(tmp_path / "study_0001_mask.nii.gz", mask, _affine())
    rc, _, err = _run(capsys, "evaluate", "--pred", pred, "--truth", truth, "--out", tmp_path / "ev")
    assert rc == 2
    line = _one_error_line(err, "study_0001.nii.gz", "study_0001_mask.nii.gz")
    assert "affine is shifted by (5, 0, 0) mm" in line
    assert not (tmp_path / "ev").exists()
    (tmp_path / "a file").write_text("x")
    rc, _, err = _run(capsys, "evaluate", "--pred", truth, "--truth", truth, "--out", tmp_path / "a file" / "ev")
    assert rc == 2
    assert "a part of the folder path is a file" in _one_error_line(err, str(tmp_path / "a file" / "ev"))
    assert _listing(tmp_path) == ["a file", "study_0001.nii.gz", "study_0001_mask.nii.gz"]


@pytest.mark.parametrize("value", [-1000, 40, -1024])
def test_uniform_volume_has_no_lungs(tmp_path, models, capsys, value):
    ct = _write(tmp_path / "blank.nii.gz", np.full((32, 32, 8), value, dtype=np.int16), _affine())
    rc, _, err = _run(capsys, *_segment_args(ct, models, tmp_path / "out"))
    assert rc == 2
    line = _one_error_line(err, "blank.nii.gz")
    assert "no lungs found" in line and "Hounsfield" not in line
    assert not (tmp_path / "out").exists()


def test_air_only_volume_has_no_lungs(tmp_path):
    air = np.random.default_rng(0).normal(-1000, 20, (32, 32, 8)).astype(np.float32)
    with pytest.raises(InputError, match="no lungs found"):
        nifti.check_hu(air, tmp_path / "air.nii.gz")
