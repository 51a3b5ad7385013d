"""Checkpoints: atomic writes, safe loads, a format version, and a model card beside each model.

A checkpoint is a ``dict`` that ``torch.load(..., weights_only=True)`` can read (tensors, state
dicts, numbers, strings, lists, dicts)::

    {"format_version": 1, "kind": "gan" | "seg", "arch": "<architecture name>",
     "config": {...}, "metadata": {...}, ...state (model, optimisers, scheduler, iteration, rng)}

Inference models are also described by a JSON *model card* beside the checkpoint
(``model.pt`` -> ``model.pt.json``), which the Slicer module reads without importing torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from CovidGANSegLib.atomic import atomic_path
from CovidGANSegLib.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("gan", "seg")


def save_checkpoint(path: str | Path, *, kind: str, arch: str, config: dict[str, Any], metadata: dict[str, Any] | None = None, **state: Any) -> Path:
    """Write a checkpoint atomically: a kill at any moment leaves the previous file intact."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    payload = {"format_version": FORMAT_VERSION, "kind": kind, "arch": arch, "config": config, "metadata": dict(metadata or {}), **state}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, *, kind: str, arch: str | None = None, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format, kind and architecture.

    Raises:
        CheckpointError: missing, corrupt or truncated file; not a CovidGANSeg checkpoint; another
            format version, kind (GAN vs segmenter) or architecture.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    if path.stat().st_size == 0:
        raise CheckpointError("empty checkpoint file (0 bytes): an interrupted copy or download?", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(f"corrupt, truncated or unsafe checkpoint ({_first_line(exc)})", path) from exc
    if not isinstance(payload, dict) or "format_version" not in payload or "kind" not in payload:
        raise CheckpointError("not a CovidGANSeg checkpoint (no format_version / kind)", path)
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {payload['format_version']}, this version reads {FORMAT_VERSION}", path)
    if payload["kind"] != kind:
        raise CheckpointError(f"this is a {payload['kind']!r} checkpoint, a {kind!r} checkpoint is needed here", path)
    if arch is not None and payload.get("arch") != arch:
        raise CheckpointError(f"checkpoint architecture {payload.get('arch')!r} does not match {arch!r}", path)
    return payload


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), also for an empty message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".json")


def write_model_card(checkpoint: str | Path, *, name: str, kind: str, arch: str, config_name: str, config: dict[str, Any],
                     trained_on: str, demo: bool, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<checkpoint>.json``: what the model is, what it was trained on, and its SHA-256.

    ``demo`` marks models trained on the synthetic phantoms: demonstration only, not for clinical use.
    """
    card = {
        "name": name,
        "kind": kind,
        "arch": arch,
        "config_name": config_name,
        "config": config,
        "trained_on": trained_on,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "demo": bool(demo),
        "intended_use": "demonstration only, not for clinical use" if demo else "research use, not for clinical use",
        "format_version": FORMAT_VERSION,
        "checkpoint": Path(checkpoint).name,
        "sha256": sha256_file(checkpoint),
        **(extra or {}),
    }
    out = model_card_path(checkpoint)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return out


def read_model_card(checkpoint_or_card: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """Read a model card (no torch needed); with ``verify`` check the checkpoint's SHA-256."""
    p = Path(checkpoint_or_card)
    card_path = p if p.suffix == ".json" else model_card_path(p)
    if not card_path.is_file():
        raise CheckpointError("model card not found", card_path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable model card ({_first_line(exc)})", card_path) from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"unreadable model card (a JSON object is needed, got {type(card).__name__})", card_path)
    missing = {"name", "kind", "arch", "sha256", "checkpoint"} - set(card)
    if missing:
        raise CheckpointError(f"model card lacks {sorted(missing)}", card_path)
    bad = [k for k in ("name", "kind", "arch", "sha256", "checkpoint") if not isinstance(card[k], str)]
    if bad or Path(card["checkpoint"]).name != card["checkpoint"] or card["checkpoint"] in ("", ".", ".."):
        raise CheckpointError(f"unreadable model card (bad {', '.join(bad) or 'checkpoint'} entry)", card_path)
    card["checkpoint_path"] = str(card_path.with_name(card["checkpoint"]))
    if verify:
        _check_sha256(Path(card["checkpoint_path"]), card["sha256"], card_path)
    return card


def _check_sha256(checkpoint: Path, expected: str, card_path: Path) -> None:
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint file not found (its model card {card_path.name} is there)", checkpoint)
    try:
        actual = sha256_file(checkpoint)
    except OSError as exc:
        raise CheckpointError(f"unreadable checkpoint ({_first_line(exc)})", checkpoint) from exc
    if actual != expected.lower():
        raise CheckpointError(
            f"SHA-256 mismatch: the file's is {actual[:12]}..., its model card {card_path.name} says {expected[:12]}...; "
            "the checkpoint is corrupt or was changed, refusing to use it",
            checkpoint,
        )


def verify_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Check a checkpoint against the SHA-256 of its model card (``<path>.json``) before it is loaded.

    Hashing costs about a second per GB, little next to inference, and catches a corrupt or
    changed file (one flipped byte in a weight loads silently and changes every result).

    Returns:
        The model card, or None when the checkpoint has no card (e.g. ``checkpoints/last.pt``);
        then nothing can be verified and a warning is logged.

    Raises:
        CheckpointError: missing or empty checkpoint, unreadable card, or a SHA-256 mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found" if not path.exists() else "not a file", path)
    if path.stat().st_size == 0:
        raise CheckpointError("empty checkpoint file (0 bytes): an interrupted copy or download?", path)
    card_path = model_card_path(path)
    if not card_path.exists():
        log.warning("%s: no model card (%s); the checkpoint's SHA-256 cannot be verified", path, card_path.name)
        return None
    card = read_model_card(card_path)
    _check_sha256(path, card["sha256"], card_path)
    return card


def find_models(folder: str | Path, *, problems: list[CheckpointError] | None = None) -> list[dict[str, Any]]:
    """All readable model cards in ``folder`` (recursively), sorted by kind and name.

    Unreadable cards are skipped; pass a list as ``problems`` to receive one ``CheckpointError``
    (naming the card) for each.
    """
    cards = []
    for card_path in sorted(Path(folder).rglob("*.pt.json")):
        try:
            cards.append(read_model_card(card_path))
        except CheckpointError as exc:
            log.debug("skipping %s", exc)
            if problems is not None:
                problems.append(exc)
    return sorted(cards, key=lambda c: (str(c["kind"]), str(c["name"])))
