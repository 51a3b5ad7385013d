"""Data-parallel training on PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun --nproc_per_node N -m CovidGANSegLib train ...`` starts N processes with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`session` then joins the
process group (NCCL on CUDA, gloo on CPU; each process on GPU ``LOCAL_RANK``) and leaves it again
(``destroy_process_group`` in a ``finally``: errors, Ctrl-C and SIGTERM included), except a group that
another rank's death broke: that process reports the failure and exits at once (:func:`broken_by`). Without
torchrun, or with a world of one process, nothing here creates a process group and every helper
answers as a single process would (rank 0 of 1), so single-process runs are unchanged.

Rules the trainers follow (:mod:`CovidGANSegLib.gan.training`, :mod:`CovidGANSegLib.seg.training`):

* The global batch is the planned batch: every rank draws the *whole* batch from the same seeded
  generators (so all ranks' random streams stay identical to a single process's) and trains on its
  own rows :func:`shard_rows`; DDP averages the gradients. A batch not divisible by the world size
  is refused (:func:`check_batch`).
* Files (checkpoints, losses.csv, figures, model cards, manifests, the run lock) are written by
  rank 0 only (:func:`is_main`).
* Work only rank 0 does (preprocessing, pseudo-masks, manifests, the final model) goes through
  :func:`run_on_main`: the other ranks wait for its result, watching a heartbeat of rank 0, so a
  long stage never runs into the collective timeout while a dead rank 0 still stops them.

Timeouts (seconds, environment): ``COVIDGANSEG_DIST_TIMEOUT`` (default 300) bounds every collective
(``init_process_group(timeout=...)``) and how long the other ranks wait for a silent rank 0.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from CovidGANSegLib.errors import CovidGANSegError, InputError, exception_chain

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "COVIDGANSEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
HEARTBEAT_S = 1.0

_state: dict[str, Any] = {"store": None, "calls": 0, "beat": None, "prefix": "", "broken": None}


class DistributedError(CovidGANSegError):
    """A distributed run cannot go on (another rank failed, died or stopped answering)."""


# ------------------------------------------------------------------------------------------------
# who am I


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def requested() -> bool:
    """Whether torchrun (or its environment variables) asks for more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1 and "RANK" in os.environ


def restart_count() -> int:
    """How many times torchrun restarted the workers (``--max-restarts``; 0 on a first start or without torchrun)."""
    return max(0, _env_int("TORCHELASTIC_RESTART_COUNT", 0))


def is_initialized() -> bool:
    """Whether this process is in a torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    if is_initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, 0 outside torchrun)."""
    return _env_int("LOCAL_RANK", 0) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return rank() == 0


def timeout_s() -> float:
    """The collective timeout in seconds (``COVIDGANSEG_DIST_TIMEOUT``, default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise InputError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from exc
    if not value > 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return value


# ------------------------------------------------------------------------------------------------
# batches


def check_batch(batch: int, what: str, world: int | None = None) -> int:
    """The rows per rank of a global ``batch``; InputError when ``world`` does not divide it."""
    world = world_size() if world is None else int(world)
    if batch % world:
        raise InputError(f"the {what} batch size {batch} is not divisible by the {world} processes: the global batch is split "
                         f"evenly across them; choose a batch size that is a multiple of {world} (--set) or another --nproc_per_node")
    return batch // world


def shard_rows(batch: int) -> slice:
    """This rank's rows of a global batch of ``batch`` rows (all of them in a single process)."""
    per = check_batch(batch, "training")
    r = rank()
    return slice(r * per, (r + 1) * per)


# ------------------------------------------------------------------------------------------------
# the process group


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[str]:
    """Join the process group for the block when torchrun asks for it; yields the device to use.

    NCCL on CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU; the group is always destroyed
    on leaving. Outside torchrun (or with one process) nothing happens and ``device`` is yielded.
    """
    if not requested() or is_initialized():
        yield device
        return
    import torch
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    if cuda:
        n = torch.cuda.device_count()
        lr = _env_int("LOCAL_RANK", 0)
        if lr >= n:
            raise InputError(f"process LOCAL_RANK={lr} has no GPU of its own ({n} visible): give --nproc_per_node {n} or fewer")
        torch.cuda.set_device(lr)
        device = f"cuda:{lr}"
    seconds = timeout_s()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=_dt.timedelta(seconds=seconds))
    _state.update(calls=0, broken=None, prefix=f"covidganseg/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
                                                f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    try:
        _state["store"] = _connect_store(seconds)
        if is_main():
            _start_heartbeat(seconds)
        else:  # one set of log lines and progress bars: rank 0's
            from CovidGANSegLib import progress

            progress.set_mode("none")
            root = logging.getLogger()
            root.setLevel(max(root.level, logging.WARNING))
        log.info("distributed training: %d processes, backend %s, collective timeout %.0f s", world_size(), backend, seconds)
        try:
            yield device
        except BaseException as exc:
            # a peer failure itself, or a signal (torchrun's SIGTERM to the surviving ranks) that came
            # while one unwound: the dead peer is what to report
            failure = None if isinstance(exc, CovidGANSegError) else next((e for e in exception_chain(exc) if is_peer_failure(e)), None)
            if failure is None:
                raise
            first = (str(failure).splitlines() or [type(failure).__name__])[0][:300]
            _state["broken"] = DistributedError(f"rank {rank()}: another process of the job failed or was killed ({first}); the job stops. "
                                                "Run the same command again with --resume to continue from the last checkpoint")
            raise _state["broken"] from exc
        # DDP wrappers and autograd graphs that still hold the group (reference cycles) go while the
        # group is whole and the interpreter too: a gloo group left to interpreter finalisation can
        # abort a process whose work is done. Not after a peer failure: freeing DDP state on a broken
        # group can deadlock or abort (broken_by).
        gc.collect()
        barrier()  # leave together: no rank tears the group down while another still runs a collective
    finally:
        broken = _state["broken"] is not None
        _stop_heartbeat(wait=not broken)
        _state["store"] = None
        if not broken:  # a group broken by a dead peer stays as it is: see broken_by()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def broken_by() -> DistributedError | None:
    """The error the last :func:`session` ended on when another rank's failure broke its process group
    (the group is then left as it was), else None.

    Freeing DDP's reducer on such a group can deadlock in torch's gloo backend (the group's destructor
    joins its worker thread while holding the GIL, and that thread needs the GIL to free a finished
    collective: seen under load, the process then waits for torchrun's SIGKILL). Such a process
    reports its error and leaves without the interpreter's teardown (:func:`CovidGANSegLib.cli.main`).
    """
    return _state["broken"]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died, left or timed out."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch < 2.1
        DistError = ()  # type: ignore[assignment]  # noqa: N806
    if DistError and isinstance(exc, DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in (
        "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Timed out", "timed out", "ProcessGroup"))


def _connect_store(seconds: float) -> Any:
    """A client of torchrun's key-value store (MASTER_ADDR:MASTER_PORT), for waits on rank 0."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500)
    return dist.TCPStore(host, port, world_size(), False, timeout=_dt.timedelta(seconds=seconds))


def _start_heartbeat(seconds: float) -> None:
    """Rank 0 bumps a counter in the store every HEARTBEAT_S seconds (its own store client)."""
    stop = threading.Event()
    key = _state["prefix"] + "heartbeat"
    store = _connect_store(seconds)

    def beat() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(Exception):
                store.set(key, str(n))
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="covidganseg-heartbeat", daemon=True)
    thread.start()
    _state["beat"] = (stop, thread)


def _stop_heartbeat(wait: bool = True) -> None:
    beat = _state.get("beat")
    _state["beat"] = None
    if beat:
        beat[0].set()
        if wait:  # (a daemon thread: one not waited for ends with the process)
            beat[1].join(timeout=5)


# ------------------------------------------------------------------------------------------------
# collectives


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean of each value over the ranks (the values unchanged in a single process)."""
    if world_size() == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def sum_over_ranks(value: Any) -> Any:
    """The sum of a tensor over the ranks, as a new tensor (the tensor itself in a single process)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is True on some rank (every rank gets the same answer)."""
    if world_size() == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_rows(tensor: Any) -> Any:
    """Concatenate every rank's rows in rank order, keeping the autograd graph.

    The backward pass sums the gradients the ranks compute for each rank's rows, so a loss computed
    identically on every rank from the gathered rows gets its full-batch gradient once DDP has
    averaged the parameters' gradients.
    """
    if world_size() == 1:
        return tensor
    import torch
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def _collective_device() -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_ddp(module: Any, *, find_unused_parameters: bool = False) -> Any:
    """``module`` in DistributedDataParallel under a process group (``module`` itself otherwise)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    param = next(module.parameters(), None)
    device_ids = [param.device.index] if param is not None and param.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def sync_batch_norm(module: Any) -> Any:
    """BatchNorm layers as SyncBatchNorm under DDP on CUDA (statistics over the global batch).

    On CPU torch has no SyncBatchNorm: each rank's BatchNorm then normalises with its own rows'
    statistics (the usual DDP behaviour; results differ from one process within the noise of the
    batch statistics). The networks' default normalisation is GroupNorm, which is per sample and
    unaffected.
    """
    from torch import nn

    if world_size() == 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    log.warning("BatchNorm under DDP on CPU: its statistics are those of each process's rows, not of the global batch")
    return module


# ------------------------------------------------------------------------------------------------
# work only rank 0 does


def run_on_main(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result (JSON-serialisable).

    The other ranks wait meanwhile, however long it takes, as long as rank 0's heartbeat goes on;
    when it stops for ``COVIDGANSEG_DIST_TIMEOUT`` seconds, or ``fn`` raises on rank 0, they raise
    :class:`DistributedError`. In a single process this is ``fn()``.
    """
    if world_size() == 1 or _state.get("store") is None:
        return fn()
    store = _state["store"]
    _state["calls"] += 1
    key = f"{_state['prefix']}step/{_state['calls']}/{name}"
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            text = str(exc) or type(exc).__name__
            with contextlib.suppress(Exception):
                store.set(key, json.dumps({"error": text}))
            raise
        store.set(key, json.dumps({"result": result}))
        return result
    answer = _wait_for_key(store, key, name)
    if "error" in answer:
        raise DistributedError(f"rank 0 failed while {name}: {answer['error']}")
    return answer["result"]


def _wait_for_key(store: Any, key: str, name: str) -> dict[str, Any]:
    limit = timeout_s()
    beat_key = _state["prefix"] + "heartbeat"
    last_beat, last_change = None, time.monotonic()
    while True:
        try:
            if store.check([key]):
                return json.loads(store.get(key).decode())
            beat = store.get(beat_key).decode() if store.check([beat_key]) else None
        except Exception as exc:  # the store went away: rank 0's node is gone
            raise DistributedError(f"lost contact with rank 0 while {name} ({exc}); the job stops (resume with --resume)") from exc
        now = time.monotonic()
        if beat != last_beat:
            last_beat, last_change = beat, now
        elif now - last_change > limit:
            raise DistributedError(f"rank 0 gave no sign of life for {limit:.0f} s while {name} ({TIMEOUT_ENV}); "
                                   "the job stops (resume with --resume)")
        time.sleep(0.2)
