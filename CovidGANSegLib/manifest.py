"""Stage manifests: what a stage of a training run was made from and what it produced.

Each stage folder of ``covidganseg train`` (``RUN/preprocessed``, ``RUN/gan``, ``RUN/pseudo_masks``,
``RUN/seg_<model>``) ends with ``manifest.json``, written atomically after its outputs::

    {"format": "covidganseg-stage-manifest", "version": 1, "stage": "gan", "status": "complete",
     "plan_hash": <SHA-256 of the whole plan>, "stage_hash": <SHA-256 of the plan sections the stage
     depends on>, "plan": {those sections}, "inputs": {...}, "outputs": {...},
     "provenance": {"phantoms": true, "trained_on": "synthetic phantoms (cohort.json ...)", ...},
     "library_version": "0.1.0", "created": "<UTC time>"}

Inputs are the upstream stages' output digests (SHA-256 of their files) or, for the raw data set, a
fingerprint of its study files (relative path, size and modification time, as the preprocessing
cache uses: hashing a 20 GB data set on every run would cost minutes). Outputs carry SHA-256 and
size. A stage is skipped when its manifest is complete, has the same stage hash and inputs, and
its outputs are there with their recorded sizes. Readers (e.g. whether a model was trained on
phantoms) read the manifest's ``provenance`` instead of guessing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from CovidGANSegLib.atomic import atomic_path
from CovidGANSegLib.checkpoints import sha256_file

FORMAT = "covidganseg-stage-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"
#: files that are not results (figures are redrawn; the lock and manifest describe the stage)
_SKIPPED_SUFFIXES = (".png",)


def file_entry(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "size"}`` of one file (path relative to ``root`` when given)."""
    path = Path(path)
    rel = path.relative_to(root).as_posix() if root is not None else path.name
    return {"path": rel, "sha256": sha256_file(path), "size": path.stat().st_size}


def folder_digest(folder: str | Path) -> dict[str, Any]:
    """SHA-256 over the files of a folder (names and contents; hidden files and figures excluded)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and p.name != MANIFEST_NAME and not p.name.endswith(_SKIPPED_SUFFIXES))
    digest = hashlib.sha256()
    total = 0
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode("utf-8") + b"\0" + sha256_file(p).encode("ascii") + b"\n")
        total += p.stat().st_size
    return {"sha256": digest.hexdigest(), "files": len(files), "size": total}


def data_fingerprint(data: str | Path) -> dict[str, Any]:
    """A cheap fingerprint of a raw data set's studies (never its lesion masks): SHA-256 over their
    paths, sizes and modification times."""
    from CovidGANSegLib.datasets import discover_studies

    data = Path(data)
    digest = hashlib.sha256()
    studies = sorted(discover_studies(data, min_slices=1), key=lambda s: s.path.as_posix())
    for study in studies:
        st = study.path.stat()
        digest.update(f"{study.path.relative_to(data).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return {"path": str(data.resolve()), "fingerprint": digest.hexdigest(), "files": len(studies),
            "method": "path, size and modification time of each study file"}


def provenance(data: str | Path) -> dict[str, Any]:
    """Where the training data came from: phantoms (from the data's ``cohort.json``) or a real data set."""
    data = Path(data)
    cohort_path = data / "cohort.json"
    cohort = None
    if cohort_path.is_file():
        try:
            cohort = json.loads(cohort_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cohort = None
    from CovidGANSegLib.synth.phantoms import GENERATOR

    if isinstance(cohort, dict) and cohort.get("generator") == GENERATOR:
        summary = {k: cohort[k] for k in ("generator", "generator_version", "seed", "size", "lesion_model", "healthy", "covid")
                   if k in cohort}
        return {"phantoms": True, "trained_on": f"synthetic phantoms ({cohort_path})", "cohort": summary, "data": str(data.resolve())}
    return {"phantoms": False, "trained_on": str(data.resolve()), "cohort": None, "data": str(data.resolve())}


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    """A stage's manifest, or None when it has none (or an unreadable one: the stage is redone)."""
    path = Path(stage_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


def write_manifest(stage_dir: str | Path, *, stage: str, status: str, plan_hash: str, stage_hash: str, plan: dict[str, Any],
                   inputs: dict[str, Any], outputs: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``<stage_dir>/manifest.json`` atomically (``status``: ``running`` or ``complete``)."""
    from CovidGANSegLib import __version__

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "stage": stage,
        "status": status,
        "plan_hash": plan_hash,
        "stage_hash": stage_hash,
        "plan": plan,
        "inputs": inputs,
        "outputs": outputs or {},
        "provenance": provenance or {},
        "library_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    path = Path(stage_dir) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def outputs_present(stage_dir: str | Path, outputs: dict[str, Any]) -> bool:
    """Whether every recorded output file exists with its recorded size."""
    stage_dir = Path(stage_dir)
    for entry in outputs.values():
        if not isinstance(entry, dict) or "path" not in entry:
            continue
        p = stage_dir / entry["path"]
        if entry.get("kind") == "folder":
            if not p.is_dir():
                return False
            continue
        if not p.is_file() or ("size" in entry and p.stat().st_size != entry["size"]):
            return False
    return True


def is_complete(stage_dir: str | Path, stage_hash: str, inputs: dict[str, Any]) -> bool:
    """Whether the stage can be skipped: complete manifest, same plan sections and inputs, outputs there."""
    manifest = read_manifest(stage_dir)
    return (manifest is not None and manifest.get("status") == "complete" and manifest.get("stage_hash") == stage_hash
            and manifest.get("inputs") == json.loads(json.dumps(inputs)) and outputs_present(stage_dir, manifest.get("outputs", {})))


def plan_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two plan dicts (``section.key``)."""
    keys = sorted(set(old) | set(new))
    diffs: list[str] = []
    for k in keys:
        name = f"{prefix}.{k}" if prefix else k
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += plan_differences(a, b, name)
        elif a != b:
            diffs.append(name)
    return diffs
