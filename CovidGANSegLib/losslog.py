"""The training loss log (``RUN/losses.csv``) shared by the GAN and segmenter trainers.

Rows are appended as training goes; on ``--resume`` the rows logged after the checkpoint (a killed
run may have logged more) are dropped atomically, so the log always matches the checkpoint.
When the optional ``tensorboard`` package is installed, every logged value is also written as a
TensorBoard scalar to ``RUN/tensorboard/`` (``tensorboard --logdir RUN``); it is never required.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from CovidGANSegLib.atomic import atomic_path

_WRITERS: dict[Path, Any] = {}


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def read_losses(path: Path) -> list[dict[str, str]]:
    """All rows as read (strings; an empty string where a value was not logged)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [dict(row) for row in csv.DictReader(fh)]


def append_losses(path: Path, row: dict[str, Any], columns: Sequence[str]) -> None:
    """Append one row (floats with 6 significant digits; None / NaN left empty)."""
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    _tensorboard(path.parent, row)


def _tensorboard(run_dir: Path, row: dict[str, Any]) -> None:
    """Mirror a row's numbers as TensorBoard scalars (step = ``iteration``) when tensorboard is installed."""
    writer = _WRITERS.get(run_dir)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        writer = _WRITERS[run_dir] = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    step = int(row.get("iteration") or 0)
    for key, value in row.items():
        if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(key, float(value), step)
    writer.flush()


def truncate_losses(path: Path, last_iteration: int, columns: Sequence[str]) -> None:
    """Drop the rows logged after ``last_iteration`` (atomic rewrite)."""
    rows = [r for r in read_losses(path) if int(float(r["iteration"])) <= last_iteration]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in columns} for r in rows)
