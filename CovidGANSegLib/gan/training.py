"""Training of the 3D GAN: paper Algorithm 1 (phase 1) with the loss of eq. 2.

Each iteration, on a batch of real healthy volumes I_H (CT-0 only) and COVID volumes I_C
(CT-1..CT-4), all on the model grid in [0, 1]:

1. D step (Algorithm 1 lines 7-9): maximise ``log D(I_H) + log(1 - D(G(I_C)))``.
2. G adversarial step (lines 10-11): make D take G(I_C) for healthy (``-log D(G(I_C))`` by
   default, see ``GANConfig.loss``).
3. G reconstruction step (lines 12-13): add synthetic lesions (thresholded fractal Perlin noise,
   ``lesions.synthesize_lesions``, inside the lung mask) to the healthy volumes, giving I_H^Pe, and
   minimise ``MSE(G(I_H^Pe), I_H)``.

Lesion masks are never read: the data are CT volumes and their lung masks only. Optimisers are
Adam with StepLR (x ``lr_gamma`` every ``lr_step`` iterations); mixed precision (autocast +
GradScaler) on CUDA; optional gradient checkpointing. ``RUN/checkpoints/last.pt`` holds the whole
training state (weights, optimisers, schedulers, scalers, iteration, RNG states) so that a resumed
run ends exactly where an uninterrupted one would.

Distributed (``torchrun``, :mod:`CovidGANSegLib.distributed`): G and D are wrapped in
DistributedDataParallel. Every rank draws the whole planned batch (indices, synthetic lesions and
G's latent noise U_N) from the same seeded generators, as one process would, and trains on its
``batch / world`` rows; DDP averages the gradients of the mean losses, which is the full batch's
gradient, so N processes train the same weights as one (within float rounding). The networks use
GroupNorm (per sample); ``norm = "batch"`` becomes SyncBatchNorm on CUDA (per-rank statistics on
CPU). Rank 0 alone writes files; all ranks stop after the same step on a signal.

Run folder::

    RUN/preprocessed/          the preprocessed dataset (when DATA is a raw dataset)
    RUN/checkpoints/last.pt    resumable training state (atomic)
    RUN/losses.csv             one row per iteration
    RUN/loss_curves.png        losses so far
    RUN/samples/iter_NNNNN.png Fig. 3 triptychs: original, pseudo-healthy, difference
    RUN/model.pt (+ .json)     the generator for inference, with its model card
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from CovidGANSegLib import distributed, progress
from CovidGANSegLib.checkpoints import load_checkpoint, save_checkpoint, write_model_card
from CovidGANSegLib.config import DEFAULT_PREPROCESS, PreprocessConfig
from CovidGANSegLib.errors import InputError
from CovidGANSegLib.gan import GAN_ARCH
from CovidGANSegLib.losslog import append_losses, read_losses, truncate_losses
from CovidGANSegLib.runlock import stop_after_step
from CovidGANSegLib.gan.networks import DenseUNetGenerator3D, Discriminator3D, GANConfig, get_gan_config, resolve_device

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("iteration", "d_loss", "g_adv", "g_rec", "d_real", "d_fake", "lr_g", "lr_d", "seconds")


# --------------------------------------------------------------------------------------------
# losses (eq. 2)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """D's loss on logits of real healthy and generated volumes: minus eq. 2's first two terms."""
    if kind == "lsgan":
        return F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))
    # -[log D(I_H) + log(1 - D(G(I_C)))] with D = sigmoid(logit)
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def generator_adversarial_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """G's adversarial loss on D's logits of G(I_C)."""
    if kind == "lsgan":
        return F.mse_loss(fake, torch.ones_like(fake))
    if kind == "log-saturating":
        return -F.softplus(fake).mean()  # log(1 - sigmoid(l)) = -softplus(l): Algorithm 1 line 11 as written
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # -log D(G(I_C)), non-saturating


# --------------------------------------------------------------------------------------------
# the trainer


def _shard_latent_noise(generator: torch.nn.Module, rank: int, world: int) -> None:
    """Make G draw U_N for the global batch and keep this rank's rows (distributed training only).

    Every rank then consumes torch's random stream exactly as one process on the whole batch does,
    so N processes see the same noise as one (and their random streams stay in step).
    """
    draw = generator.latent_noise

    def latent_noise(latent: torch.Tensor) -> torch.Tensor:
        b = latent.shape[0]
        full = draw(latent.new_empty((b * world, *latent.shape[1:])))
        return full[rank * b:(rank + 1) * b]

    generator.latent_noise = latent_noise  # type: ignore[method-assign]


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GANTrainer:
    """Networks, optimisers and one training iteration of Algorithm 1 (usable without files).

    Args:
        config: the GAN configuration.
        preprocess: the preprocessing configuration of the data (HU window and spacing for the
            lesion synthesiser).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds torch (weights, latent noise), the numpy generator (batches, lesions) and
            Python's ``random``.
    """

    def __init__(self, config: GANConfig, preprocess: PreprocessConfig = DEFAULT_PREPROCESS, *, device: str = "auto", seed: int = 0) -> None:
        self.config = config
        self.preprocess = preprocess
        self.device = resolve_device(device)
        torch.manual_seed(seed)
        random.seed(seed)
        self.rng = np.random.default_rng(seed)
        self.generator = DenseUNetGenerator3D(config).to(self.device)
        self.discriminator = Discriminator3D(config).to(self.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=tuple(config.betas))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=tuple(config.betas))
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, step_size=config.lr_step, gamma=config.lr_gamma)
        self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, step_size=config.lr_step, gamma=config.lr_gamma)
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if config.amp_dtype == "float16" else torch.bfloat16
        scaler_on = self.use_amp and self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=scaler_on)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=scaler_on)
        self.iteration = 0
        self._lesion_config = None
        # distributed: every rank trains on its rows of the global batch (config.batch_size)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self._G, self._D = self.generator, self.discriminator  # what the gradient-carrying passes call
        if self.world > 1:
            distributed.check_batch(config.batch_size, "GAN", self.world)
            self.generator = distributed.sync_batch_norm(self.generator)
            _shard_latent_noise(self.generator, self.rank, self.world)
            self._G = distributed.wrap_ddp(self.generator)
            self._D = distributed.wrap_ddp(self.discriminator)

    # -- data -----------------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))[:, None]  # (B, D, H, W) -> (B, 1, D, H, W)
        return t.to(self.device, dtype=dtype, non_blocking=True)

    def sample_batch(self, healthy: np.ndarray, healthy_lungs: np.ndarray, covid: np.ndarray, covid_lungs: np.ndarray,
                     healthy_spacing: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Draw ``batch_size`` healthy and COVID volumes (with replacement only if too few).

        Returns ``(healthy, healthy_lungs, covid, covid_lungs, spacing)`` with ``spacing`` the
        ``(B, 3)`` model-grid voxel sizes (D, H, W) of the healthy volumes (None if not given).
        """
        b = self.config.batch_size
        ih = self.rng.choice(len(healthy), size=b, replace=len(healthy) < b)
        ic = self.rng.choice(len(covid), size=b, replace=len(covid) < b)
        spacing = None if healthy_spacing is None else np.asarray(healthy_spacing)[ih]
        return healthy[ih], healthy_lungs[ih], covid[ic], covid_lungs[ic], spacing

    def make_noisy(self, healthy: np.ndarray, lungs: np.ndarray, spacing: np.ndarray | None = None) -> np.ndarray:
        """I_H^Pe: synthetic lesions (thresholded fractal Perlin noise) inside each lung mask.

        ``spacing``: ``(B, 3)`` voxel sizes in mm along (D, H, W) (default: the preprocessing's
        target spacing), so lesion blobs have realistic sizes in mm.
        """
        from CovidGANSegLib.synth.lesions import LesionConfig, synthesize_lesions

        if self._lesion_config is None:
            self._lesion_config = LesionConfig()
        out = np.empty(healthy.shape, dtype=np.float32)
        for i in range(len(healthy)):
            sp = self.preprocess.spacing_dhw if spacing is None else tuple(float(v) for v in spacing[i])
            lung = lungs[i].astype(bool, copy=False)
            noisy, _ = synthesize_lesions(healthy[i].astype(np.float32, copy=False), lung, self.rng,
                                          config=self._lesion_config, window=tuple(self.preprocess.hu_window), spacing=sp)
            out[i] = np.where(lung, noisy, healthy[i])  # bit-identical outside the lungs (the synthesiser's HU round trip is not)
        return out

    # -- one iteration ---------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self, healthy: np.ndarray, healthy_lungs: np.ndarray, covid: np.ndarray, covid_lungs: np.ndarray,
             healthy_spacing: np.ndarray | None = None, noisy_healthy: np.ndarray | None = None) -> dict[str, float]:
        """One iteration of Algorithm 1 on ``(B, D, H, W)`` arrays in [0, 1]; returns the losses.

        ``noisy_healthy`` (I_H^Pe) is synthesised from ``healthy`` (voxel sizes
        ``healthy_spacing``, see :meth:`make_noisy`) when not given. Distributed, the arrays are the
        global batch: this rank trains on its rows and the returned losses are the global batch's.
        """
        if noisy_healthy is None:
            noisy_healthy = self.make_noisy(healthy, healthy_lungs, healthy_spacing)
        if self.world > 1:
            rows = distributed.shard_rows(len(healthy))
            healthy, healthy_lungs, covid, covid_lungs, noisy_healthy = (
                a[rows] for a in (healthy, healthy_lungs, covid, covid_lungs, noisy_healthy))
        cfg = self.config
        G, D = self.generator, self.discriminator
        G_grad = self._G  # DDP under torchrun: passes whose backward reaches G's weights
        G.train()
        D.train()
        i_h, m_h = self._tensor(healthy), self._tensor(healthy_lungs, torch.bool)
        i_c, m_c = self._tensor(covid), self._tensor(covid_lungs, torch.bool)
        i_pe = self._tensor(noisy_healthy)

        # G(I_C) once; the D step sees it detached, the G step back-propagates through it.
        with self._autocast(), torch.set_grad_enabled(cfg.adv_weight > 0):
            # without an adversarial term no gradient reaches G through it: plain G, no DDP pass
            fake = (G_grad if cfg.adv_weight > 0 else G)(i_c, m_c)  # (B, 1, D, H, W)

        # 1. D step: maximise log D(I_H) + log(1 - D(G(I_C)))  (eq. 2)
        D.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        with self._autocast():
            d_real = self._D(i_h)
            d_fake = self._D(fake.detach())
        d_loss = discriminator_loss(d_real, d_fake, cfg.loss)
        self.scaler_d.scale(d_loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        # 2. G adversarial step (D frozen)
        D.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            d_fake_g = D(fake)  # plain D (frozen): no gradient for D's weights, nothing for DDP to reduce
        g_adv = generator_adversarial_loss(d_fake_g, cfg.loss)
        joint = cfg.g_update == "joint"
        if cfg.adv_weight > 0:
            self.scaler_g.scale(cfg.adv_weight * g_adv).backward()
            if not joint:  # Algorithm 1 line 11: its own update; "joint" adds step 3's gradients first
                self.scaler_g.step(self.opt_g)
                self.scaler_g.update()
                self.opt_g.zero_grad(set_to_none=True)
        del fake, d_fake_g
        D.requires_grad_(True)

        # 3. G reconstruction step: MSE(G(I_H^Pe), I_H)  (eq. 2, third term)
        with self._autocast(), torch.set_grad_enabled(cfg.rec_weight > 0):
            recon = (G_grad if cfg.rec_weight > 0 else G)(i_pe, m_h)
        g_rec = F.mse_loss(recon.float(), i_h)
        if cfg.rec_weight > 0:
            self.scaler_g.scale(cfg.rec_weight * g_rec).backward()
        if cfg.rec_weight > 0 or (joint and cfg.adv_weight > 0):
            self.scaler_g.step(self.opt_g)
            self.scaler_g.update()
        self.opt_g.zero_grad(set_to_none=True)

        lrs = (self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"])
        self.sched_g.step()
        self.sched_d.step()
        self.iteration += 1
        with torch.no_grad():
            p_real = torch.sigmoid(d_real.float()).mean().item() if cfg.loss != "lsgan" else d_real.float().mean().item()
            p_fake = torch.sigmoid(d_fake.float()).mean().item() if cfg.loss != "lsgan" else d_fake.float().mean().item()
        values = [float(d_loss.item()), float(g_adv.item()), float(g_rec.item()), p_real, p_fake]
        if self.world > 1:  # means over equal shards: the global batch's means
            values = distributed.mean_over_ranks(values)
        return {"d_loss": values[0], "g_adv": values[1], "g_rec": values[2],
                "d_real": values[3], "d_fake": values[4], "lr_g": lrs[0], "lr_d": lrs[1]}

    @torch.no_grad()
    def generate(self, images: np.ndarray, lungs: np.ndarray, *, batch: int = 2) -> np.ndarray:
        """G's pseudo-healthy volumes (eval mode, no latent noise) for ``(N, D, H, W)`` arrays."""
        G = self.generator
        was_training = G.training
        G.eval()
        out = np.empty(images.shape, dtype=np.float32)
        try:
            for s in range(0, len(images), batch):
                with self._autocast():
                    y = G(self._tensor(images[s:s + batch]), self._tensor(lungs[s:s + batch], torch.bool))
                out[s:s + batch] = y.float()[:, 0].cpu().numpy()  # (B, 1, D, H, W) -> (B, D, H, W)
        finally:
            G.train(was_training)
        return out

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs, as types ``torch.load(weights_only=True)`` accepts."""
        return {
            "iteration": int(self.iteration),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "rng": _rng_state(self.rng),
        }

    def load_state(self, payload: dict[str, Any]) -> None:
        self.generator.load_state_dict(payload["generator"])
        self.discriminator.load_state_dict(payload["discriminator"])
        self.opt_g.load_state_dict(payload["opt_g"])
        self.opt_d.load_state_dict(payload["opt_d"])
        self.sched_g.load_state_dict(payload["sched_g"])
        self.sched_d.load_state_dict(payload["sched_d"])
        if payload.get("scaler_g"):
            self.scaler_g.load_state_dict(payload["scaler_g"])
        if payload.get("scaler_d"):
            self.scaler_d.load_state_dict(payload["scaler_d"])
        self.iteration = int(payload["iteration"])
        _set_rng_state(self.rng, payload["rng"])


# --------------------------------------------------------------------------------------------
# bookkeeping


def _read_losses(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in read_losses(path)]


def _find_cohort_json(data: Path) -> dict[str, Any] | None:
    """The phantom cohort description beside the data, if any (raw cohort or preprocessed from one)."""
    candidates = [data / "cohort.json"]
    index = data / "index.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
            src = meta.get("source") or meta.get("data") if isinstance(meta, dict) else None
            if src:
                candidates.append(Path(src) / "cohort.json")
        except (OSError, json.JSONDecodeError):
            pass
    for c in candidates:
        if c.is_file():
            try:
                return json.loads(c.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def is_phantom_data(data: str | Path) -> bool:
    """True when DATA is (or was preprocessed from) a synthetic phantom cohort (``phantoms.write_cohort``).

    Read, never guessed: the stage manifest's provenance when DATA is a stage folder of
    ``covidganseg train``, else the ``generator`` of the ``cohort.json`` that ``write_cohort``
    writes (beside the data, or beside the raw data a preprocessed folder was made from).
    """
    from CovidGANSegLib.manifest import read_manifest
    from CovidGANSegLib.synth.phantoms import GENERATOR

    manifest = read_manifest(data)
    if manifest is not None and isinstance(manifest.get("provenance"), dict) and "phantoms" in manifest["provenance"]:
        return bool(manifest["provenance"]["phantoms"])
    cohort = _find_cohort_json(Path(data))
    return isinstance(cohort, dict) and cohort.get("generator") == GENERATOR


def healthy_difference_stats(trainer: GANTrainer, healthy: np.ndarray, lungs: np.ndarray, *, max_values: int = 2_000_000) -> dict[str, float]:
    """Statistics of the difference I - G(I) in the lungs of *healthy* volumes (lesion-free lung).

    This is G's noise level: how much it changes tissue that has no infection. Stored in
    ``model.pt``'s metadata, it is the fallback for the pseudo-mask threshold rule.
    """
    gen = trainer.generate(healthy, lungs)
    diff = (healthy.astype(np.float32) - gen)[lungs.astype(bool)]
    return difference_stats(diff, max_values=max_values, rng=np.random.default_rng(0))


def difference_stats(values: np.ndarray, *, max_values: int = 2_000_000, rng: np.random.Generator | None = None) -> dict[str, float]:
    """median, MAD-based sigma, mean and upper quantiles of a 1D array of differences."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size == 0:
        return {"count": 0, "median": 0.0, "sigma": 0.0, "mean": 0.0, "q99": 0.0, "q999": 0.0}
    if values.size > max_values:
        values = (rng or np.random.default_rng(0)).choice(values, size=max_values, replace=False)
    med = float(np.median(values))
    sigma = float(1.4826 * np.median(np.abs(values - med)))
    q99, q999 = (float(q) for q in np.quantile(values, [0.99, 0.999]))
    return {"count": int(values.size), "median": med, "sigma": sigma, "mean": float(values.mean()), "q99": q99, "q999": q999}


def _model_spacings(ds, subset: str) -> np.ndarray | None:
    """``(N, 3)`` model-grid voxel sizes (D, H, W) in mm of a preprocessed subset, from its GridMappings."""
    from CovidGANSegLib.preprocessing import GridMapping

    try:
        recs = ds.records_of(subset)
        sp = np.array([GridMapping.from_dict(r["mapping"]).model_spacing[::-1] for r in recs], dtype=np.float64)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return sp if len(sp) == len(getattr(ds, subset)) else None


def _sample_slice(lung: np.ndarray) -> int:
    """The slice (axis 0) with the largest lung area."""
    return int(np.argmax(lung.reshape(lung.shape[0], -1).sum(axis=1)))


def _write_sample(trainer: GANTrainer, image: np.ndarray, lung: np.ndarray, path: Path, iteration: int) -> None:
    from CovidGANSegLib.gan.figures import save_triptych

    gen = trainer.generate(image[None], lung[None])[0]
    save_triptych(image, gen, image - gen, path, slice_index=_sample_slice(lung), title=f"iteration {iteration}")


# --------------------------------------------------------------------------------------------
# the training run


def _ensure_only(ensure: Any, *args: Any) -> None:
    """Run ``ensure(*args)`` for its files only (rank 0's part of :func:`distributed.run_on_main`)."""
    ensure(*args)


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if distributed.is_initialized() else None


def train_gan(data: str | Path, run_dir: str | Path, *, config: GANConfig | str | None = None, preprocess: PreprocessConfig | None = None,
              iterations: int | None = None, resume: bool = False, device: str = "auto", seed: int = 0,
              run_info: dict[str, Any] | None = None) -> Path:
    """Train the 3D GAN (Algorithm 1) on DATA and write RUN/model.pt; returns its path.

    Args:
        data: a raw dataset folder (MosMedData layout or healthy/ + covid/) or a preprocessed
            folder (``preprocessing.preprocess_dataset``). Healthy volumes come from CT-0 only,
            COVID volumes from CT-1..CT-4; lesion masks are never read.
        run_dir: the run folder (see the module docstring).
        config: a GANConfig, a registry name or a JSON file (default ``paper``; a resumed run
            keeps its checkpoint's).
        preprocess: the preprocessing configuration (default: the paper's with ``config.grid``).
        iterations: total iterations of the run (default ``config.iterations``); with ``resume``
            the run continues up to this total.
        resume: continue from RUN/checkpoints/last.pt (its configurations win over the arguments).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: random seed of a fresh run (a resumed run restores its RNG states).
        run_info: extra metadata for every checkpoint (``covidganseg train``: the plan and its hash).

    SIGINT / SIGTERM / SIGHUP during the loop: the current iteration finishes, ``last.pt`` is
    written and :class:`~CovidGANSegLib.runlock.TrainingInterrupted` says how to resume.

    Raises:
        InputError: RUN already holds a checkpoint and ``resume`` is False, nothing to resume,
            fewer iterations than a resumed run already has, no healthy or no COVID volumes, a
            grid the generator cannot take.
    """
    from CovidGANSegLib.preprocessing import ensure_preprocessed

    data, run_dir = Path(data), Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    payload = None
    if resume:
        if not ckpt_path.is_file():
            raise InputError("no checkpoint to resume (checkpoints/last.pt is missing); start a fresh run without --resume", run_dir)
        payload = load_checkpoint(ckpt_path, kind="gan", arch=GAN_ARCH)
        ckpt_config = GANConfig.from_dict(payload["config"])
        if config is not None and get_gan_config(config) != ckpt_config:
            log.warning("resuming with the checkpoint's GAN configuration %r; the one given is ignored", ckpt_config.name)
        config = ckpt_config
        preprocess = PreprocessConfig.from_dict(payload["preprocess"])
        seed = int(payload.get("metadata", {}).get("seed", seed))
    else:
        if ckpt_path.exists():
            raise InputError("this run folder already has a checkpoint (checkpoints/last.pt): use --resume to continue it, "
                             "or choose a new --out folder", run_dir)
        config = get_gan_config("paper" if config is None else config)
        if preprocess is None:
            preprocess = PreprocessConfig(grid=tuple(config.grid))
    total = int(iterations if iterations is not None else config.iterations)
    if total < 1:
        raise ValueError(f"iterations must be >= 1, got {total}")
    if payload is not None and total < int(payload["iteration"]):
        raise InputError(f"this run already has {int(payload['iteration'])} iterations; resuming up to {total} would rewrite model.pt "
                         f"with fewer: give --iterations {int(payload['iteration'])} or more", run_dir)
    bad = [g for g in preprocess.grid if g % config.divisor]
    if bad:
        raise InputError(f"grid {preprocess.grid} is not divisible by {config.divisor} (2 ** generator depth) along every axis; "
                         "choose another --grid", data)

    main = distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    progress.report(0.0, "preparing data")
    if distributed.world_size() > 1:  # rank 0 preprocesses (if needed), then every rank reads the result
        distributed.run_on_main("preprocessing", lambda: _ensure_only(ensure_preprocessed, data, run_dir / "preprocessed", preprocess))
    ds = ensure_preprocessed(data, run_dir / "preprocessed", preprocess)
    if len(ds.healthy) == 0:
        raise InputError("no healthy (CT-0) volumes to train on", data)
    if len(ds.covid) == 0:
        raise InputError("no COVID (CT-1..CT-4) volumes to train on", data)
    if tuple(ds.healthy.shape[1:]) != tuple(preprocess.grid_dhw):
        raise InputError(f"preprocessed volumes have shape {ds.healthy.shape[1:]}, expected {preprocess.grid_dhw}", data)
    log.info("GAN training on %d healthy and %d COVID volumes, grid %s (D, H, W), config %r", len(ds.healthy), len(ds.covid), preprocess.grid_dhw, config.name)

    trainer = GANTrainer(config, preprocess, device=device, seed=seed)
    losses_csv = run_dir / "losses.csv"
    if payload is not None:
        trainer.load_state(payload)
        if main:
            truncate_losses(losses_csv, trainer.iteration, LOSS_COLUMNS)
        log.info("resumed at iteration %d of %d", trainer.iteration, total)
    elif losses_csv.exists() and main:
        losses_csv.unlink()
    del payload

    metadata = {"config_name": config.name, "seed": int(seed), "data": str(data), "n_healthy": int(len(ds.healthy)), "n_covid": int(len(ds.covid)),
                "device": str(trainer.device), "amp": trainer.use_amp, **(run_info or {})}
    if trainer.world > 1:
        metadata["distributed"] = {"world_size": trainer.world, "backend": _backend(), "global_batch": int(config.batch_size)}
    common = dict(kind="gan", arch=GAN_ARCH, config=config.to_dict(), metadata=metadata, preprocess=preprocess.to_dict())

    def save_state() -> None:
        if main:
            save_checkpoint(ckpt_path, **common, **trainer.state())

    healthy_spacing = _model_spacings(ds, "healthy")
    sample_image, sample_lung = ds.covid[0], ds.covid_lungs[0].astype(bool)
    samples = run_dir / "samples"
    start = trainer.iteration
    def stop() -> str:
        save_state()
        return (f"GAN training interrupted after iteration {trainer.iteration} of {total}; checkpoint written to {ckpt_path}. "
                "Run the same command again with --resume to continue.")

    steps = progress.track(range(start, total), total=max(total - start, 0), desc="GAN training")
    agree = distributed.any_rank if trainer.world > 1 else None
    for _ in stop_after_step(steps, stop, agree):
        t0 = time.perf_counter()
        batch = trainer.sample_batch(ds.healthy, ds.healthy_lungs, ds.covid, ds.covid_lungs, healthy_spacing)
        losses = trainer.step(*batch)
        it = trainer.iteration
        if main:
            append_losses(losses_csv, {"iteration": it, **losses, "seconds": time.perf_counter() - t0}, LOSS_COLUMNS)
            progress.postfix(D=losses["d_loss"], G_adv=losses["g_adv"], G_rec=losses["g_rec"])
        if not all(np.isfinite(v) for v in losses.values()):  # the same global losses on every rank
            raise RuntimeError(f"GAN training diverged at iteration {it}: {losses}")
        if it % config.checkpoint_every == 0 or it == total:
            save_state()
        if main and (it % config.sample_every == 0 or it == total):
            from CovidGANSegLib.gan.figures import save_loss_curves

            _write_sample(trainer, sample_image, sample_lung, samples / f"iter_{it:05d}.png", it)
            save_loss_curves(_read_losses(losses_csv), run_dir / "loss_curves.png")
        if it % max(1, min(100, config.sample_every)) == 0:
            log.info("iteration %d/%d: D %.4f, G adv %.4f, G rec %.5f", it, total, losses["d_loss"], losses["g_adv"], losses["g_rec"])

    model_path = run_dir / "model.pt"
    if not main:  # rank 0 calibrates and writes the model
        return model_path
    progress.report(0.98, "calibrating on healthy volumes")
    stats = healthy_difference_stats(trainer, ds.healthy, ds.healthy_lungs.astype(bool))
    demo = is_phantom_data(data)
    final_meta = {**metadata, "iteration": int(trainer.iteration), "healthy_difference": stats, "demo": demo}
    generator_state = {k: v.detach().cpu() for k, v in trainer.generator.state_dict().items()}
    save_checkpoint(model_path, kind="gan", arch=GAN_ARCH, config=config.to_dict(), metadata=final_meta,
                    preprocess=preprocess.to_dict(), generator=generator_state, iteration=int(trainer.iteration))
    trained_on = (f"synthetic phantoms ({len(ds.healthy)} healthy, {len(ds.covid)} COVID)" if demo
                  else f"{data} ({len(ds.healthy)} healthy CT-0, {len(ds.covid)} COVID CT-1..CT-4)")
    write_model_card(model_path, name=f"gan-{run_dir.name}", kind="gan", arch=GAN_ARCH, config_name=config.name, config=config.to_dict(),
                     trained_on=trained_on, demo=demo,
                     extra={"iterations": int(trainer.iteration), "preprocess": preprocess.to_dict(), "healthy_difference": stats})
    progress.report(1.0, "GAN training done")
    log.info("wrote %s", model_path)
    return model_path
