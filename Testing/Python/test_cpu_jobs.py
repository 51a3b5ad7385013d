"""CPU jobs side by side (``cpu_jobs``): results, threads, failures, stopping; and the demo's use of it."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch

from CovidGANSegLib import cpu_jobs, demo


def _threads_and_pid(tag: str) -> tuple[str, int, int]:
    return tag, torch.get_num_threads(), os.getpid()


def _process_group() -> int:
    return os.getpgrp()


def _fail(message: str) -> None:
    raise ValueError(message)


def _die(code: int) -> None:
    os._exit(code)


def _sleep(seconds: float, pid_file: str) -> None:
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def _interrupt_parent_after(seconds: float) -> None:
    time.sleep(seconds)
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers: look at its state where /proc tells it
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def test_jobs_run_in_their_own_processes_with_the_threads_asked_for():
    out = cpu_jobs.run_side_by_side({"a": (_threads_and_pid, {"tag": "A"}), "b": (_threads_and_pid, {"tag": "B"})}, threads=1)
    assert set(out) == {"a", "b"}
    assert out["a"][:2] == ("A", 1) and out["b"][:2] == ("B", 1)
    assert len({out["a"][2], out["b"][2], os.getpid()}) == 3
    assert cpu_jobs.run_side_by_side({}, threads=1) == {}
    with pytest.raises(ValueError, match="threads"):
        cpu_jobs.run_side_by_side({"a": (_threads_and_pid, {"tag": "A"})}, threads=0)


def test_jobs_have_process_groups_of_their_own():
    """A Ctrl-C at the terminal goes to the foreground process group: the jobs must not get it besides
    the parent's one SIGTERM (a training loop takes a second signal for "stop at once, no checkpoint")."""
    out = cpu_jobs.run_side_by_side({"a": (_process_group, {}), "b": (_process_group, {})}, threads=1)
    assert len({out["a"], out["b"], os.getpgrp()}) == 3


def test_a_failing_job_raises_its_error_and_stops_the_others(tmp_path):
    pid_file = tmp_path / "pid"
    t = time.perf_counter()
    with pytest.raises(ValueError, match="bad input in job a"):
        cpu_jobs.run_side_by_side({"a": (_fail, {"message": "bad input in job a"}),
                                   "b": (_sleep, {"seconds": 120, "pid_file": str(pid_file)})}, threads=1)
    assert time.perf_counter() - t < 60  # the sleeper was stopped, not waited for
    if pid_file.is_file():  # it got as far as starting
        assert not _alive(int(pid_file.read_text()))


def test_a_job_that_dies_silently_is_named_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"the b job ended with exit code 3"):
        cpu_jobs.run_side_by_side({"a": (_threads_and_pid, {"tag": "A"}), "b": (_die, {"code": 3})}, threads=1)


def test_an_interrupt_stops_every_job_before_it_returns(tmp_path):
    pid_file = tmp_path / "pid"
    t = time.perf_counter()
    # Ctrl-C as Python handles it by default: a shell that starts a command in the background
    # without job control has the process ignore SIGINT, and the interrupt would never come
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cpu_jobs.run_side_by_side({"a": (_interrupt_parent_after, {"seconds": 3.0}),
                                       "b": (_sleep, {"seconds": 120, "pid_file": str(pid_file)})}, threads=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t < 60
    assert pid_file.is_file() and not _alive(int(pid_file.read_text()))


@pytest.mark.slow
def test_training_side_by_side_gives_the_models_of_training_alone(tmp_path, one_torch_thread):
    """The demo's segmenters trained side by side (1 thread each) equal the same trainings run one
    after the other in this process with 1 thread: the split changes where they run, not what they learn."""
    from test_seg_training import make_pseudo_masks

    from CovidGANSegLib.checkpoints import load_checkpoint

    pm = make_pseudo_masks(tmp_path / "pm")
    jobs = {name: dict(pseudo_masks=pm, run_dir=tmp_path / "side" / name, model=name, config="tiny", iterations=6, device="cpu", seed=3)
            for name in ("transunet", "unet")}
    side = cpu_jobs.run_side_by_side({name: (demo._timed_training, kw) for name, kw in jobs.items()}, threads=1)
    for name, kw in jobs.items():
        alone, seconds = demo._timed_training(**{**kw, "run_dir": tmp_path / "alone" / name})
        assert seconds > 0 and side[name][1] > 0
        a = load_checkpoint(alone, kind="seg")
        b = load_checkpoint(side[name][0], kind="seg")
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["threshold"] == b["threshold"]


def test_jobs_run_side_by_side_only_on_a_cpu_with_two_threads_or_more():
    assert cpu_jobs.threads_per_job("cpu", 2, 2) == 1
    assert cpu_jobs.threads_per_job("cpu", 3, 2) == 1  # the GAN and two segmenters share two cores
    assert cpu_jobs.threads_per_job("cuda", 2, 2) == 0
    assert cpu_jobs.threads_per_job("cpu", 2, 1) == 0
    assert cpu_jobs.threads_per_job("cpu", 1, 8) == 0
    assert cpu_jobs.threads_per_job("cpu", 2, 16) == 8 and cpu_jobs.threads_per_job("cpu", 3, 16) == 5
    assert demo._segmenters_need_no_gan(demo.QUICK) and demo._segmenters_need_no_gan(demo.FULL)
    assert not demo._segmenters_need_no_gan(dataclasses.replace(demo.QUICK, synthetic_fraction=0.5))
    assert not demo._segmenters_need_no_gan(dataclasses.replace(demo.QUICK, seg_config="paper"))  # contrastive phase
    assert not demo._segmenters_need_no_gan(dataclasses.replace(demo.QUICK, synthetic_variants=0))  # no synthetic copy to learn from
