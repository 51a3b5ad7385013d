"""``covidganseg train`` on the tiny plan: stages, manifests, skipping, resume, pre-flight checks, the run
lock, stale temporary files, the resume-iterations guard and stopping on a signal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from CovidGANSegLib import cli, progress
from CovidGANSegLib.checkpoints import load_checkpoint, verify_checkpoint
from CovidGANSegLib.commands import train as train_command
from CovidGANSegLib.manifest import read_manifest
from CovidGANSegLib.plan import load_plan
from CovidGANSegLib.runlock import LOCK_NAME, clean_stale_partials, run_lock

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("preprocessed", "gan", "pseudo_masks", "seg_transunet", "seg_unet")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_progress_bars")


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["--progress", "none", "--log-level", "WARNING", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str, *names: object) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0], err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A phantom cohort (2 healthy, 3 COVID) in the MosMedData layout, with its cohort.json."""
    from CovidGANSegLib.synth.phantoms import write_cohort

    progress.set_mode("none")
    return write_cohort(tmp_path_factory.mktemp("train_cmd") / "cohort", healthy=2, covid=3, seed=2)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> tuple[Path, str]:
    """A complete run of the tiny plan (and what it printed); tests that change it work on a copy."""
    import io
    from contextlib import redirect_stdout

    progress.set_mode("none")
    run = tmp_path_factory.mktemp("train_run") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["--progress", "none", "--log-level", "ERROR", "train", "--data", str(cohort), "--out", str(run), "--plan", "tiny"])
    assert rc == 0
    return run, buf.getvalue()


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _forbid_training(monkeypatch):
    """Make every stage's work fail: a skipped stage must not call it."""
    from CovidGANSegLib import preprocessing
    from CovidGANSegLib.gan import pseudomasks, training as gan_training
    from CovidGANSegLib.seg import training as seg_training

    def boom(*args, **kwargs):
        raise AssertionError("a stage that should have been skipped ran")

    for module, name in ((preprocessing, "ensure_preprocessed"), (gan_training, "train_gan"), (pseudomasks, "make_pseudo_masks"),
                         (seg_training, "train_segmenter")):
        monkeypatch.setattr(module, name, boom)


# ------------------------------------------------------------------------------------------------
# the run


def test_train_writes_the_plan_manifests_and_the_checkpoints_segment_uses(trained, cohort):
    run, stdout = trained
    plan = load_plan("tiny")
    assert stdout.split() == [str(run / "gan" / "model.pt"), str(run / "seg_transunet" / "model.pt"), str(run / "seg_unet" / "model.pt")]
    assert load_plan(run / "plan.toml") == plan  # the effective plan, readable again
    assert not (run / LOCK_NAME).exists() and not any(p.name.startswith(".") for p in run.rglob("*"))
    for stage in STAGES:
        manifest = read_manifest(run / stage)
        assert manifest["format"] == "covidganseg-stage-manifest" and manifest["stage"] == stage and manifest["status"] == "complete"
        assert manifest["plan_hash"] == plan.hash() and len(manifest["stage_hash"]) == 64
        assert manifest["provenance"]["phantoms"] is True and "phantoms" in manifest["provenance"]["trained_on"]
        assert manifest["library_version"] and manifest["created"]
    assert read_manifest(run / "preprocessed")["inputs"]["data"]["files"] == 5
    gan_manifest = read_manifest(run / "gan")
    assert gan_manifest["inputs"]["preprocessed"] == read_manifest(run / "preprocessed")["outputs"]["data"]["sha256"]
    assert gan_manifest["iterations"] == plan.gan.iterations
    model = verify_checkpoint(run / "gan" / "model.pt")
    assert gan_manifest["outputs"]["model"]["sha256"] == model["sha256"]
    assert read_manifest(run / "pseudo_masks")["inputs"]["gan_model"] == model["sha256"]
    for path, kind in ((run / "gan" / "model.pt", "gan"), (run / "gan" / "checkpoints" / "last.pt", "gan"),
                       (run / "seg_unet" / "model.pt", "seg"), (run / "seg_transunet" / "checkpoints" / "last.pt", "seg")):
        meta = load_checkpoint(path, kind=kind)["metadata"]
        assert meta["plan_hash"] == plan.hash() and meta["plan"] == plan.to_dict(), path
    assert load_checkpoint(run / "seg_unet" / "model.pt", kind="seg")["arch"] == "unet"


def test_a_second_run_skips_every_completed_stage(run_copy, cohort, capsys, monkeypatch):
    before = _listing(run_copy)
    _forbid_training(monkeypatch)
    rc, out, err = _run(capsys, "train", "--data", cohort, "--out", run_copy)  # no --plan: the run's own plan.toml
    assert rc == 0, err
    assert out.split()[0] == str(run_copy / "gan" / "model.pt")
    after = _listing(run_copy)
    assert {k: v for k, v in after.items() if k != "plan.toml"} == {k: v for k, v in before.items() if k != "plan.toml"}


def test_a_changed_plan_is_refused_before_anything_is_written(run_copy, cohort, capsys):
    before = _listing(run_copy)
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy, "--set", "segmenter.learning_rate=0.01")
    assert rc == 2
    _one_error_line(err, run_copy / "seg_transunet", "another plan", "segmenter.learning_rate")
    assert _listing(run_copy) == before


def test_more_iterations_need_resume_then_continue_and_retrain_what_depends_on_it(run_copy, cohort, capsys, caplog):
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy, "--set", "gan.iterations=3")
    assert rc == 2
    _one_error_line(err, run_copy / "gan", "has 2 iterations", "--resume")
    old_pm = read_manifest(run_copy / "pseudo_masks")["outputs"]["data"]["sha256"]
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy, "--set", "gan.iterations=3", "--resume")
    assert rc == 0, err
    assert load_checkpoint(run_copy / "gan" / "checkpoints" / "last.pt", kind="gan")["iteration"] == 3
    assert read_manifest(run_copy / "gan")["iterations"] == 3
    new_pm = read_manifest(run_copy / "pseudo_masks")["outputs"]["data"]["sha256"]
    assert new_pm != old_pm
    for model in ("seg_transunet", "seg_unet"):  # trained again on the new pseudo-masks, from the start
        assert read_manifest(run_copy / model)["inputs"]["pseudo_masks"] == new_pm
        assert load_checkpoint(run_copy / model / "checkpoints" / "last.pt", kind="seg")["iteration"] == 4
    assert "training it again from the start" in caplog.text and "is ignored" not in caplog.text


def test_one_segmenter_trained_on_alone_by_its_own_iterations(run_copy, cohort, capsys):
    """``segmenter.unet.iterations`` moves the U-Net's stage alone: the TransUNet's is skipped, untouched."""
    transunet_before = _listing(run_copy / "seg_transunet")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy, "--set", "segmenter.unet.iterations=6")
    assert rc == 2
    _one_error_line(err, run_copy / "seg_unet", "has 4 iterations", "--resume")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy, "--set", "segmenter.unet.iterations=6", "--resume")
    assert rc == 0, err
    assert read_manifest(run_copy / "seg_unet")["iterations"] == 6
    assert load_checkpoint(run_copy / "seg_unet" / "checkpoints" / "last.pt", kind="seg")["iteration"] == 6
    assert read_manifest(run_copy / "seg_transunet")["iterations"] == 4
    assert _listing(run_copy / "seg_transunet") == transunet_before


def test_an_interrupted_stage_needs_resume(run_copy, cohort, capsys):
    manifest = run_copy / "seg_unet" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "status": "running"}))
    before = _listing(run_copy)
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy)
    assert rc == 2
    _one_error_line(err, run_copy / "seg_unet", "interrupted", "--resume")
    assert _listing(run_copy) == before


def test_an_elastic_restart_resumes_the_interrupted_stage(run_copy, cohort, capsys, monkeypatch, caplog):
    """torchrun --max-restarts starts the workers again with TORCHELASTIC_RESTART_COUNT > 0 and the
    same command line (no --resume): the interrupted stage continues from its checkpoint."""
    manifest = run_copy / "seg_unet" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "status": "running"}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy)
    assert rc == 0, err
    assert "restart 1" in caplog.text and "resuming" in caplog.text
    assert read_manifest(run_copy / "seg_unet")["status"] == "complete"


# ------------------------------------------------------------------------------------------------
# segmenters on synthetic lesions alone: no pseudo-mask, so they train beside the GAN on a CPU

#: the tiny plan with segmenters that read no pseudo-mask (no contrastive phase), on a grid of their own
SYNTHETIC_ONLY = ("--plan", "tiny", "--set", "segmenter.pretrain_fraction=0.0", "--set", "segmenter.grid=[40,40,8]")
SEG_DATA = "preprocessed-40x40x8"


def _weights(path: Path, kind: str) -> dict:
    payload = load_checkpoint(path, kind=kind)
    return payload["generator"] if kind == "gan" else payload["model"]


@pytest.fixture(scope="module")
def beside(cohort, tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic-only plan run twice: GAN and segmenters side by side (job processes, one torch thread
    each, as on a 2-core CPU), and one after the other in this process with one thread."""
    from CovidGANSegLib import cpu_jobs

    progress.set_mode("none")
    runs = tmp_path_factory.mktemp("train_beside")
    argv = ["--progress", "none", "--log-level", "ERROR", "train", "--data", str(cohort), *SYNTHETIC_ONLY]
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(cpu_jobs, "threads_per_job", lambda device, jobs, threads: 1 if jobs > 1 else 0)
        assert cli.main([*argv, "--out", str(runs / "side")]) == 0
    finally:
        mp.undo()
    assert torch.get_num_threads() == 1  # one_torch_thread: no job processes now
    assert cli.main([*argv, "--out", str(runs / "alone")]) == 0
    return runs / "side", runs / "alone"


def test_segmenters_without_pseudo_masks_train_from_their_own_grid_and_beside_the_gan(beside):
    side, alone = beside
    plan = load_plan("tiny", ["segmenter.pretrain_fraction=0.0", "segmenter.grid=[40,40,8]"])
    assert [s.name for s in train_command.stages_of(plan, side)] == ["preprocessed", SEG_DATA, *STAGES[1:]]
    assert train_command.stages_of(load_plan("tiny"), side)[1].name == "gan"  # with a contrastive phase: no such stage
    no_copies = load_plan("tiny", ["segmenter.pretrain_fraction=0.0", "segmenter.grid=[40,40,8]",
                                   "segmenter.synthetic.variants_per_volume=0"])
    assert train_command.segmenters_need_pseudo_masks(no_copies) and train_command.stages_of(no_copies, side)[1].name == "gan"
    for run in (side, alone):
        data = read_manifest(run / SEG_DATA)
        assert data["status"] == "complete" and data["plan"]["preprocess"]["grid"] == [40, 40, 8]
        assert json.loads((run / SEG_DATA / "config.json").read_text())["grid"] == [40, 40, 8]
        for model in ("seg_transunet", "seg_unet"):  # they depend on the data on their grid, not on the GAN
            assert read_manifest(run / model)["inputs"] == {"preprocessed": data["outputs"]["data"]["sha256"]}
            assert load_checkpoint(run / model / "model.pt", kind="seg")["config"]["image_size"] == 48  # 40, padded to 16s
        pm = read_manifest(run / "pseudo_masks")
        assert pm["status"] == "complete" and pm["inputs"]["gan_model"] == read_manifest(run / "gan")["outputs"]["model"]["sha256"]
    # where they run does not change what they learn
    for rel, kind in (("gan/model.pt", "gan"), ("seg_transunet/model.pt", "seg"), ("seg_unet/model.pt", "seg")):
        a, b = _weights(side / rel, kind), _weights(alone / rel, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert not any(p.name.startswith(".") for run in (side, alone) for p in run.rglob("*"))


def test_more_gan_iterations_leave_segmenters_without_pseudo_masks_alone(beside, cohort, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(beside[1], run)
    segs = {m: _listing(run / m) for m in ("seg_transunet", "seg_unet")}
    old_pm = read_manifest(run / "pseudo_masks")["outputs"]["data"]["sha256"]
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run, *SYNTHETIC_ONLY, "--set", "gan.iterations=3", "--resume")
    assert rc == 0, err
    assert read_manifest(run / "gan")["iterations"] == 3
    assert read_manifest(run / "pseudo_masks")["outputs"]["data"]["sha256"] != old_pm  # made again by the new GAN
    assert {m: _listing(run / m) for m in segs} == segs  # not trained again: they never read the GAN


def test_a_second_synthetic_only_run_skips_every_stage(beside, cohort, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(beside[0], run)
    before = _listing(run)
    _forbid_training(monkeypatch)
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run)
    assert rc == 0, err
    assert {k: v for k, v in _listing(run).items() if k != "plan.toml"} == {k: v for k, v in before.items() if k != "plan.toml"}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, process groups")
def test_ctrl_c_stops_the_stages_side_by_side_each_with_its_checkpoint(cohort, tmp_path):
    """A Ctrl-C at the terminal goes to the whole foreground process group: each stage trained beside
    the others ends its step, writes its checkpoint and stops; the run exits with 130."""
    run = tmp_path / "run"
    code = ("import signal, sys, torch\nsignal.signal(signal.SIGINT, signal.default_int_handler)\ntorch.set_num_threads(2)\n"
            "from CovidGANSegLib import cli\nsys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    argv = ["--progress", "none", "--log-level", "ERROR", "train", "--data", str(cohort), "--out", str(run), *SYNTHETIC_ONLY,
            "--set", "gan.iterations=100000", "--set", "segmenter.iterations=100000"]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    stages = ("gan", "seg_transunet", "seg_unet")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if all((run / s / "losses.csv").is_file() and len((run / s / "losses.csv").read_text().splitlines()) >= 4 for s in stages):
            break
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the parent's group
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # it ignored the signal: do not leave it running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    for stage in stages:
        rows = len((run / stage / "losses.csv").read_text().splitlines()) - 1
        kind = "gan" if stage == "gan" else "seg"
        assert load_checkpoint(run / stage / "checkpoints" / "last.pt", kind=kind)["iteration"] == rows >= 3, stage
        assert read_manifest(run / stage)["status"] == "running"
    assert not [p for p in run.rglob("*") if p.name == LOCK_NAME or ".partial" in p.name]


# ------------------------------------------------------------------------------------------------
# pre-flight checks: one line, exit 2 (69 for CUDA), nothing written


def _subset(cohort: Path, folder: Path, categories: list[str]) -> Path:
    for c in categories:
        shutil.copytree(cohort / "studies" / c, folder / "studies" / c)
    return folder


@pytest.mark.parametrize("case", ["missing", "empty", "file", "no_healthy", "no_covid", "preprocessed"])
def test_preflight_data_errors(case, cohort, tmp_path, capsys):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "file":
        data.write_text("not a folder")
    elif case == "no_healthy":
        _subset(cohort, data, ["CT-1", "CT-2", "CT-3"])
    elif case == "no_covid":
        _subset(cohort, data, ["CT-0"])
    elif case == "preprocessed":
        data.mkdir()
        (data / "index.json").write_text("{}")
    words = {"missing": "not found", "empty": "no data set found", "file": "not a folder", "no_healthy": "no healthy (CT-0)",
             "no_covid": "no COVID", "preprocessed": "preprocessed folder"}[case]
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "train", "--data", data, "--out", out, "--plan", "tiny")
    assert rc == 2
    _one_error_line(err, data, words)
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_preflight_unreadable_data_and_unwritable_output(cohort, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = _run(capsys, "train", "--data", cohort, "--out", locked / "run", "--plan", "tiny")
        assert rc == 2
        _one_error_line(err, locked / "run", "not writable")
        assert not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_preflight_output_is_a_file_and_plan_errors(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("x")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", out, "--plan", "tiny")
    assert rc == 2
    _one_error_line(err, out, "is a file")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", tmp_path / "new", "--plan", "tiny", "--set", "gan.iterationz=3")
    assert rc == 2
    _one_error_line(err, "gan.iterationz", "unknown key")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gan]\nbatch_size = 'two'\n")
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", tmp_path / "new", "--plan", bad)
    assert rc == 2
    _one_error_line(err, bad, "gan.batch_size")
    assert not (tmp_path / "new").exists()


def test_preflight_not_enough_disk(cohort, tmp_path, capsys, monkeypatch):
    plan = load_plan("tiny")
    need = train_command.estimate_disk_bytes(plan, 2, 3)
    paper_need = train_command.estimate_disk_bytes(load_plan("paper"), 2, 3)
    assert need > 5 * 2 * 32 * 32 * 8 and paper_need > 10 * need  # grows with the grid and the networks
    real = shutil.disk_usage
    monkeypatch.setattr(train_command.shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", out, "--plan", "tiny")
    assert rc == 2
    _one_error_line(err, out, "not enough free disk space")
    assert not out.exists()


def test_preflight_cuda_asked_for_but_absent(cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", out, "--plan", "tiny", "--set", "run.device=cuda")
    assert rc == 69
    _one_error_line(err, "CUDA")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# the run lock and stale temporary files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_into_the_same_folder_is_refused(run_copy, cohort, capsys):
    owner = {"pid": os.getppid(), "host": socket.gethostname(), "command": "train", "started": "2026-01-01T00:00:00+00:00"}
    (run_copy / LOCK_NAME).write_text(json.dumps(owner))
    before = _listing(run_copy)
    rc, _, err = _run(capsys, "train", "--data", cohort, "--out", run_copy)
    assert rc == 2
    _one_error_line(err, run_copy, f"in use by pid {os.getppid()}", socket.gethostname())
    assert _listing(run_copy) == before
    rc, _, err = _run(capsys, "train-gan", "--data", run_copy / "preprocessed", "--out", run_copy, "--config", "tiny", "--device", "cpu")
    assert rc == 2
    _one_error_line(err, "in use by pid")
    with run_lock(run_copy / "other"):  # in-process: held, then released and the folder it created removed
        with pytest.raises(Exception, match="in use by pid"):
            run_lock(run_copy / "other").acquire()
    assert not (run_copy / "other").exists()


def test_a_stale_lock_and_stale_partials_are_cleaned_on_start(run_copy, cohort, capsys, monkeypatch, caplog):
    owner = {"pid": _dead_pid(), "host": socket.gethostname(), "command": "train", "started": "2026-01-01T00:00:00+00:00"}
    (run_copy / LOCK_NAME).write_text(json.dumps(owner))
    leftovers = [run_copy / ".preprocessed.k3j2.partial" / "covid.npy", run_copy / "gan" / "checkpoints" / ".last.x1y2.partial.pt",
                 run_copy / "pseudo_masks" / ".index.abcd.partial.json"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    keep = [run_copy / "gan" / ".keep", run_copy.parent / ".outside.zz.partial"]
    for p in keep:
        p.write_text("mine")
    _forbid_training(monkeypatch)
    capsys.readouterr()
    rc = cli.main(["--progress", "none", "--log-level", "WARNING", "train", "--data", str(cohort), "--out", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "stale lock" in caplog.text and f"pid {owner['pid']}" in caplog.text
    assert ".last.x1y2.partial.pt" in caplog.text  # each removal is reported
    assert not (run_copy / LOCK_NAME).exists()
    assert not any(p.exists() for p in leftovers) and not (run_copy / ".preprocessed.k3j2.partial").exists()
    assert all(p.read_text() == "mine" for p in keep)


def test_partials_are_only_cleaned_with_the_lock_held(tmp_path):
    lock = run_lock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".a.b.partial").write_text("")
    with pytest.raises(RuntimeError, match="lock"):
        clean_stale_partials(tmp_path / "run", lock)
    with lock:
        assert clean_stale_partials(tmp_path / "run", lock) == [tmp_path / "run" / ".a.b.partial"]


# ------------------------------------------------------------------------------------------------
# --resume with fewer iterations (hostile finding 13c)


def test_resume_with_fewer_iterations_is_refused(run_copy, capsys):
    for argv, folder in (
        (["train-gan", "--data", run_copy / "preprocessed", "--out", run_copy / "gan"], run_copy / "gan"),
        (["train-seg", "--pseudo-masks", run_copy / "pseudo_masks", "--out", run_copy / "seg_unet", "--model", "unet"], run_copy / "seg_unet"),
    ):
        model = (folder / "model.pt").read_bytes()
        done = 2 if folder.name == "gan" else 4
        rc, _, err = _run(capsys, *argv, "--resume", "--iterations", "1", "--device", "cpu")
        assert rc == 2
        _one_error_line(err, folder, f"already has {done} iterations", f"--iterations {done} or more")
        assert (folder / "model.pt").read_bytes() == model
        assert not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------
# SIGINT during training: the step ends, a checkpoint is written, exit 130 with how to resume


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_during_training_writes_a_checkpoint_and_says_how_to_resume(trained, tmp_path):
    run = tmp_path / "gan"
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from CovidGANSegLib import cli\nsys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    argv = ["--progress", "none", "--log-level", "ERROR", "train-gan", "--data", str(trained[0] / "preprocessed"), "--out", str(run),
            "--config", "tiny", "--iterations", "100000", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    losses = run / "losses.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if losses.is_file() and len(losses.read_text().splitlines()) >= 4:  # header + 3 iterations
            break
        time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # it ignored the signal: do not leave it running
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "--resume" in err and "checkpoint written" in err and "Traceback" not in err
    rows = len(losses.read_text().splitlines()) - 1
    assert load_checkpoint(run / "checkpoints" / "last.pt", kind="gan")["iteration"] == rows >= 3
    assert not (run / LOCK_NAME).exists() and not [p for p in run.rglob(".*") if ".partial" in p.name]


def test_deterministic_mode_is_set_for_the_run_and_restored():
    before = torch.are_deterministic_algorithms_enabled()
    with train_command.deterministic_mode(True) as info:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert info == {"deterministic": True, "torch_deterministic_algorithms": True, "warn_only": True, "cudnn_benchmark": False,
                        "cudnn_deterministic": True}
    assert torch.are_deterministic_algorithms_enabled() == before
    with train_command.deterministic_mode(False) as info:
        assert info == {"deterministic": False}


def test_manifests_record_the_deterministic_setting(trained):
    assert read_manifest(trained[0] / "gan")["deterministic"] is False
    assert load_checkpoint(trained[0] / "seg_unet" / "model.pt", kind="seg")["metadata"]["deterministic"] is False


def test_cpu_bf16_enters_the_segmenter_stages_hash_only_when_on(tmp_path):
    off = {s.name: s for s in train_command.stages_of(load_plan("tiny"), tmp_path)}
    on = {s.name: s for s in train_command.stages_of(load_plan("tiny", ["segmenter.cpu_bf16=true"]), tmp_path)}
    seg = [n for n in off if n.startswith("seg_")]
    assert seg and all(off[n].hash != on[n].hash for n in seg)
    assert all(off[n].hash == on[n].hash for n in off if n not in seg)
    # off, the stage is hashed as before the field existed: float32 runs made then are not "another plan"
    assert all("cpu_bf16" not in off[n].plan["segmenter"] and on[n].plan["segmenter"]["cpu_bf16"] is True for n in seg)
