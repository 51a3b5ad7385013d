"""Models a user can pick: checkpoints with a model card, read without torch.

Each model is a checkpoint (``model.pt``) with a JSON card beside it (``model.pt.json``, written
by ``CovidGANSegLib.checkpoints.write_model_card``): name, kind (``gan`` or ``seg``),
architecture, configuration, training data, date, SHA-256, and whether it is a demonstration
model trained on synthetic phantoms. Checks here are the fast ones that give a clear message
before a child process is started; the child re-checks the checkpoint itself when it loads it.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

KIND_TITLES = {"gan": "pseudo-healthy GAN", "seg": "lesion segmenter"}
DEMO_WARNING = "DEMONSTRATION ONLY - trained on synthetic phantoms, not for clinical use"
RESEARCH_NOTE = "research use only, not for clinical use"

#: (path, size, mtime) -> verified SHA-256, so a checkpoint is hashed once per session
_verifiedHashes: dict[tuple[str, int, int], str] = {}


def findModels(folder: str | Path | None) -> list[dict[str, Any]]:
    """All model cards under ``folder`` (recursively), GANs first; [] for an empty or missing folder."""
    from CovidGANSegLib.checkpoints import find_models

    if not folder or not Path(folder).is_dir():
        return []
    return find_models(folder)


def isDemo(card: dict[str, Any]) -> bool:
    return bool(card.get("demo")) or "phantom" in str(card.get("trained_on", "")).lower()


def displayName(card: dict[str, Any]) -> str:
    """One line for a combo box: name, configuration, and a DEMO flag."""
    text = f"{card.get('name', '?')} ({card.get('arch', '?')}, {card.get('config_name', '?')})"
    return f"{text} [DEMO]" if isDemo(card) else text


def describe(card: dict[str, Any] | None) -> str:
    """Rich text for the module panel: the card's metadata, with the intended-use warning."""
    if not card:
        return "<i>No model selected. Choose a models folder that contains checkpoints with model cards (*.pt.json).</i>"
    e = html.escape
    rows = [
        ("Model", card.get("name", "?")),
        ("Kind", KIND_TITLES.get(card.get("kind", ""), card.get("kind", "?"))),
        ("Architecture", f"{card.get('arch', '?')} / configuration '{card.get('config_name', '?')}'"),
        ("Trained on", card.get("trained_on", "?")),
        ("Created", card.get("created", "?")),
        ("SHA-256", str(card.get("sha256", "?"))[:16] + "..."),
        ("File", card.get("checkpoint_path", "?")),
    ]
    body = "".join(f"<tr><td><b>{e(k)}</b></td><td>{e(str(v))}</td></tr>" for k, v in rows)
    if isDemo(card):
        warning = f'<p style="color:#c00000"><b>{e(DEMO_WARNING)}</b></p>'
    else:
        warning = f"<p><i>{e(card.get('intended_use', RESEARCH_NOTE))}</i></p>"
    return f"<table>{body}</table>{warning}"


def checkModel(checkpoint: str | Path | None, kind: str, *, verify: bool = True) -> dict[str, Any]:
    """The model card of ``checkpoint`` after checking it is a CovidGANSeg model of ``kind``.

    Raises ``ValueError`` with a message naming the file for: no checkpoint chosen, a missing
    file, a checkpoint without model card (a foreign ``.pt`` file), a card of the other kind
    (a segmenter chosen as GAN), and a SHA-256 that does not match the card (corrupt or replaced).
    """
    from CovidGANSegLib.checkpoints import model_card_path, read_model_card, sha256_file
    from CovidGANSegLib.errors import CheckpointError

    title = KIND_TITLES[kind]
    if not checkpoint or str(checkpoint) in (".", ""):
        raise ValueError(f"No {title} model is selected: choose a models folder and a {title}.")
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"{path}: {title} checkpoint not found")
    if not model_card_path(path).is_file():
        raise ValueError(f"{path}: not a CovidGANSeg model (no model card {model_card_path(path).name} beside it)")
    try:
        card = read_model_card(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc
    if card.get("kind") != kind:
        other = KIND_TITLES.get(card.get("kind"), card.get("kind"))
        raise ValueError(f"{path}: this is a {other} checkpoint; a {title} is needed here")
    if verify:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, int(stat.st_mtime_ns))
        if _verifiedHashes.get(key) != card["sha256"]:
            actual = sha256_file(path)
            if actual != card["sha256"]:
                raise ValueError(f"{path}: SHA-256 {actual[:12]}... does not match its model card ({card['sha256'][:12]}...): "
                                 "the file is corrupt or was replaced")
            _verifiedHashes[key] = actual
    return card


def defaultModelsFolder() -> Path:
    """Where models are looked for first: ``$COVIDGANSEG_MODELS`` or ``~/.covidganseg/models``."""
    return Path(os.environ.get("COVIDGANSEG_MODELS", Path.home() / ".covidganseg" / "models"))
