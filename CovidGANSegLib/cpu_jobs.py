"""Independent CPU jobs side by side, each in its own process with a share of the cores.

On a small CPU, torch's intra-op threads pay off poorly for the segmenters' small batches. On the
project's 2-core machine (AMD EPYC, Zen 3, no AVX-512) one float32 training step (8 x 1 x 128 x
128) of the ``small`` TransUNet takes 0.37-0.41 s with 2 threads and 0.56 s with 1, the U-Net's
0.35-0.36 s and 0.43-0.48 s; the two at once, one thread each, take 0.60-0.64 s and 0.43-0.50 s.
One step of each: 0.60-0.64 s side by side against 0.72-0.76 s one after the other
(``benchmarks/bench_cpu_throughput.py --side-by-side``), and the mostly single-threaded parts of a
training run (synthetic lesions, validation, figures) overlap as well.

A job's result is the same as running it alone with the same number of threads: the split only
decides where it runs. Jobs are started with ``spawn`` (no state inherited from the parent beyond
their arguments), so arguments and results must be picklable.

Stopping: on ``KeyboardInterrupt`` in the parent (Ctrl-C, or SIGTERM / SIGHUP turned into it by
the command line) every job still running gets SIGTERM (a training loop finishes its step, writes
its checkpoint and stops), the parent waits for them and re-raises: no job outlives the call. Each
job runs in a process group of its own, so that a Ctrl-C at the terminal (SIGINT to the whole
foreground group) reaches the parent alone: a training loop takes a second signal for "stop at
once, no checkpoint" (:func:`~CovidGANSegLib.runlock.stop_after_step`), and the job gets exactly
one. A job that fails makes the others stop the same way, and its exception is raised in the parent
(an unpicklable one as a ``RuntimeError`` with its traceback); a job process that dies without a
word (killed, crashed) raises a ``RuntimeError`` naming it and its exit code.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: seconds a job gets to stop after SIGTERM before it is killed
STOP_GRACE_S = 120.0


def threads_per_job(device: str, jobs: int, threads: int) -> int:
    """Torch threads for each of ``jobs`` run side by side (0: one after the other).

    Side by side on a CPU with at least two of torch's ``threads``: an even share each, at least
    one (three jobs on two threads share the two cores); on a GPU, with one job or one thread,
    one after the other.
    """
    if device != "cpu" or jobs < 2 or threads < 2:
        return 0
    return max(1, threads // jobs)


def run_side_by_side(jobs: dict[str, tuple[Callable[..., Any], dict[str, Any]]], *, threads: int,
                     log_level: int | None = None) -> dict[str, Any]:
    """Run ``{name: (function, keyword arguments)}`` at once, one spawned process each with
    ``threads`` torch threads; return ``{name: result}``.

    ``function`` must be importable at module level (spawn pickles it by name). The jobs' logging
    goes to stderr in :data:`CovidGANSegLib.protocol.LOG_FORMAT` at ``log_level`` (default: this
    process's root level); their progress display is off.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not jobs:
        return {}
    level = logging.getLogger().getEffectiveLevel() if log_level is None else int(log_level)
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    procs = {name: ctx.Process(target=_job, args=(name, fn, kwargs, threads, level, messages), name=f"covidganseg-{name}")
             for name, (fn, kwargs) in jobs.items()}
    results: dict[str, Any] = {}
    finished = False
    try:
        for p in procs.values():
            p.start()
        while len(results) < len(procs):
            try:
                name, ok, value = messages.get(timeout=0.5)
            except queue.Empty:
                silent = [n for n, p in procs.items() if n not in results and p.exitcode is not None]
                if not silent:
                    continue
                try:  # its last message may still be on its way
                    name, ok, value = messages.get(timeout=5.0)
                except queue.Empty:
                    raise RuntimeError(f"the {silent[0]} job ended with exit code {procs[silent[0]].exitcode} "
                                       "without a result (killed, or out of memory?)") from None
            if not ok:
                raise value
            results[name] = value
        finished = True
    finally:
        _stop(procs, terminate=not finished)
        messages.close()
    return results


def _stop(procs: dict[str, multiprocessing.process.BaseProcess], *, terminate: bool) -> None:
    """Wait for every job process; with ``terminate``, SIGTERM the ones still running first."""
    if terminate:
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                p.terminate()
    for name, p in procs.items():
        if p.pid is None:
            continue
        p.join(STOP_GRACE_S)
        if p.is_alive():
            log.warning("the %s job did not stop within %.0f s: killing it", name, STOP_GRACE_S)
            p.kill()
            p.join()


def _job(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], threads: int, level: int, messages: Any) -> None:
    """Body of a job process: set threads, logging and progress, run ``fn``, report the outcome."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a terminal's Ctrl-C reaches the parent alone, which stops this job with one SIGTERM
    import torch

    from CovidGANSegLib import progress, protocol

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format=protocol.LOG_FORMAT)
    progress.set_mode("none")
    try:
        outcome = (name, True, fn(**kwargs))
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the parent
        try:
            pickle.dumps(exc)
            err: BaseException = exc
        except Exception:  # noqa: BLE001
            err = RuntimeError(f"the {name} job failed:\n{traceback.format_exc()}")
        outcome = (name, False, err)
    messages.put(outcome)
    messages.close()
    messages.join_thread()  # the message is on its way before the process ends
    if not outcome[1]:
        raise SystemExit(1)
