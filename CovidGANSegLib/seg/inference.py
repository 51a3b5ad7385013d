"""Lesion segmentation of a CT file on its own grid (``covidganseg segment``).

``segment_ct`` preprocesses a CT with the segmenter checkpoint's own ``PreprocessConfig`` (same
grid and HU window as in training; when a GAN is given too, both must agree), runs the 2D
segmenter slice by slice on the model grid (batched, ``torch.inference_mode``), maps the
probabilities back onto the canonical CT grid with ``GridMapping.to_canonical`` (linear; 0 outside
the model's crop box), thresholds them (``p > threshold``, default the checkpoint's, chosen on
synthetic validation lesions) and post-processes the detections on the input grid
(:mod:`CovidGANSegLib.seg.postprocess`: slab rule, HU prior, opening, the optional GAN gate, density
filter, growth, thin-growth limit, local contrast; its docstring gives each rule and why).

``segment_file`` does the same file to file: the lesion mask (uint8 0/1) has the input file's
shape and affine, and optional outputs are the lung mask, the GAN's pseudo-healthy CT and
difference map (HU), and ``report.json`` (``quantify``: lesion and lung volume in mL, percent of
lung involved, MosMed category). All files are written together at the end, each atomically: on
an error before that point nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from CovidGANSegLib import progress
from CovidGANSegLib.checkpoints import load_checkpoint, read_model_card
from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import CheckpointError, InputError
from CovidGANSegLib.seg import ARCHS, resolve_device
from CovidGANSegLib.seg.postprocess import PostProcessing, post_process
from CovidGANSegLib.seg.training import THRESHOLDS, pad_to_multiple, slice_stacks
from CovidGANSegLib.seg.transunet import SegConfig
from CovidGANSegLib.seg.unet import build_segmenter

log = logging.getLogger(__name__)

def gan_gate(ct, lung: np.ndarray, generator: Any, gan_payload: dict[str, Any], rule: PostProcessing | None = None) -> tuple[Any, float | None]:
    """The GAN's pseudo-healthy result for ``ct`` and the gate level in HU (None when the checkpoint has no statistics)."""
    from CovidGANSegLib.gan.inference import preprocess_config_of, pseudo_healthy

    gan_pp = preprocess_config_of(gan_payload)
    ph = pseudo_healthy(generator, ct, gan_pp, lung_mask=lung)
    stats = gan_payload.get("metadata", {}).get("healthy_difference")
    gate = (rule or PostProcessing()).gate_hu(stats, gan_pp.hu_window[1] - gan_pp.hu_window[0])
    return ph, gate


@dataclass
class SegmentationResult:
    """Output of :func:`segment_ct` (canonical arrays are indexed ``(x, y, z)``).

    Attributes:
        probability: canonical float32 lesion probability (0 outside the model's crop box).
        lesion_mask: canonical bool, ``probability > threshold`` inside the lung mask.
        lung_mask: canonical bool lung mask used.
        probability_model: ``(D, H, W)`` probabilities on the model grid.
        preprocessed: the ``preprocessing.PreprocessedVolume`` the model saw.
        threshold: the probability threshold used.
    """

    probability: np.ndarray
    lesion_mask: np.ndarray
    lung_mask: np.ndarray
    probability_model: np.ndarray
    preprocessed: Any
    threshold: float


def load_segmenter(checkpoint: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a segmenter (``model.pt`` or a training ``last.pt``) in eval mode.

    Returns ``(model, payload)``; ``model.preprocess_config`` is the training PreprocessConfig.

    Raises:
        CheckpointError: missing, corrupt, truncated or foreign file, a GAN checkpoint, an unknown
            architecture, or weights that do not fit the stored configuration.
    """
    path = Path(checkpoint)
    payload = load_checkpoint(path, kind="seg", map_location="cpu")
    arch = payload.get("arch")
    if arch not in ARCHS:
        raise CheckpointError(f"unknown segmenter architecture {arch!r} (this version knows {', '.join(ARCHS)})", path)
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError("segmenter checkpoint without model weights", path)
    try:
        config = SegConfig.from_dict(payload["config"])
        preprocess = PreprocessConfig.from_dict(payload["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"segmenter checkpoint with an invalid configuration ({exc})", path) from exc
    model = build_segmenter(arch, config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the stored {arch} configuration ({str(exc).splitlines()[0][:200]})", path) from exc
    model.preprocess_config = preprocess
    model.threshold = float(payload.get("threshold", 0.5))
    model.to(resolve_device(device)).eval()
    return model, payload


def chose_threshold_among_old_range(payload: dict[str, Any]) -> bool:
    """True for a segmenter checkpoint whose threshold training chose on synthetic pairs above
    :data:`~CovidGANSegLib.seg.training.THRESHOLDS` (versions before 2026-12-05 tried up to 0.9). A
    threshold of 0.5 without that choice (no synthetic validation pairs: the paper's pseudo-masks
    alone) is the plain default and is not flagged."""
    meta = payload.get("metadata") or {}
    stored = payload.get("threshold")
    return (stored is not None and meta.get("threshold_val_dice_synthetic") is not None
            and float(stored) > max(THRESHOLDS) + 1e-9)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_slices(model: torch.nn.Module, image: np.ndarray, *, batch_size: int = 16, progress_range: tuple[float, float] | None = None) -> np.ndarray:
    """Lesion probabilities ``(D, H, W)`` for a model-grid volume ``(D, H, W)`` in [0, 1], slice by slice."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = _device_of(model)
    d, h, w = image.shape
    context = int(getattr(getattr(model, "config", None), "in_channels", 1)) // 2  # 2.5D: neighbouring slices as channels
    out = np.empty(image.shape, dtype=np.float32)
    starts = range(0, d, batch_size)
    if progress_range is not None:
        starts = progress.track(starts, desc="segmenting slices", start=progress_range[0], end=progress_range[1])
    for s in starts:
        rows = np.arange(s, min(d, s + batch_size))
        x = torch.from_numpy(slice_stacks(image[None], np.zeros_like(rows), rows, context)).to(device)  # (B, 2 context + 1, H, W)
        logits = model(pad_to_multiple(x))[..., :h, :w]
        out[s:s + batch_size] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out


def segment_ct(ct, model: torch.nn.Module, preprocess: PreprocessConfig | None = None, *, lung_mask: np.ndarray | None = None,
               threshold: float | None = None, batch_size: int = 16, preprocessed: Any = None,
               post: PostProcessing | None = None, difference_hu: np.ndarray | None = None,
               gate_hu: float | None = None) -> SegmentationResult:
    """Segment lesions in one ``nifti.CTVolume``.

    Args:
        ct: the CT (canonical, HU).
        model: from :func:`load_segmenter` (or any network with the segmenters' interface).
        preprocess: the checkpoint's preprocessing (default ``model.preprocess_config``).
        lung_mask: canonical ``(x, y, z)`` bool lung mask; computed when None.
        threshold: probability threshold in (0, 1) (default: the checkpoint's, ``model.threshold``, else 0.5).
        batch_size: slices per forward pass.
        preprocessed: an already computed ``PreprocessedVolume`` of ``ct`` with ``preprocess``.
        post: post-processing on the input grid (default ``PostProcessing()``; ``PLAIN`` for the
            paper's plain ``p > threshold`` inside the lung).
        difference_hu, gate_hu: the GAN's canonical difference map and the gate level in HU (see
            :func:`gan_gate`); without them there is no GAN-agreement gate.
    """
    from CovidGANSegLib.preprocessing import preprocess_ct

    if threshold is None:
        threshold = float(getattr(model, "threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if preprocess is None:
        preprocess = getattr(model, "preprocess_config", None)
        if preprocess is None:
            raise ValueError("give the PreprocessConfig the model was trained with")
    pv = preprocessed if preprocessed is not None else preprocess_ct(ct, preprocess, lung_mask=lung_mask)
    lung = np.asarray(lung_mask if lung_mask is not None else pv.lung_mask_canonical, dtype=bool)
    if lung.shape != ct.shape:
        raise ValueError(f"lung mask {lung.shape} does not match the CT grid {ct.shape}")
    prob_model = predict_slices(model, pv.image, batch_size=batch_size, progress_range=(0.45, 0.75))
    prob = pv.mapping.to_canonical(prob_model, order=1)  # (x, y, z), 0 outside the crop box
    np.clip(prob, 0.0, 1.0, out=prob)
    lesion = post_process(prob > threshold, np.asarray(ct.array), lung, tuple(ct.spacing), post if post is not None else PostProcessing(),
                          difference_hu=difference_hu, gate_hu=gate_hu)
    return SegmentationResult(probability=prob, lesion_mask=lesion, lung_mask=lung, probability_model=prob_model, preprocessed=pv,
                              threshold=float(threshold))


def _card(path: Path) -> dict[str, Any] | None:
    try:
        return read_model_card(path)
    except CheckpointError:
        return None


def _check_outputs(input: Path, outputs: dict[str, Path | None]) -> None:
    given = {k: Path(v) for k, v in outputs.items() if v is not None}
    for key, p in given.items():
        if key != "report" and not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
            raise InputError(f"--{key.replace('_', '-')} must be a NIfTI file name ending in .nii or .nii.gz", p)
        if key == "report" and p.suffix.lower() != ".json":
            raise InputError("--report must be a .json file name", p)
        if p.resolve() == input.resolve():
            raise InputError("an output would overwrite the input CT; choose another file name", p)
        if p.is_dir():
            raise InputError("output is a folder; give a file name", p)
    resolved = [p.resolve() for p in given.values()]
    if len(set(resolved)) != len(resolved):
        raise InputError("two outputs have the same file name", next(iter(given.values())))


def _preprocess_differences(a: PreprocessConfig, b: PreprocessConfig) -> list[str]:
    """Preprocessing fields that differ between the segmenter and the GAN, the model grid aside
    (the GAN may run on a coarser grid than the segmenter: its outputs go back to the CT's grid)."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]} vs {db[k]}" for k in da if k != "grid" and da[k] != db.get(k)]


def _integral_dtype(*arrays: np.ndarray) -> type:
    lim = np.iinfo(np.int16)
    for a in arrays:
        if not np.all(a == np.rint(a)) or a.min() < lim.min or a.max() > lim.max:
            return np.float32
    return np.int16


def segment_file(input: str | Path, *, seg: str | Path, output: str | Path, gan: str | Path | None = None, lungs: str | Path | None = None,
                 pseudo_healthy: str | Path | None = None, difference: str | Path | None = None, report: str | Path | None = None,
                 device: str = "auto", threshold: float | None = None, input_lungs: str | Path | None = None,
                 batch_size: int = 16, grow: bool = True, gan_gate_sigmas: float | None = None,
                 local_contrast: bool = True, thin_growth: bool = True, faint_components: bool = True,
                 small_dense: bool = True, detection_rim: bool = True) -> dict[str, Any]:
    """File to file: lesion mask (and optional outputs) on the input CT's own grid; returns the report.

    Args:
        input: CT NIfTI in HU (any slice count, spacing and orientation).
        seg: segmenter checkpoint (``model.pt`` of ``train-seg``).
        output: lesion mask NIfTI to write (uint8, 1 = lesion).
        gan: GAN checkpoint; needed for ``pseudo_healthy`` / ``difference``, and checked to share
            the segmenter's preprocessing.
        lungs: lung mask NIfTI to write (uint8).
        pseudo_healthy, difference: GAN outputs to write (HU; int16 for integral inputs).
        report: JSON report to write (the returned dict).
        device: ``auto``, ``cpu`` or ``cuda`` (CPU fallback with a warning when CUDA is missing).
        threshold: probability threshold (default: the checkpoint's, 0.5).
        input_lungs: a lung mask NIfTI on the input grid to use instead of computing one.
        grow: grow the detections into connected lesion-range density (:class:`PostProcessing`,
            step 5). Off, the mask is the detections alone: on the mild validation phantoms (CT-1)
            about twice as precise (0.33 against 0.18) but with lower Dice (0.19 against 0.21,
            five models), and extensive disease needs the growth (docs/ablation.md).
        gan_gate_sigmas: switch the GAN-agreement gate on with this k (needs ``gan``; off by
            default: on real anatomy it dropped most true mild lesions, docs/ablation.md "Mild lesions in
            real anatomy").
        local_contrast: drop components that are not at least ``PostProcessing.min_contrast_hu``
            denser than the lung around them (:class:`PostProcessing`, step 7; docs/ablation.md "Local
            contrast"). Off, faint ground glass in dense (dependent) lung is kept, and so are
            dependent density and partial volume along the pleura.
        thin_growth: limit mostly thin grown components (vessel trees) to their seeds and 3 mm
            around them (:class:`PostProcessing`, step 6; docs/ablation.md "Thin growth"). Off, a lesion that
            growth reached through a vessel is kept whole, and so are the vessel trees.
        faint_components: with growth, add the faint components of the rules alone (mean HU at most
            ``PostProcessing.faint_component_hu``) that the segmenter did not seed (:class:`PostProcessing`,
            step 8; docs/ablation.md "Faint components without a seed"). Off, only seeded components.
        small_dense: drop final components smaller than ``PostProcessing.small_dense_ml`` whose mean HU
            exceeds ``PostProcessing.small_dense_hu`` (:class:`PostProcessing`, step 9; docs/ablation.md
            "Small dense components"). Off, small dense nodules are kept, and so are vessel confluences.
        detection_rim: add the segmenter's detections within ``PostProcessing.detection_rim_mm`` of a final
            component at its edge (:class:`PostProcessing`, step 10; docs/ablation.md "The detections'
            rim"). Off, the edge the opening took from the detections stays out.

    Raises:
        InputError / CheckpointError: unreadable input, bad or mismatched checkpoints, bad output
            names; nothing is written then.
    """
    from CovidGANSegLib.atomic import atomic_path
    from CovidGANSegLib.lungmask import INFERENCE_Z_CLOSING_MM
    from CovidGANSegLib.nifti import load_ct, load_mask, save_like
    from CovidGANSegLib.preprocessing import preprocess_ct
    from CovidGANSegLib.quantify import quantify

    t0 = time.perf_counter()
    input, seg = Path(input), Path(seg)
    outputs = {"output": output, "lungs": lungs, "pseudo_healthy": pseudo_healthy, "difference": difference, "report": report}
    _check_outputs(input, outputs)
    if (pseudo_healthy is not None or difference is not None) and gan is None:
        raise InputError("--pseudo-healthy and --difference need the GAN checkpoint (--gan)", Path(pseudo_healthy or difference))
    if gan_gate_sigmas is not None and gan is None:
        raise InputError("the GAN-agreement gate (--gan-gate) needs the GAN checkpoint (--gan)", input)
    rule = PostProcessing(grow=grow, gan_gate_sigmas=gan_gate_sigmas,  # validates the settings before any work
                          min_contrast_hu=PostProcessing.min_contrast_hu if local_contrast else None,
                          min_thick_fraction=PostProcessing.min_thick_fraction if thin_growth else None,
                          faint_component_hu=PostProcessing.faint_component_hu if faint_components else None,
                          small_dense_hu=PostProcessing.small_dense_hu if small_dense else None,
                          detection_rim_mm=PostProcessing.detection_rim_mm if detection_rim else 0.0)
    dev = resolve_device(device)

    progress.report(0.0, "loading models")
    model, payload = load_segmenter(seg, dev)
    preprocess = model.preprocess_config
    thr = float(payload.get("threshold", 0.5) if threshold is None else threshold)
    if not 0.0 < thr < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {thr}")
    if threshold is None and chose_threshold_among_old_range(payload):
        choices = " or ".join(f"{t:g}" for t in THRESHOLDS)
        log.warning("%s: its probability threshold %.2g was chosen above %g by an earlier version; training now chooses %s, "
                    "which keeps the seeds of faint mild lesions (docs/ablation.md, \"The segmenters' threshold\"): "
                    "--threshold %g follows it", seg, thr, max(THRESHOLDS), choices, max(THRESHOLDS))
    generator = None
    if gan is not None:
        from CovidGANSegLib.gan.inference import load_generator, preprocess_config_of

        generator, gan_payload = load_generator(gan, dev)
        gan_pp = preprocess_config_of(gan_payload)
        diffs = _preprocess_differences(preprocess, gan_pp)
        if diffs:
            raise CheckpointError(f"the GAN ({gan}) and the segmenter were trained with different preprocessing ({'; '.join(diffs)}); "
                                  "use models from the same pipeline run", seg)

    progress.report(0.1, "reading CT")
    ct = load_ct(input)
    lung_in = load_mask(input_lungs, ct) if input_lungs is not None else None
    progress.report(0.2, "lung mask and preprocessing")
    pv = preprocess_ct(ct, preprocess, lung_mask=lung_in)
    lung = pv.lung_mask_canonical if lung_in is None else lung_in
    ph = gate = None
    # the GAN runs only where its result is used: the gate, or the pseudo-healthy / difference outputs
    if generator is not None and (rule.gan_gate_sigmas is not None or pseudo_healthy is not None or difference is not None):
        progress.report(0.3, "pseudo-healthy CT")
        ph, gate = gan_gate(ct, lung, generator, gan_payload, rule)
    result = segment_ct(ct, model, preprocess, lung_mask=lung, threshold=thr, batch_size=batch_size, preprocessed=pv, post=rule,
                        difference_hu=None if ph is None else ph.difference_hu, gate_hu=gate)

    progress.report(0.85, "quantifying")
    q = quantify(result.lesion_mask, lung, ct.spacing)
    seg_card, gan_card = _card(seg), (_card(Path(gan)) if gan is not None else None)
    demo = bool((seg_card or {}).get("demo") or (gan_card or {}).get("demo") or payload.get("metadata", {}).get("demo"))
    rep: dict[str, Any] = {
        "input": str(input),
        "shape": list(ct.original_shape),
        "spacing_mm": [float(s) for s in ct.spacing],
        **{k: q[k] for k in ("lesion_ml", "lung_ml", "percent_involved", "mosmed_category")},
        "quantification": q,
        "category_rule": "MosMed: CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 % of lung; "
                         f"below {q['ct0_max_percent']} % counts as CT-0",
        "threshold": thr,
        "post_processing": {**dataclasses.asdict(rule), "gan_gate_hu": gate},
        "lung_mask": ({"source": "computed", "z_closing_mm": INFERENCE_Z_CLOSING_MM} if lung_in is None else
                      {"source": str(input_lungs), "z_closing_mm": None}),
        "segmenter": {"checkpoint": str(seg), "arch": payload.get("arch"), "config": payload.get("config", {}).get("name"),
                      "demo": bool((seg_card or {}).get("demo", payload.get("metadata", {}).get("demo", False)))},
        "gan": None if gan is None else {"checkpoint": str(gan), "demo": bool((gan_card or {}).get("demo", False))},
        "outputs": {k: None if v is None else str(v) for k, v in outputs.items()},
        "device": dev,
        "demo_models": demo,
        "warning": "models trained on synthetic phantoms: demonstration only, not for clinical use" if demo else
                   "research use only, not for clinical use",
    }

    progress.report(0.9, "writing outputs")
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(v)) for k, v in outputs.items() if v is not None}
        save_like(result.lesion_mask.astype(np.uint8), ct, tmp["output"], dtype=np.uint8)
        if "lungs" in tmp:
            save_like(lung.astype(np.uint8), ct, tmp["lungs"], dtype=np.uint8)
        if ph is not None:
            dtype = _integral_dtype(ph.pseudo_healthy_hu, ph.difference_hu)
            if "pseudo_healthy" in tmp:
                save_like(ph.pseudo_healthy_hu, ct, tmp["pseudo_healthy"], dtype=dtype)
            if "difference" in tmp:
                save_like(ph.difference_hu, ct, tmp["difference"], dtype=dtype)
        rep["runtime_s"] = time.perf_counter() - t0
        if "report" in tmp:
            tmp["report"].write_text(json.dumps(rep, indent=2) + "\n")
    progress.report(1.0, "done")
    log.info("%s: %.1f mL lesion in %.1f mL lung (%.2f %%, %s)", input.name, q["lesion_ml"], q["lung_ml"], q["percent_involved"], q["mosmed_category"])
    return rep
