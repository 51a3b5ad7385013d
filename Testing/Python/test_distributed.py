"""Distributed training under torchrun on CPU (gloo): the same weights as one process, a killed rank
stops the job, ``--resume`` continues from the last checkpoint; the helpers in a single process."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from CovidGANSegLib import cli, distributed, progress, protocol

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# float rounding of the sharded sums, amplified by Adam's first steps where a gradient is near eps:
# at most ~1e-6 on the earlier AVX-512 CPU, 1.3e-5 on a Zen 3 CPU without AVX-512 (2026-12-03).
# Without the per-shard rescaling of the masked means the weights differ by 1.2e-3 (checked by mutation).
ATOL = 5e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _torchrun(*args: object, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *[str(a) for a in args]]


def _train_argv(cohort: Path, run: Path, *extra: object) -> list[str]:
    return ["-m", "CovidGANSegLib", "--progress", "none", "--log-level", "INFO", "train", "--data", str(cohort), "--out", str(run),
            "--plan", "tiny", *[str(e) for e in extra]]


#: what a rank prints when a C++ thread of the torch runtime is torn down unjoined: seen in CI on
#: 2026-12-04 (and once in ~40 runs under load before the ranks left together), never reproduced
#: here since (0 of 160 runs of the eq. 4 job)
TEARDOWN_ABORT = "terminate called without an active exception"


def _run_torchrun(argv: list[object], *, timeout: float, fresh: Path | None = None) -> subprocess.CompletedProcess:
    """A torchrun job, run once more (``fresh`` removed first) only when a rank aborted in the torch
    runtime's teardown: any other failure, and a second abort, fail the test as they are."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=timeout)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        print(f"torchrun job aborted in teardown, run again: {proc.stderr[-2000:]}", file=sys.stderr)
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=timeout)
    return proc


def _weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)[key]


def _without_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention's key bias dropped (its query and value thirds kept).

    Adding a constant key bias shifts every logit of a softmax row equally, so its gradient is zero
    up to rounding; Adam divides that rounding noise by its own size and moves the bias by up to the
    learning rate each step in a direction float rounding decides. It has no effect on any output.
    """
    out = {}
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            h = v.shape[0] // 3
            v = torch.cat([v[:h], v[2 * h:]])
        out[k] = v
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, atol: float = ATOL) -> None:
    a, b = _without_key_bias(a), _without_key_bias(b)
    assert a.keys() == b.keys(), what
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"{what}: largest difference {worst:.3g} > {atol}"


def _losses(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from CovidGANSegLib.synth.phantoms import write_cohort

    progress.set_mode("none")
    return write_cohort(tmp_path_factory.mktemp("dist") / "cohort", healthy=2, covid=3, seed=2)


@pytest.fixture(scope="module")
def one_process_run(cohort, tmp_path_factory) -> Path:
    """The tiny plan in one process (no process group)."""
    run = tmp_path_factory.mktemp("dist_one") / "run"
    rc = cli.main(["--progress", "none", "--log-level", "ERROR", "train", "--data", str(cohort), "--out", str(run), "--plan", "tiny"])
    progress.set_mode("none")
    assert rc == 0
    return run


# ------------------------------------------------------------------------------------------------
# single process: the helpers answer as rank 0 of 1 and create no process group


def test_single_process_helpers_create_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.requested()
    with distributed.session("cpu") as device:
        assert device == "cpu" and not distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.run_on_main("x", lambda: 42) == 42
        assert distributed.mean_over_ranks([1.0, 2.0]) == [1.0, 2.0] and distributed.any_rank(True)
        assert distributed.shard_rows(4) == slice(0, 4)
        distributed.barrier()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not distributed.requested()  # torchrun --nproc_per_node 1: a plain single-process run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_signal_while_a_dead_peer_is_reported_still_reports_the_dead_peer(monkeypatch, capsys):
    """torchrun's SIGTERM to the surviving ranks can come while one of them unwinds a collective that
    failed: the session still names the dead peer and leaves the broken group alone, and the command
    line reports that error (not "interrupted")."""
    import torch.distributed as dist

    from CovidGANSegLib.commands import gan

    monkeypatch.setattr(distributed, "requested", lambda: True)  # a gloo group of one process, in this one
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(distributed.DistributedError, match="another process of the job failed or was killed") as info:
            with distributed.session("cpu"):
                assert distributed.is_initialized()
                try:
                    raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4519: Connection reset by peer")
                except RuntimeError:
                    raise KeyboardInterrupt("signal SIGTERM") from None  # the signal, while the failure unwinds
        assert "Connection reset by peer" in str(info.value) and "--resume" in str(info.value)
        assert distributed.broken_by() is info.value
        assert distributed.is_initialized()  # the broken group is left as it is (freeing it can deadlock)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # (whole here: this test's own clean-up)
        distributed._state["broken"] = None  # else the command line below would end this process (os._exit)

    error = info.value

    def report_interrupted(args):  # the same signal, while the error reaches the command line
        try:
            raise error
        except distributed.DistributedError:
            raise KeyboardInterrupt("signal SIGTERM")

    monkeypatch.setattr(gan, "run_train", report_interrupted)
    capsys.readouterr()
    assert cli.main(["train-gan", "--data", "d", "--out", "r"]) == protocol.EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert protocol.parse_error(err.strip().splitlines()[-1]) == str(error) and "interrupted" not in err

    def interrupted(args):  # a plain Ctrl-C stays an interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(gan, "run_train", interrupted)
    assert cli.main(["train-gan", "--data", "d", "--out", "r"]) == protocol.EXIT_INTERRUPTED
    assert protocol.parse_error(capsys.readouterr().err.strip().splitlines()[-1]) == "interrupted"


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_is_written(cohort, tmp_path, monkeypatch, capsys):
    from CovidGANSegLib.errors import InputError

    with pytest.raises(InputError, match="batch size 5 is not divisible by the 2 processes"):
        distributed.check_batch(5, "GAN", 2)
    assert distributed.check_batch(8, "GAN", 4) == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    run = tmp_path / "run"
    rc = cli.main(["--progress", "none", "--log-level", "WARNING", "train", "--data", str(cohort), "--out", str(run), "--plan", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "not divisible by the 3 processes" in err and "gan.batch_size" in err, err
    assert not run.exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(InputError, match="COVIDGANSEG_DIST_TIMEOUT"):
        distributed.timeout_s()


# ------------------------------------------------------------------------------------------------
# two gloo processes


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(one_process_run, cohort, tmp_path):
    run = tmp_path / "run"
    proc = _run_torchrun(_torchrun(*_train_argv(cohort, run)), timeout=300, fresh=run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [str(run / "gan" / "model.pt"), str(run / "seg_transunet" / "model.pt"), str(run / "seg_unet" / "model.pt")]
    assert "distributed training: 2 processes, backend gloo" in proc.stderr
    # preprocessing sharded: rank 0 did its share only, and assembled every study from the shards
    own = int(re.search(r"rank 0 preprocessed (\d+) studies", proc.stderr).group(1))
    assembled = int(re.search(r"assembling (\d+) studies preprocessed by 2 processes", proc.stderr).group(1))
    index = json.loads((run / "preprocessed" / "index.json").read_text())
    assert 1 <= own < assembled == len(index["records"])
    one = one_process_run
    _assert_close(_weights(run / "gan" / "model.pt", "generator"), _weights(one / "gan" / "model.pt", "generator"), "generator")
    _assert_close(_weights(run / "gan" / "checkpoints" / "last.pt", "discriminator"),
                  _weights(one / "gan" / "checkpoints" / "last.pt", "discriminator"), "discriminator")
    for model in ("transunet", "unet"):
        _assert_close(_weights(run / f"seg_{model}" / "checkpoints" / "last.pt", "model"),
                      _weights(one / f"seg_{model}" / "checkpoints" / "last.pt", "model"), model)
        rows, ref = _losses(run / f"seg_{model}" / "losses.csv"), _losses(one / f"seg_{model}" / "losses.csv")
        assert [r["iteration"] for r in rows] == [r["iteration"] for r in ref]  # rank 0 alone wrote it: no doubled rows
        for r, q in zip(rows, ref):  # the logged losses are the global batch's
            assert float(r["loss"]) == pytest.approx(float(q["loss"]), abs=1e-5)
    gan_rows, gan_ref = _losses(run / "gan" / "losses.csv"), _losses(one / "gan" / "losses.csv")
    assert len(gan_rows) == len(gan_ref)
    for r, q in zip(gan_rows, gan_ref):
        for column in ("d_loss", "g_adv", "g_rec"):
            assert float(r[column]) == pytest.approx(float(q[column]), abs=1e-5)
    meta = torch.load(run / "gan" / "model.pt", weights_only=False)["metadata"]
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 2}
    assert not any(p.name.startswith(".") for p in run.rglob("*"))  # lock released, no temporary files


TRAINER_SCRIPT = textwrap.dedent('''
    """Phase 1 (contrastive) and phase 2 steps of SegTrainer, with severity labels and uneven lungs."""
    import sys

    import torch

    from CovidGANSegLib import distributed
    from CovidGANSegLib.seg.training import PHASE_CONTRASTIVE, PHASE_END_TO_END, SegTrainer
    from CovidGANSegLib.seg.transunet import get_seg_config

    torch.set_num_threads(1)
    with distributed.session("cpu"):
        cfg = get_seg_config("tiny").replace(batch_size=4, weight_contrastive=0.5, dropout=0.0)
        trainer = SegTrainer(sys.argv[2], cfg, device="cpu", seed=3)
        g = torch.Generator().manual_seed(5)
        x = torch.rand(4, 1, 32, 32, generator=g)
        y = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
        lung = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
        lung[0, :, 4:28, 4:28] = True  # rank 0's rows: many lung pixels; rank 1's: few
        lung[1, :, 8:12, 8:30] = True
        lung[2, :, 10:14, 10:14] = True
        lung[3, :, 2:5, 2:9] = True
        labels = torch.tensor([1, 0, 1, 0])
        rows = [trainer.step(x, y, labels, PHASE_CONTRASTIVE, lung) for _ in range(2)]
        rows += [trainer.step(x, y, labels, PHASE_END_TO_END, lung) for _ in range(2)]
        if distributed.is_main():
            torch.save({"model": trainer.model.state_dict(), "tau": trainer.contrastive.log_tau.detach(), "rows": rows}, sys.argv[1])
        del trainer  # as in the library, whose trainers are locals: DDP (and its hold on gloo) ends in the session
''')


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_contrastive_and_masked_losses_give_the_full_batch_gradient(tmp_path, arch):
    """eq. 4 over pairs across ranks and eq. 5 / MSE masked over uneven lungs: 2 ranks == 1 process."""
    script = tmp_path / "steps.py"
    script.write_text(TRAINER_SCRIPT)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    proc = subprocess.run([str(a) for a in (sys.executable, script, one, arch)], capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _run_torchrun(_torchrun(script, two, arch), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    _assert_close(a["model"], b["model"], arch)
    assert float(a["tau"]) == pytest.approx(float(b["tau"]), abs=ATOL)
    for r, q in zip(a["rows"], b["rows"]):
        for column in ("loss", "contrastive", "sensitivity", "mse"):
            if r[column] == r[column]:  # not NaN
                assert q[column] == pytest.approx(r[column], abs=1e-5), (column, r, q)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc")
def test_a_killed_rank_stops_the_job_and_resume_continues_from_the_last_checkpoint(cohort, tmp_path):
    run = tmp_path / "run"
    iterations = 24
    plan = ("--set", f"gan.iterations={iterations}", "--set", "gan.sample_every=30")  # fewer figures: faster steps
    argv = _torchrun(*_train_argv(cohort, run, *plan))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        losses = run / "gan" / "losses.csv"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # wait for a checkpoint (every 2 iterations) and more
            if losses.is_file() and len(losses.read_text().splitlines()) > 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a rank could be killed"
        victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)
        stopped_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, out[-3000:]
    assert stopped_after < 15, stopped_after  # (torchrun gives a rank that does not stop 30 s after its SIGTERM)
    assert "exitcode  : -9" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]  # torchrun names the killed rank
    assert "another process of the job failed or was killed" in out and "--resume" in out, out[-3000:]  # and the survivor says so
    # ... and leaves on its own with the input-error code, not on torchrun's SIGTERM or SIGKILL (its teardown
    # on the broken group, skipped now, could deadlock until the SIGKILL: 2 of 80 runs under load, 2026-12-05)
    assert re.search(rf"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: {protocol.EXIT_INPUT_ERROR} ", out), out[-3000:]
    done = torch.load(run / "gan" / "checkpoints" / "last.pt", weights_only=False)["iteration"]
    assert 2 <= done < iterations

    # --resume under torchrun: every rank loads the same last.pt and the run ends as an uninterrupted one
    proc = subprocess.run(_torchrun(*_train_argv(cohort, run, *plan, "--resume")),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed at iteration {done} of {iterations}" in proc.stderr
    assert [int(r["iteration"]) for r in _losses(run / "gan" / "losses.csv")] == list(range(1, iterations + 1))
    script = tmp_path / "gan.py"
    script.write_text(GAN_SCRIPT)
    ref = tmp_path / "ref"
    proc = _run_torchrun(_torchrun(script, run / "preprocessed", ref, iterations), timeout=180, fresh=ref)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the same two processes without the interruption: the same weights (one process differs by float rounding,
    # which 24 adversarial steps amplify to ~1e-2 in the weights while the losses agree to ~1e-4)
    _assert_close(_weights(run / "gan" / "model.pt", "generator"), _weights(ref / "model.pt", "generator"), "resumed generator", atol=1e-6)
    for r, q in zip(_losses(run / "gan" / "losses.csv"), _losses(ref / "losses.csv")):
        assert float(r["g_rec"]) == pytest.approx(float(q["g_rec"]), abs=1e-6)


GAN_SCRIPT = textwrap.dedent('''
    """train_gan of the tiny plan on a preprocessed folder (argv: data, run folder, iterations)."""
    import sys

    import torch

    from CovidGANSegLib import distributed, progress
    from CovidGANSegLib.gan.training import train_gan
    from CovidGANSegLib.plan import load_plan

    torch.set_num_threads(1)
    progress.set_mode("none")
    n = int(sys.argv[3])
    plan = load_plan("tiny", [f"gan.iterations={n}"])
    with distributed.session("cpu"):
        train_gan(sys.argv[1], sys.argv[2], config=plan.gan, preprocess=plan.preprocess, iterations=n, device="cpu", seed=plan.run.seed)
''')
