"""Training of the 2D segmenters on GAN pseudo-masks (paper section 3.3, Algorithm 1 lines 15-24).

Data: a pseudo-masks folder (``gan.pseudomasks.make_pseudo_masks``): ``images.npy`` (the COVID
volumes on the model grid, (N, D, H, W) in [0, 1]), ``pseudo_masks.npy`` (bool), ``lungs.npy``,
``severity.json`` ("high" / "low" lists of [volume_index, slice_index]). Lesion masks are never
read. Training uses the 2D axial slices that contain lung, held in memory as tensors.

* Synthetic-lesion supervision (``seg.synthetic``, default): the folder's healthy volumes with
  lesions drawn by the Perlin training lesion model, exactly labelled by construction, fill
  ``SyntheticSupervision.fraction`` of each phase-2 batch (default all of it; measured on the
  validation phantoms, mixing in the pseudo-masks of a CPU-trained GAN made the models worse). The
  healthy volumes are split by volume; synthetic lesions in the validation ones select the model
  (mean per-volume Dice) and the probability threshold. No real or phantom lesion mask is read.
* Validation split by VOLUME (``val_fraction`` of the pseudo-mask volumes, never ground truth):
  all lung slices of those volumes are scored against their pseudo-masks (eq. 5 + MSE loss, and
  Dice of ``p > 0.5`` inside the lung). The model with the best validation Dice (ties: lower loss;
  validation loss alone when the validation pseudo-masks are empty) becomes ``model.pt``.
* Phase 1 (the first ``pretrain_fraction`` of the iterations): contrastive pre-training of the
  encoder and projection head with the enhanced contrastive loss (eq. 4) on batches of half
  high-infection and half low-infection slices (positives = same severity group). Skipped, with a
  warning, when the training volumes lack one of the groups.
* Phase 2: end-to-end, ``w_s * L_sensitivity (eq. 5) + w_m * MSE + w_c * L_contrastive`` where the
  contrastive term uses the batch's slices that belong to a severity group. eq. 5 and the MSE are
  averaged over the lung pixels of the batch (``loss_region="lung"``, the default): pseudo-masks
  only exist inside the lung and inference keeps lesions only there; averaged over every pixel
  instead, the background outside the lungs dominated and small models learnt to predict nothing
  (seen on phantoms: validation Dice 0 at any learning rate tried). ``positive_fraction`` of each
  batch comes from slices whose pseudo-mask is not empty (lesions are a small share of the slices).
* Adam (learning rate from the configuration: the paper's 5e-5 for ``paper``; 1e-3 for the CPU
  ``small`` and the test ``tiny`` configurations, which train for only hundreds of iterations),
  StepLR x ``lr_gamma`` every ``lr_step`` iterations; the learnable temperature (``log tau``) is
  optimised with the network. Augmentation (``SegConfig.augmentation``, :mod:`~CovidGANSegLib.seg.augmentation`):
  ``light``, random horizontal / vertical flips and a small intensity jitter (x [0.95, 1.05],
  + [-0.03, 0.03], clipped to [0, 1]), or ``strong``, which adds rotation / zoom, blur and noise.

Distributed (``torchrun``, :mod:`CovidGANSegLib.distributed`): the network is wrapped in
DistributedDataParallel. Every rank draws the whole planned batch (indices and augmentation, from
the same seeded generator, as one process would) and trains on its ``batch / world`` rows. The
losses are made to give the full batch's gradient once DDP has averaged the ranks' gradients:

* eq. 5 and the MSE are masked means over the batch's lung pixels; a shard's masked mean is not its
  share of the global one, so each rank's is rescaled by ``world * (its lung pixels) / (all ranks'
  lung pixels)`` (numerator and denominator reduced over the ranks): the ranks' mean is then
  exactly the global masked mean;
* eq. 4 compares every pair of slices of the batch: the projections are gathered from all ranks
  (``all_gather`` with autograd, gradients summed back to each rank's rows) and every rank computes
  the global batch's contrastive loss;
* the networks use GroupNorm / LayerNorm (per sample); dropout masks (``dropout > 0``, TransUNet)
  are drawn per rank (seeded by seed, iteration and rank, so a resumed run continues identically),
  so such runs match one process statistically, not bit for bit.

Validation, model selection, figures and files are rank 0's; all ranks stop after the same step on
a signal.

Run folder::

    RUN/checkpoints/last.pt     resumable state: weights, optimiser (incl. log tau), scheduler,
                                iteration, phase boundary, RNG states, best model so far (atomic)
    RUN/losses.csv              one row per iteration (+ validation columns when validated)
    RUN/loss_curves.png         training and validation curves
    RUN/samples/iter_NNNNN.png  validation slices: input, pseudo-mask, predicted probability
    RUN/model.pt (+ .json)      the selected segmenter with its PreprocessConfig and model card
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from CovidGANSegLib import distributed, progress
from CovidGANSegLib.checkpoints import load_checkpoint, read_model_card, save_checkpoint, write_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError
from CovidGANSegLib.losslog import append_losses, read_losses, truncate_losses
from CovidGANSegLib.runlock import stop_after_step
from CovidGANSegLib.seg import ARCHS, augmentation, cpu_has_native_bf16, resolve_device
from CovidGANSegLib.seg.losses import EnhancedContrastiveLoss, SensitivityEnhancedLoss, mse_to_pseudo_mask
from CovidGANSegLib.seg.synthetic import SyntheticSupervision, synthetic_pairs
from CovidGANSegLib.seg.transunet import DOWNSAMPLE, SegConfig, count_parameters, get_seg_config
from CovidGANSegLib.seg.unet import build_segmenter

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("iteration", "phase", "loss", "contrastive", "sensitivity", "mse", "tau", "lr", "val_loss", "val_dice",
                "val_dice_synthetic", "seconds")
#: probability thresholds tried on the synthetic validation pairs. Only 0.3 and 0.4: the threshold
#: picks the seeds of the post-processing, whose growth into connected lesion-range density sets the
#: extent, and the pixel Dice on the synthetic pairs, which knows nothing of that growth, sometimes
#: favours 0.5-0.6 by a hair while faint mild lesions in real anatomy lose their seeds there
#: (docs/ablation.md, "The segmenters' threshold: 0.3 or 0.4").
THRESHOLDS = (0.3, 0.4)
#: a slice "has lung" when at least this share of its pixels is lung
MIN_LUNG_SHARE = 0.002
PHASE_CONTRASTIVE, PHASE_END_TO_END = 1, 2


# --------------------------------------------------------------------------------------------
# data


@dataclass
class PseudoMaskData:
    """A pseudo-masks folder in memory (model grid, (N, D, H, W))."""

    images: np.ndarray
    masks: np.ndarray
    lungs: np.ndarray
    severity: np.ndarray  # (N, D) int8: 1 high infection, 0 low infection, -1 neither
    preprocess: PreprocessConfig
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    healthy: np.ndarray | None = None  # (Nh, D, H, W) healthy volumes on the same grid (synthetic-lesion supervision)
    healthy_lungs: np.ndarray | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable JSON ({exc})", path) from exc


def _find_preprocess(folder: Path, meta: dict[str, Any]) -> PreprocessConfig:
    """The pseudo-masks' preprocessing: ``index.json["preprocess"]``, where ``make_pseudo_masks`` writes it."""
    if isinstance(meta.get("preprocess"), dict):
        try:
            return PreprocessConfig.from_dict(meta["preprocess"])
        except (TypeError, ValueError) as exc:
            raise InputError(f"index.json 'preprocess' is not a valid preprocessing configuration ({exc})", folder) from exc
    raise InputError("no preprocessing configuration found (index.json 'preprocess'); "
                     "was this folder made by 'covidganseg pseudo-masks'?", folder)


def load_pseudo_masks(folder: str | Path) -> PseudoMaskData:
    """Read a pseudo-masks folder and check it (shapes, severity indices)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("pseudo-masks folder not found", folder)
    need = ("images.npy", "pseudo_masks.npy", "lungs.npy", "severity.json")
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise InputError(f"not a pseudo-masks folder: missing {', '.join(missing)}", folder)
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "pseudo_masks.npy", mmap_mode="r")
        lungs = np.load(folder / "lungs.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable array file ({exc})", folder) from exc
    if images.ndim != 4 or masks.shape != images.shape or lungs.shape != images.shape:
        raise InputError(f"images {images.shape}, pseudo_masks {masks.shape} and lungs {lungs.shape} must be equal (N, D, H, W)", folder)
    if images.shape[0] == 0:
        raise InputError("the pseudo-masks folder holds no volumes", folder)
    meta = _read_json(folder / "index.json") if (folder / "index.json").is_file() else {}
    if not isinstance(meta, dict):
        meta = {"records": meta}
    severity_json = _read_json(folder / "severity.json")
    n, d = images.shape[:2]
    severity = np.full((n, d), -1, dtype=np.int8)
    for key, label in (("low", 0), ("high", 1)):
        for item in severity_json.get(key, []) if isinstance(severity_json, dict) else []:
            try:
                v, s = int(item[0]), int(item[1])
            except (TypeError, ValueError, IndexError) as exc:
                raise InputError(f"severity.json {key!r} entries must be [volume_index, slice_index], got {item!r}", folder) from exc
            if not (0 <= v < n and 0 <= s < d):
                raise InputError(f"severity.json {key!r} entry {item} is outside the {n} x {d} slices", folder)
            severity[v, s] = label
    healthy = healthy_lungs = None
    if (folder / "healthy.npy").is_file() and (folder / "healthy_lungs.npy").is_file():
        try:
            healthy = np.asarray(np.load(folder / "healthy.npy", mmap_mode="r"), dtype=np.float32)
            healthy_lungs = np.asarray(np.load(folder / "healthy_lungs.npy", mmap_mode="r")).astype(bool, copy=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable healthy volumes ({exc})", folder) from exc
        if healthy.shape[1:] != images.shape[1:] or healthy_lungs.shape != healthy.shape:
            raise InputError(f"healthy {healthy.shape} / healthy_lungs {healthy_lungs.shape} do not match the images {images.shape}", folder)
    return PseudoMaskData(
        healthy=healthy,
        healthy_lungs=healthy_lungs,
        images=np.asarray(images, dtype=np.float32),
        masks=np.asarray(masks).astype(bool, copy=False),
        lungs=np.asarray(lungs).astype(bool, copy=False),
        severity=severity,
        preprocess=_find_preprocess(folder, meta),
        meta=meta,
        folder=folder,
    )


def needs_pseudo_masks(config: SegConfig, synthetic: SyntheticSupervision) -> bool:
    """Whether a segmenter trained with ``config`` and ``synthetic`` reads the GAN's pseudo-masks: a
    pseudo-mask in its batches (synthetic fraction < 1, or no synthetic copy to draw from) or a
    contrastive phase on their severity groups (``config.pretrain_fraction`` > 0). When it does not, it
    learns from a preprocessed data set alone (:func:`load_training_data`) and can train while the GAN does."""
    return synthetic.fraction < 1.0 or synthetic.variants_per_volume == 0 or config.pretrain_fraction > 0.0


def load_training_data(folder: str | Path) -> PseudoMaskData:
    """A segmenter's training data: a pseudo-masks folder, or a preprocessed data set.

    A preprocessed data set (``covidganseg preprocess``, ``preprocessing.preprocess_dataset``)
    serves synthetic-lesion supervision alone: its healthy volumes are kept and its COVID volumes
    are left out (there is no pseudo-mask to learn them from). The model-grid voxel size of the
    synthetic lesions comes from the COVID records, as in a pseudo-masks folder made from the same
    data set, so both give the same synthetic pairs (the healthy records when there are no COVID
    ones).
    """
    folder = Path(folder)
    if (folder / "pseudo_masks.npy").is_file() or not (folder / "config.json").is_file():
        return load_pseudo_masks(folder)
    from CovidGANSegLib.preprocessing import load_preprocessed

    ds = load_preprocessed(folder)
    d, h, w = ds.config.grid_dhw
    none = np.zeros((0, d, h, w), dtype=np.float32)  # (0, D, H, W): no COVID volume, no pseudo-mask
    return PseudoMaskData(images=none, masks=none.astype(bool), lungs=none.astype(bool), severity=np.zeros((0, d), dtype=np.int8),
                          preprocess=ds.config, meta={"records": ds.records_of("covid") or ds.records_of("healthy"), "preprocessed": True},
                          folder=folder, healthy=np.asarray(ds.healthy, dtype=np.float32),
                          healthy_lungs=np.asarray(ds.healthy_lungs).astype(bool, copy=False))


def split_volumes(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and validation VOLUME indices (at least one of each when n >= 2 and val_fraction > 0)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0 if n < 2 or val_fraction <= 0 else min(n - 1, max(1, int(round(val_fraction * n))))
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


def pad_to_multiple(x: torch.Tensor, multiple: int = DOWNSAMPLE) -> torch.Tensor:
    """Zero-pad ``(..., H, W)`` at the bottom / right to multiples of ``multiple`` (0 = air in the window)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def slice_stacks(volumes: np.ndarray, v_idx: np.ndarray, s_idx: np.ndarray, context: int = 0) -> np.ndarray:
    """Slices ``volumes[v, s]`` of ``(N, D, H, W)`` volumes with ``context`` neighbouring slices on each
    side as channels, ``(S, 2 * context + 1, H, W)`` (beyond the first / last slice the edge slice
    repeats): the 2.5D input of a segmenter with ``in_channels = 2 * context + 1``."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    offsets = np.arange(-context, context + 1)
    s = np.clip(np.asarray(s_idx)[:, None] + offsets[None, :], 0, volumes.shape[1] - 1)  # (S, C)
    return np.ascontiguousarray(volumes[np.asarray(v_idx)[:, None], s])  # (S, C, H, W)


@dataclass
class SliceSet:
    """Lung slices of some volumes as tensors (padded to multiples of 16): images ``(S, C, H', W')``
    (C = the segmenter's ``in_channels``: the slice and its neighbours), masks and lungs ``(S, 1, H', W')``."""

    images: torch.Tensor
    masks: torch.Tensor
    lungs: torch.Tensor
    labels: torch.Tensor  # (S,) severity group or -1
    index: list[tuple[int, int]]  # (volume, slice) of each row


def lung_slices(data: PseudoMaskData, volumes: list[int], device: str | torch.device = "cpu", context: int = 0) -> SliceSet:
    """The slices with lung of ``volumes``; each image with ``context`` neighbouring slices per side."""
    h, w = data.images.shape[2:]
    min_px = max(1, int(MIN_LUNG_SHARE * h * w))
    index = [(v, s) for v in volumes for s in range(data.images.shape[1]) if int(data.lungs[v, s].sum()) >= min_px]
    if not index:
        empty = torch.zeros((0, 1, h + (-h) % DOWNSAMPLE, w + (-w) % DOWNSAMPLE))
        images = torch.zeros((0, 2 * context + 1, *empty.shape[2:]))
        return SliceSet(images, empty.clone(), empty.bool(), torch.zeros(0, dtype=torch.long), [])
    v_idx = np.array([i[0] for i in index])
    s_idx = np.array([i[1] for i in index])

    def take(a: np.ndarray, dtype: torch.dtype, c: int = 0) -> torch.Tensor:
        t = torch.from_numpy(slice_stacks(a, v_idx, s_idx, c))  # (S, 2 c + 1, H, W)
        return pad_to_multiple(t.to(dtype)).to(device)

    labels = torch.from_numpy(data.severity[v_idx, s_idx].astype(np.int64)).to(device)
    return SliceSet(take(data.images, torch.float32, context), take(data.masks, torch.float32), take(data.lungs, torch.bool), labels, index)


def model_spacing_dhw(data: PseudoMaskData) -> tuple[float, float, float]:
    """Median model-grid voxel size ``(D, H, W)`` in mm of a pseudo-masks folder's volumes."""
    from CovidGANSegLib.preprocessing import GridMapping

    spacings = []
    for r in data.meta.get("records", []) if isinstance(data.meta.get("records"), list) else []:
        try:
            spacings.append(GridMapping.from_dict(r["mapping"]).model_spacing[::-1])
        except (KeyError, TypeError, ValueError):
            continue
    if not spacings:
        return data.preprocess.spacing_dhw
    return tuple(float(v) for v in np.median(np.asarray(spacings), axis=0))  # type: ignore[return-value]


def synthetic_slices(data: PseudoMaskData, volumes: list[int], plan: SyntheticSupervision, seed: int,
                     device: str | torch.device = "cpu", context: int = 0, band_mm: float = 0.0) -> SliceSet | None:
    """Lung slices of healthy volumes with synthetic lesions and their exact masks (None without volumes);
    with ``band_mm``, each slice's loss region (``lungs``) also holds the pixels within that in-plane
    distance of the lung: the pairs' labels are exact there too (no lesion outside the lung)."""
    if not volumes or data.healthy is None:
        return None
    spacing_dhw = model_spacing_dhw(data)
    images, masks, lungs, _ = synthetic_pairs(data.healthy[volumes], data.healthy_lungs[volumes], window=data.preprocess.hu_window,
                                              spacing_dhw=spacing_dhw, plan=plan, seed=seed)
    pairs = PseudoMaskData(images=images, masks=masks, lungs=lungs, severity=np.full(images.shape[:2], -1, dtype=np.int8),
                           preprocess=data.preprocess)
    slices = lung_slices(pairs, list(range(len(images))), device, context)
    if band_mm > 0:  # the loss region: the lung and the tissue next to it (SegConfig.loss_band_mm)
        slices.lungs = band_around(slices.lungs, band_mm / spacing_dhw[1])
    return slices


def band_around(region: torch.Tensor, radius_px: float) -> torch.Tensor:
    """``region`` (S, 1, H, W) bool with every pixel within ``radius_px`` of it (in-plane, Euclidean)."""
    r = int(math.floor(radius_px + 1e-6))
    if r < 1 or len(region) == 0:
        return region
    offsets = torch.arange(-r, r + 1, dtype=torch.float32, device=region.device)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px ** 2 + 1e-6).to(torch.float32)[None, None]  # (1, 1, k, k)
    hit = F.conv2d(region.to(torch.float32), disk, padding=r)  # (S, 1, H, W)
    return hit > 0.5


# --------------------------------------------------------------------------------------------
# the trainer


class _Dispatch(torch.nn.Module):
    """``forward(x, method)`` calls ``model.<method>(x)``: lets DDP wrap the heads besides ``forward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, method: str = "forward") -> Any:
        return getattr(self.model, method)(x)


class SegTrainer:
    """Network, losses, optimiser and one training iteration (usable without files)."""

    def __init__(self, arch: str, config: SegConfig, *, device: str = "auto", seed: int = 0) -> None:
        if arch not in ARCHS:
            raise ValueError(f"model must be one of {ARCHS}, got {arch!r}")
        self.arch = arch
        self.config = config
        self.device = torch.device(resolve_device(device))
        torch.manual_seed(seed)
        self._seed = int(seed)
        self.model = build_segmenter(arch, config).to(self.device)
        #: bfloat16 autocast of the training forward passes (``SegConfig.cpu_bf16`` on a CPU that has it natively)
        self.bf16 = bool(config.cpu_bf16) and self.device.type == "cpu" and cpu_has_native_bf16()
        if config.cpu_bf16 and self.device.type == "cpu" and not self.bf16:
            log.warning("cpu_bf16 is set but this CPU has no native bfloat16 (AVX512-BF16 / AMX): training in float32")
        self.contrastive = EnhancedContrastiveLoss(config.tau_init).to(self.device)
        self.sensitivity = SensitivityEnhancedLoss(config.beta, fn_mode=config.fn_mode)
        params = list(self.model.parameters()) + list(self.contrastive.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
        self.generator = torch.Generator().manual_seed(seed)  # batches and augmentation (CPU)
        self.iteration = 0
        self.pretrain_iterations = 0
        self.best: dict[str, Any] = {"key": None, "iteration": None, "val_loss": None, "val_dice": None, "state": None}
        # distributed: every rank trains on its rows of the global batch (config.batch_size)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self._ddp = None
        if self.world > 1:
            distributed.check_batch(config.batch_size, "segmenter", self.world)
            self.model = distributed.sync_batch_norm(self.model)
            # the phases use different heads (contrastive: encoder + projection; eq. 5 without a
            # contrastive term: no projection): DDP looks for the unused parameters each step
            self._ddp = distributed.wrap_ddp(_Dispatch(self.model), find_unused_parameters=True)

    def _run(self, method: str, x: torch.Tensor) -> Any:
        """``self.model.<method>(x)`` (through DDP when distributed, so that its gradients are averaged),
        under bfloat16 autocast when :attr:`bf16`; the outputs are float32 (the losses are computed in float32)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = getattr(self.model, method)(x) if self._ddp is None else self._ddp(x, method=method)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    # -- batches ---------------------------------------------------------------------------------

    def _draw(self, pool: torch.Tensor, k: int) -> torch.Tensor:
        if k <= 0 or len(pool) == 0:
            return torch.zeros(0, dtype=torch.long)
        return pool[torch.randint(len(pool), (k,), generator=self.generator)]

    def sample(self, slices: SliceSet, phase: int, *, high: torch.Tensor, low: torch.Tensor, positive: torch.Tensor,
               size: int | None = None) -> torch.Tensor:
        """Row indices of one batch (``size`` rows, default the batch size): half high / half low (phase 1), or lesion-enriched (phase 2)."""
        b = self.config.batch_size if size is None else int(size)
        if b <= 0 or len(slices.images) == 0:
            return torch.zeros(0, dtype=torch.long)
        if phase == PHASE_CONTRASTIVE:
            return torch.cat([self._draw(high, b // 2), self._draw(low, b - b // 2)])
        n_pos = int(round(self.config.positive_fraction * b)) if len(positive) else 0
        return torch.cat([self._draw(positive, n_pos), torch.randint(len(slices.images), (b - n_pos,), generator=self.generator)])

    def augment(self, x: torch.Tensor, *targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The configuration's augmentation (``seg.augmentation``) of ``x`` and, alike, every target."""
        return augmentation.augment(self.config.augmentation, x, targets, self.generator)

    # -- one iteration ---------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, phase: int, lung: torch.Tensor | None = None) -> dict[str, float]:
        """One optimiser step on a batch ``x, y`` (B, 1, H, W) with severity ``labels`` (B,).

        ``lung`` (B, 1, H, W) bool restricts eq. 5 and the MSE to the lung when the configuration's
        ``loss_region`` is ``lung``. Distributed, ``x, y, labels, lung`` are the global batch: this
        rank trains on its rows and the returned losses are the global batch's (module docstring).
        """
        cfg = self.config
        if self.world > 1:
            rows = distributed.shard_rows(len(x))
            x, y = x[rows], y[rows]
            lung = None if lung is None else lung[rows]
            # dropout masks: independent per rank, reproducible per (seed, iteration, rank) on resume
            torch.manual_seed(int(np.random.SeedSequence((self._seed, self.iteration, self.rank)).generate_state(1)[0]))
        region = lung if cfg.loss_region == "lung" else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        nan = float("nan")
        if phase == PHASE_CONTRASTIVE:
            con = self.contrastive(distributed.gather_rows(self._run("project", x)), labels)
            loss, sel_v, mse_v = con, nan, nan
        else:
            logits, z = self._run("forward_with_projection", x)
            sel = self.sensitivity(logits, y, region)
            mse = mse_to_pseudo_mask(logits, y, region)
            if self.world > 1 and region is not None:
                # masked means of this shard -> its share of the global masked mean (x world: DDP averages)
                mine = region.sum().to(torch.float64)
                share = (mine / distributed.sum_over_ranks(mine).clamp_min(1.0) * self.world).to(sel.dtype)
                sel, mse = sel * share, mse * share
            loss = cfg.weight_sensitivity * sel + cfg.weight_mse * mse
            grouped = labels >= 0  # the global batch's labels: the same decision on every rank
            counts = torch.bincount(labels[grouped]) if bool(grouped.any()) else labels.new_zeros(0)
            con = None
            if cfg.weight_contrastive > 0 and bool((counts >= 2).any()):  # some anchor has a positive in the batch
                z = distributed.gather_rows(z)
                con = self.contrastive(z[grouped.to(z.device)], labels[grouped])
                loss = loss + cfg.weight_contrastive * con
            sel_v, mse_v = float(sel.item()), float(mse.item())
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        loss_v = float(loss.item())
        if self.world > 1:  # the ranks' mean: the global batch's values (the contrastive term is global already)
            loss_v, sel_v, mse_v = distributed.mean_over_ranks([loss_v, sel_v, mse_v])
        return {"phase": phase, "loss": loss_v, "contrastive": nan if con is None else float(con.item()), "sensitivity": sel_v, "mse": mse_v,
                "tau": float(self.contrastive.tau.item()), "lr": lr}

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, batch: int = 32) -> torch.Tensor:
        """Probabilities ``(S, 1, H, W)`` in eval mode."""
        was = self.model.training
        self.model.eval()
        try:
            return torch.cat([torch.sigmoid(self.model(images[i:i + batch])) for i in range(0, len(images), batch)]) if len(images) else images
        finally:
            self.model.train(was)

    @torch.inference_mode()
    def validate(self, val: SliceSet, *, batch: int = 32, threshold: float = 0.5) -> dict[str, float]:
        """Loss (eq. 5 + MSE, weighted and restricted as in training) and Dice of ``p > threshold`` in the lung.

        ``val_dice`` is the mean of the per-VOLUME Dice (both empty: 1), the figure the evaluation
        reports, so that a mild case weighs as much as a severe one; ``val_dice_pooled`` pools all
        voxels.
        """
        (counts,), total, pixels = self._score(val, (threshold,), batch=batch, loss=True)
        tp_all, fp_all, fn_all = (sum(c[j] for c in counts.values()) for j in range(3))
        return {"val_loss": total / max(pixels, 1), "val_dice": _mean_volume_dice(counts),
                "val_dice_pooled": _dice(tp_all, fp_all, fn_all), "val_has_lesion": tp_all + fn_all > 0}

    @torch.inference_mode()
    def dice_by_threshold(self, val: SliceSet, thresholds: tuple[float, ...], *, batch: int = 32) -> dict[float, float]:
        """``val_dice`` of :meth:`validate` for each threshold, from one pass of the network."""
        counts, _, _ = self._score(val, thresholds, batch=batch, loss=False)
        return {float(t): _mean_volume_dice(c) for t, c in zip(thresholds, counts)}

    def _score(self, val: SliceSet, thresholds: tuple[float, ...], *, batch: int, loss: bool
               ) -> tuple[list[dict[int, list[int]]], float, int]:
        """Per threshold, volume -> [tp, fp, fn] in the lung; and the summed loss and its pixel count."""
        was = self.model.training
        self.model.eval()
        cfg = self.config
        total, pixels = 0.0, 0
        counts: list[dict[int, list[int]]] = [{} for _ in thresholds]
        try:
            for i in range(0, len(val.images), batch):
                x, y, lung = val.images[i:i + batch], val.masks[i:i + batch], val.lungs[i:i + batch]
                logits = self.model(x)
                if loss:
                    region = lung if cfg.loss_region == "lung" else None
                    n = int(lung.sum()) if region is not None else y.numel()
                    total += float(cfg.weight_sensitivity * self.sensitivity(logits, y, region)
                                   + cfg.weight_mse * mse_to_pseudo_mask(logits, y, region)) * n
                    pixels += n
                prob = torch.sigmoid(logits)
                t = (y > 0.5) & lung
                for per_volume, threshold in zip(counts, thresholds):
                    pred = (prob > threshold) & lung
                    tp = (pred & t).flatten(1).sum(dim=1).tolist()
                    fp = (pred & ~t).flatten(1).sum(dim=1).tolist()
                    fn = (~pred & t).flatten(1).sum(dim=1).tolist()
                    for k in range(len(x)):
                        c = per_volume.setdefault(val.index[i + k][0] if val.index else 0, [0, 0, 0])
                        c[0] += int(tp[k])
                        c[1] += int(fp[k])
                        c[2] += int(fn[k])
        finally:
            self.model.train(was)
        return counts, total, pixels

    def consider(self, result: dict[str, float]) -> bool:
        """Keep the current weights if they are the best on validation so far (strictly better)."""
        key = (result["val_dice"], -result["val_loss"]) if result["val_has_lesion"] else (-result["val_loss"],)
        if self.best["key"] is not None and not tuple(key) > tuple(self.best["key"]):
            return False
        self.best = {"key": list(key), "iteration": self.iteration, "val_loss": result["val_loss"], "val_dice": result["val_dice"],
                     "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        return True

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "iteration": int(self.iteration),
            "pretrain_iterations": int(self.pretrain_iterations),
            "model": self.model.state_dict(),
            "contrastive": self.contrastive.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "best": self.best,
        }

    def load_state(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.contrastive.load_state_dict(payload["contrastive"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.iteration = int(payload["iteration"])
        self.pretrain_iterations = int(payload["pretrain_iterations"])
        self.best = dict(payload["best"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _dice(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _mean_volume_dice(counts: dict[int, list[int]]) -> float:
    """Mean of the per-volume Dice of ``volume -> [tp, fp, fn]`` (1 without any volume)."""
    return float(np.mean([_dice(*c) for c in counts.values()])) if counts else 1.0


def choose_threshold(trainer: SegTrainer, state: dict[str, torch.Tensor], val: SliceSet) -> tuple[float, float]:
    """The probability threshold of :data:`THRESHOLDS` with the best Dice on ``val`` for the weights ``state``."""
    current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(state)
    try:
        dice = trainer.dice_by_threshold(val, THRESHOLDS)
    finally:
        trainer.model.load_state_dict(current)
    best, _, t = max((dice[t], -abs(t - 0.5), t) for t in THRESHOLDS)
    return float(t), float(best)


# --------------------------------------------------------------------------------------------
# bookkeeping


def _is_demo(data: PseudoMaskData, data_path: Path | None) -> tuple[bool, str]:
    """Were the pseudo-masks made from synthetic phantoms? Returns (demo, description)."""
    meta = data.meta
    if meta.get("demo") is True:
        return True, "synthetic phantoms"
    for key in ("gan", "gan_checkpoint", "checkpoint"):
        ckpt = meta.get(key)
        if isinstance(ckpt, str):
            try:
                if read_model_card(ckpt).get("demo"):
                    return True, "synthetic phantoms"
            except CheckpointError:
                pass
    try:
        from CovidGANSegLib.gan.training import is_phantom_data
    except ImportError:  # pragma: no cover - gan package missing
        return False, str(data_path or data.folder)
    for candidate in (data_path, data.folder, *(Path(str(meta[k])) for k in ("data", "source") if isinstance(meta.get(k), str))):
        if candidate is not None and Path(candidate).exists() and is_phantom_data(candidate):
            return True, "synthetic phantoms"
    return False, str(data_path or data.folder)


def _write_samples(trainer: SegTrainer, val: SliceSet, path: Path, iteration: int, n: int = 4) -> None:
    from CovidGANSegLib.seg.figures import save_segmentation_samples

    if len(val.images) == 0:
        return
    area = val.masks.flatten(1).sum(dim=1)
    order = torch.argsort(area, descending=True, stable=True)[:n]
    x = val.images[order]
    prob = trainer.predict(x)
    save_segmentation_samples(x[:, x.shape[1] // 2].cpu().numpy(), val.masks[order][:, 0].cpu().numpy(), prob[:, 0].cpu().numpy(), path,
                              title=f"{trainer.arch}, iteration {iteration} (validation volumes)")


# --------------------------------------------------------------------------------------------
# the training run


def train_segmenter(pseudo_masks: str | Path, run_dir: str | Path, *, model: str = "transunet", config: str | Path | SegConfig = "small",
                    iterations: int | None = None, resume: bool = False, device: str = "auto", seed: int = 0,
                    data: str | Path | None = None, synthetic: SyntheticSupervision | None = None,
                    run_info: dict[str, Any] | None = None) -> Path:
    """Train a segmenter on a pseudo-masks folder and write RUN/model.pt; returns its path.

    Args:
        pseudo_masks: the pseudo-masks folder (see the module docstring), or a preprocessed data
            set for synthetic-lesion supervision alone (:func:`load_training_data`; ``synthetic``
            with ``fraction=1``: no COVID volume, no pseudo-mask, no contrastive phase).
        run_dir: the run folder.
        model: ``transunet`` or ``unet``.
        config: ``paper``, ``small``, ``tiny``, a JSON file or a SegConfig (a resumed run keeps
            its checkpoint's). ``image_size`` follows the data's slice size.
        iterations: total iterations of both phases (default ``config.iterations``).
        resume: continue from RUN/checkpoints/last.pt.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds the weights, the volume split, batches and augmentation.
        data: the dataset the pseudo-masks came from (provenance only: model card, demo flag).
        synthetic: synthetic-lesion supervision from the folder's healthy volumes (default
            ``SyntheticSupervision()``: all of each end-to-end batch, the pseudo-masks' severity
            groups then serve the contrastive phase; ``fraction=0`` for the paper's pseudo-masks
            alone). A resumed run keeps its own. The healthy volumes are split by volume like the COVID
            ones; synthetic pairs of the validation healthy volumes select the model and the
            probability threshold (label-free: the labels are the synthesiser's own).
        run_info: extra metadata for every checkpoint (``covidganseg train``: the plan and its hash).

    SIGINT / SIGTERM / SIGHUP during the loop: the current iteration finishes, ``last.pt`` is
    written and :class:`~CovidGANSegLib.runlock.TrainingInterrupted` says how to resume.

    Raises:
        InputError: not a pseudo-masks folder (or preprocessed data set), no lung slices, a
            preprocessed data set with a synthetic fraction under 1, a checkpoint exists without
            ``resume`` (or is missing with it), a checkpoint of another architecture, fewer
            iterations than a resumed run already has.
    """
    pm_path, run_dir = Path(pseudo_masks), Path(run_dir)
    data_path = None if data is None else Path(data)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    payload = None
    if model not in ARCHS:
        raise ValueError(f"model must be one of {ARCHS}, got {model!r}")
    if resume:
        if not ckpt_path.is_file():
            raise InputError("no checkpoint to resume (checkpoints/last.pt is missing); start a fresh run without --resume", run_dir)
        payload = load_checkpoint(ckpt_path, kind="seg")
        if payload.get("arch") != model:
            raise InputError(f"this run trains a {payload.get('arch')!r} model, not {model!r}", run_dir)
        cfg = SegConfig.from_dict(payload["config"])
        seed = int(payload.get("metadata", {}).get("seed", seed))
        if "synthetic" in payload.get("metadata", {}):  # the run's own supervision (None: it had none)
            stored = payload["metadata"]["synthetic"]
            if isinstance(stored, dict):
                stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
                stored.setdefault("sub_slice_mm", 0.0)  # a run from before sub-slice lesions drew them on the model grid
                stored.setdefault("validation_variants", stored["variants_per_volume"])  # before: as many as in training
                synthetic = SyntheticSupervision(**stored)
            else:
                synthetic = SyntheticSupervision(fraction=0.0)
    else:
        if ckpt_path.exists():
            raise InputError("this run folder already has a checkpoint (checkpoints/last.pt): use --resume to continue it, "
                             "or choose a new --out folder", run_dir)
        cfg = config if isinstance(config, SegConfig) else get_seg_config(config)

    progress.report(0.0, "loading pseudo-masks")
    pm = load_training_data(pm_path)
    n, d, h, w = pm.images.shape
    if payload is None:
        size = h + (-h) % DOWNSAMPLE
        if h == w and cfg.image_size != size:
            cfg = cfg.replace(image_size=size)
    total = int(iterations if iterations is not None else cfg.iterations)
    if total < 1:
        raise ValueError(f"iterations must be >= 1, got {total}")
    if payload is not None and total < int(payload["iteration"]):
        raise InputError(f"this run already has {int(payload['iteration'])} iterations; resuming up to {total} would rewrite model.pt "
                         f"with fewer: give --iterations {int(payload['iteration'])} or more", run_dir)

    train_vols, val_vols = split_volumes(n, cfg.val_fraction, seed)
    if payload is not None and "split" in payload:
        train_vols, val_vols = list(payload["split"]["train"]), list(payload["split"]["val"])
    trainer = SegTrainer(model, cfg, device=device, seed=seed)
    dev = trainer.device
    context = cfg.in_channels // 2  # 2.5D: neighbouring slices as channels
    train = lung_slices(pm, train_vols, dev, context)
    val = lung_slices(pm, val_vols, dev, context)
    syn = synthetic if synthetic is not None else SyntheticSupervision()
    syn_train = syn_val = None
    h_train: list[int] = []
    h_val: list[int] = []
    if syn.fraction > 0 and syn.variants_per_volume > 0:
        if pm.healthy is None or len(pm.healthy) == 0:
            log.warning("no healthy volumes in %s: synthetic-lesion supervision is off (pseudo-masks only)", pm_path)
        else:
            h_train, h_val = split_volumes(len(pm.healthy), cfg.val_fraction, seed + 1)
            progress.report(0.01, "synthesising lesions in healthy volumes")
            syn_train = synthetic_slices(pm, h_train, syn, seed, dev, context, cfg.loss_band_mm)
            syn_val = synthetic_slices(pm, h_val, syn.for_validation(), seed + 7919, dev, context, cfg.loss_band_mm)
    syn_positive = (torch.nonzero(syn_train.masks.flatten(1).amax(dim=1) > 0.5).flatten().cpu() if syn_train is not None
                    else torch.zeros(0, dtype=torch.long))
    n_syn = int(round(syn.fraction * cfg.batch_size)) if syn_train is not None else 0
    if len(train.images) == 0 and (n_syn < cfg.batch_size or len(syn_train.images) == 0):
        if n == 0:  # a preprocessed data set: synthetic lesions are all there is to learn from
            raise InputError("a preprocessed data set has no pseudo-masks: it trains a segmenter on synthetic lesions alone, which needs "
                             "healthy volumes with lung and a synthetic fraction of 1; or give a pseudo-masks folder", pm_path)
        raise InputError("no slice with lung in the training volumes", pm_path)
    if not val_vols and syn_val is None:
        log.warning("only %d pseudo-mask volume(s): no validation split, the last model is kept", n)
    high = torch.nonzero(train.labels == 1).flatten().cpu()
    low = torch.nonzero(train.labels == 0).flatten().cpu()
    positive = torch.nonzero(train.masks.flatten(1).amax(dim=1) > 0.5).flatten().cpu()
    if trainer.bf16:
        log.info("bfloat16 autocast of the training forward passes (CPU with native bfloat16; SegConfig.cpu_bf16)")
    log.info("%s training on %d lung slices of %d volumes (%d with pseudo-lesion, %d high / %d low severity); validation: %d slices of %d volumes",
             model, len(train.images), len(train_vols), len(positive), len(high), len(low), len(val.images), len(val_vols))

    losses_csv = run_dir / "losses.csv"
    main = distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    if payload is not None:
        trainer.load_state(payload)
        if main:
            truncate_losses(losses_csv, trainer.iteration, LOSS_COLUMNS)
        log.info("resumed at iteration %d of %d", trainer.iteration, total)
    else:
        if losses_csv.exists() and main:
            losses_csv.unlink()
        can_pretrain = len(high) > 0 and len(low) > 0
        trainer.pretrain_iterations = int(round(cfg.pretrain_fraction * total)) if can_pretrain else 0
        if not can_pretrain and cfg.pretrain_fraction > 0:
            log.warning("no high- and low-severity slices in the training volumes: contrastive pre-training (phase 1) skipped")
    del payload

    demo, source = _is_demo(pm, data_path)
    metadata = {"config_name": cfg.name, "seed": int(seed), "pseudo_masks": str(pm_path), "data": None if data_path is None else str(data_path),
                "n_train_volumes": len(train_vols), "n_val_volumes": len(val_vols), "device": str(dev), "demo": demo,
                "synthetic": dataclasses.asdict(syn) if syn_train is not None else None,
                "n_train_healthy_volumes": len(h_train), "n_val_healthy_volumes": len(h_val),
                "autocast": "bfloat16" if trainer.bf16 else None, **(run_info or {})}
    if trainer.world > 1:
        import torch.distributed as dist

        metadata["distributed"] = {"world_size": trainer.world, "backend": dist.get_backend(), "global_batch": int(cfg.batch_size)}
    common = dict(kind="seg", arch=model, config=cfg.to_dict(), metadata=metadata, preprocess=pm.preprocess.to_dict(),
                  split={"train": train_vols, "val": val_vols})

    def save_state() -> None:
        if main:
            save_checkpoint(ckpt_path, **common, **trainer.state())

    samples = run_dir / "samples"
    start = trainer.iteration
    def stop() -> str:
        save_state()
        return (f"{model} training interrupted after iteration {trainer.iteration} of {total}; checkpoint written to {ckpt_path}. "
                "Run the same command again with --resume to continue.")

    steps = progress.track(range(start, total), total=max(total - start, 0), desc=f"{model} training")
    agree = distributed.any_rank if trainer.world > 1 else None
    for _ in stop_after_step(steps, stop, agree):
        t0 = time.perf_counter()
        phase = PHASE_CONTRASTIVE if trainer.iteration < trainer.pretrain_iterations else PHASE_END_TO_END
        if phase == PHASE_END_TO_END and n_syn:
            # (B, 1, H, W): pseudo-mask slices of COVID volumes, then synthetic pairs (no severity group)
            idx = trainer.sample(train, phase, high=high, low=low, positive=positive, size=cfg.batch_size - n_syn).to(dev)
            idx_s = trainer.sample(syn_train, phase, high=high, low=low, positive=syn_positive, size=n_syn).to(dev)
            x, y, lung = trainer.augment(torch.cat([train.images[idx], syn_train.images[idx_s]]),
                                         torch.cat([train.masks[idx], syn_train.masks[idx_s]]),
                                         torch.cat([train.lungs[idx], syn_train.lungs[idx_s]]))
            labels = torch.cat([train.labels[idx], torch.full((len(idx_s),), -1, dtype=train.labels.dtype, device=dev)])
        else:
            idx = trainer.sample(train, phase, high=high, low=low, positive=positive).to(dev)
            x, y, lung = trainer.augment(train.images[idx], train.masks[idx], train.lungs[idx])
            labels = train.labels[idx]
        row = trainer.step(x, y, labels, phase, lung)
        it = trainer.iteration
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"segmenter training diverged at iteration {it}: {row}")
        validate = main and (bool(val_vols) or syn_val is not None) and phase == PHASE_END_TO_END and (it % cfg.val_every == 0 or it == total)
        if validate:
            result = trainer.validate(val) if val_vols else None
            if result is not None:
                row.update(val_loss=result["val_loss"], val_dice=result["val_dice"])
            if syn_val is not None:  # model selection on the synthetic pairs of held-out healthy volumes
                syn_result = trainer.validate(syn_val)
                row.update(val_dice_synthetic=syn_result["val_dice"])
                result = syn_result
            if trainer.consider(result):
                log.info("iteration %d: validation Dice %.4f, loss %.5f (best so far)", it, result["val_dice"], result["val_loss"])
            _write_samples(trainer, syn_val if syn_val is not None else val, samples / f"iter_{it:05d}.png", it)
        if not main:
            continue  # validation, files and figures are rank 0's
        append_losses(losses_csv, {"iteration": it, **row, "seconds": time.perf_counter() - t0}, LOSS_COLUMNS)
        best_dice = trainer.best.get("val_dice")
        progress.postfix(loss=row["loss"], **({"best_val_dice": best_dice} if best_dice is not None else {}))
        if it % cfg.checkpoint_every == 0 or it == total:
            save_state()
            from CovidGANSegLib.seg.figures import save_loss_curves

            save_loss_curves(read_losses(losses_csv), run_dir / "loss_curves.png")
        if it % max(1, cfg.log_every * 10) == 0:
            log.info("iteration %d/%d (phase %d): loss %.5f, tau %.4f", it, total, phase, row["loss"], row["tau"])

    model_path = run_dir / "model.pt"
    if not main:  # rank 0 chooses the threshold and writes the model
        return model_path
    progress.report(0.99, "writing the model")
    best = trainer.best
    if best["state"] is None:  # no validation happened: keep the last weights
        best = {**best, "state": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, "iteration": trainer.iteration}
    threshold, threshold_dice = 0.5, None
    if syn_val is not None and best["state"] is not None:
        threshold, threshold_dice = choose_threshold(trainer, best["state"], syn_val)
        log.info("probability threshold %.2f (Dice %.4f on the synthetic validation pairs)", threshold, threshold_dice)
    # the model was chosen on the synthetic pairs when there are any, else on the pseudo-masks of other volumes
    chosen_on = "synthetic" if syn_val is not None else "pseudo_masks"
    best_figures = {f"val_dice_{chosen_on}": best["val_dice"], f"val_loss_{chosen_on}": best["val_loss"]}
    final_meta = {**metadata, "iterations": int(trainer.iteration), "threshold": threshold, "threshold_val_dice_synthetic": threshold_dice, "pretrain_iterations": int(trainer.pretrain_iterations),
                  "best_iteration": best["iteration"], **best_figures,
                  "tau": float(trainer.contrastive.tau.item()), "parameters": count_parameters(trainer.model)}
    save_checkpoint(model_path, kind="seg", arch=model, config=cfg.to_dict(), metadata=final_meta, preprocess=pm.preprocess.to_dict(),
                    model=best["state"], threshold=threshold)
    trained_on = f"pseudo-masks of {len(train_vols)} COVID volumes ({source})" if n else f"a preprocessed data set ({source}), no pseudo-masks"
    if syn_train is not None:
        trained_on += (f" and synthetic lesions in {len(h_train)} healthy volumes ({syn.fraction:.0%} of each batch); "
                       f"model and threshold chosen on synthetic lesions in {len(h_val)} other healthy volumes")
    else:
        trained_on += f"; validation on pseudo-masks of {len(val_vols)} other volumes"
    write_model_card(model_path, name=f"seg-{model}-{run_dir.name}", kind="seg", arch=model, config_name=cfg.name, config=cfg.to_dict(),
                     trained_on=trained_on, demo=demo,
                     extra={"iterations": int(trainer.iteration), "preprocess": pm.preprocess.to_dict(), "best_iteration": best["iteration"],
                            **best_figures,
                            "parameters": final_meta["parameters"], "threshold": threshold,
                            "synthetic": metadata["synthetic"]})
    progress.report(1.0, f"{model} training done")
    log.info("wrote %s", model_path)
    return model_path
