"""``covidganseg train``: the whole training pipeline from one plan, resumable, one process per run.

Stages, each in its own folder of RUN with a ``manifest.json`` (:mod:`CovidGANSegLib.manifest`):

1. ``RUN/preprocessed``: the data set on the GAN's grid (``preprocessing.ensure_preprocessed``;
   under torchrun each process preprocesses its share of the studies and rank 0 assembles them);
   when the segmenters learn from synthetic lesions alone (no pseudo-mask in their batches, no
   contrastive phase: ``seg.training.needs_pseudo_masks``) and have a grid of their own, also
   ``RUN/preprocessed-XxYxZ``, the data set on their grid;
2. ``RUN/gan``: the 3D GAN (``gan.training.train_gan``), ``RUN/gan/model.pt``;
3. ``RUN/pseudo_masks``: difference maps, pseudo-masks, severity groups (``gan.pseudomasks``);
4. ``RUN/seg_<model>``: each planned segmenter (``seg.training.train_segmenter``), ``model.pt``,
   trained on the pseudo-masks, or, when it needs none, on the preprocessed data set of its grid.

Segmenters that need no pseudo-mask do not depend on the GAN: on a CPU with two or more torch
threads (one process, no torchrun) the GAN and they train at once, each stage in a process of its
own with an even share of the threads (:mod:`CovidGANSegLib.cpu_jobs`, as the demo does), and the
pseudo-masks follow the GAN. Each stage keeps its lock, manifest, checkpoints and resume; Ctrl-C
stops every one of them after its current step with a checkpoint.

A stage whose manifest matches the plan and its inputs and whose outputs are there is skipped; an
interrupted stage continues from its last checkpoint with ``--resume``. Before anything is written
the plan is validated and the data, the output folder, the free disk space and the device are
checked; then ``RUN/.lock`` is taken, temporary files of a killed earlier run are removed and the
effective plan is written to ``RUN/plan.toml``.

Under ``torchrun --nproc_per_node N -m CovidGANSegLib train ...`` (:mod:`CovidGANSegLib.distributed`)
every process runs the read-only checks, then joins the process group; rank 0 alone takes the
lock and decides which stages run; every rank preprocesses its share of the studies, rank 0
assembles them, makes the pseudo-masks and writes every file, while
all ranks train the GAN and the segmenters with DistributedDataParallel on their shares of the
planned (global) batch. The other ranks wait for rank 0's stage results before reading them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CovidGANSegLib import protocol

log = logging.getLogger(__name__)

#: plan sections (and keys of the run section) each stage depends on; iterations are compared apart
_RUN_KEYS = ("seed", "deterministic")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the whole training pipeline from one plan: preprocess, GAN, pseudo-masks, segmenter(s)",
        description=(
            "Run every training stage in order into RUN: preprocessed/ (the data on the model grid), gan/ (the 3D\n"
            "GAN), pseudo_masks/ and seg_<model>/ (TransUNet and / or the U-Net baseline). The plan (--plan: a\n"
            "shipped plan or a TOML file; --set section.key=value overrides, values in TOML syntax) is written to\n"
            "RUN/plan.toml and into every checkpoint; each stage writes manifest.json (plan hash, inputs with\n"
            "SHA-256, outputs, provenance). A stage that matches the plan and its inputs is skipped; --resume\n"
            "continues an interrupted stage from its checkpoint. Ctrl-C / SIGTERM: the current step ends, a\n"
            "checkpoint is written, exit code 130. RUN/.lock keeps a second run out of the same folder.\n"
            "Prints the GAN and segmenter checkpoints that 'covidganseg segment' uses."),
        epilog=("plans: paper (the paper's sizes; GPU), quick (the demo's sizes; minutes on a CPU), tiny (tests)\n"
                "examples:\n"
                "  covidganseg train --data MosMedData --out runs/paper --plan paper\n"
                "  covidganseg train --data phantoms --out runs/quick --plan quick --set gan.iterations=600 --set run.device=cpu\n"
                "  covidganseg train --data MosMedData --out runs/paper --resume\n"
                "  PythonSlicer -m CovidGANSegLib train --data MosMedData --out runs/paper --plan paper"),
    )
    p.add_argument("--data", type=Path, required=True, help="raw data set (MosMedData layout studies/CT-0..CT-4, or healthy/ + covid/)")
    p.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder (created; reused stage by stage)")
    p.add_argument("--plan", default=None, metavar="NAME|FILE.toml",
                   help="paper, quick, tiny or a TOML plan file (default: RUN/plan.toml when RUN has one, else paper)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one plan value (TOML syntax: gan.iterations=30, preprocess.grid=[64,64,16]); repeatable")
    p.add_argument("--resume", action="store_true", help="continue interrupted (or extended) stages from their last checkpoint")
    p.set_defaults(handler=run_train)


@dataclass(frozen=True)
class Stage:
    """One stage of the run: its folder, the plan sections it depends on and their hash."""

    name: str
    folder: Path
    plan: dict[str, Any]
    hash: str
    iterations: int | None = None  # trained stages: the planned total


def stages_of(plan: Any, run_dir: Path) -> list[Stage]:
    """The stages of ``plan`` in order."""
    from CovidGANSegLib.plan import SEG_MODELS, plan_hash

    data = plan.to_dict()
    run = {k: data["run"][k] for k in _RUN_KEYS}
    gan = {k: v for k, v in data["gan"].items() if k != "iterations"}
    # cpu_bf16 (added later) enters the hash only when on, so that float32 stages made before it still match
    # iterations (a model's own included) stay out of the hashes: a finished stage may be trained on
    seg = {k: v for k, v in data["segmenter"].items()
           if k not in ("iterations", "models", *SEG_MODELS) and not (k == "cpu_bf16" and not v)}
    parts = [("preprocessed", {"preprocess": data["preprocess"]}, None)]
    grid = _own_segmenter_grid(plan)
    if grid is not None:
        parts.append((segmenter_data_folder(run_dir, grid).name, {"preprocess": {**data["preprocess"], "grid": list(grid)}}, None))
    parts += [
        ("gan", {"preprocess": data["preprocess"], "gan": gan, "run": run}, plan.gan.iterations),
        ("pseudo_masks", {"pseudo_masks": data["pseudo_masks"], "segmenter": {"grid": data["segmenter"].get("grid")}}, None),
    ]
    parts += [(f"seg_{m}", {"segmenter": {**seg, "model": m}, "run": run}, plan.segmenter.iterations_of(m)) for m in plan.segmenter.models]
    return [Stage(name, run_dir / name, section, plan_hash(section), its) for name, section, its in parts]


def segmenters_need_pseudo_masks(plan: Any) -> bool:
    """Whether the plan's segmenters read the GAN's pseudo-masks (``seg.training.needs_pseudo_masks``)."""
    from CovidGANSegLib.seg.training import needs_pseudo_masks

    return needs_pseudo_masks(plan.segmenter.config, plan.segmenter.synthetic)


def segmenter_data_folder(run_dir: Path, grid: tuple[int, ...]) -> Path:
    """``RUN/preprocessed-XxYxZ``: the data set on the segmenters' grid (the folder ``make_pseudo_masks``
    keeps it in when its cache is ``RUN/preprocessed``, so the pseudo-masks stage reuses it)."""
    return run_dir / f"preprocessed-{'x'.join(str(int(g)) for g in grid)}"


def _own_segmenter_grid(plan: Any) -> tuple[int, ...] | None:
    """The segmenters' grid when they learn without pseudo-masks on a grid other than the GAN's, else None."""
    grid = plan.segmenter.grid
    if segmenters_need_pseudo_masks(plan) or grid is None or tuple(grid) == tuple(plan.preprocess.grid):
        return None
    return tuple(int(g) for g in grid)


# ------------------------------------------------------------------------------------------------
# before anything is written


def _load_plan(args: argparse.Namespace) -> Any:
    from CovidGANSegLib.plan import load_plan

    if args.plan is not None:
        return load_plan(args.plan, args.overrides)
    own = args.out / "plan.toml"
    if own.is_file():
        log.info("using the run's own plan %s", own)
        return load_plan(own, args.overrides)
    return load_plan("paper", args.overrides)


def check_data(data: Path, min_slices: int) -> tuple[int, int]:
    """``(healthy, covid)`` study counts of a raw data set; InputError for anything unusable."""
    from CovidGANSegLib.datasets import discover_studies
    from CovidGANSegLib.errors import InputError

    if not data.exists():
        raise InputError("data folder not found", data)
    if not data.is_dir():
        raise InputError("the data is not a folder", data)
    if (data / "index.json").is_file():
        raise InputError("this is a preprocessed folder; 'train' needs the raw data set (it preprocesses into RUN/preprocessed)", data)
    try:
        studies = discover_studies(data, min_slices=min_slices)
    except OSError as exc:
        raise InputError(f"cannot read the data folder ({exc.strerror or exc})", data) from exc
    if not studies:
        raise InputError(f"no study with at least {min_slices} slices", data)
    healthy = sum(not s.covid for s in studies)
    covid = len(studies) - healthy
    if healthy == 0:
        raise InputError("no healthy (CT-0) study: the GAN learns healthy lungs from them", data)
    if covid == 0:
        raise InputError("no COVID (CT-1..CT-4) study to train on", data)
    return healthy, covid


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: Path) -> Path:
    """The nearest existing folder of ``out``, checked to be writable (a probe file, removed at once)."""
    from CovidGANSegLib.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError("the run folder is a file; give a folder", out)
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise InputError(f"{base} is a file, not a folder", out)
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"the run folder is not writable (no permission to write in {base})", out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".partial", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"the run folder is not writable ({exc.strerror or exc})", out) from exc
    return base


def _parameters(factory: Any) -> int:
    """Parameter count of a network built on torch's meta device (nothing allocated)."""
    import torch

    try:
        with torch.device("meta"):
            net = factory()
    except Exception:  # a module that cannot be built on meta: build it for real
        net = factory()
    return sum(p.numel() for p in net.parameters())


def estimate_disk_bytes(plan: Any, healthy: int, covid: int) -> int:
    """About the bytes the plan writes: preprocessed data, pseudo-masks and checkpoints (+ atomic copies)."""
    from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, Discriminator3D
    from CovidGANSegLib.seg.transunet import DOWNSAMPLE
    from CovidGANSegLib.seg.unet import build_segmenter

    n = healthy + covid
    gan_voxels = math.prod(plan.preprocess.grid)
    seg_grid = plan.segmenter.grid or plan.preprocess.grid
    seg_voxels = math.prod(seg_grid)
    total = n * gan_voxels * 5  # float32 image + bool lungs
    total += covid * seg_voxels * 10 + healthy * seg_voxels * 5  # difference, image, mask, lungs; healthy + lungs
    if tuple(seg_grid) != tuple(plan.preprocess.grid):
        total += n * seg_voxels * 5  # the preprocessed data on the segmenter's grid
    g = _parameters(lambda: DenseUNetGenerator3D(plan.gan))
    d = _parameters(lambda: Discriminator3D(plan.gan))
    total += (g + d) * 4 * 3 * 2 + g * 4  # last.pt (weights + two Adam moments) and its atomic copy; model.pt
    size = seg_grid[1] + (-seg_grid[1]) % DOWNSAMPLE
    cfg = plan.segmenter.config.replace(image_size=size)
    for model in plan.segmenter.models:
        p = _parameters(lambda m=model: build_segmenter(m, cfg))
        total += p * 4 * 3 * 2 * 2 + p * 4  # last.pt with the best model so far, its atomic copy; model.pt
    return int(total * 1.2) + (64 << 20)  # margin: figures, logs, manifests


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def check_disk(out: Path, base: Path, plan: Any, healthy: int, covid: int) -> int:
    """The estimated need in bytes; InputError when the disk of ``out`` has less free space."""
    from CovidGANSegLib.errors import InputError

    need = estimate_disk_bytes(plan, healthy, covid)
    free = shutil.disk_usage(base).free
    if free < need:
        raise InputError(f"not enough free disk space: the plan writes about {_gib(need)} (preprocessed data, pseudo-masks, "
                         f"checkpoints), {_gib(free)} free", out)
    return need


def check_stages(stages: list[Stage], resume: bool, data_fingerprint: dict[str, Any]) -> None:
    """Refuse, before anything is written, stages made with another plan or interrupted ones without --resume."""
    from CovidGANSegLib.errors import InputError
    from CovidGANSegLib.manifest import plan_differences, read_manifest

    for i, stage in enumerate(stages):
        manifest = read_manifest(stage.folder)
        checkpoint = stage.folder / "checkpoints" / "last.pt"
        if manifest is None:
            if checkpoint.is_file() and not resume:
                raise InputError("holds an interrupted training (checkpoints/last.pt): continue it with --resume, "
                                 "or choose another --out", stage.folder)
            continue
        if manifest.get("stage_hash") != stage.hash:
            diffs = plan_differences(manifest.get("plan", {}), stage.plan)
            raise InputError(f"was made with another plan (differs in {', '.join(diffs) or 'its plan'}); choose another --out "
                             "or remove this folder", stage.folder)
        if i == 0 and manifest.get("inputs", {}).get("data", {}).get("fingerprint") not in (None, data_fingerprint["fingerprint"]):
            later = [s.folder.name for s in stages[1:] if s.folder.exists()]
            if later:
                raise InputError(f"the data set changed since this run preprocessed it, and {', '.join(later)} depend on it; "
                                 "choose another --out", stage.folder)
        done = manifest.get("iterations")
        if stage.iterations is not None and isinstance(done, int):
            if stage.iterations < done:
                raise InputError(f"already has {done} iterations; the plan asks for {stage.iterations}: keep {done} or more, "
                                 "or choose another --out", stage.folder)
            if manifest.get("status") == "complete" and stage.iterations > done and not resume:
                raise InputError(f"has {done} iterations, the plan asks for {stage.iterations}: continue it with --resume",
                                 stage.folder)
        if manifest.get("status") != "complete" and checkpoint.is_file() and not resume:
            raise InputError("holds an interrupted training (checkpoints/last.pt): continue it with --resume, "
                             "or choose another --out", stage.folder)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[dict[str, Any]]:
    """torch's deterministic algorithms (warn where none exists) for the block; yields what was set."""
    import torch

    info = {"deterministic": bool(enabled)}
    if not enabled:
        yield info
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    info.update(torch_deterministic_algorithms=True, warn_only=True, cudnn_benchmark=False, cudnn_deterministic=True)
    try:
        yield info
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


# ------------------------------------------------------------------------------------------------
# the run


def check_world(plan: Any) -> int:
    """The number of processes torchrun starts (1 without it); InputError for batches it cannot split."""
    from CovidGANSegLib import distributed

    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed.requested() else 1
    distributed.check_batch(plan.gan.batch_size, "GAN (gan.batch_size)", world)
    distributed.check_batch(plan.segmenter.config.batch_size, "segmenter (segmenter.batch_size)", world)
    distributed.timeout_s()  # a bad COVIDGANSEG_DIST_TIMEOUT: refused before anything starts
    return world


def run_train(args: argparse.Namespace) -> int:
    from CovidGANSegLib import distributed
    from CovidGANSegLib.manifest import data_fingerprint
    from CovidGANSegLib.runlock import clean_stale_partials, run_lock

    plan = _load_plan(args)
    if distributed.restart_count() and not args.resume:
        # an elastic restart (torchrun --max-restarts) continues the interrupted stage from its last checkpoint
        log.warning("torchrun restarted the workers (restart %d): resuming from the last checkpoints", distributed.restart_count())
        args.resume = True
    device = protocol.resolve_device(plan.run.device)  # CudaMissingError: exit code EXIT_CUDA_MISSING
    check_world(plan)
    healthy, covid = check_data(args.data, plan.preprocess.min_slices)
    base = check_output(args.out)
    check_disk(args.out, base, plan, healthy, covid)
    stages = stages_of(plan, args.out)
    fingerprint = data_fingerprint(args.data)
    check_stages(stages, args.resume, fingerprint)

    # torchrun: every rank has passed the checks when the process group exists (joining waits for all)
    with distributed.session(device) as device, contextlib.ExitStack() as held:
        def start() -> None:
            lock = held.enter_context(run_lock(args.out, "train"))  # rank 0's, for the whole run
            clean_stale_partials(args.out, lock)
            _write_plan(args.out, plan)

        distributed.run_on_main("taking the run folder", start)
        with deterministic_mode(plan.run.deterministic) as det:
            models = _run_stages(args, plan, stages, device, fingerprint, det)
        main = distributed.is_main()
    if main:
        log.info("segment with: covidganseg segment --gan %s --seg %s --input CT --output LESIONS", models[0], models[1])
        for path in models:
            print(path)
    return 0


def _write_plan(run_dir: Path, plan: Any) -> Path:
    from CovidGANSegLib.atomic import atomic_path

    path = run_dir / "plan.toml"
    with atomic_path(path) as tmp:
        tmp.write_text(plan.to_toml(), encoding="utf-8")
    return path


def _run_stages(args: argparse.Namespace, plan: Any, stages: list[Stage], device: str, fingerprint: dict[str, Any],
                det: dict[str, Any]) -> list[Path]:
    from CovidGANSegLib import distributed, progress
    from CovidGANSegLib.manifest import is_complete, provenance, read_manifest, write_manifest
    from CovidGANSegLib.runlock import clean_stale_partials, run_lock

    plan_dict, full_hash = plan.to_dict(), plan.hash()
    source = provenance(args.data)
    by_name = {s.name: s for s in stages}
    pre, gan, pm = by_name["preprocessed"], by_name["gan"], by_name["pseudo_masks"]
    segs = [s for s in stages if s.name.startswith("seg_")]
    grid = _own_segmenter_grid(plan)
    seg_pre = by_name[segmenter_data_folder(args.out, grid).name] if grid is not None else None
    from_pseudo_masks = segmenters_need_pseudo_masks(plan)
    world = distributed.world_size()

    def finish(stage: Stage, inputs: dict[str, Any], outputs: dict[str, Any], **extra: Any) -> None:
        write_manifest(stage.folder, stage=stage.name, status="complete", plan_hash=full_hash, stage_hash=stage.hash, plan=stage.plan,
                       inputs=inputs, outputs=outputs, provenance=source, extra={**extra, **det})

    def skip(stage: Stage, inputs: dict[str, Any]) -> bool:
        manifest = read_manifest(stage.folder) or {}
        done = is_complete(stage.folder, stage.hash, inputs) and manifest.get("iterations") in (None, stage.iterations)
        if done:
            log.info("stage %s: up to date (manifest %s), skipped", stage.name, stage.folder / "manifest.json")
        return done

    def run_info(stage: Stage) -> dict[str, Any]:
        return {"plan": plan_dict, "plan_hash": full_hash, "stage": stage.name, "stage_hash": stage.hash, "provenance": source, **det}

    def prepare(stage: Stage, inputs: dict[str, Any], held: contextlib.ExitStack) -> bool | None:
        """Rank 0: None to skip the stage, else whether it resumes; its lock is taken and held."""
        if skip(stage, inputs):
            return None
        resume = _resumable(stage, inputs)
        lock = held.enter_context(run_lock(stage.folder, "train"))
        clean_stale_partials(stage.folder, lock)
        _running(stage, inputs, full_hash, source)
        return resume

    def gan_job(resume: bool) -> dict[str, Any]:
        return dict(data=pre.folder, run_dir=gan.folder, config=None if resume else plan.gan, preprocess=plan.preprocess,
                    iterations=plan.gan.iterations, resume=resume, device=device, seed=plan.run.seed, run_info=run_info(gan))

    def seg_job(stage: Stage, data: Path, resume: bool) -> dict[str, Any]:
        model = stage.name[len("seg_"):]
        return dict(pseudo_masks=data, run_dir=stage.folder, model=model, config=plan.segmenter.config_for(model),
                    iterations=plan.segmenter.iterations_of(model), resume=resume, device=device, seed=plan.run.seed,
                    data=args.data, synthetic=plan.segmenter.synthetic, run_info=run_info(stage))

    def finish_training(stage: Stage, inputs: dict[str, Any], iterations: int) -> None:
        distributed.run_on_main(f"writing {stage.name}",
                                lambda: finish(stage, inputs, _checkpoint_outputs(stage.folder), iterations=iterations))

    # every rank calls run_on_main in the same order; rank 0 does the work, the others get its result
    # 1. preprocessing; under torchrun every rank first preprocesses its share of the studies (every
    # world-th) into RUN/.preprocess-shards.partial, and rank 0 assembles them
    shards = args.out / ".preprocess-shards.partial"
    if world > 1 and distributed.run_on_main("checking the preprocessed data",
                                             lambda: not is_complete(pre.folder, pre.hash, {"data": fingerprint})):
        from CovidGANSegLib.preprocessing import preprocess_shard

        progress.report(0.0, "preprocessing (shared by the processes)")
        done = preprocess_shard(args.data, shards, plan.preprocess, distributed.rank(), world)
        log.info("rank %d preprocessed %d studies", distributed.rank(), done)
        distributed.barrier()

    def preprocess(stage: Stage, config: Any) -> str:
        inputs = {"data": fingerprint}
        if not skip(stage, inputs):
            from CovidGANSegLib.preprocessing import ensure_preprocessed

            progress.report(0.0, "preprocessing" if stage is pre else f"preprocessing on the segmenters' grid {list(config.grid)}")
            precomputed = shards if stage is pre and shards.is_dir() else None
            if precomputed is not None:
                log.info("assembling %d studies preprocessed by %d processes", len(list(shards.glob("*.npz"))), world)
            ensure_preprocessed(args.data, stage.folder, config, precomputed=precomputed)
            finish(stage, inputs, _data_outputs(stage.folder))
        if stage is pre:
            shutil.rmtree(shards, ignore_errors=True)
        return read_manifest(stage.folder)["outputs"]["data"]["sha256"]

    with progress.scope(0.0, 0.04 if seg_pre is not None else 0.05):
        pre_digest = distributed.run_on_main("preprocessing", lambda: preprocess(pre, plan.preprocess))
    # what segmenters that need no pseudo-mask learn from: the studies on their own grid, else on the GAN's
    own_data: tuple[Path, dict[str, Any]] = (pre.folder, {"preprocessed": pre_digest})
    if seg_pre is not None:
        import dataclasses

        with progress.scope(0.04, 0.05):
            digest = distributed.run_on_main("preprocessing for the segmenters",
                                             lambda: preprocess(seg_pre, dataclasses.replace(plan.preprocess, grid=grid)))
        own_data = (seg_pre.folder, {"preprocessed": digest})
    gan_inputs = {"preprocessed": pre_digest}
    gan_model = gan.folder / "model.pt"

    # 3. pseudo-masks
    def pseudo_masks() -> str:
        inputs = {"gan_model": read_manifest(gan.folder)["outputs"]["model"]["sha256"], "preprocessed": pre_digest}
        if not skip(pm, inputs):
            from CovidGANSegLib.gan.pseudomasks import make_pseudo_masks

            rule = plan.pseudo_masks
            make_pseudo_masks(gan_model, pre.folder, pm.folder, device=device, k=rule.k, floor=rule.floor, min_size=rule.min_size,
                              rule=rule.rule, overwrite=True, cache=pre.folder, grid=plan.segmenter.grid)
            finish(pm, inputs, _data_outputs(pm.folder))
        return read_manifest(pm.folder)["outputs"]["data"]["sha256"]

    if not from_pseudo_masks and world == 1:
        # 2 and 4 at once where the CPU allows, then 3
        with progress.scope(0.05, 0.95):
            _train_beside(plan, device, det, gan, segs, prepare=prepare, gan_job=gan_job, gan_inputs=gan_inputs,
                          seg_job=lambda stage, resume: seg_job(stage, own_data[0], resume), seg_inputs=own_data[1],
                          finish_training=finish_training)
        with progress.scope(0.95, 1.0):
            pseudo_masks()
        return [gan_model] + [stage.folder / "model.pt" for stage in segs]

    spans = [(0.05, 0.45), (0.45, 0.5)] + [(0.5 + 0.5 * i / len(segs), 0.5 + 0.5 * (i + 1) / len(segs)) for i in range(len(segs))]
    # 2. the GAN
    with progress.scope(*spans[0]), contextlib.ExitStack() as held:
        resume = distributed.run_on_main("preparing the GAN stage", lambda: prepare(gan, gan_inputs, held))
        if resume is not None:
            from CovidGANSegLib.gan.training import train_gan

            train_gan(**gan_job(resume))
            finish_training(gan, gan_inputs, plan.gan.iterations)

    with progress.scope(*spans[1]):
        pm_digest = distributed.run_on_main("making the pseudo-masks", pseudo_masks)
    seg_data, seg_inputs = (pm.folder, {"pseudo_masks": pm_digest}) if from_pseudo_masks else own_data

    # 4. segmenters
    models = [gan_model]
    for stage, span in zip(segs, spans[2:]):
        with progress.scope(*span), contextlib.ExitStack() as held:
            resume = distributed.run_on_main(f"preparing {stage.name}", lambda: prepare(stage, seg_inputs, held))
            if resume is not None:
                from CovidGANSegLib.seg.training import train_segmenter

                train_segmenter(**seg_job(stage, seg_data, resume))
                finish_training(stage, seg_inputs, stage.iterations)
        models.append(stage.folder / "model.pt")
    return models


def _train_beside(plan: Any, device: str, det: dict[str, Any], gan: Stage, segs: list[Stage], *, prepare: Any, gan_job: Any,
                  gan_inputs: dict[str, Any], seg_job: Any, seg_inputs: dict[str, Any], finish_training: Any) -> None:
    """The GAN and segmenters that need no pseudo-mask (one process, no torchrun): the stages to run
    train side by side on a CPU with two or more torch threads, one process each (``cpu_jobs``),
    else one after the other here; each stage is locked and marked running before, complete after."""
    import torch

    from CovidGANSegLib import progress
    from CovidGANSegLib.cpu_jobs import run_side_by_side, threads_per_job

    with contextlib.ExitStack() as held:
        todo: dict[str, tuple[Stage, str, dict[str, Any], dict[str, Any], int]] = {}
        resume = prepare(gan, gan_inputs, held)
        if resume is not None:
            todo[gan.name] = (gan, "gan", gan_job(resume), gan_inputs, plan.gan.iterations)
        for stage in segs:
            resume = prepare(stage, seg_inputs, held)
            if resume is not None:
                todo[stage.name] = (stage, "seg", seg_job(stage, resume), seg_inputs, stage.iterations)
        threads = threads_per_job(device, len(todo), torch.get_num_threads())
        if threads:
            log.info("training %s side by side, %d torch thread%s each", ", ".join(todo), threads, "s" if threads > 1 else "")
            progress.report(0.0, f"training {', '.join(todo)} side by side")
            run_side_by_side({name: (_stage_job, {"kind": kind, "deterministic": det["deterministic"], "kwargs": kwargs})
                              for name, (_, kind, kwargs, _, _) in todo.items()}, threads=threads)
        else:
            for i, (_, kind, kwargs, _, _) in enumerate(todo.values()):
                with progress.scope(i / len(todo), (i + 1) / len(todo)):
                    _stage_job(kind, det["deterministic"], kwargs)
        for stage, _, _, inputs, iterations in todo.values():
            finish_training(stage, inputs, iterations)


def _stage_job(kind: str, deterministic: bool, kwargs: dict[str, Any]) -> Path:
    """Train one stage (``gan`` or ``seg``) with ``kwargs`` in the run's deterministic mode (module level:
    also the body of a ``cpu_jobs`` process, which inherits nothing of this one's torch settings)."""
    with deterministic_mode(deterministic):
        if kind == "gan":
            from CovidGANSegLib.gan.training import train_gan

            return train_gan(**kwargs)
        from CovidGANSegLib.seg.training import train_segmenter

        return train_segmenter(**kwargs)


def _data_outputs(folder: Path) -> dict[str, Any]:
    """The outputs of a data stage (preprocessed data, pseudo-masks): the folder's digest and its index."""
    from CovidGANSegLib.manifest import file_entry, folder_digest

    return {"data": {"path": ".", "kind": "folder", **folder_digest(folder)}, "index": file_entry(folder / "index.json", folder)}


def _resumable(stage: Stage, inputs: dict[str, Any]) -> bool:
    """Whether a trained stage continues from its checkpoint; a stage whose inputs changed restarts.

    Its inputs change when an upstream stage was redone (e.g. the GAN resumed to more iterations):
    its old outputs are then moved aside and removed, and it trains again from the start.
    """
    import json

    from CovidGANSegLib.manifest import read_manifest

    if not (stage.folder / "checkpoints" / "last.pt").is_file():
        return False
    manifest = read_manifest(stage.folder)
    if manifest is None or manifest.get("inputs") == json.loads(json.dumps(inputs)):
        return True
    log.warning("%s: its inputs changed (an earlier stage was redone); training it again from the start", stage.folder)
    aside = Path(tempfile.mkdtemp(prefix=f".{stage.folder.name}.", suffix=".old.partial", dir=stage.folder.parent))
    os.replace(stage.folder, aside / "old")
    shutil.rmtree(aside, ignore_errors=True)
    return False


def _running(stage: Stage, inputs: dict[str, Any], full_hash: str, source: dict[str, Any]) -> None:
    """A ``running`` manifest: an interrupted stage is recognised (and its plan compared) on the next run."""
    from CovidGANSegLib.manifest import read_manifest, write_manifest

    previous = read_manifest(stage.folder) or {}
    extra = {"iterations": previous["iterations"]} if isinstance(previous.get("iterations"), int) else {}
    write_manifest(stage.folder, stage=stage.name, status="running", plan_hash=full_hash, stage_hash=stage.hash, plan=stage.plan,
                   inputs=inputs, provenance=source, extra=extra)


def _checkpoint_outputs(folder: Path) -> dict[str, Any]:
    from CovidGANSegLib.manifest import file_entry

    names = {"model": "model.pt", "card": "model.pt.json", "last": "checkpoints/last.pt"}
    return {key: file_entry(folder / rel, folder) for key, rel in names.items()}
